"""The ``word_kd`` criterion: label-smoothed NLL mixed with word-level KD."""

import logging
import math
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics

from fairseq_kd import compat
from fairseq_kd.losses import (
    DIVERGENCE_NAMES,
    at_least_float32,
    forward_kl,
    gold_token_nll,
    kd_divergence_per_token,
    nll_and_full_vocabulary_kd,
    push_queue,
    queue_threshold,
    restrict_topk,
    right_align,
    select_above,
    select_top_fraction,
    teacher_log_distribution,
)
from fairseq_kd.schedules import parse_schedule
from fairseq_kd.tasks.kd_teacher import KD_MASK
from fairseq_kd.tasks.translation_kd import TEACHER_KEY

logger = logging.getLogger(__name__)

SELECTION_NAMES = ("none", "batch", "global")


@dataclass
class WordKDConfig(LabelSmoothedCrossEntropyCriterionConfig):
    """Label smoothing options plus the distillation weight, T and top-k."""

    kd_alpha: float = field(
        default=0.5,
        metadata={
            "help": "weight of the distillation term in [0, 1]: loss = (1 - alpha)"
            " * label-smoothed NLL + alpha * T^2 * KL(teacher || student)"
        },
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature T > 0 of teacher and student"},
    )
    kd_topk: int = field(
        default=0,
        metadata={
            "help": "keep the teacher's top-K tokens per position, renormalised "
            "per position (0: the whole vocabulary)"
        },
    )
    kd_divergence: ChoiceEnum(DIVERGENCE_NAMES) = field(
        default="forward_kl",
        metadata={
            "help": "divergence of the KD term: forward_kl = KL(teacher || student),"
            " reverse_kl = KL(student || teacher), js = Jensen-Shannon; reverse_kl"
            " and js renormalise the student over the teacher's (top-k) support"
        },
    )
    kd_selection: ChoiceEnum(SELECTION_NAMES) = field(
        default="none",
        metadata={
            "help": "selective KD (Wang et al., 2021): apply the KD term only to "
            "the tokens with the highest student cross-entropy; batch = top "
            "fraction of each batch, global = above a threshold from a queue of "
            "recent cross-entropies (none: every token)"
        },
    )
    kd_selection_ratio: float = field(
        default=0.5,
        metadata={
            "help": "fraction r in (0, 1] of tokens that get the KD term with "
            "--kd-selection batch|global (batch: ceil(r * tokens) per batch)"
        },
    )
    kd_selection_queue_size: int = field(
        default=30000,
        metadata={
            "help": "number of recent per-token cross-entropies (all ranks "
            "together) from which --kd-selection global takes its threshold"
        },
    )
    kd_alpha_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' (--kd-alpha throughout) or "
            "'linear:START:END:FROM:TO': START until update FROM, linear to END "
            "at update TO, END after (replaces --kd-alpha)"
        },
    )
    kd_temperature_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' (--kd-temperature throughout) or "
            "'linear:START:END:FROM:TO' (replaces --kd-temperature)"
        },
    )


def validate_word_kd_options(
    kd_alpha,
    kd_temperature,
    kd_topk,
    label_smoothing,
    kd_divergence="forward_kl",
    kd_selection="none",
    kd_selection_ratio=0.5,
    kd_selection_queue_size=30000,
    kd_alpha_schedule="constant",
    kd_temperature_schedule="constant",
):
    """Raise ``ValueError`` naming the option when a setting is out of range.

    Args:
        kd_alpha: ``--kd-alpha``.
        kd_temperature: ``--kd-temperature``.
        kd_topk: ``--kd-topk``.
        label_smoothing: ``--label-smoothing``.
        kd_divergence: ``--kd-divergence``.
        kd_selection: ``--kd-selection``.
        kd_selection_ratio: ``--kd-selection-ratio``.
        kd_selection_queue_size: ``--kd-selection-queue-size``.
        kd_alpha_schedule: ``--kd-alpha-schedule``.
        kd_temperature_schedule: ``--kd-temperature-schedule``.

    Returns:
        ``(alpha_schedule, temperature_schedule)``, parsed.
    """
    if not (0.0 <= kd_alpha <= 1.0) or math.isnan(kd_alpha):
        raise ValueError(f"--kd-alpha must be in [0, 1], got {kd_alpha}")
    if not kd_temperature > 0 or math.isinf(kd_temperature):
        raise ValueError(f"--kd-temperature must be > 0, got {kd_temperature}")
    if kd_topk < 0:
        raise ValueError(f"--kd-topk must be >= 0 (0 = full vocabulary), got {kd_topk}")
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    if str(kd_divergence) not in DIVERGENCE_NAMES:
        raise ValueError(
            f"--kd-divergence must be one of {', '.join(DIVERGENCE_NAMES)}, "
            f"got {str(kd_divergence)!r}"
        )
    if str(kd_divergence) != "forward_kl" and kd_topk == 1:
        raise ValueError(
            f"--kd-divergence {kd_divergence} with --kd-topk 1 compares two point "
            "masses on the same token: it is always 0 and gives no gradient. Use "
            "--kd-topk >= 2 (or 0) or --kd-divergence forward_kl"
        )
    if str(kd_selection) not in SELECTION_NAMES:
        raise ValueError(
            f"--kd-selection must be one of {', '.join(SELECTION_NAMES)}, "
            f"got {str(kd_selection)!r}"
        )
    if not (0.0 < kd_selection_ratio <= 1.0):
        raise ValueError(
            f"--kd-selection-ratio must be in (0, 1], got {kd_selection_ratio}"
        )
    if kd_selection_queue_size < 1:
        raise ValueError(
            f"--kd-selection-queue-size must be >= 1, got {kd_selection_queue_size}"
        )
    alpha = parse_schedule(kd_alpha_schedule, kd_alpha, "--kd-alpha-schedule")
    for value in alpha.values:
        if not (0.0 <= value <= 1.0):
            raise ValueError(
                f"--kd-alpha-schedule {kd_alpha_schedule}: alpha must stay in "
                f"[0, 1], got {value}"
            )
    temperature = parse_schedule(
        kd_temperature_schedule, kd_temperature, "--kd-temperature-schedule"
    )
    for value in temperature.values:
        if not value > 0 or math.isinf(value):
            raise ValueError(
                f"--kd-temperature-schedule {kd_temperature_schedule}: the "
                f"temperature must stay > 0, got {value}"
            )
    return alpha, temperature


def check_teacher_positions(teacher_lprobs, target):
    """Refuse teacher distributions that do not cover the target's positions.

    Args:
        teacher_lprobs: ``B x T x S`` teacher log-probabilities.
        target: ``B x T`` target ids.

    Raises:
        RuntimeError: the first two dimensions differ.
    """
    if teacher_lprobs.shape[:2] != target.shape:
        raise RuntimeError(
            f"teacher distributions cover {tuple(teacher_lprobs.shape[:2])} "
            f"positions but the target has {tuple(target.shape)}"
        )


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(LabelSmoothedCrossEntropyCriterion):
    """(1 - a) * label-smoothed NLL + a * T^2 * D(p_teacher^T, p_student^T).

    The teacher's distributions come from ``sample["teacher"]``, which the
    ``translation_kd`` task fills from a live teacher or a top-k store. ``D``
    is the chosen divergence (forward KL by default). The NLL term is summed
    over non-padding target tokens, the KD term over the selected ones (all
    of them without ``--kd-selection``); fairseq normalises both (tokens, or
    sentences with ``--sentence-avg``). ``a`` and ``T`` may follow schedules
    over the update number, which the ``translation_kd`` task passes in
    through :meth:`begin_train_step`.

    Args:
        task: the task (``translation_kd`` when ``kd_alpha > 0``).
        sentence_avg: normalise by sentences instead of tokens.
        label_smoothing: epsilon of the NLL term.
        kd_alpha: weight of the distillation term.
        kd_temperature: temperature of both distributions in the KD term.
        kd_topk: teacher's top-K per position (0: full vocabulary).
        ignore_prefix_size: ignore the first N target tokens.
        report_accuracy: log accuracy.
        kd_divergence: ``forward_kl``, ``reverse_kl`` or ``js``.
        kd_selection: ``none``, ``batch`` or ``global``.
        kd_selection_ratio: fraction of tokens that get the KD term.
        kd_selection_queue_size: capacity of the global selection queue.
        kd_alpha_schedule: schedule of ``kd_alpha`` (see :mod:`schedules`).
        kd_temperature_schedule: schedule of ``kd_temperature``.
    """

    # one gather / one gradient buffer for both terms where possible (tests: False)
    share_gather = True

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        kd_alpha=0.5,
        kd_temperature=1.0,
        kd_topk=0,
        ignore_prefix_size=0,
        report_accuracy=False,
        kd_divergence="forward_kl",
        kd_selection="none",
        kd_selection_ratio=0.5,
        kd_selection_queue_size=30000,
        kd_alpha_schedule="constant",
        kd_temperature_schedule="constant",
    ):
        super().__init__(
            task,
            sentence_avg,
            label_smoothing,
            ignore_prefix_size=ignore_prefix_size,
            report_accuracy=report_accuracy,
        )
        self.alpha_schedule, self.temperature_schedule = validate_word_kd_options(
            kd_alpha,
            kd_temperature,
            kd_topk,
            label_smoothing,
            kd_divergence,
            kd_selection,
            kd_selection_ratio,
            kd_selection_queue_size,
            kd_alpha_schedule,
            kd_temperature_schedule,
        )
        max_alpha = max(self.alpha_schedule.values)
        if max_alpha > 0 and not getattr(task, "has_teacher", False):
            raise ValueError(
                f"--criterion word_kd with --kd-alpha {max_alpha} needs a teacher: "
                "use --task translation_kd with --teacher-path (live) or "
                "--teacher-topk (stored top-k)"
            )
        support = getattr(task, "teacher_support", None) if max_alpha > 0 else None
        if support is not None and kd_topk > support:
            raise ValueError(
                f"--kd-topk {kd_topk} is larger than the {support} entries per "
                "position of the --teacher-topk store"
            )
        self.kd_topk = kd_topk
        self.kd_divergence = str(kd_divergence)
        self.kd_selection = str(kd_selection)
        self.kd_selection_ratio = kd_selection_ratio
        self.kd_selection_queue_size = kd_selection_queue_size
        # global selection: a fixed-size queue (see fairseq_kd.losses.push_queue)
        self._queue, self._queue_count = None, None
        self.push_to_history = True  # False for fairseq's dummy batches
        self.num_updates = 0
        # the current values; begin_train_step moves them along the schedules
        self.kd_alpha = self.alpha_schedule(0)
        self.kd_temperature = self.temperature_schedule(0)
        if self.kd_selection != "none" and max_alpha == 0:
            logger.warning(
                f"--kd-selection {self.kd_selection} has no effect on the loss with "
                "--kd-alpha 0 (the KD term is only logged)"
            )
        if self.kd_selection == "global" and not compat.restores_task_checkpoint_dict():
            logger.warning(
                "this fairseq version does not restore task state when resuming: "
                "the --kd-selection global queue will start empty after a resume"
            )

    def begin_train_step(self, update_num, ignore_grad=False):
        """Prepare a training step (called by the ``translation_kd`` task).

        Args:
            update_num: number of updates completed before this step.
            ignore_grad: fairseq's dummy batch (its tokens stay out of the
                global selection queue).
        """
        self.push_to_history = not ignore_grad
        self.set_num_updates(update_num)

    def set_num_updates(self, num_updates):
        """Move alpha and T along their schedules and log them.

        Args:
            num_updates: number of updates completed before the next step.
        """
        self.num_updates = num_updates
        self.kd_alpha = self.alpha_schedule(num_updates)
        self.kd_temperature = self.temperature_schedule(num_updates)
        if not self.alpha_schedule.is_constant:
            metrics.log_scalar("kd_alpha", self.kd_alpha, weight=0, round=4)
        if not self.temperature_schedule.is_constant:
            metrics.log_scalar("kd_temperature", self.kd_temperature, weight=0, round=4)

    @property
    def selection_history(self):
        """The global selection queue, oldest first (1-D), or None.

        Reading it copies the used slots out of the fixed-size queue (a host
        synchronisation: for checkpoints and tests, not the training step).
        """
        if self._queue is None:
            return None
        return self._queue[self._queue.numel() - int(self._queue_count) :]

    @selection_history.setter
    def selection_history(self, history):
        if history is None:
            self._queue, self._queue_count = None, None
            return
        history = history.detach().reshape(-1)[-self.kd_selection_queue_size :]
        self._queue = history.new_full((self.kd_selection_queue_size,), float("nan"))
        if history.numel() > 0:
            self._queue[-history.numel() :] = history
        self._queue_count = torch.tensor(history.numel(), device=history.device)

    def checkpoint_state(self):
        """State to save with each checkpoint (the global selection queue)."""
        history = self.selection_history
        if history is None or history.numel() == 0:
            return {}
        return {"selection_history": history.detach().cpu()}

    def load_checkpoint_state(self, state):
        """Restore what :meth:`checkpoint_state` returned.

        Args:
            state: the saved dictionary (may be empty).
        """
        history = (state or {}).get("selection_history")
        if history is not None and self.kd_selection == "global":
            self.selection_history = history
            logger.info(
                f"restored the --kd-selection global queue "
                f"({history.numel()} cross-entropies)"
            )

    def forward(self, model, sample, reduce=True):
        """Compute the loss for ``sample``.

        Args:
            model: the student.
            sample: the mini-batch, with ``sample["teacher"]`` when KD is on.
            reduce: sum the losses (as fairseq's criterions). With
                ``reduce=False`` the loss is a vector of ``B * T`` per-token
                losses ``(1 - a) * ls_nll_i + a * T^2 * kd_i`` (0 at padding
                and in the ignored prefix) whose sum is the reduced loss.

        Returns:
            ``(loss, sample_size, logging_output)``.
        """
        net_output = model(**sample["net_input"])
        # one log-softmax over the vocabulary serves both terms, at any T
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
        elif self.kd_alpha > 0 and self._fuses_full_vocabulary(teacher):
            loss, nll_loss, kd_tokens, selection = self.compute_losses_fused(
                lprobs, model, net_output, sample, teacher, reduce=reduce
            )
            kd_loss = kd_tokens.sum()
            loss = (1.0 - self.kd_alpha) * loss + (
                self.kd_alpha * self.kd_temperature**2
            ) * (kd_loss if reduce else kd_tokens)
        else:
            loss, nll_loss = self.compute_loss_from_lprobs(
                lprobs, model, net_output, sample, reduce=reduce
            )
            # with alpha = 0 the term is only logged: the loss stays LS-CE
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_alpha > 0):
                kd_tokens, selection = self.compute_kd_per_token(
                    model, net_output, sample, teacher, lprobs
                )  # N
            kd_loss = kd_tokens.sum()
            if self.kd_alpha > 0:
                loss = (1.0 - self.kd_alpha) * loss + (
                    self.kd_alpha * self.kd_temperature**2
                ) * (kd_loss if reduce else kd_tokens)
        # (validation of a split without a top-k store: label-smoothed CE only)
        sample_size = (
            sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        )
        logging_output = {
            "loss": loss.data if reduce else loss.data.sum(),
            "nll_loss": nll_loss.data if reduce else nll_loss.data.sum(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if kd_loss is not None:
            logging_output["kd_loss"] = kd_loss.data
        if selection is not None:  # tensors: read back only when logging
            logging_output["kd_selected"], logging_output["kd_tokens"] = selection
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy_from_lprobs(
                lprobs, model, net_output, sample
            )
            logging_output["n_correct"] = n_correct
            logging_output["total"] = total
        return loss, sample_size, logging_output

    def _shares_gather(self, teacher):
        """Whether both loss terms can read the student through one gather.

        True for a top-k teacher (``indices`` present, or a full-vocabulary
        teacher restricted by ``--kd-topk``) with forward KL at T = 1, no
        token selection and no ignored prefix: the NLL's target ids and the
        teacher's ids are then gathered together, so the backward pass
        scatters into one dense ``B x T x V`` gradient instead of two.
        """
        top_k = teacher is not None and (
            teacher.get("indices") is not None
            or 0 < self.kd_topk < teacher["lprobs"].size(-1)
        )
        return (
            self.share_gather
            and top_k
            and self.kd_temperature == 1.0
            and self.kd_divergence == "forward_kl"
            and self.kd_selection == "none"
            and self.ignore_prefix_size == 0
        )

    def compute_losses_one_gather(self, lprobs, model, net_output, sample, teacher):
        """Label-smoothed NLL and forward-KL term from a single gather.

        The same values as :meth:`compute_loss_from_lprobs` followed by
        :meth:`compute_kd_per_token` (checked in the tests), for the cases
        that :meth:`_shares_gather` accepts.

        Args:
            lprobs: the student's log-probabilities, ``B x T x V``.
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x S, "indices": B x T x S}`` (or a
                full-vocabulary ``lprobs`` restricted by ``--kd-topk``).

        Returns:
            ``(label-smoothed loss, nll_loss, kd_loss)``, each summed.
        """
        target = model.get_targets(sample, net_output)  # B x T
        teacher_lprobs, indices = teacher["lprobs"], teacher.get("indices")
        check_teacher_positions(teacher_lprobs, target)
        vocab, support = lprobs.size(-1), teacher_lprobs.size(-1)
        lprobs = lprobs.reshape(-1, vocab)  # N x V
        target = target.reshape(-1, 1)  # N x 1
        teacher_lprobs, indices = restrict_topk(
            teacher_lprobs.reshape(-1, support),
            None if indices is None else indices.reshape(-1, support),
            self.kd_topk,
        )  # N x K
        ids = torch.cat([target, indices.to(target.dtype)], dim=-1)  # N x 1+K
        gathered = lprobs.gather(-1, ids)
        pad_mask = target.eq(self.padding_idx)  # N x 1
        no_kd = pad_mask.squeeze(-1)  # N
        if teacher.get(KD_MASK) is not None:  # e.g. language tags: no KD term
            no_kd = no_kd | ~teacher[KD_MASK].reshape(-1)
        # fairseq's label_smoothed_nll_loss, term for term
        nll_loss = (-gathered[:, :1]).masked_fill(pad_mask, 0.0).sum()
        smooth_loss = (-lprobs.sum(dim=-1, keepdim=True)).masked_fill(pad_mask, 0.0)
        eps_i = self.eps / (vocab - 1)
        loss = (1.0 - self.eps - eps_i) * nll_loss + eps_i * smooth_loss.sum()
        logq = teacher_log_distribution(teacher_lprobs, 1.0)  # N x K
        kl = forward_kl(logq, at_least_float32(gathered[:, 1:]))  # N
        kd_loss = kl.masked_fill(no_kd, 0.0).sum()
        return loss, nll_loss, kd_loss

    def _fuses_full_vocabulary(self, teacher):
        """Whether the NLL and a full-vocabulary KD term share one gradient.

        True for a teacher over the whole vocabulary (no ``indices``, no
        ``--kd-topk`` below its size), any divergence, temperature, selection
        and prefix: :meth:`compute_losses_fused` then applies.
        """
        return (
            self.share_gather
            and teacher is not None
            and teacher.get("indices") is None
            and not (0 < self.kd_topk < teacher["lprobs"].size(-1))
        )

    def compute_losses_fused(self, lprobs, model, net_output, sample, teacher, reduce):
        """Label-smoothed NLL and a full-vocabulary KD term, one gradient buffer.

        The same values as :meth:`compute_loss_from_lprobs` followed by
        :meth:`compute_kd_per_token` (checked in the tests), through
        :func:`fairseq_kd.losses.nll_and_full_vocabulary_kd`.

        Args:
            lprobs: the student's log-probabilities at T = 1, ``B x T x V``.
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x V}``.
            reduce: sum the losses (else ``B * T`` per-token values).

        Returns:
            ``(label-smoothed loss, nll_loss, kd, selection)``: the first two
            summed (or per token), ``kd`` per token as in
            :meth:`compute_kd_per_token`, and the selection counts.
        """
        target = self.loss_target(model, net_output, sample)  # B x T
        teacher_lprobs = teacher["lprobs"]  # B x T x V
        check_teacher_positions(teacher_lprobs, target)
        vocab = lprobs.size(-1)
        flat_lprobs = lprobs.reshape(-1, vocab)  # N x V
        flat_target = target.reshape(-1)  # N
        keep, selection = self.kd_tokens(flat_lprobs, flat_target, teacher.get(KD_MASK))
        nll, smooth, kd = nll_and_full_vocabulary_kd(
            flat_lprobs,
            flat_target,
            teacher_lprobs.reshape(-1, teacher_lprobs.size(-1)),
            self.kd_temperature,
            self.kd_divergence,
        )  # N each
        pad_mask = flat_target.eq(self.padding_idx)
        nll, smooth = nll.masked_fill(pad_mask, 0.0), smooth.masked_fill(pad_mask, 0.0)
        if reduce:
            nll, smooth = nll.sum(), smooth.sum()
        eps_i = self.eps / (vocab - 1)
        loss = (1.0 - self.eps - eps_i) * nll + eps_i * smooth
        return loss, nll, kd.masked_fill(~keep, 0.0), selection

    def kd_tokens(self, flat_lprobs, flat_target, kd_mask=None):
        """Which tokens get the KD term, and the selection counts.

        Args:
            flat_lprobs: the student's log-probabilities at T = 1, ``N x V``.
            flat_target: the target with the prefix padded, ``N``.
            kd_mask: ``sample["teacher"]["mask"]``, ``B x T`` bool: False
                where the task wants no KD term (language tags), or None.

        Returns:
            ``(keep, selection)``: a boolean mask ``N`` (non-padding, selected
            with ``--kd-selection``), and ``(selected, candidates)`` counts
            as 0-dim tensors (None without selection).
        """
        keep = flat_target.ne(self.padding_idx)  # N
        if kd_mask is not None:
            keep = keep & kd_mask.reshape(-1)
        if self.kd_selection == "none":
            return keep, None
        ce = gold_token_nll(flat_lprobs, flat_target, self.padding_idx)  # N
        selected = self.select_tokens(ce, keep)
        return selected, (selected.sum(), keep.sum())

    def loss_target(self, model, net_output, sample):
        """The target with the ignored prefix (``--ignore-prefix-size``) padded.

        Masking the prefix instead of slicing it keeps the ``B x T x V``
        log-probabilities as they are (a slice would be copied to be
        flattened); the prefix then counts as padding in both terms.
        """
        target = model.get_targets(sample, net_output)  # B x T
        if self.ignore_prefix_size > 0:
            target = target.clone()
            target[:, : self.ignore_prefix_size] = self.padding_idx
        return target

    def compute_loss_from_lprobs(self, lprobs, model, net_output, sample, reduce=True):
        """fairseq's label-smoothed NLL, from already normalised ``lprobs``.

        Args:
            lprobs: the student's log-probabilities, ``B x T x V``.
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            reduce: sum the losses (else ``B * T`` per-token values, 0 at
                padding and in the ignored prefix).
        """
        target = self.loss_target(model, net_output, sample)  # B x T
        loss, nll_loss = label_smoothed_nll_loss(
            lprobs.reshape(-1, lprobs.size(-1)),
            target.reshape(-1),
            self.eps,
            ignore_index=self.padding_idx,
            reduce=reduce,
        )
        if not reduce:
            loss, nll_loss = loss.reshape(-1), nll_loss.reshape(-1)  # N
        return loss, nll_loss

    def compute_accuracy_from_lprobs(self, lprobs, model, net_output, sample):
        """Correct argmax predictions and counted tokens, as 0-dim tensors.

        Args:
            lprobs: the student's log-probabilities, ``B x T x V``.
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
        """
        target = self.loss_target(model, net_output, sample)  # B x T
        mask = target.ne(self.padding_idx)
        n_correct = (lprobs.argmax(-1).eq(target) & mask).sum()
        return n_correct, mask.sum()

    def compute_kd_per_token(self, model, net_output, sample, teacher, lprobs):
        """Per-token D(p_teacher^T, p_student^T), 0 where a token gets none.

        The student's one log-softmax at temperature 1 serves every case: at
        ``T != 1`` it is tempered chunk by chunk (full vocabulary) or only at
        the teacher's ``K`` ids (top-k support), and the selection's gold
        cross-entropies are read from it.

        Args:
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x S, "indices": B x T x S (optional)}``.
            lprobs: the student's log-probabilities at T = 1, ``B x T x V``.

        Returns:
            ``(kd, selection)``: the ``B * T`` divergences (0 at padding, in
            the ignored prefix and at unselected tokens), and ``(selected,
            candidates)`` token counts as 0-dim tensors with
            ``--kd-selection`` (None without).
        """
        target = self.loss_target(model, net_output, sample)  # B x T
        teacher_lprobs = teacher["lprobs"]  # B x T x S
        indices = teacher.get("indices")  # B x T x S or None
        check_teacher_positions(teacher_lprobs, target)
        vocab, support = lprobs.size(-1), teacher_lprobs.size(-1)
        flat_lprobs = lprobs.reshape(-1, vocab)  # N x V
        flat_target = target.reshape(-1)  # N
        keep, selection = self.kd_tokens(flat_lprobs, flat_target, teacher.get(KD_MASK))
        kd = kd_divergence_per_token(
            flat_lprobs,
            teacher_lprobs.reshape(-1, support),
            None if indices is None else indices.reshape(-1, support),
            temperature=self.kd_temperature,
            topk=self.kd_topk,
            divergence=self.kd_divergence,
            temper_student=True,
        )  # N
        return kd.masked_fill(~keep, 0.0), selection

    def compute_kd_loss(self, model, net_output, sample, teacher, lprobs=None):
        """Sum over the selected tokens of D(p_teacher^T, p_student^T).

        Args:
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x S, "indices": B x T x S (optional)}``.
            lprobs: the student's log-probabilities at T = 1, ``B x T x V``
                (computed here when None).

        Returns:
            ``(kd_loss, selection)`` as :meth:`compute_kd_per_token` gives
            them, the divergences summed.
        """
        if lprobs is None:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
        kd, selection = self.compute_kd_per_token(
            model, net_output, sample, teacher, lprobs
        )
        return kd.sum(), selection

    def select_tokens(self, ce, candidates):
        """Which tokens get the KD term, by the student's cross-entropy.

        ``batch`` keeps the top ``ceil(r * n)`` of this batch's ``n`` tokens.
        ``global`` first appends this step's cross-entropies (gathered from
        every data-parallel rank, so the queue is the same everywhere) to the
        queue when training, then keeps the tokens at or above the queue's
        threshold (:func:`fairseq_kd.losses.queue_threshold`); an empty queue
        (evaluation before any training step) uses the batch itself. In
        evaluation mode the queue is read but not changed. Nothing here reads
        a value back to the host: counts and thresholds stay tensors and the
        queue has a fixed size.

        Args:
            ce: per-token student cross-entropy, ``N`` (detached).
            candidates: non-padding positions, ``N``.

        Returns:
            A boolean mask, ``N``.
        """
        ratio = self.kd_selection_ratio
        if self.kd_selection == "batch":
            return select_top_fraction(ce, candidates, ratio)
        size = self.kd_selection_queue_size
        if self.training:
            # every rank gathers at every training forward, a dummy batch
            # (ignore_grad) with nothing to add: the collective is matched
            pushed = (
                candidates if self.push_to_history else torch.zeros_like(candidates)
            )
            values, valid = self.gather_from_ranks(ce, pushed, size)
            self._queue, self._queue_count = push_queue(
                self._queue, self._queue_count, values, valid, size
            )
        batch, batch_count = right_align(ce, candidates)
        threshold = queue_threshold(batch, batch_count, ratio)  # -inf if empty
        if self._queue is not None:
            self._queue = self._queue.to(ce.device)
            self._queue_count = self._queue_count.to(ce.device)
            threshold = torch.where(
                self._queue_count > 0,
                queue_threshold(self._queue, self._queue_count, ratio),
                threshold,
            )
        return select_above(ce, candidates, threshold)

    @staticmethod
    def gather_from_ranks(values, valid, size):
        """Concatenate the valid values of every data-parallel rank, in rank order.

        Each rank contributes a fixed-size buffer (its last ``size`` valid
        values, right-aligned) and its count, so the collectives have the
        same shapes on every rank and nothing is read back to the host. Every
        rank must call this at every training forward pass (the criterion
        does, also for fairseq's dummy batches, with no valid values).

        Args:
            values: this rank's values, ``N`` (any length, also 0).
            valid: which of them to contribute, boolean, ``N``.
            size: the queue's capacity (more than ``size`` values per rank
                could not reach the queue anyway).

        Returns:
            ``(values, valid)``: all ranks' values and validity mask, 1-D.
        """
        group = distributed_utils.get_data_parallel_group()
        world_size = distributed_utils.get_world_size(group)
        if world_size <= 1:
            return values, valid
        aligned, count = right_align(values.detach(), valid)
        if aligned.numel() >= size:
            part = aligned[-size:]
        else:
            part = torch.cat(
                [aligned.new_full((size - aligned.numel(),), 0.0), aligned]
            )
        count = torch.clamp(count, max=size).reshape(1)
        parts = distributed_utils.all_gather(part.contiguous(), group)
        counts = distributed_utils.all_gather(count, group)
        slots = torch.arange(size, device=part.device)
        masks = [slots >= size - c.to(part.device) for c in counts]
        return torch.cat([p.to(part.device) for p in parts]), torch.cat(masks)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs, adding ``kd_loss`` (base 2, per token).

        With ``--kd-selection``, also the summed counts ``kd_selected`` and
        ``kd_tokens`` and the derived fraction ``kd_selected_frac``.
        """
        super().reduce_metrics(logging_outputs)
        if any("kd_loss" in log for log in logging_outputs):
            kd_sum = sum(log.get("kd_loss", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            metrics.log_scalar(
                "kd_loss", kd_sum / max(ntokens, 1) / math.log(2), ntokens, round=3
            )
        if any("kd_tokens" in log for log in logging_outputs):
            tokens = utils.item(sum(log.get("kd_tokens", 0) for log in logging_outputs))
            selected = utils.item(
                sum(log.get("kd_selected", 0) for log in logging_outputs)
            )
            metrics.log_scalar_sum("kd_selected", selected)
            metrics.log_scalar_sum("kd_tokens", tokens)
            metrics.log_derived(
                "kd_selected_frac",
                lambda meters: (
                    round(meters["kd_selected"].sum / meters["kd_tokens"].sum, 4)
                    if meters["kd_tokens"].sum > 0
                    else float("nan")
                ),
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """All logged values are sums, so workers' outputs can be added."""
        return True
