"""The ``translation_multi_simple_epoch_kd`` task: multilingual translation with KD."""

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.data.multilingual.multilingual_data_manager import (
    MultilingualDatasetManager,
)
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import (
    TranslationMultiSimpleEpochTask,
)

from fairseq_kd import multilingual
from fairseq_kd.direction_dataset import DIRECTION_KEY, DirectionDataset, select_rows
from fairseq_kd.tasks.kd_teacher import KDTeacherConfig, KDTeacherMixin
from fairseq_kd.topk_store import HEADER, PROGRESS, TopKStoreError

logger = logging.getLogger(__name__)

__all__ = ["MultilingualKDConfig", "TranslationMultiSimpleEpochKDTask"]

# logged per direction in validation (sums, see reduce_metrics)
PER_DIRECTION_KEYS = ("loss", "nll_loss", "kd_loss", "ntokens", "sample_size")


@dataclass
class MultilingualKDConfig(KDTeacherConfig):
    """The teacher options plus the multilingual task's own."""

    kd_on_langtok: bool = field(
        default=False,
        metadata={
            "help": "also apply the KD term at target positions that hold a "
            "language tag (--decoder-langtok); by default they get none, as "
            "--ignore-prefix-size would do for the KD term only (their NLL term "
            "stays)"
        },
    )


class _KDDatasetManager(MultilingualDatasetManager):
    """fairseq's multilingual data manager, each direction wrapped by the task."""

    def __init__(self, args, lang_pairs, langs, dicts, sampling_method, task):
        super().__init__(args, lang_pairs, langs, dicts, sampling_method)
        self.kd_task = task

    def load_a_dataset(self, split, data_path, src, src_dict, tgt, tgt_dict, *a, **kw):
        dataset = super().load_a_dataset(
            split, data_path, src, src_dict, tgt, tgt_dict, *a, **kw
        )
        return self.kd_task.wrap_direction(
            split, kw.get("data_category"), src, tgt, kw["langtok_spec"], dataset
        )


@register_task("translation_multi_simple_epoch_kd")
class TranslationMultiSimpleEpochKDTask(
    KDTeacherMixin, TranslationMultiSimpleEpochTask
):
    """Multilingual translation (M2M-100/NLLB style) with a frozen teacher.

    fairseq's ``translation_multi_simple_epoch`` with the teacher logic of
    :class:`~fairseq_kd.tasks.kd_teacher.KDTeacherMixin` (shared with
    ``translation_kd``). The teacher reads the student's ``net_input``,
    language tags included. Target positions that hold a language tag get no
    KD term (unless ``--kd-on-langtok``). Every direction's dataset is
    wrapped in a :class:`~fairseq_kd.direction_dataset.DirectionDataset`, so
    that batches say each row's direction: validation logs ``loss``,
    ``nll_loss`` and ``kd_loss`` per direction (``nll_loss_de-en``...). A
    live teacher must have been trained with this task's languages and
    language-token options, on every direction of ``--lang-pairs``; a top-k
    store serves one direction (``--teacher-topk DIR``:
    ``DIR/SPLIT/SRC-TGT``, as ``fairseq-kd-dump-topk`` writes them).

    Args:
        args: the parsed options.
        langs: the language list.
        dicts: the dictionaries, by language.
        training: whether the task trains (no ``--source-lang``).
    """

    @staticmethod
    def add_args(parser):
        """fairseq's multilingual options plus the fields of MultilingualKDConfig."""
        TranslationMultiSimpleEpochTask.add_args(parser)
        gen_parser_from_dataclass(parser, MultilingualKDConfig())

    def __init__(self, args, langs, dicts, training):
        super().__init__(args, langs, dicts, training)
        if self.has_teacher and args.lang_tok_replacing_bos_eos:
            raise ValueError(
                "--lang-tok-replacing-bos-eos is not supported with a teacher: "
                "fairseq then collates each direction apart and drops the "
                "teacher's distributions; use --encoder-langtok/--decoder-langtok"
            )
        if args.teacher_topk and args.extra_data:
            raise ValueError(
                "--teacher-topk reads stores of the main data only: --extra-data "
                "needs a live teacher (--teacher-path)"
            )
        if args.teacher_topk and len(utils.split_paths(args.data)) > 1:
            raise ValueError(
                "--teacher-topk with the multilingual task reads one data folder: "
                f"{args.data} names several; use a live teacher (--teacher-path)"
            )
        self.data_manager = _KDDatasetManager(
            args, self.lang_pairs, langs, dicts, self.sampling_method, self
        )
        self.kd_directions = []  # index -> "de-en" (or "mined:de-en")
        ids = multilingual.langtok_ids(self)
        self._langtok_ids = torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------ directions

    def direction_index(self, label):
        """The index of direction ``label`` in :attr:`kd_directions` (added)."""
        if label not in self.kd_directions:
            self.kd_directions.append(label)
        return self.kd_directions.index(label)

    def direction_signature(self, src, tgt, langtok_spec):
        """See :func:`fairseq_kd.multilingual.direction_signature`."""
        return multilingual.direction_signature(self, src, tgt, langtok_spec)

    def direction_datasets(self, split, pairs=None, combine=False):
        """See :func:`fairseq_kd.multilingual.direction_datasets`."""
        return multilingual.direction_datasets(self, split, pairs, combine)

    def direction_store_path(self, split, pair):
        """The store of direction ``pair`` of ``split``, or None.

        ``--teacher-topk DIR`` holds ``DIR/SPLIT/SRC-TGT``; for the training
        split ``DIR/SRC-TGT`` too.

        Args:
            split: the split's name.
            pair: ``SRC-TGT``.
        """
        root = self.args.teacher_topk
        if not root:
            return None
        if any(os.path.isfile(os.path.join(root, f)) for f in (HEADER, PROGRESS)):
            raise TopKStoreError(
                f"--teacher-topk {root} is one store, but the multilingual task "
                "reads one store per direction: "
                f"{os.path.join(root, split, self.lang_pairs[0])}... (dump with "
                "fairseq-kd-dump-topk --task translation_multi_simple_epoch_kd, "
                f"--output {os.path.join(root, split)})"
            )
        candidates = [os.path.join(root, split, pair)]
        if split == self.args.train_subset:
            candidates.append(os.path.join(root, pair))
        return next((c for c in candidates if os.path.isdir(c)), None)

    def store_targets(self, split, epoch=1):
        """One store per direction of ``--lang-pairs`` (see the class doc).

        A split has a store for each direction or for none (a batch mixes
        directions); the training split must have them.

        Args:
            split: the split's name.
            epoch: fairseq's epoch (unused: one data folder).
        """
        targets = [
            (
                f"split '{split}', direction {pair}",
                self.direction_store_path(split, pair),
            )
            for pair in self.lang_pairs
        ]
        missing = [pair for pair, (_, p) in zip(self.lang_pairs, targets) if p is None]
        if self.args.teacher_topk and missing:
            root = self.args.teacher_topk
            if split == self.args.train_subset or len(missing) < len(targets):
                raise TopKStoreError(
                    f"--teacher-topk {root} holds no store for direction(s) "
                    f"{', '.join(missing)} of split '{split}': every direction of "
                    f"a split needs its store, {os.path.join(root, split, 'SRC-TGT')}"
                    " (fairseq-kd-dump-topk --task translation_multi_simple_epoch_kd "
                    f"--gen-subset {split} --output {os.path.join(root, split)})"
                )
        return targets

    def wrap_direction(self, split, category, src, tgt, langtok_spec, dataset):
        """Wrap one direction's dataset (the data manager calls this).

        Args:
            split: the split's name.
            category: the data category (``main``, ``mined``...).
            src: source language.
            tgt: target language.
            langtok_spec: the category's ``(encoder spec, decoder spec)``.
            dataset: the direction's ``LanguagePairDataset``.
        """
        pair = f"{src}-{tgt}"
        label = pair if category in (None, "main") else f"{category}:{pair}"
        store = None
        if self.args.teacher_topk and label == pair:
            store = self.verified_store(
                f"split '{split}', direction {pair}",
                self.direction_store_path(split, pair),
                dataset,
                self.source_dictionary,
                self.target_dictionary,
                split,
                os.path.join(self.args.teacher_topk, split),
                direction=self.direction_signature(src, tgt, langtok_spec),
            )
        return DirectionDataset(
            dataset,
            self.direction_index(label),
            store,
            self.target_dictionary.pad(),
            k=self.teacher_support if store is not None else None,
        )

    # --------------------------------------------------------------- teacher

    def check_teacher_state(self, path, state):
        """See :func:`fairseq_kd.multilingual.check_teacher_settings`."""
        multilingual.check_teacher_settings(self, path, state)

    def teacher_dictionaries(self, path, state, dict_dir=None):
        """See :func:`fairseq_kd.multilingual.teacher_dictionaries`."""
        return multilingual.teacher_dictionaries(self, path, state, dict_dir)

    def kd_position_mask(self, sample):
        """False at target positions holding a language tag (unless --kd-on-langtok).

        Args:
            sample: the mini-batch.
        """
        if self.args.kd_on_langtok or self._langtok_ids.numel() == 0:
            return None
        target = sample["target"]  # B x T
        if self._langtok_ids.device != target.device:
            self._langtok_ids = self._langtok_ids.to(target.device)
        return ~torch.isin(target, self._langtok_ids)  # B x T

    # ------------------------------------------------------------ validation

    def valid_step(self, sample, model, criterion):
        """Validate direction by direction, logging each one's sums too.

        The teacher is attached to the whole batch once; the criterion then
        runs on each direction's rows, and the logging outputs are the sums
        of the parts plus ``KEY_SRC-TGT`` copies of ``loss``, ``nll_loss``,
        ``kd_loss``, ``ntokens`` and ``sample_size``.
        """
        directions = None if sample is None else sample.get(DIRECTION_KEY)
        if not directions or sample.get("target") is None:
            return super().valid_step(sample, model, criterion)
        self.prepare_teacher(sample, model, criterion)
        total_loss, total_size, outputs = 0.0, 0, []
        pad = self.target_dictionary.pad()
        for index in sorted(set(directions)):
            rows = [i for i, d in enumerate(directions) if d == index]
            part = (
                sample
                if len(rows) == len(directions)
                else select_rows(sample, rows, pad)
            )
            loss, sample_size, output = super().valid_step(part, model, criterion)
            label = self.kd_directions[index]
            for key in PER_DIRECTION_KEYS:
                if key in output:
                    output[f"{key}_{label}"] = output[key]
            total_loss, total_size = total_loss + loss, total_size + sample_size
            outputs.append(output)
        keys = {key for output in outputs for key in output}
        merged = {key: sum(o.get(key, 0) for o in outputs) for key in keys}
        return total_loss, total_size, merged

    def reduce_metrics(self, logging_outputs, criterion):
        """fairseq's metrics, then ``loss``/``nll_loss``/``kd_loss`` per direction.

        Each is a sum over the direction's tokens divided by their number (the
        loss: by its sample size), in base 2, as fairseq logs the totals.
        """
        super().reduce_metrics(logging_outputs, criterion)
        labels = sorted(
            {
                key[len("ntokens_") :]
                for output in logging_outputs
                for key in output
                if key.startswith("ntokens_")
            }
        )
        for label in labels:

            def total(key):
                return utils.item(
                    sum(o.get(f"{key}_{label}", 0) for o in logging_outputs)
                )

            ntokens = total("ntokens")
            metrics.log_scalar(
                f"loss_{label}",
                total("loss") / max(total("sample_size"), 1) / math.log(2),
                total("sample_size"),
                round=3,
            )
            for key in ("nll_loss", "kd_loss"):
                if any(f"{key}_{label}" in o for o in logging_outputs):
                    metrics.log_scalar(
                        f"{key}_{label}",
                        total(key) / max(ntokens, 1) / math.log(2),
                        ntokens,
                        round=3,
                    )
