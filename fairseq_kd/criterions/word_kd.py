"""The ``word_kd`` criterion: label-smoothed NLL mixed with word-level KD."""

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
from fairseq.logging import metrics

from fairseq_kd.losses import word_kd_divergence
from fairseq_kd.tasks.translation_kd import TEACHER_KEY


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


def validate_word_kd_options(kd_alpha, kd_temperature, kd_topk, label_smoothing):
    """Raise ``ValueError`` naming the option when a setting is out of range.

    Args:
        kd_alpha: ``--kd-alpha``.
        kd_temperature: ``--kd-temperature``.
        kd_topk: ``--kd-topk``.
        label_smoothing: ``--label-smoothing``.
    """
    if not (0.0 <= kd_alpha <= 1.0) or math.isnan(kd_alpha):
        raise ValueError(f"--kd-alpha must be in [0, 1], got {kd_alpha}")
    if not kd_temperature > 0 or math.isinf(kd_temperature):
        raise ValueError(f"--kd-temperature must be > 0, got {kd_temperature}")
    if kd_topk < 0:
        raise ValueError(f"--kd-topk must be >= 0 (0 = full vocabulary), got {kd_topk}")
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(LabelSmoothedCrossEntropyCriterion):
    """(1 - a) * label-smoothed NLL + a * T^2 * KL(p_teacher^T || p_student^T).

    The teacher's distributions come from ``sample["teacher"]``, which the
    ``translation_kd`` task fills from a live teacher or a top-k store. Both
    terms are summed over non-padding target tokens and normalised by fairseq
    (tokens, or sentences with ``--sentence-avg``).

    Args:
        task: the task (``translation_kd`` when ``kd_alpha > 0``).
        sentence_avg: normalise by sentences instead of tokens.
        label_smoothing: epsilon of the NLL term.
        kd_alpha: weight of the distillation term.
        kd_temperature: temperature of both distributions in the KD term.
        kd_topk: teacher's top-K per position (0: full vocabulary).
        ignore_prefix_size: ignore the first N target tokens.
        report_accuracy: log accuracy.
    """

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
    ):
        super().__init__(
            task,
            sentence_avg,
            label_smoothing,
            ignore_prefix_size=ignore_prefix_size,
            report_accuracy=report_accuracy,
        )
        validate_word_kd_options(kd_alpha, kd_temperature, kd_topk, label_smoothing)
        if kd_alpha > 0 and not getattr(task, "has_teacher", False):
            raise ValueError(
                f"--criterion word_kd with --kd-alpha {kd_alpha} needs a teacher: "
                "use --task translation_kd with --teacher-path (live) or "
                "--teacher-topk (stored top-k)"
            )
        support = getattr(task, "teacher_support", None) if kd_alpha > 0 else None
        if support is not None and kd_topk > support:
            raise ValueError(
                f"--kd-topk {kd_topk} is larger than the {support} entries per "
                "position of the --teacher-topk store"
            )
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.kd_topk = kd_topk

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
        loss, nll_loss = self.compute_loss_from_lprobs(
            lprobs, model, net_output, sample, reduce=reduce
        )
        teacher = sample.get(TEACHER_KEY)
        kd_loss = None
        if teacher is not None:
            if self.kd_alpha > 0:
                kd_loss = self.compute_kd_loss(
                    model, net_output, sample, teacher, lprobs
                )
                loss = (1.0 - self.kd_alpha) * loss + (
                    self.kd_alpha * self.kd_temperature**2
                ) * kd_loss
            else:  # logged only: the loss stays exactly label-smoothed CE
                with torch.no_grad():
                    kd_loss = self.compute_kd_loss(
                        model, net_output, sample, teacher, lprobs
                    )
        elif self.kd_alpha > 0 and model.training:
            raise RuntimeError(
                "word_kd found no teacher distributions in the sample: "
                "use --task translation_kd with --teacher-path or --teacher-topk"
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
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
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
        """Sum over non-padding tokens of KL(p_teacher^T || p_student^T).

        Args:
            model: the student.
            net_output: the student's output on ``sample``.
            sample: the mini-batch.
            teacher: ``{"lprobs": B x T x S, "indices": B x T x S (optional)}``.
            lprobs: the student's log-probabilities at T = 1, ``B x T x V``, if
                already computed (reused when the temperature is 1).
        """
        if self.kd_temperature != 1.0 or lprobs is None:
            logits = net_output[0] / self.kd_temperature
            net_output = (logits,) + tuple(net_output[1:])
            lprobs = model.get_normalized_probs(net_output, log_probs=True)  # B x T x V
        target = model.get_targets(sample, net_output)  # B x T
        teacher_lprobs = teacher["lprobs"]  # B x T x S
        indices = teacher.get("indices")  # B x T x S or None
        if self.ignore_prefix_size > 0:
            p = self.ignore_prefix_size
            lprobs, target = lprobs[:, p:, :], target[:, p:]
            teacher_lprobs = teacher_lprobs[:, p:, :]
            indices = None if indices is None else indices[:, p:, :]
        if teacher_lprobs.shape[:2] != target.shape:
            raise RuntimeError(
                f"teacher distributions cover {tuple(teacher_lprobs.shape[:2])} "
                f"positions but the target has {tuple(target.shape)}"
            )
        support = teacher_lprobs.size(-1)
        return word_kd_divergence(
            lprobs.reshape(-1, lprobs.size(-1)),
            teacher_lprobs.reshape(-1, support),
            target.reshape(-1),
            temperature=self.kd_temperature,
            teacher_indices=None if indices is None else indices.reshape(-1, support),
            topk=self.kd_topk,
            ignore_index=self.padding_idx,
        )

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs, adding ``kd_loss`` (base 2, per token)."""
        super().reduce_metrics(logging_outputs)
        if any("kd_loss" in log for log in logging_outputs):
            kd_sum = sum(log.get("kd_loss", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            metrics.log_scalar(
                "kd_loss", kd_sum / max(ntokens, 1) / math.log(2), ntokens, round=3
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """All logged values are sums, so workers' outputs can be added."""
        return True
