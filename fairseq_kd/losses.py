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


# Full-vocabulary terms are computed in row chunks of about this many
# elements, so that no temporary of the size of the vocabulary times the
# batch is created besides the gradient itself.
CHUNK_ELEMENTS = 1 << 21


def _row_steps(n_rows, width):
    """Start rows of the chunks of ``n_rows`` rows of ``width`` elements."""
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _tempered(student, temperature, temper_student):
    """Student log-probabilities at ``temperature`` for one chunk (float32+)."""
    lp = at_least_float32(student)  # C x V
    if temper_student and temperature != 1.0:
        lp = lp / temperature
        lp = lp - lp.logsumexp(-1, keepdim=True)
    return lp


def _teacher_chunk(teacher, temperature):
    """Teacher log-distribution at ``temperature`` for one full-vocabulary chunk.

    At temperature 1 the teacher's full-vocabulary log-probabilities are
    already normalised and are used as they are.
    """
    lq = at_least_float32(teacher)  # C x V
    if temperature != 1.0:
        lq = F.log_softmax(lq / temperature, dim=-1)
    return lq


def _masked_product(weight, log_ratio):
    """``weight * log_ratio`` with 0 where ``weight`` is 0 (0 log 0 = 0)."""
    return torch.where(weight > 0, weight * log_ratio, 0.0)


def _full_vocabulary_rows(student, teacher, temperature, temper_student, divergence):
    """One chunk's divergences, ``C`` (see :func:`full_vocabulary_divergence`)."""
    lp = _tempered(student, temperature, temper_student)  # C x V
    lq = _teacher_chunk(teacher, temperature)  # C x V
    if divergence == "forward_kl":
        return _masked_product(lq.exp(), lq - lp).sum(-1)
    if divergence == "reverse_kl":
        return _masked_product(lp.exp(), lp - lq).sum(-1)
    lm = torch.logaddexp(lq, lp) - math.log(2.0)
    terms = _masked_product(lq.exp(), lq - lm) + _masked_product(lp.exp(), lp - lm)
    return 0.5 * terms.sum(-1)


def _full_vocabulary_grad(
    student, teacher, temperature, temper_student, divergence, grad_rows
):
    """One chunk's gradient with respect to ``student``, ``C x V``."""
    lp = _tempered(student, temperature, temper_student)  # C x V
    lq = _teacher_chunk(teacher, temperature)  # C x V
    g = grad_rows.unsqueeze(-1).to(lp.dtype)  # C x 1
    if divergence == "forward_kl":  # d/d log p of sum q (log q - log p)
        grad = lq.exp().mul_(-g)
    elif divergence == "reverse_kl":  # d/d log p of sum p (log p - log q)
        p = lp.exp()
        grad = _masked_product(p, lp - lq + 1.0).mul_(g)
    else:  # d JS / d log p = p log(p / m) / 2
        lm = torch.logaddexp(lq, lp) - math.log(2.0)
        grad = _masked_product(lp.exp(), lp - lm).mul_(0.5 * g)
    if temper_student and temperature != 1.0:  # through log_softmax(student / T)
        grad = (grad - lp.exp() * grad.sum(-1, keepdim=True)) / temperature
    return grad


class _FullVocabularyDivergence(torch.autograd.Function):
    """Row-chunked divergence against a full-vocabulary teacher.

    The forward pass keeps only its inputs (the student's log-probabilities,
    alive anyway, and the teacher's); the backward pass recomputes each
    chunk and writes the one ``N x V`` gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature, temper_student, divergence):
        ctx.save_for_backward(student, teacher)
        ctx.options = (temperature, temper_student, divergence)
        rows = []
        for start, end in _row_steps(student.size(0), student.size(-1)):
            rows.append(
                _full_vocabulary_rows(
                    student[start:end], teacher[start:end], *ctx.options
                )
            )
        if not rows:
            return at_least_float32(student.new_zeros(0))
        return torch.cat(rows)  # N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)  # N x V
        for start, end in _row_steps(student.size(0), student.size(-1)):
            grad[start:end] = _full_vocabulary_grad(
                student[start:end],
                teacher[start:end],
                *ctx.options,
                grad_out[start:end],
            )
        return grad, None, None, None, None


def full_vocabulary_divergence(
    student_lprobs,
    teacher_lprobs,
    temperature=1.0,
    divergence="forward_kl",
    temper_student=False,
):
    """Per-position divergence against a teacher over the whole vocabulary.

    Forward KL is the cross-entropy against the teacher minus the teacher's
    entropy; all three divergences are computed in row chunks, without a
    second full-size tensor for the teacher's distribution, the element-wise
    terms or a mask, and the backward pass writes only the gradient. At
    temperature 1 the teacher's log-probabilities are used as they come (they
    are normalised); at ``T != 1`` each chunk is tempered and renormalised.

    Args:
        student_lprobs: student log-probabilities, ``N x V`` (at temperature
            ``T``, or at temperature 1 with ``temper_student``).
        teacher_lprobs: teacher log-probabilities at temperature 1, ``N x V``.
        temperature: distillation temperature ``T``.
        divergence: ``forward_kl``, ``reverse_kl`` or ``js``.
        temper_student: the student is given at temperature 1 and is
            tempered here (``log_softmax(student / T)``, chunk by chunk).

    Returns:
        ``N`` divergences (float32, or float64 for a float64 student).
    """
    if teacher_lprobs.shape != student_lprobs.shape:
        raise RuntimeError(
            f"a full-vocabulary teacher needs {tuple(student_lprobs.shape)} "
            f"log-probabilities, got {tuple(teacher_lprobs.shape)}"
        )
    return _FullVocabularyDivergence.apply(
        student_lprobs,
        teacher_lprobs.detach(),
        float(temperature),
        bool(temper_student),
        divergence,
    )


class _NLLAndFullVocabularyKD(torch.autograd.Function):
    """Gold-token NLL, smoothing sum and full-vocabulary divergence, one gradient.

    The label-smoothed NLL's two terms and the KD term read the same student
    log-probabilities; computed together, the backward pass writes their
    gradients into a single ``N x V`` buffer instead of one per term.
    """

    @staticmethod
    def forward(ctx, student, target, teacher, temperature, divergence):
        ctx.save_for_backward(student, target, teacher)
        ctx.options = (temperature, True, divergence)
        # fairseq's label_smoothed_nll_loss, term for term
        nll = -student.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # N
        smooth = -student.sum(dim=-1)  # N
        rows = [
            _full_vocabulary_rows(student[start:end], teacher[start:end], *ctx.options)
            for start, end in _row_steps(student.size(0), student.size(-1))
        ]
        kd = torch.cat(rows) if rows else at_least_float32(student.new_zeros(0))
        return nll, smooth, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, grad_smooth, grad_kd):
        student, target, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)  # N x V
        for start, end in _row_steps(student.size(0), student.size(-1)):
            rows = _full_vocabulary_grad(
                student[start:end], teacher[start:end], *ctx.options, grad_kd[start:end]
            )
            grad[start:end] = rows.sub_(grad_smooth[start:end].unsqueeze(-1))
        grad.scatter_add_(
            -1, target.unsqueeze(-1), -grad_nll.unsqueeze(-1).to(grad.dtype)
        )
        return grad, None, None, None, None


def nll_and_full_vocabulary_kd(
    student_lprobs, target, teacher_lprobs, temperature=1.0, divergence="forward_kl"
):
    """Per-token NLL, smoothing sum and KD term against a full-vocabulary teacher.

    The same values as fairseq's ``label_smoothed_nll_loss`` pieces
    (``-log p(gold)`` and ``-sum log p``) and :func:`full_vocabulary_divergence`
    with ``temper_student``, with one gradient buffer for all three.

    Args:
        student_lprobs: student log-probabilities at temperature 1, ``N x V``.
        target: gold ids, ``N``.
        teacher_lprobs: teacher log-probabilities at temperature 1, ``N x V``.
        temperature: distillation temperature ``T``.
        divergence: ``forward_kl``, ``reverse_kl`` or ``js``.

    Returns:
        ``(nll, smooth, kd)``, each ``N``, not masked.
    """
    check_divergence(str(divergence))
    if teacher_lprobs.shape != student_lprobs.shape:
        raise RuntimeError(
            f"a full-vocabulary teacher needs {tuple(student_lprobs.shape)} "
            f"log-probabilities, got {tuple(teacher_lprobs.shape)}"
        )
    return _NLLAndFullVocabularyKD.apply(
        student_lprobs,
        target,
        teacher_lprobs.detach(),
        float(temperature),
        str(divergence),
    )


class _TemperedLogProbsAt(torch.autograd.Function):
    """``log_softmax(student / T)`` read at ``indices`` only, in row chunks.

    Forward: the gathered values over ``T`` minus a chunked logsumexp.
    Backward: one ``N x V`` gradient, the softmax part written chunk by chunk
    and the gathered part scattered into it (no tempered ``N x V`` copy of
    the student is kept).
    """

    @staticmethod
    def forward(ctx, student, indices, temperature):
        lse = []
        for start, end in _row_steps(student.size(0), student.size(-1)):
            chunk = at_least_float32(student[start:end]) / temperature
            lse.append(chunk.logsumexp(-1))
        lse = torch.cat(lse) if lse else at_least_float32(student.new_zeros(0))
        ctx.save_for_backward(student, indices, lse)
        ctx.temperature = temperature
        gathered = at_least_float32(student.gather(-1, indices)) / temperature
        return gathered - lse.unsqueeze(-1)  # N x K

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student, indices, lse = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.empty_like(student)  # N x V
        total = grad_out.sum(-1, keepdim=True)  # N x 1
        for start, end in _row_steps(student.size(0), student.size(-1)):
            chunk = at_least_float32(student[start:end]) / T
            p = (chunk - lse[start:end].unsqueeze(-1)).exp_()
            grad[start:end] = p.mul_(-total[start:end] / T)
        grad.scatter_add_(-1, indices, (grad_out / T).to(grad.dtype))
        return grad, None, None


def tempered_log_probs_at(student_lprobs, indices, temperature):
    """The student's log-probabilities at ``temperature``, at ``indices`` only.

    Args:
        student_lprobs: log-probabilities (or logits) at temperature 1,
            ``N x V``.
        indices: vocabulary ids, ``N x K`` (int64).
        temperature: ``T``.

    Returns:
        ``log_softmax(student / T)`` gathered at ``indices``, ``N x K``.
    """
    if temperature == 1.0:
        return at_least_float32(student_lprobs.gather(-1, indices))
    return _TemperedLogProbsAt.apply(student_lprobs, indices, float(temperature))


def check_divergence(divergence):
    """Refuse an unknown divergence name, naming ``--kd-divergence``."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"--kd-divergence must be one of {', '.join(DIVERGENCE_NAMES)}, "
            f"got {divergence!r}"
        )


def kd_divergence_per_token(
    student_lprobs,
    teacher_lprobs,
    teacher_indices=None,
    temperature=1.0,
    topk=0,
    divergence="forward_kl",
    temper_student=False,
):
    """Per-position divergence between teacher and student, ``N``.

    A full-vocabulary teacher goes through
    :func:`full_vocabulary_divergence` (row-chunked); a top-k support works
    on the ``K`` gathered student values (plus a chunked logsumexp for
    forward KL at ``T != 1``), the teacher renormalised over its ``K``.

    Args:
        student_lprobs: student log-probabilities, ``N x V``: at temperature
            ``T``, or at temperature 1 with ``temper_student``.
        teacher_lprobs: teacher log-probabilities at temperature 1, ``N x S``.
        teacher_indices: vocabulary ids of the teacher's entries (``N x S``)
            or None for a full-vocabulary teacher.
        temperature: distillation temperature ``T``.
        topk: keep only the teacher's top-k per position (0: all entries).
        divergence: ``forward_kl``, ``reverse_kl`` or ``js``.
        temper_student: temper the student here (the criterion passes its
            one log-softmax at temperature 1).

    Returns:
        ``N`` divergences, not masked.
    """
    divergence = str(divergence)
    check_divergence(divergence)
    teacher_lprobs, teacher_indices = restrict_topk(
        teacher_lprobs, teacher_indices, topk
    )
    if divergence != "forward_kl" and teacher_lprobs.size(-1) == 1:
        raise ValueError(
            f"--kd-divergence {divergence} needs a teacher support of at least 2 "
            "tokens per position (with one token both renormalised distributions "
            "are the same point mass): raise --kd-topk or use forward_kl"
        )
    if teacher_indices is None:
        return full_vocabulary_divergence(
            student_lprobs, teacher_lprobs, temperature, divergence, temper_student
        )
    T = temperature if temper_student else 1.0  # what the student still needs
    indices = teacher_indices.long()  # N x K
    logq = teacher_log_distribution(teacher_lprobs, temperature)  # N x K
    if divergence == "forward_kl":  # the student's full softmax, read at K ids
        return forward_kl(logq, tempered_log_probs_at(student_lprobs, indices, T))
    gathered = at_least_float32(student_lprobs.gather(-1, indices))  # N x K
    if T != 1.0:
        gathered = gathered / T
    logp = F.log_softmax(gathered, dim=-1)  # renormalised over the support
    return DIVERGENCES[divergence](logq, logp)


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
    See :func:`kd_divergence_per_token`.

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
    kl = kd_divergence_per_token(
        student_lprobs,
        teacher_lprobs,
        teacher_indices,
        temperature=temperature,
        topk=topk,
        divergence=divergence,
    )  # N
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


def num_kept_tensor(ratio, n):
    """:func:`num_kept` of a count held in a tensor, without a host sync.

    Args:
        ratio: fraction kept, in (0, 1].
        n: number of candidate tokens, an integer tensor (any shape).

    Returns:
        An int64 tensor of ``n``'s shape, equal to ``num_kept(ratio, n)``.
    """
    count = n.to(torch.float64)
    kept = torch.ceil(ratio * count - 1e-9).clamp(min=1.0)
    return torch.minimum(kept, count).long()


def select_top_fraction(scores, candidates, ratio):
    """Mark the ``num_kept(ratio, n)`` candidates with the highest scores.

    Ties are broken by position: among equal scores the earlier position (in
    the flattened order) is selected first, so the result is deterministic.
    The count stays on the device: no host synchronisation.

    Args:
        scores: per-position scores (student cross-entropies), ``N``.
        candidates: boolean mask of the positions that may be selected
            (non-padding), ``N``.
        ratio: fraction of the candidates to keep, in (0, 1].

    Returns:
        A boolean mask, ``N``; never true outside ``candidates``.
    """
    k = num_kept_tensor(ratio, candidates.sum())  # 0-dim
    ranked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, descending=True, stable=True).indices  # N
    positions = torch.arange(order.numel(), device=order.device)
    rank = torch.empty_like(order).scatter_(0, order, positions)  # N
    return candidates & (rank < k)


def right_align(values, valid, fill=float("nan")):
    """Move the ``valid`` entries to the end, in order, without a host sync.

    Args:
        values: 1-D tensor.
        valid: boolean mask of ``values``' shape.
        fill: value of the other slots.

    Returns:
        ``(aligned, count)``: ``values``' shape with the valid entries in the
        last ``count`` slots (their order kept) and ``fill`` before them, and
        ``count`` as a 0-dim int64 tensor.
    """
    values, valid = values.reshape(-1), valid.reshape(-1)
    m = values.numel()
    count = valid.sum()
    flags = valid.long()
    valid_before = flags.cumsum(0) - flags  # N, valid entries before each one
    invalid_before = torch.arange(m, device=values.device) - valid_before
    slots = torch.where(valid, m - count + valid_before, invalid_before)
    aligned = torch.empty_like(values).scatter_(
        0, slots, values.masked_fill(~valid, fill)
    )
    return aligned, count


def queue_valid(queue, count):
    """Mask of a fixed-size queue's used slots (the last ``count``)."""
    size = queue.numel()
    return torch.arange(size, device=queue.device) >= size - count


def push_queue(queue, count, values, valid, size):
    """Append the ``valid`` ``values`` to a fixed-size FIFO queue.

    The queue is a tensor of ``size`` slots whose last ``count`` hold the
    history, oldest first: shapes never depend on the data, so nothing is
    read back to the host.

    Args:
        queue: the queue (``size`` slots) or None for an empty one.
        count: number of used slots (0-dim int64 tensor), or None.
        values: new values, 1-D.
        valid: which of ``values`` to append, boolean, 1-D.
        size: capacity.

    Returns:
        ``(queue, count)`` after the push, on ``values``' device.
    """
    values = values.detach().reshape(-1)
    if queue is None:
        queue = values.new_full((size,), float("nan"))
        count = torch.zeros((), dtype=torch.long, device=values.device)
    queue = queue.to(device=values.device, dtype=values.dtype)
    count = count.to(values.device)
    both = torch.cat([queue, values])
    mask = torch.cat([queue_valid(queue, count), valid.reshape(-1)])
    aligned, total = right_align(both, mask)
    return aligned[-size:].clone(), torch.clamp(total, max=size)


def queue_threshold(queue, count, ratio):
    """:func:`history_threshold` of a fixed-size queue, without a host sync.

    Args:
        queue: the queue's slots, 1-D.
        count: number of used slots (the last ones), 0-dim int64 tensor.
        ratio: fraction of the history above (or at) the threshold.

    Returns:
        A 0-dim tensor: the ``k``-th largest used value, ``-inf`` when the
        queue is empty.
    """
    k = num_kept_tensor(ratio, count)
    ranked = queue.masked_fill(~queue_valid(queue, count), float("-inf"))
    top = torch.sort(ranked, descending=True).values
    return top.gather(0, (k - 1).clamp(min=0).reshape(1)).squeeze(0)


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
    (The criterion uses :func:`queue_threshold`, the same value without a
    host sync.)

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
