"""Word-level distillation math: teacher top-k restriction, temperature and KL."""

import torch
import torch.nn.functional as F


def _at_least_float32(x):
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
    lprobs = _at_least_float32(lprobs)
    if temperature != 1.0:
        lprobs = lprobs / temperature
    return F.log_softmax(lprobs, dim=-1)


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
    q = teacher_logq.exp()
    terms = q * (teacher_logq - student_lprobs)
    terms = torch.where(q > 0, terms, torch.zeros_like(terms))
    return terms.sum(-1)


def word_kd_divergence(
    student_lprobs,
    teacher_lprobs,
    target,
    temperature=1.0,
    teacher_indices=None,
    topk=0,
    ignore_index=None,
):
    """Sum of KL(p_teacher^T || p_student^T) over non-padding positions.

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

    Returns:
        A scalar tensor: the KL summed over the kept positions.
    """
    teacher_lprobs, teacher_indices = restrict_topk(
        teacher_lprobs, teacher_indices, topk
    )
    logq = teacher_log_distribution(teacher_lprobs, temperature)
    kl = forward_kl(logq, _at_least_float32(student_lprobs), teacher_indices)  # N
    if ignore_index is not None:
        kl = kl.masked_fill(target.eq(ignore_index), 0.0)
    return kl.sum()
