"""Word-level distillation math: top-k, temperature, divergences, token selection."""

import math

import torch
import torch.nn.functional as F

DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "js")


def at_least_float32(x):
    """Upcast half precision to float32; keep float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def restrict_topk(lprobs, indices=None, topk=0):
    """Keep the teacher's ``topk`` most probable tokens at every position.

    Args:
        lprobs: teacher log-probabilities, ``N x S`` (``S`` is the vocabulary
            size when ``indices`` is None, else the stored support size).
        indices: vocabulary ids of the ``S`` entries (``N x S``), or None when
            ``lprobs`` covers the whole vocabulary.
        topk: how many entries to keep per position; 0 keeps them all.

    Returns:
        ``(lprobs, indices)`` restricted to ``topk`` entries per position;
        ``indices`` stays None when the whole vocabulary is kept.
    """
    support = lprobs.size(-1)
    if topk <= 0 or topk == support:
        return lprobs, indices
    if topk > support:
        raise ValueError(
            f"--kd-topk {topk} is larger than the {support} entries the teacher "
            "provides per position"
        )
    values, positions = lprobs.topk(topk, dim=-1)  # N x K
    if indices is None:
        return values, positions
    return values, indices.gather(-1, positions)


def teacher_log_distribution(lprobs, temperature=1.0):
    """Teacher log-distribution at ``temperature``, renormalised per position.

    The teacher's log-probabilities at temperature 1 (full vocabulary or a
    top-k support) are divided by ``temperature`` and renormalised over the
    last dimension, so a top-k support gives the teacher's distribution
    restricted to its top-k. Computed in float32 (or float64) precision.

    Args:
        lprobs: teacher log-probabilities at temperature 1, ``N x S``.
        temperature: distillation temperature ``T > 0``.
    """
    lprobs = at_least_float32(lprobs)
    if temperature != 1.0:
        lprobs = lprobs / temperature
    return F.log_softmax(lprobs, dim=-1)


def kl_terms(log_a, log_b):
    """Element-wise terms of KL(a || b): ``a * (log a - log b)``, 0 where a = 0.

    Args:
        log_a: log-probabilities of the distribution the KL is taken under.
        log_b: log-probabilities of the other one, same shape.

    Returns:
        The terms, same shape; summed over the support they give KL(a || b).
        Where ``a`` is 0 the term is 0 by convention (``0 log 0 = 0``), even
        when ``log b`` is ``-inf``.
    """
    a = log_a.exp()
    terms = a * (log_a - log_b)
    return torch.where(a > 0, terms, torch.zeros_like(terms))


def forward_kl(teacher_logq, student_lprobs, indices=None):
    """Per-position KL(q_teacher || p_student).

    Args:
        teacher_logq: teacher log-distribution over its support, ``N x S``
            (normalised over the last dimension).
        student_lprobs: student log-probabilities over the vocabulary,
            ``N x V``.
        indices: vocabulary ids of the teacher's support (``N x S``), or None
            when the support is the whole vocabulary (``S = V``).

    Returns:
        ``N`` non-negative divergences (terms where the teacher puts no mass
        contribute 0).
    """
    if indices is not None:
        student_lprobs = student_lprobs.gather(-1, indices)  # N x S
    return kl_terms(teacher_logq, student_lprobs).sum(-1)


def student_on_support(student_lprobs, indices=None):
    """Student log-distribution renormalised over the teacher's support.

    Args:
        student_lprobs: student log-probabilities over the vocabulary,
            ``N x V``.
        indices: vocabulary ids of the teacher's support (``N x S``), or None
            when the support is the whole vocabulary (then the student is
            returned unchanged).

    Returns:
        ``N x S`` log-probabilities that sum to one over the support.
    """
    if indices is None:
        return student_lprobs
    return F.log_softmax(student_lprobs.gather(-1, indices), dim=-1)  # N x S


def reverse_kl(teacher_logq, student_lprobs, indices=None):
    """Per-position KL(p_student || q_teacher) over the teacher's support.

    The student is renormalised over the support first (see
    :func:`student_on_support`); otherwise its mass outside a top-k support
    would make the divergence infinite.

    Args:
        teacher_logq: teacher log-distribution over its support, ``N x S``.
        student_lprobs: student log-probabilities over the vocabulary,
            ``N x V``.
        indices: vocabulary ids of the support (``N x S``), or None when the
            support is the whole vocabulary.

    Returns:
        ``N`` non-negative divergences.
    """
    logp = student_on_support(student_lprobs, indices)  # N x S
    return kl_terms(logp, teacher_logq).sum(-1)


def jensen_shannon(teacher_logq, student_lprobs, indices=None):
    """Per-position Jensen-Shannon divergence (natural log, at most log 2).

    ``JS = KL(q || m) / 2 + KL(p || m) / 2`` with ``m = (q + p) / 2``, the
    student ``p`` renormalised over the teacher's support as for
    :func:`reverse_kl`.

    Args:
        teacher_logq: teacher log-distribution over its support, ``N x S``.
        student_lprobs: student log-probabilities over the vocabulary,
            ``N x V``.
        indices: vocabulary ids of the support (``N x S``), or None when the
            support is the whole vocabulary.

    Returns:
        ``N`` non-negative divergences.
    """
    logp = student_on_support(student_lprobs, indices)  # N x S
    logm = torch.logaddexp(teacher_logq, logp) - math.log(2.0)  # N x S
    return 0.5 * (kl_terms(teacher_logq, logm) + kl_terms(logp, logm)).sum(-1)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
}


def word_kd_divergence(
    student_lprobs,
    teacher_lprobs,
    target,
    temperature=1.0,
    teacher_indices=None,
    topk=0,
    ignore_index=None,
    divergence="forward_kl",
    selected=None,
):
    """Sum of a divergence between teacher and student over the kept positions.

    ``forward_kl`` is KL(q || p) with the student's full softmax ``p`` (the
    vocabulary outside the teacher's support contributes nothing);
    ``reverse_kl`` and ``js`` compare ``q`` with the student renormalised
    over the teacher's support (unchanged for a full-vocabulary teacher).

    Args:
        student_lprobs: student log-probabilities at temperature ``T``,
            ``N x V``.
        teacher_lprobs: teacher log-probabilities at temperature 1, ``N x S``.
        target: target ids, ``N``; positions equal to ``ignore_index`` are
            excluded.
        temperature: distillation temperature ``T``.
        teacher_indices: vocabulary ids of the teacher's entries (``N x S``)
            or None for a full-vocabulary teacher.
        topk: keep only the teacher's top-k per position (0: all entries).
        ignore_index: padding index.
        divergence: ``forward_kl``, ``reverse_kl`` or ``js``.
        selected: optional boolean mask (``N``) of the positions that get the
            term (selective distillation); None keeps every position.

    Returns:
        A scalar tensor: the divergence summed over the kept positions.
    """
    divergence = str(divergence)
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"--kd-divergence must be one of {', '.join(DIVERGENCE_NAMES)}, "
            f"got {divergence!r}"
        )
    teacher_lprobs, teacher_indices = restrict_topk(
        teacher_lprobs, teacher_indices, topk
    )
    if divergence != "forward_kl" and teacher_lprobs.size(-1) == 1:
        raise ValueError(
            f"--kd-divergence {divergence} needs a teacher support of at least 2 "
            "tokens per position (with one token both renormalised distributions "
            "are the same point mass): raise --kd-topk or use forward_kl"
        )
    logq = teacher_log_distribution(teacher_lprobs, temperature)
    div_fn = DIVERGENCES[divergence]
    kl = div_fn(logq, at_least_float32(student_lprobs), teacher_indices)  # N
    if ignore_index is not None:
        kl = kl.masked_fill(target.eq(ignore_index), 0.0)
    if selected is not None:
        kl = kl.masked_fill(~selected, 0.0)
    return kl.sum()


def gold_token_nll(lprobs, target, ignore_index=None):
    """Per-position negative log-likelihood of the gold token, detached.

    Args:
        lprobs: log-probabilities at temperature 1, ``N x V``.
        target: gold ids, ``N``.
        ignore_index: padding index; its positions get 0.

    Returns:
        ``N`` cross-entropies (no gradient).
    """
    with torch.no_grad():
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # N
        nll = at_least_float32(nll)
        if ignore_index is not None:
            nll = nll.masked_fill(target.eq(ignore_index), 0.0)
    return nll


def num_kept(ratio, n):
    """How many of ``n`` tokens a ratio keeps: ``ceil(ratio * n)``.

    A tolerance of 1e-9 absorbs floating-point error (``0.3 * 10`` keeps 3,
    not 4); any ``n > 0`` keeps at least one token.

    Args:
        ratio: fraction kept, in (0, 1].
        n: number of candidate tokens.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def select_top_fraction(scores, candidates, ratio):
    """Mark the ``num_kept(ratio, n)`` candidates with the highest scores.

    Ties are broken by position: among equal scores the earlier position (in
    the flattened order) is selected first, so the result is deterministic.

    Args:
        scores: per-position scores (student cross-entropies), ``N``.
        candidates: boolean mask of the positions that may be selected
            (non-padding), ``N``.
        ratio: fraction of the candidates to keep, in (0, 1].

    Returns:
        A boolean mask, ``N``; never true outside ``candidates``.
    """
    k = num_kept(ratio, int(candidates.sum()))
    selected = torch.zeros_like(candidates)
    if k == 0:
        return selected
    ranked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, descending=True, stable=True).indices  # N
    selected[order[:k]] = True
    return selected


def push_history(history, values, size):
    """Append ``values`` to a FIFO history, keeping the last ``size`` of them.

    Args:
        history: 1-D tensor, oldest first, or None for an empty history.
        values: new values, 1-D.
        size: capacity of the history.

    Returns:
        The new history (a new 1-D tensor on ``values``' device).
    """
    values = values.detach().reshape(-1)
    if history is not None and history.numel() > 0:
        values = torch.cat(
            [history.to(device=values.device, dtype=values.dtype), values]
        )
    return values[-size:].clone()


def history_threshold(history, ratio):
    """The ``k``-th largest value of ``history``, ``k = num_kept(ratio, m)``.

    With ``m`` values in the history, this is the lower empirical
    ``(1 - ratio)`` quantile: the smallest value that still belongs to the
    top ``ratio`` fraction. Tokens whose score is ``>=`` it are selected.

    Args:
        history: 1-D tensor of recent scores (non-empty).
        ratio: fraction of the history above (or at) the threshold, in (0, 1].
    """
    m = history.numel()
    if m == 0:
        raise ValueError("the selection history is empty")
    k = num_kept(ratio, m)
    return torch.topk(history, k, sorted=True).values[-1]


def select_above(scores, candidates, threshold):
    """Mark the candidates whose score is at least ``threshold``.

    Args:
        scores: per-position scores, ``N``.
        candidates: boolean mask of selectable positions, ``N``.
        threshold: scalar (tensor or float).
    """
    return candidates & (scores >= threshold)
