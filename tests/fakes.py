"""Hand-built stand-ins for fairseq models and tasks used by the unit tests."""

import torch
from fairseq.data import Dictionary


def make_dictionary(n_words):
    """A fairseq dictionary with the 4 special symbols and ``n_words`` words."""
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return d


class FakeModel(torch.nn.Module):
    """A "model" whose logits are a free parameter of shape B x T x V.

    Its (log-)probabilities keep the logits' dtype (float64, float32, or
    half precision for the mixed-precision tests) unless ``lprobs_dtype``
    names another one (fairseq's models return float32).
    """

    def __init__(self, logits, lprobs_dtype=None):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.lprobs_dtype = lprobs_dtype

    def forward(self, **net_input):
        return self.logits, {"attn": None}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        logits = net_output[0]
        if self.lprobs_dtype is not None:
            logits = logits.to(self.lprobs_dtype)
        if log_probs:
            return torch.log_softmax(logits, dim=-1)
        return torch.softmax(logits, dim=-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


class FakeTask:
    """Just what a criterion needs from a task."""

    def __init__(self, dictionary, has_teacher=True):
        self.source_dictionary = dictionary
        self.target_dictionary = dictionary
        self.has_teacher = has_teacher


def make_sample(target, pad, teacher_lprobs=None, teacher_indices=None):
    """A fairseq-style sample around ``target`` (B x T, padded with ``pad``)."""
    sample = {
        "net_input": {"src_tokens": target.clone()},
        "target": target,
        "ntokens": int(target.ne(pad).sum()),
    }
    if teacher_lprobs is not None:
        sample["teacher"] = {"lprobs": teacher_lprobs}
        if teacher_indices is not None:
            sample["teacher"]["indices"] = teacher_indices
    return sample
