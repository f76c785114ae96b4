"""Unit tests of the word-level KD math on hand-built distributions."""

import math

import numpy as np
import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
)
from fakes import FakeModel, FakeTask, make_dictionary, make_sample

from fairseq_kd.checkpoints import teacher_log_probs
from fairseq_kd.criterions.word_kd import WordKDCriterion
from fairseq_kd.losses import (
    forward_kl,
    kl_terms,
    restrict_topk,
    word_kd_divergence,
)

V_WORDS = 12  # + 4 special symbols


@pytest.fixture
def setup():
    torch.manual_seed(0)
    d = make_dictionary(V_WORDS)
    V, pad = len(d), d.pad()
    target = torch.tensor([[5, 6, 7, 2], [8, 9, 2, pad], [10, 2, pad, pad]])
    student_logits = torch.randn(3, 4, V) * 2
    teacher_lprobs = torch.log_softmax(torch.randn(3, 4, V) * 3, dim=-1)
    return d, target, student_logits, teacher_lprobs


def np_softmax(x, T=1.0):
    z = x / T
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def reference_kd(student_logits, teacher_lprobs, target, pad, T, topk):
    """Independent numpy computation of sum_t KL(q_T || p_T)."""
    s = student_logits.detach().double().numpy()
    t = teacher_lprobs.detach().double().numpy()
    total = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if target[b, i] == pad:
                continue
            p = np_softmax(s[b, i], T)
            probs_t1 = np.exp(t[b, i])
            if topk:
                keep = np.argsort(-probs_t1, kind="stable")[:topk]
            else:
                keep = np.arange(len(probs_t1))
            # teacher at temperature T restricted to `keep`, renormalised
            qt = probs_t1[keep] ** (1.0 / T)
            qt = qt / qt.sum()
            total += float(np.sum(qt * (np.log(qt) - np.log(p[keep]))))
    return total


def criterion(task, alpha, T=1.0, topk=0, eps=0.0, sentence_avg=False):
    return WordKDCriterion(
        task,
        sentence_avg,
        eps,
        kd_alpha=alpha,
        kd_temperature=T,
        kd_topk=topk,
    )


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("topk", [0, 1, 3, 15])  # vocabulary: 16
def test_kd_term_matches_independent_reference(setup, T, topk):
    d, target, logits, teacher = setup
    crit = criterion(FakeTask(d), alpha=1.0, T=T, topk=topk)
    model = FakeModel(logits)
    sample = make_sample(target, d.pad(), teacher)
    loss, _, log = crit(model, sample)
    ref = reference_kd(logits, teacher, target, d.pad(), T, topk)
    assert float(log["kd_loss"]) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # alpha = 1, epsilon = 0: the loss is exactly T^2 times the KL term
    assert float(loss) == pytest.approx(T * T * ref, rel=1e-5)


def test_alpha_zero_equals_label_smoothed_cross_entropy(setup):
    d, target, logits, teacher = setup
    for eps in (0.0, 0.1):
        ls = LabelSmoothedCrossEntropyCriterion(FakeTask(d), False, eps)
        kd = criterion(FakeTask(d), alpha=0.0, T=2.0, eps=eps)
        m1, m2 = FakeModel(logits), FakeModel(logits)
        l1, n1, log1 = ls(m1, make_sample(target, d.pad()))
        l2, n2, log2 = kd(m2, make_sample(target, d.pad(), teacher))
        assert torch.equal(l1, l2) and n1 == n2
        assert torch.equal(log1["nll_loss"], log2["nll_loss"])
        l1.backward()
        l2.backward()
        assert torch.equal(m1.logits.grad, m2.logits.grad)
        assert log2["kd_loss"] > 0  # still logged, for monitoring


def test_mixture_weights(setup):
    d, target, logits, teacher = setup
    sample = make_sample(target, d.pad(), teacher)
    ls = LabelSmoothedCrossEntropyCriterion(FakeTask(d), False, 0.1)
    ls_loss, _, _ = ls(FakeModel(logits), make_sample(target, d.pad()))
    loss, _, log = criterion(FakeTask(d), alpha=0.3, T=2.0, eps=0.1)(
        FakeModel(logits), sample
    )
    expected = 0.7 * ls_loss + 0.3 * 4.0 * log["kd_loss"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_padding_changes_nothing(setup):
    d, target, logits, teacher = setup
    pad = d.pad()
    crit = criterion(FakeTask(d), alpha=0.5, T=2.0, topk=3, eps=0.1)
    loss, size, log = crit(FakeModel(logits), make_sample(target, pad, teacher))
    # two more padded positions holding arbitrary student and teacher values
    target2 = torch.cat([target, torch.full((3, 2), pad)], dim=1)
    logits2 = torch.cat([logits, torch.randn(3, 2, logits.size(-1)) * 5], dim=1)
    teacher2 = torch.cat(
        [teacher, torch.log_softmax(torch.randn(3, 2, logits.size(-1)), -1)], dim=1
    )
    loss2, size2, log2 = crit(FakeModel(logits2), make_sample(target2, pad, teacher2))
    assert size == size2
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert float(log2["kd_loss"]) == pytest.approx(float(log["kd_loss"]), rel=1e-6)


def test_kl_is_zero_for_identical_distributions(setup):
    d, target, logits, _ = setup
    teacher = torch.log_softmax(logits, dim=-1)
    for T in (1.0, 3.0):
        crit = criterion(FakeTask(d), alpha=1.0, T=T)
        _, _, log = crit(FakeModel(logits), make_sample(target, d.pad(), teacher))
        assert abs(float(log["kd_loss"])) < 1e-5


def test_topk_zero_when_student_is_the_restricted_teacher():
    teacher = torch.log_softmax(torch.randn(5, 9, dtype=torch.double), -1)
    values, idx = restrict_topk(teacher, None, 3)
    q = torch.log_softmax(values, -1)
    student = torch.full_like(teacher, -1e9).scatter(-1, idx, q)
    assert forward_kl(q, student, idx).abs().max() < 1e-9


def test_topk_renormalises_per_position_not_per_batch():
    # two positions with very different mass in their top-2
    teacher = torch.log(
        torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    ).double()
    values, idx = restrict_topk(teacher, None, 2)
    q = torch.softmax(values, -1)
    assert torch.allclose(q.sum(-1), torch.ones(2, dtype=torch.double))
    assert torch.allclose(q[0], torch.tensor([0.625, 0.375], dtype=torch.double))
    assert idx[1].tolist() == [3, 2]
    assert torch.allclose(q[1], torch.tensor([0.8 / 0.9, 0.1 / 0.9]).double())


def test_topk_of_a_stored_support_maps_back_to_vocabulary_ids():
    lprobs = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    indices = torch.tensor([[7, 2, 9]])
    values, idx = restrict_topk(lprobs, indices, 2)
    assert idx.tolist() == [[7, 2]]
    with pytest.raises(ValueError, match="--kd-topk 4"):
        restrict_topk(lprobs, indices, 4)


@pytest.mark.parametrize("T,topk", [(1.0, 0), (2.0, 0), (2.0, 3)])
def test_gradient_matches_finite_differences(T, topk):
    torch.manual_seed(1)
    student = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(4, 7, dtype=torch.double), -1)
    target = torch.tensor([3, 4, 1, 5])  # position 2 is padding (index 1)

    def f(logits):
        lp = torch.log_softmax(logits / T, -1)
        return word_kd_divergence(
            lp.double(), teacher, target, T, topk=topk, ignore_index=1
        ).double()

    assert torch.autograd.gradcheck(f, (student,))
    # and the gradient of KL(q||softmax(z)) wrt z over a full vocabulary is p - q
    if topk == 0 and T == 1.0:
        f(student).backward()
        expected = torch.softmax(student, -1) - teacher.exp()
        expected[2] = 0
        assert torch.allclose(student.grad, expected.detach(), atol=1e-10)


def test_ensemble_averages_probabilities():
    torch.manual_seed(2)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    models = [FakeModel(a).eval(), FakeModel(b).eval()]
    lp = teacher_log_probs(models, {"src_tokens": None})
    expected = torch.log((torch.softmax(a, -1) + torch.softmax(b, -1)) / 2)
    assert torch.allclose(lp, expected, atol=1e-6)
    assert lp.dtype == torch.float32


def test_reduce_metrics_kd_loss_in_base_2_per_token(monkeypatch):
    logged = {}
    from fairseq.logging import metrics

    def fake_log_scalar(key, value, weight=1, round=None, **kw):
        logged[key] = value

    monkeypatch.setattr(metrics, "log_scalar", fake_log_scalar)
    monkeypatch.setattr(metrics, "log_derived", lambda *a, **k: None)
    logs = [
        {"loss": 4.0, "nll_loss": 3.0, "kd_loss": 2.0, "ntokens": 4, "sample_size": 4},
        {"loss": 4.0, "nll_loss": 3.0, "kd_loss": 1.0, "ntokens": 2, "sample_size": 2},
    ]
    WordKDCriterion.reduce_metrics(logs)
    assert logged["kd_loss"] == pytest.approx(3.0 / 6 / math.log(2))
    assert logged["nll_loss"] == pytest.approx(6.0 / 6 / math.log(2))


@pytest.mark.parametrize("T,topk", [(1.0, 0), (2.0, 0), (2.0, 3)])
def test_sentence_avg_sample_size(setup, T, topk):
    """--sentence-avg changes the sample size only; fairseq divides by it."""
    from fairseq.logging import metrics

    d, target, logits, teacher = setup
    sample = make_sample(target, d.pad(), teacher)
    results = {}
    for sentence_avg in (False, True):
        crit = criterion(
            FakeTask(d), alpha=0.5, T=T, topk=topk, eps=0.1, sentence_avg=sentence_avg
        )
        model = FakeModel(logits)
        loss, size, log = crit(model, sample)
        (loss / size).backward()  # what fairseq's optimizer step sees
        with metrics.aggregate(new_root=True) as agg:
            WordKDCriterion.reduce_metrics([log])
            logged = agg.get_smoothed_values()
        results[sentence_avg] = (loss, size, log, model.logits.grad, logged)
    (l_tok, n_tok, log_tok, g_tok, m_tok), (l_snt, n_snt, log_snt, g_snt, m_snt) = (
        results[False],
        results[True],
    )
    assert n_tok == int(target.ne(d.pad()).sum()) == 9 and n_snt == 3
    assert torch.equal(l_tok, l_snt)
    for key in ("nll_loss", "kd_loss"):
        assert torch.equal(log_tok[key], log_snt[key])
    # gradients scale with the sample size, nothing else changes
    assert torch.allclose(g_snt, g_tok * n_tok / n_snt, rtol=1e-5, atol=1e-7)
    # fairseq logs the loss per sample-size unit, nll and kd per token
    assert m_snt["loss"] == pytest.approx(float(l_tok) / 3 / math.log(2), abs=1e-3)
    assert m_tok["loss"] == pytest.approx(float(l_tok) / 9 / math.log(2), abs=1e-3)
    for key in ("nll_loss", "kd_loss"):
        assert m_snt[key] == pytest.approx(m_tok[key])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kd_alpha": -0.1}, "--kd-alpha"),
        ({"kd_alpha": 1.5}, "--kd-alpha"),
        ({"kd_temperature": 0.0}, "--kd-temperature"),
        ({"kd_temperature": -1.0}, "--kd-temperature"),
        ({"kd_topk": -2}, "--kd-topk"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
    ],
)
def test_invalid_options_are_refused(kwargs, message):
    d = make_dictionary(4)
    args = {"kd_alpha": 0.5, "kd_temperature": 1.0, "kd_topk": 0}
    eps = kwargs.pop("label_smoothing", 0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        WordKDCriterion(FakeTask(d), False, eps, **args)


def test_kd_without_teacher_is_refused():
    d = make_dictionary(4)
    with pytest.raises(ValueError, match="needs a teacher"):
        WordKDCriterion(FakeTask(d, has_teacher=False), False, 0.1, kd_alpha=0.5)
    # alpha = 0 is plain label-smoothed cross-entropy: no teacher needed
    WordKDCriterion(FakeTask(d, has_teacher=False), False, 0.1, kd_alpha=0.0)


def test_kl_terms_are_zero_where_the_first_distribution_has_no_mass():
    log_a = torch.tensor([[0.0, float("-inf")], [math.log(0.25), math.log(0.75)]])
    # row 0: where a = 0, log a - log b is -inf - (-inf) = nan; the term is 0
    log_b = torch.tensor([[0.0, float("-inf")], [math.log(0.5), math.log(0.5)]])
    terms = kl_terms(log_a, log_b)
    assert torch.isfinite(terms).all() and terms[0].tolist() == [0.0, 0.0]
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert terms[1].sum().item() == pytest.approx(expected, abs=1e-7)


def test_teacher_distributions_must_cover_the_target_positions():
    from fairseq_kd.criterions.word_kd import check_teacher_positions

    target = torch.zeros(2, 5, dtype=torch.long)
    check_teacher_positions(torch.zeros(2, 5, 8), target)
    with pytest.raises(RuntimeError, match=r"cover \(2, 4\) positions .* \(2, 5\)"):
        check_teacher_positions(torch.zeros(2, 4, 8), target)


# --------------------------------------------------------------------------
# the reworked KD term against the pre-issue-10 implementation


def _reference_case(seed, lengths, V, support):
    """Target, student logits and teacher (full and top-``support``) for a batch."""
    g = torch.Generator().manual_seed(seed)
    pad = 1
    target = torch.full((len(lengths), max(lengths)), pad)
    for b, n in enumerate(lengths):
        target[b, :n] = torch.randint(4, V, (n,), generator=g)
    logits = torch.randn(len(lengths), max(lengths), V, generator=g) * 2
    full = torch.log_softmax(torch.randn(logits.shape, generator=g) * 3, dim=-1)
    values, indices = full.topk(support, dim=-1)
    perm = torch.randperm(support, generator=g)  # a store's arbitrary order
    return target, logits, full, values[..., perm], indices[..., perm]


REFERENCE_TABLE = [
    (divergence, T, teacher, topk, selection, prefix)
    for divergence in ("forward_kl", "reverse_kl", "js")
    for T in (1.0, 2.0)
    for teacher in ("full", "store")
    for topk in (0, 5)
    for selection in ("none", "batch", "global")
    for prefix in (0, 1)
]


@pytest.mark.parametrize("divergence,T,teacher,topk,selection,prefix", REFERENCE_TABLE)
def test_criterion_equals_the_pre_rework_implementation(
    divergence, T, teacher, topk, selection, prefix
):
    """Values, logged counts and gradients equal the old criterion's.

    Three training steps of different batch shapes (the global queue carries
    over), then one evaluation step; every batch has padding.
    """
    from kd_reference import ReferenceWordKD

    d = make_dictionary(V_WORDS + 4)
    V = len(d)
    options = dict(
        kd_alpha=0.6,
        kd_temperature=T,
        kd_topk=topk,
        ignore_prefix_size=prefix,
        kd_divergence=divergence,
        kd_selection=selection,
        kd_selection_ratio=0.4,
        kd_selection_queue_size=12,
    )
    new = WordKDCriterion(FakeTask(d), False, 0.1, **options)
    plain = WordKDCriterion(FakeTask(d), False, 0.1, **options)
    plain.share_gather = False  # the two-term path, not the fused ones
    old = ReferenceWordKD(FakeTask(d), False, 0.1, **options)
    batches = [(5, 3), (6, 2, 4), (2, 7), (4, 4, 1)]
    for step, lengths in enumerate(batches):
        if step == len(batches) - 1:
            new.eval(), plain.eval(), old.eval()
        target, logits, full, values, indices = _reference_case(step, lengths, V, 8)
        results = []
        for crit in (new, plain, old):
            if teacher == "full":
                sample = make_sample(target, d.pad(), full.clone())
            else:
                sample = make_sample(target, d.pad(), values.clone(), indices.clone())
            model = FakeModel(logits)
            loss, size, log = crit(model, sample)
            loss.backward()
            results.append((loss, size, log, model.logits.grad))
        for result in results[:-1]:
            _assert_same_step(result, results[-1], selection)
    if selection == "global":
        assert torch.allclose(new.selection_history, old.history)
        assert torch.allclose(plain.selection_history, old.history)


def _assert_same_step(new, old, selection):
    """One step's loss, sample size, logs and gradient agree (float32 tolerance)."""
    (l1, s1, log1, g1), (l2, s2, log2, g2) = new, old
    assert s1 == s2
    assert float(l1) == pytest.approx(float(l2), rel=1e-5, abs=1e-5)
    for key in ("nll_loss", "kd_loss"):
        assert float(log1[key]) == pytest.approx(float(log2[key]), rel=1e-5, abs=1e-5)
    if selection != "none":
        assert int(log1["kd_selected"]) == int(log2["kd_selected"])
        assert int(log1["kd_tokens"]) == int(log2["kd_tokens"])
    assert float(log2["kd_loss"]) > 0
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6), (g1 - g2).abs().max()


# --------------------------------------------------------------------------
# reduce=False, --ignore-prefix-size, precision


def np_lsoftmax(x, T=1.0):
    return np.log(np_softmax(np.asarray(x, dtype=np.float64), T))


def np_divergence(student_logits, teacher_lprobs, T, topk, divergence):
    """One position's divergence from probabilities (as docs/word_kd_options.md)."""
    p = np_softmax(np.asarray(student_logits, dtype=np.float64), T)
    t1 = np.exp(np.asarray(teacher_lprobs, dtype=np.float64))
    keep = np.argsort(-t1, kind="stable")[:topk] if topk else np.arange(len(t1))
    q = t1[keep] ** (1.0 / T)
    q = q / q.sum()
    if divergence == "forward_kl":
        return float(np.sum(q * (np.log(q) - np.log(p[keep]))))
    ps = p[keep] / p[keep].sum()
    if divergence == "reverse_kl":
        return float(np.sum(ps * (np.log(ps) - np.log(q))))
    m = 0.5 * (q + ps)
    return float(0.5 * np.sum(q * np.log(q / m)) + 0.5 * np.sum(ps * np.log(ps / m)))


def np_per_token_loss(logits, teacher, target, pad, alpha, T, topk, eps, div, prefix):
    """(1 - a) * label-smoothed NLL + a * T^2 * KD per position, numpy, B * T."""
    B, L, V = logits.shape
    out = np.zeros(B * L)
    eps_i = eps / (V - 1)
    for b in range(B):
        for i in range(L):
            if target[b, i] == pad or i < prefix:
                continue
            lp = np_lsoftmax(logits[b, i].double().numpy())
            ls = (1 - eps - eps_i) * -lp[target[b, i]] + eps_i * -lp.sum()
            kd = np_divergence(logits[b, i], teacher[b, i], T, topk, div)
            out[b * L + i] = (1 - alpha) * ls + alpha * T * T * kd
    return out


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
@pytest.mark.parametrize("T,topk", [(1.0, 0), (2.0, 0), (1.0, 3), (2.0, 3)])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("prefix", [0, 1])
def test_reduce_false_gives_per_token_losses(setup, divergence, T, topk, share, prefix):
    d, target, logits, teacher = setup
    pad = d.pad()
    crit = WordKDCriterion(
        FakeTask(d),
        False,
        0.1,
        kd_alpha=0.4,
        kd_temperature=T,
        kd_topk=topk,
        kd_divergence=divergence,
        ignore_prefix_size=prefix,
    )
    crit.share_gather = share
    sample = make_sample(target, pad, teacher)
    per_token, _, log_tokens = crit(FakeModel(logits), sample, reduce=False)
    total, _, log_total = crit(FakeModel(logits), sample)
    assert per_token.shape == (target.numel(),)
    assert float(per_token.sum()) == pytest.approx(float(total), rel=1e-5)
    expected = np_per_token_loss(
        logits, teacher, target, pad, 0.4, T, topk, 0.1, divergence, prefix
    )
    assert np.allclose(per_token.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (per_token.reshape(target.shape)[target.eq(pad)] == 0).all()
    for key in ("loss", "nll_loss", "kd_loss"):  # logged as sums either way
        assert float(log_tokens[key]) == pytest.approx(float(log_total[key]), rel=1e-5)


@pytest.mark.parametrize("selection", ["none", "batch"])
@pytest.mark.parametrize("teacher_form", ["full", "store"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ignore_prefix_size_equals_the_sliced_computation(
    setup, selection, teacher_form, T
):
    """Prefix positions get neither NLL nor KD; the rest is the sliced batch."""
    d, target, logits, teacher = setup
    pad, p = d.pad(), 2
    indices = None
    if teacher_form == "store":
        teacher, indices = teacher.topk(6, dim=-1)
    options = dict(
        kd_alpha=0.5, kd_temperature=T, kd_selection=selection, kd_selection_ratio=0.5
    )

    def run(prefix, target, logits, teacher, indices):
        crit = WordKDCriterion(
            FakeTask(d), False, 0.1, ignore_prefix_size=prefix, **options
        )
        model = FakeModel(logits)
        loss, _, log = crit(model, make_sample(target, pad, teacher, indices))
        loss.backward()
        return loss, log, model.logits.grad

    loss, log, grad = run(p, target, logits, teacher, indices)
    sliced = (
        target[:, p:].contiguous(),
        logits[:, p:].contiguous(),
        teacher[:, p:].contiguous(),
        None if indices is None else indices[:, p:].contiguous(),
    )
    loss2, log2, grad2 = run(0, *sliced)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-5)
    for key in ("nll_loss", "kd_loss"):
        assert float(log[key]) == pytest.approx(float(log2[key]), rel=1e-5)
    assert torch.all(grad[:, :p] == 0)  # the prefix gets no gradient at all
    assert torch.allclose(grad[:, p:], grad2, rtol=1e-5, atol=1e-7)
    if selection != "none":
        assert int(log["kd_tokens"]) == int(target[:, p:].ne(pad).sum())
        assert int(log["kd_selected"]) == int(log2["kd_selected"])


class UpcastModel(FakeModel):
    """Half-precision log-probabilities upcast to float32: the float32 reference."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return super().get_normalized_probs(net_output, log_probs).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize(
    "T,teacher_form", [(1.0, "full"), (2.0, "full"), (2.0, "store")]
)
def test_half_precision_student_log_probs(setup, dtype, divergence, T, teacher_form):
    """bf16/fp16 student log-probabilities give the float32 computation's values."""
    d, target, logits, teacher = setup
    indices = None
    if teacher_form == "store":
        teacher, indices = teacher.topk(6, dim=-1)
        teacher = teacher.half()  # as a store holds them
    options = dict(kd_alpha=0.5, kd_temperature=T, kd_divergence=divergence)
    results = []
    for model in (FakeModel(logits, lprobs_dtype=dtype), UpcastModel(logits, dtype)):
        crit = WordKDCriterion(FakeTask(d), False, 0.1, **options)
        loss, _, log = crit(model, make_sample(target, d.pad(), teacher, indices))
        loss.backward()
        results.append((loss, log, model.logits.grad))
    (l1, log1, g1), (l2, log2, g2) = results
    assert l1.dtype == torch.float32 and log1["kd_loss"].dtype == torch.float32
    # the NLL term is fairseq's label-smoothed CE on the half-precision values
    ls = LabelSmoothedCrossEntropyCriterion(FakeTask(d), False, 0.1)
    ls_loss, _, _ = ls(
        FakeModel(logits, lprobs_dtype=dtype), make_sample(target, d.pad())
    )
    expected = 0.5 * float(ls_loss) + 0.5 * T * T * float(log2["kd_loss"])
    assert float(l1) == pytest.approx(expected, rel=1e-5)
    assert float(log1["kd_loss"]) == pytest.approx(float(log2["kd_loss"]), rel=1e-5)
    assert torch.allclose(g1, g2, rtol=2e-2, atol=2e-3)
    # and the float32 student agrees to half precision
    crit = WordKDCriterion(FakeTask(d), False, 0.1, **options)
    _, _, log3 = crit(FakeModel(logits), make_sample(target, d.pad(), teacher, indices))
    assert float(log1["kd_loss"]) == pytest.approx(float(log3["kd_loss"]), rel=5e-2)


def test_fake_model_keeps_the_logits_dtype():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    lprobs = FakeModel(logits).get_normalized_probs((logits,), log_probs=True)
    assert lprobs.dtype == torch.float64


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
@pytest.mark.parametrize(
    "T,teacher_form", [(1.0, "full"), (2.0, "full"), (2.0, "store")]
)
@pytest.mark.parametrize("share", [True, False])
def test_criterion_gradcheck_in_float64(divergence, T, teacher_form, share):
    """The hand-written backward passes against finite differences."""
    torch.manual_seed(7)
    d = make_dictionary(6)
    V, pad = len(d), d.pad()
    target = torch.tensor([[5, 6, 2], [7, 2, pad]])
    teacher = torch.log_softmax(torch.randn(2, 3, V, dtype=torch.double) * 2, -1)
    indices = None
    if teacher_form == "store":
        teacher, indices = teacher.topk(4, dim=-1)
    logits = torch.randn(2, 3, V, dtype=torch.double, requires_grad=True)

    def f(z):
        crit = WordKDCriterion(
            FakeTask(d),
            False,
            0.1,
            kd_alpha=0.7,
            kd_temperature=T,
            kd_divergence=divergence,
            kd_selection="batch",
            kd_selection_ratio=0.6,
        )
        crit.share_gather = share

        class Model(FakeModel):
            def forward(self, **net_input):
                return z, {"attn": None}

        model = Model(z.detach())
        loss, _, _ = crit(model, make_sample(target, pad, teacher, indices))
        assert loss.dtype == torch.double
        return loss

    assert torch.autograd.gradcheck(f, (logits,))
