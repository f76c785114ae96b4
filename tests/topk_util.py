"""Helpers for the top-k store tests: dumps, tasks and per-sentence references."""

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_kd import dump_topk
from fairseq_kd.checkpoints import load_teacher_ensemble, teacher_log_probs


def dump(data, teacher, output, *flags):
    """Run ``fairseq-kd-dump-topk`` in this process; return its statistics."""
    argv = [data, "--path", teacher, "--output", output, "--cpu"]
    argv += ["--no-progress-bar", *flags]
    return dump_topk.dump(dump_topk.parse(argv))


def dump_argv(data, teacher, output, *flags):
    """The command line of the same dump, for a subprocess."""
    argv = ["fairseq-kd-dump-topk", data, "--path", teacher, "--output", output]
    return argv + ["--cpu", "--no-progress-bar", *flags]


def make_task(data, *flags):
    """A ``translation_kd`` task and its config, parsed like ``fairseq-train``."""
    parser = options.get_training_parser()
    argv = [data, "--task", "translation_kd", "--arch", "transformer", "--cpu"]
    args = options.parse_args_and_arch(parser, input_args=argv + list(flags))
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task), cfg


class SentenceReference:
    """The teacher's log-probabilities of each sentence, computed independently.

    Sentences are forwarded in small groups of consecutive ids (``group=1``:
    alone), never in the dump's length-sorted batches.

    Args:
        teacher_path: the teacher checkpoint.
        task: a task with the teacher's dictionaries.
        dataset: the split's ``LanguagePairDataset``.
        group: sentences per forward pass.
    """

    def __init__(self, teacher_path, task, dataset, group=1):
        self.teachers = load_teacher_ensemble(teacher_path, task)
        self.dataset = dataset
        self.pad = dataset.tgt_dict.pad()
        self.group = group
        self.cache = {}

    def __call__(self, i):
        """``L x V`` log-probabilities of sentence ``i`` (target positions)."""
        if i not in self.cache:
            first = i - i % self.group
            ids = range(first, min(first + self.group, len(self.dataset)))
            sample = self.dataset.collater([self.dataset[j] for j in ids])
            lprobs = teacher_log_probs(self.teachers, sample["net_input"])  # B x T x V
            mask = sample["target"].ne(self.pad)  # B x T
            for row, j in enumerate(sample["id"].tolist()):
                self.cache[j] = lprobs[row][mask[row]]  # L x V
        return self.cache[i]


def assert_entries_match(lprobs, indices, reference, atol=4e-3):
    """Check stored top-k entries (``L x k``) against full log-probabilities.

    The stored log-probabilities must equal the reference at the stored ids,
    and no id outside them may be more probable than the last one kept.
    """
    lprobs, indices = lprobs.float(), indices.long()
    assert lprobs.shape == indices.shape and lprobs.size(0) == reference.size(0)
    at_ids = reference.gather(-1, indices)  # L x k
    tol = atol + 2e-3 * at_ids.abs()
    assert ((at_ids - lprobs).abs() <= tol).all(), (at_ids - lprobs).abs().max()
    kth = reference.topk(indices.size(-1), dim=-1).values[:, -1]  # L
    assert (at_ids.min(-1).values >= kth - tol.max(-1).values).all()
    assert torch.all(lprobs[:, :-1] >= lprobs[:, 1:]), "entries not sorted"


def reversed_dictionary_data(text_dir, data_bin, dest):
    """The corpus binarized with the same number of symbols in another order.

    The non-special symbols of ``data_bin``'s joined dictionary are written in
    reverse order, so sizes agree and ids do not.

    Args:
        text_dir: the corpus text folder.
        data_bin: the folder binarized with the teacher's dictionary.
        dest: the new folder.
    """
    import os

    from corpus import binarize

    with open(os.path.join(data_bin, "dict.src.txt")) as f:
        lines = f.readlines()
    os.makedirs(dest, exist_ok=True)
    reversed_dict = os.path.join(dest, "reversed.txt")
    with open(reversed_dict, "w") as f:
        f.writelines(lines[::-1])
    flags = ["--srcdict", reversed_dict, "--tgtdict", reversed_dict]
    return binarize(text_dir, dest, flags)


def teacher_with_data(teacher, dest, data):
    """A copy of ``teacher`` whose config names another data folder.

    Args:
        teacher: the checkpoint.
        dest: the copy's path.
        data: the ``task.data`` the copy names.
    """
    state = torch.load(teacher, map_location="cpu", weights_only=False)
    state["cfg"]["task"]["data"] = data
    torch.save(state, dest)
    return dest


def train_short_teacher(data, save):
    """A teacher with learned positional tables of 8 positions (3 updates).

    Args:
        data: the binarized corpus (sentences up to 10 tokens).
        save: its checkpoint folder.
    """
    import os

    from corpus import train

    short = ["--max-source-positions", "8", "--max-target-positions", "8"]
    short += ["--encoder-learned-pos", "--decoder-learned-pos"]
    train(data, save, short + ["--skip-invalid-size-inputs-valid-test"], updates=3)
    return os.path.join(save, "checkpoint_last.pt")
