"""The word_kd criterion and its loss math before issue 10, as test references.

A verbatim copy of ``fairseq_kd/losses.py`` and of ``WordKDCriterion``'s
loss methods as they were before the memory rework (full-size tensors and
host synchronisations included), so that the tests can compare values and
gradients of the reworked criterion with the old ones.
"""

import math

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_kd.criterions.word_kd import WordKDCriterion, check_teacher_positions
from fairseq_kd.tasks.translation_kd import TEACHER_KEY

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


class ReferenceWordKD(WordKDCriterion):
    """``word_kd`` with the pre-issue-10 loss methods (single process only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history = None  # the old 1-D queue

    def compute_accuracy(self, model, net_output, sample):
        return super(WordKDCriterion, self).compute_accuracy(model, net_output, sample)

    def forward(self, model, sample, reduce=True):
        """Compute the loss for ``sample``.

        Args:
            model: the student.
            sample: the mini-batch, with ``sample["teacher"]`` when KD is on.
            reduce: sum the losses (as fairseq's criterions).

        Returns:
            ``(loss, sample_size, logging_output)``.
        """
        net_output = model(**sample["net_input"])
        # one log-softmax over the vocabulary serves both terms when T = 1
        lprobs = model.get_normalized_probs(net_output, log_probs=True)  # B x T x V
        teacher = sample.get(TEACHER_KEY)
        kd_loss, selection = None, None
        if teacher is None:
            if self.kd_alpha > 0 and model.training:
                raise RuntimeError(
                    "word_kd found no teacher distributions in the sample: "
                    "use --task translation_kd with --teacher-path or --teacher-topk"
                )
            loss, nll_loss = self.compute_loss_from_lprobs(
                lprobs, model, net_output, sample, reduce=reduce
            )
        elif self.kd_alpha > 0 and reduce and self._shares_gather(teacher):
            loss, nll_loss, kd_loss = self.compute_losses_one_gather(
                lprobs, model, net_output, sample, teacher
            )
            loss = (1.0 - self.kd_alpha) * loss + self.kd_alpha * kd_loss  # T = 1
        elif self.kd_alpha > 0:
            loss, nll_loss = self.compute_loss_from_lprobs(
                lprobs, model, net_output, sample, reduce=reduce
            )
            kd_loss, selection = self.compute_kd_loss(
                model, net_output, sample, teacher, lprobs
            )
            loss = (1.0 - self.kd_alpha) * loss + (
                self.kd_alpha * self.kd_temperature**2
            ) * kd_loss
        else:  # logged only: the loss stays exactly label-smoothed CE
            loss, nll_loss = self.compute_loss_from_lprobs(
                lprobs, model, net_output, sample, reduce=reduce
            )
            with torch.no_grad():
                kd_loss, selection = self.compute_kd_loss(
                    model, net_output, sample, teacher, lprobs
                )
        # (validation of a split without a top-k store: label-smoothed CE only)
        sample_size = (
            sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        )
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if kd_loss is not None:
            logging_output["kd_loss"] = kd_loss.data
        if selection is not None:
            logging_output["kd_selected"], logging_output["kd_tokens"] = selection
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.data.sum()
            logging_output["total"] = total.data.sum()
        return loss, sample_size, logging_output

    def compute_loss_from_lprobs(self, lprobs, model, net_output, sample, reduce=True):
        """fairseq's label-smoothed NLL, from already normalised ``lprobs``.

        Args:
            lprobs: the student's log-probabilities, ``B x T x V``.
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            reduce: sum the losses.
        """
        target = model.get_targets(sample, net_output)  # B x T
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size :, :].contiguous()
            target = target[:, self.ignore_prefix_size :].contiguous()
        return label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)),
            target.view(-1),
            self.eps,
            ignore_index=self.padding_idx,
            reduce=reduce,
        )

    def compute_kd_loss(self, model, net_output, sample, teacher, lprobs=None):
        """Sum over the selected tokens of D(p_teacher^T, p_student^T).

        Args:
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x S, "indices": B x T x S (optional)}``.
            lprobs: the student's log-probabilities at T = 1, ``B x T x V``, if
                already computed (reused when the temperature is 1).

        Returns:
            ``(kd_loss, selection)``: the summed divergence, and ``(number of
            selected tokens, number of candidate tokens)`` with
            ``--kd-selection`` (None without).
        """
        logits = net_output[0]
        plain_output = net_output
        if self.kd_temperature != 1.0 or lprobs is None:
            net_output = (logits / self.kd_temperature,) + tuple(net_output[1:])
            lprobs = model.get_normalized_probs(net_output, log_probs=True)  # B x T x V
        target = model.get_targets(sample, net_output)  # B x T
        ce_lprobs = None
        if self.kd_selection != "none":
            if self.kd_temperature == 1.0:
                ce_lprobs = lprobs
            else:
                with torch.no_grad():  # B x T x V, at temperature 1
                    ce_lprobs = model.get_normalized_probs(plain_output, log_probs=True)
        teacher_lprobs = teacher["lprobs"]  # B x T x S
        indices = teacher.get("indices")  # B x T x S or None
        if self.ignore_prefix_size > 0:
            p = self.ignore_prefix_size
            lprobs, target = lprobs[:, p:, :], target[:, p:]
            teacher_lprobs = teacher_lprobs[:, p:, :]
            ce_lprobs = None if ce_lprobs is None else ce_lprobs[:, p:, :]
            indices = None if indices is None else indices[:, p:, :]
        check_teacher_positions(teacher_lprobs, target)
        support = teacher_lprobs.size(-1)
        flat_target = target.reshape(-1)  # N
        selected, selection = None, None
        if ce_lprobs is not None:
            ce = gold_token_nll(
                ce_lprobs.reshape(-1, ce_lprobs.size(-1)),
                flat_target,
                self.padding_idx,
            )  # N
            candidates = flat_target.ne(self.padding_idx)  # N
            selected = self.select_tokens(ce, candidates)
            selection = (int(selected.sum()), int(candidates.sum()))
        kd_loss = word_kd_divergence(
            lprobs.reshape(-1, lprobs.size(-1)),
            teacher_lprobs.reshape(-1, support),
            flat_target,
            temperature=self.kd_temperature,
            teacher_indices=None if indices is None else indices.reshape(-1, support),
            topk=self.kd_topk,
            ignore_index=self.padding_idx,
            divergence=self.kd_divergence,
            selected=selected,
        )
        return kd_loss, selection

    def select_tokens(self, ce, candidates):
        """Which tokens get the KD term, by the student's cross-entropy.

        ``batch`` keeps the top ``ceil(r * n)`` of this batch's ``n`` tokens.
        ``global`` first appends this step's cross-entropies (gathered from
        every data-parallel rank, so the queue is the same everywhere) to the
        queue when training, then keeps the tokens at or above the queue's
        threshold (:func:`fairseq_kd.losses.history_threshold`). In evaluation
        mode the queue is read but not changed.

        Args:
            ce: per-token student cross-entropy, ``N`` (detached).
            candidates: non-padding positions, ``N``.

        Returns:
            A boolean mask, ``N``.
        """
        ratio = self.kd_selection_ratio
        if self.kd_selection == "batch":
            return select_top_fraction(ce, candidates, ratio)
        if self.training:
            values = ce[candidates] if self.push_to_history else ce[:0]
            if values.numel() > 0:
                self.history = push_history(
                    self.history, values, self.kd_selection_queue_size
                )
        history = self.history
        if history is None or history.numel() == 0:
            history = ce[candidates]  # nothing seen yet: this batch is the history
            if history.numel() == 0:
                return candidates
        threshold = history_threshold(history.to(ce.device), ratio)
        return select_above(ce, candidates, threshold)
