"""The teacher logic shared by the KD tasks: live teachers, top-k stores, checks."""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim.amp_optimizer import AMPOptimizer

from fairseq_kd.checkpoints import checkpoint_fingerprint, load_teacher_ensemble
from fairseq_kd.teacher import (
    PRECISIONS,
    current_autocast,
    place_teachers,
    resolve_precision,
    teacher_distribution,
)
from fairseq_kd.topk_dataset import TEACHER_KEY
from fairseq_kd.topk_store import (
    HEADER,
    PROGRESS,
    TopKStore,
    TopKStoreError,
    TopKStoreMismatch,
    data_folder_output,
    data_folder_stores,
)

logger = logging.getLogger(__name__)

__all__ = ["KD_MASK", "KDTeacherConfig", "KDTeacherMixin", "TEACHER_KEY"]

# sample["teacher"]["mask"]: B x T bool, False where a target position gets no KD
KD_MASK = "mask"


def _identity(header, key):
    """What must agree across stores: teachers' hashes, dictionary signatures."""
    if key == "teachers":
        return [t["sha256"] for t in header.get("teachers", [])]
    return header.get(key)


def describe_teachers(teachers):
    """``path (sha256 0123456789ab), ...`` of a teacher fingerprint.

    Args:
        teachers: a list of ``{"path", "sha256"}``.
    """
    return ", ".join(f"{t['path']} (sha256 {t['sha256'][:12]})" for t in teachers)


def _describe_identity(header, key):
    value = _identity(header, key)
    if key == "teachers":
        return "teacher(s) " + describe_teachers(header.get("teachers", []))
    return f"{value['size']} symbols, sha256 {value['sha256'][:12]}"


@dataclass
class KDTeacherConfig(FairseqDataclass):
    """Where the teacher comes from and how it runs (shared by the KD tasks).

    ``translation_kd``'s config subclasses it beside ``TranslationConfig``;
    ``translation_multi_simple_epoch_kd``, an argparse task, adds the same
    fields to its parser with ``gen_parser_from_dataclass``.
    """

    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint(s) run live beside the student; several "
            "separated by ':' form an ensemble whose probabilities are averaged"
        },
    )
    teacher_dict_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "folder holding the --teacher-path teachers' dictionaries "
            "(dict.SRC.txt, dict.TGT.txt), whose symbols must equal this task's; "
            "by default the data folder named in each teacher's checkpoint"
        },
    )
    teacher_topk: Optional[str] = field(
        default=None,
        metadata={
            "help": "read the teacher's top-k from a store written by "
            "fairseq-kd-dump-topk instead of running a teacher: either one store "
            "(used for --train-subset) or a folder with one store per split "
            "(DIR/train, DIR/valid, ...; multilingual: one per direction, "
            "DIR/train/de-en, ...); excludes --teacher-path"
        },
    )
    teacher_allow_change: bool = field(
        default=False,
        metadata={
            "help": "resume a checkpoint trained with other teachers than this "
            "run's (their sha256 is recorded in each checkpoint); refused "
            "without this option"
        },
    )
    teacher_topk_checksums: bool = field(
        default=False,
        metadata={
            "help": "verify the sha256 of every array of the top-k store(s) "
            "before training (reads each store once)"
        },
    )
    teacher_precision: ChoiceEnum(PRECISIONS) = field(
        default="auto",
        metadata={
            "help": "precision of the live teacher's forward pass: auto follows "
            "the student (fp16 under --fp16, bf16 under --bf16, float32 weights "
            "under the student's autocast with --amp, fp32 otherwise); fp32, "
            "fp16 or bf16 set it whatever the student uses. Log-probabilities "
            "are always normalised in float32"
        },
    )


class KDTeacherMixin:
    """A teacher whose distributions ride along in the sample, for any task.

    Put before a fairseq translation task in the bases (``class
    TranslationKDTask(KDTeacherMixin, TranslationTask)``). Before each
    training or validation step, the teacher's float32 log-probabilities at
    temperature 1 are attached to the sample as ``sample["teacher"] =
    {"lprobs": B x T x S, "indices": B x T x S}`` (``indices`` is absent when
    ``S`` is the whole vocabulary; a live teacher gives its top-``K`` when the
    criterion's ``kd_topk`` is ``K``), with ``"mask": B x T`` (False where a
    position gets no KD term) when :meth:`kd_position_mask` gives one. A
    criterion such as ``word_kd`` reads them from there, whatever produced
    them.

    The options (:class:`KDTeacherConfig`) are read from :attr:`kd_cfg`: the
    task's dataclass config, or the ``args`` namespace of an argparse task.
    Hooks for the task: :meth:`store_targets` (which stores serve a split),
    :meth:`check_teacher_state` (refuse an incompatible teacher checkpoint),
    :meth:`teacher_dictionaries` and :meth:`kd_position_mask`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.kd_cfg
        if cfg.teacher_path and cfg.teacher_topk:
            raise ValueError(
                "--teacher-path (live teacher) and --teacher-topk (stored top-k) "
                "are mutually exclusive: give one of them"
            )
        self.teachers = None  # a plain list: never a submodule of anything
        self.criterion = None  # set by build_criterion, for checkpoint state
        self._stores = {}  # path -> TopKStore
        self._checked_stores = None

    @property
    def kd_cfg(self):
        """The options: the dataclass config, or an argparse task's ``args``."""
        cfg = getattr(self, "cfg", None)
        return cfg if cfg is not None else self.args

    @property
    def has_teacher(self):
        """Whether this task was configured with a teacher (live or stored)."""
        return bool(self.kd_cfg.teacher_path or self.kd_cfg.teacher_topk)

    # ------------------------------------------------------------------ stores

    def topk_store_path(self, split, epoch=1):
        """The store serving ``split`` at ``epoch`` under ``--teacher-topk``, or None.

        ``--teacher-topk DIR`` is either one store (it has ``header.json``),
        used for the training split, or a folder of stores named after the
        splits (``DIR/train``, ``DIR/valid``...). With data in several folders
        (``DATA=bin1:bin2``, read one per epoch for the training split), the
        training split's store is a folder holding one store per data folder,
        ``data-000``, ``data-001``... (as ``fairseq-kd-dump-topk DATA`` writes
        them), either ``DIR`` itself or ``DIR/train``; epoch ``e`` reads
        ``data-III`` with ``III = (e - 1) % len(DATA)``, as fairseq does.

        Args:
            split: the split's name.
            epoch: fairseq's epoch (selects the data folder).
        """
        cfg = self.kd_cfg
        root = cfg.teacher_topk
        if not root:
            return None
        is_train = split == cfg.train_subset
        if any(os.path.isfile(os.path.join(root, f)) for f in (HEADER, PROGRESS)):
            base = root if is_train else None
        elif os.path.isdir(os.path.join(root, split)):
            base = os.path.join(root, split)
        elif not is_train:
            base = None
        elif data_folder_stores(root):
            base = root
        elif os.path.isdir(root) and not any(
            name.startswith("shard-") for name in os.listdir(root)
        ):
            raise TopKStoreError(
                f"--teacher-topk {root} holds no store for the training split "
                f"'{split}': expected {os.path.join(root, HEADER)} (one store) or "
                f"{os.path.join(root, split, HEADER)} (one store per split)"
            )
        else:
            base = root  # TopKStore explains what is missing there (shards, nothing)
        if base is None:
            return None
        num_folders = len(utils.split_paths(cfg.data)) if is_train else 1
        found = data_folder_stores(base)
        if not found and num_folders == 1:
            return base
        expected = [
            os.path.basename(data_folder_output(base, i, 2)) for i in range(num_folders)
        ]
        if found != expected:
            raise TopKStoreError(
                f"top-k store {base} does not hold one store per data folder of "
                f"split '{split}': the data has {num_folders} folder(s) "
                f"({cfg.data}), read one per epoch, so expected "
                f"{', '.join(expected)} in {base}, found "
                f"{', '.join(found) or 'none'}. Dump the teacher with "
                f"fairseq-kd-dump-topk {cfg.data} ... --output {base} "
                "(one store per data folder)"
            )
        return data_folder_output(base, (epoch - 1) % num_folders, 2)

    def store_targets(self, split, epoch=1):
        """The stores that serve ``split``: a list of ``(label, path or None)``.

        ``label`` names the part of the split a store serves in messages
        (``split 'train'``; a multilingual task: ``split 'train', direction
        de-en``). The default is one store per split (:meth:`topk_store_path`).

        Args:
            split: the split's name.
            epoch: fairseq's epoch.
        """
        return [(f"split '{split}'", self.topk_store_path(split, epoch))]

    def _open_path(self, path):
        if path not in self._stores:
            self._stores[path] = TopKStore(
                path, verify_checksums=self.kd_cfg.teacher_topk_checksums
            )
        return self._stores[path]

    def _open_store(self, split, epoch=1):
        path = self.topk_store_path(split, epoch)
        return None if path is None else self._open_path(path)

    def _kd_splits(self):
        """The ``(split, epoch)`` pairs this run reads stores for."""
        cfg = self.kd_cfg
        splits = [
            (cfg.train_subset, epoch)
            for epoch in range(1, len(utils.split_paths(cfg.data)) + 1)
        ]
        if not cfg.disable_validation:
            splits += [
                (split, 1)
                for split in str(cfg.valid_subset).split(",")
                if split and split != cfg.train_subset
            ]
        return splits

    def teacher_stores(self):
        """Open every store this run reads and check them against each other.

        The stores are the training split's (one per data folder, or per
        direction) and each ``--valid-subset``'s (unless
        ``--disable-validation``). They must all be finished, merged stores
        from the same teachers (their sha256 list) with the same
        dictionaries; each is checked against its data later, when its split
        is loaded. Checked once, at start-up (the criterion asks for
        :attr:`teacher_support`; ``build_criterion`` and ``load_dataset`` call
        this too).

        Returns:
            A list of ``(label, store)`` pairs, the training split's first.
        """
        if self._checked_stores is not None:
            return self._checked_stores
        stores = []
        for split, epoch in self._kd_splits():
            for label, path in self.store_targets(split, epoch):
                if path is None:
                    continue
                store = self._open_path(path)
                if store.is_shard:
                    shard = store.header["shard"]
                    raise TopKStoreMismatch(
                        f"top-k store {store.path} ({label}) is shard "
                        f"{shard['shard_id']} of {shard['num_shards']}: merge the "
                        "shards with fairseq-kd-merge-topk"
                    )
                if all(store is not other for _, other in stores):
                    stores.append((label, store))
        if not stores:
            raise TopKStoreError(
                f"--teacher-topk {self.kd_cfg.teacher_topk} holds no store this "
                "run reads"
            )
        ref_label, ref = stores[0]
        for label, store in stores[1:]:
            for key, what in (
                ("teachers", "teachers"),
                ("source_dictionary", "source dictionaries"),
                ("target_dictionary", "target dictionaries"),
            ):
                if _identity(ref.header, key) != _identity(store.header, key):
                    raise TopKStoreMismatch(
                        f"the top-k stores of this run come from different {what}: "
                        f"{ref.path} ({ref_label}) has "
                        f"{_describe_identity(ref.header, key)}, {store.path} "
                        f"({label}) has "
                        f"{_describe_identity(store.header, key)}. Dump every "
                        "split (and data folder) with the same teacher and data."
                    )
        self._checked_stores = stores
        return stores

    @property
    def teacher_support(self):
        """Entries per position every store provides (None: the vocabulary).

        The smallest ``k`` of all the stores the run reads (see
        :meth:`teacher_stores`).
        """
        if not self.kd_cfg.teacher_topk:
            return None
        return min(store.k for _, store in self.teacher_stores())

    def verified_store(
        self, label, path, dataset, src_dict, tgt_dict, split, output, **kw
    ):
        """The store at ``path`` checked against ``dataset``, or None.

        Logs a warning when ``path`` is None (no store: the split's loss is
        label-smoothed cross-entropy only).

        Args:
            label: what the store serves, for messages (see :meth:`store_targets`).
            path: the store, or None.
            dataset: the ``LanguagePairDataset`` it must have been dumped from.
            src_dict: source dictionary.
            tgt_dict: target dictionary.
            split: the split's name.
            output: where ``fairseq-kd-dump-topk --output`` would write the
                missing store (for the warning).
            kw: passed on to ``TopKStore.verify_against`` (``direction``).
        """
        self.teacher_stores()
        if path is None:
            logger.warning(
                f"no top-k store for {label} under {self.kd_cfg.teacher_topk}: "
                "its loss is label-smoothed cross-entropy only (no kd_loss); dump "
                f"one with fairseq-kd-dump-topk --gen-subset {split} --output "
                f"{output}"
            )
            return None
        store = self._open_path(path)
        store.verify_against(dataset, src_dict, tgt_dict, split, **kw)
        logger.info(store.describe())
        return store

    # ---------------------------------------------------------------- teachers

    def check_teacher_state(self, path, state):
        """Refuse a teacher checkpoint this task cannot distil (hook).

        Called for each ``--teacher-path`` checkpoint before its dictionaries
        are compared. The default accepts any.

        Args:
            path: the checkpoint.
            state: its loaded state.
        """

    def teacher_dictionaries(self, path, state, dict_dir=None):
        """The teacher's own dictionaries, for a symbol comparison (hook).

        Args:
            path: the checkpoint.
            state: its loaded state.
            dict_dir: ``--teacher-dict-dir``.

        Returns:
            ``(source, target, (source file, target file))`` dictionaries, or
            ``(None, why)`` when they cannot be found; None: the default
            lookup of :func:`fairseq_kd.checkpoints.teacher_dictionary_files`.
        """
        return None

    def build_model(self, cfg, from_checkpoint=False):
        """Build the student; load the teacher once, unless reloading a model.

        Args:
            cfg: the model config.
            from_checkpoint: True when fairseq rebuilds a saved model (for
                inference): no teacher is loaded then.
        """
        model = super().build_model(cfg, from_checkpoint)
        kd = self.kd_cfg
        if kd.teacher_path and not from_checkpoint and self.teachers is None:
            # building the teacher draws random initial weights: keep the RNG
            # where the student left it, so seeds reproduce runs without KD
            with torch.random.fork_rng(devices=[]):
                self.teachers = load_teacher_ensemble(
                    kd.teacher_path, self, dict_dir=kd.teacher_dict_dir
                )
        return model

    def max_positions(self):
        """The task's maximum positions, within every live teacher's.

        fairseq filters (training) or refuses (validation, without
        ``--skip-invalid-size-inputs-valid-test``) longer sentences by
        ``task.max_positions()`` and the student's; a teacher with a shorter
        positional table would otherwise fail on them mid-epoch.
        """
        positions = super().max_positions()
        if self.teachers:
            positions = utils.resolve_max_positions(
                positions, *(teacher.max_positions() for teacher in self.teachers)
            )
        return positions

    def build_criterion(self, cfg, from_checkpoint=False):
        """Build the criterion and keep a reference for its checkpoint state.

        Args:
            cfg: the criterion config.
            from_checkpoint: passed on to fairseq.
        """
        kd_topk = getattr(cfg, "kd_topk", 0) or 0
        if self.kd_cfg.teacher_topk and not from_checkpoint:
            for label, store in self.teacher_stores():
                if kd_topk > store.k:
                    raise ValueError(
                        f"--kd-topk {kd_topk} is larger than the {store.k} entries "
                        f"per position of the top-k store {store.path} "
                        f"({label}): dump it again with --k {kd_topk} or more, "
                        "or lower --kd-topk"
                    )
        if from_checkpoint:
            criterion = super().build_criterion(cfg, from_checkpoint=True)
        else:
            criterion = super().build_criterion(cfg)
        self.criterion = criterion
        return criterion

    def teacher_fingerprint(self):
        """The teachers of this run: ``[{"path", "sha256"}]``, or None.

        A live teacher's checkpoint files (hashed once), or the teachers named
        in the header of the top-k stores (all alike, see
        :meth:`teacher_stores`).
        """
        if self.kd_cfg.teacher_path:
            return checkpoint_fingerprint(self.kd_cfg.teacher_path)
        if self.kd_cfg.teacher_topk:
            _, store = self.teacher_stores()[0]
            return [
                {"path": t["path"], "sha256": t["sha256"]}
                for t in store.header["teachers"]
            ]
        return None

    def get_checkpoint_dict(self):
        """State fairseq saves in each checkpoint's ``extra_state``.

        The teachers' fingerprint (see :meth:`teacher_fingerprint`), compared
        on resume. fairseq saves a criterion's ``state_dict`` only when it has
        parameters; a criterion with other state (``word_kd``'s global
        selection queue) exposes ``checkpoint_state()`` and rides along here.
        """
        state = {}
        if self.has_teacher:
            state["teachers"] = self.teacher_fingerprint()
        if hasattr(self.criterion, "checkpoint_state"):
            criterion_state = self.criterion.checkpoint_state()
            if criterion_state:
                state["criterion"] = criterion_state
        return {self.__class__.__name__: state} if state else {}

    def set_checkpoint_dict(self, state):
        """Restore :meth:`get_checkpoint_dict`'s state when fairseq resumes.

        A checkpoint trained with other teachers (sha256) than this run's is
        refused unless ``--teacher-allow-change``.

        Args:
            state: the dictionary saved under this task's class name.
        """
        saved = state.get("teachers")
        if saved is not None and self.has_teacher:
            current = self.teacher_fingerprint()
            if [t["sha256"] for t in saved] != [t["sha256"] for t in current]:
                message = (
                    "the checkpoint being resumed was trained with teacher(s) "
                    f"{describe_teachers(saved)}, but this run's teacher is "
                    f"{describe_teachers(current)}"
                )
                if not self.kd_cfg.teacher_allow_change:
                    raise ValueError(
                        f"{message}: resuming would switch teachers. Give the "
                        "original teacher, start a new --save-dir, or pass "
                        "--teacher-allow-change to resume with this one"
                    )
                logger.warning(f"{message} (--teacher-allow-change: resuming)")
        if "criterion" in state and hasattr(self.criterion, "load_checkpoint_state"):
            self.criterion.load_checkpoint_state(state["criterion"])

    def _teachers_like(self, model):
        """Place the teachers for ``model``: its device, and their precision.

        Returns:
            ``(teachers, precision)``; ``precision`` is the
            :class:`~fairseq_kd.teacher.TeacherPrecision` of
            ``--teacher-precision``, resolved against the student's parameter
            dtype and the autocast state at the time of the call.
        """
        param = next(model.parameters())
        precision = resolve_precision(
            self.kd_cfg.teacher_precision,
            param.dtype,
            current_autocast(param.device.type),
        )
        place_teachers(self.teachers, param.device, precision.weights)
        return self.teachers, precision

    def _live_topk(self, criterion=None):
        """Entries per position the criterion uses (0: the whole vocabulary)."""
        criterion = self.criterion if criterion is None else criterion
        topk = int(getattr(criterion, "kd_topk", 0) or 0)
        return topk if 0 < topk < len(self.target_dictionary) else 0

    def attach_teacher(self, sample, model, criterion=None):
        """Add the live teacher's distributions to ``sample`` (in place).

        With a criterion whose ``kd_topk`` is ``K > 0`` only the teacher's
        top-K are attached (as a top-k store gives them): ``{"lprobs": B x T
        x K, "indices": B x T x K}``, taken where the log-probabilities are
        computed, a chunk of positions at a time; otherwise ``{"lprobs": B x
        T x V}``. Log-probabilities are float32 at temperature 1. The teacher
        reads the sample's ``net_input``: exactly the student's input.

        Args:
            sample: the mini-batch.
            model: the student (gives the device and precision).
            criterion: the criterion that will read the sample (its
                ``kd_topk``); default: the one :meth:`build_criterion` built.
        """
        if self.teachers is None or sample is None or TEACHER_KEY in sample:
            return sample
        teachers, precision = self._teachers_like(model)
        device_type = next(model.parameters()).device.type
        topk = self._live_topk(criterion)
        with torch.no_grad(), precision.context(device_type):
            lprobs, indices = teacher_distribution(
                teachers, sample["net_input"], topk=topk
            )  # B x T x K (or V)
        sample[TEACHER_KEY] = {"lprobs": lprobs}
        if indices is not None:
            sample[TEACHER_KEY]["indices"] = indices
        return sample

    def kd_position_mask(self, sample):
        """``B x T`` bool, False where a target position gets no KD term (hook).

        None (the default): every non-padding position gets one.

        Args:
            sample: the mini-batch.
        """
        return None

    def prepare_teacher(self, sample, model, criterion=None):
        """Attach the teacher (see :meth:`attach_teacher`) and the KD mask.

        Args:
            sample: the mini-batch.
            model: the student.
            criterion: the criterion that will read the sample.
        """
        self.attach_teacher(sample, model, criterion)
        teacher = None if sample is None else sample.get(TEACHER_KEY)
        if teacher is not None and KD_MASK not in teacher:
            mask = self.kd_position_mask(sample)
            if mask is not None:
                teacher[KD_MASK] = mask
        return sample

    @staticmethod
    def _student_autocast(model, optimizer):
        """The autocast fairseq's ``train_step`` puts the student under.

        fairseq runs the criterion under ``torch.cuda.amp.autocast`` (float16)
        when the optimizer is an ``AMPOptimizer`` (``--amp``); the teacher is
        attached outside that block, so the same state is set up for it here.
        """
        if isinstance(optimizer, AMPOptimizer) and next(model.parameters()).is_cuda:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def train_step(
        self, sample, model, criterion, optimizer, update_num, ignore_grad=False
    ):
        """Attach the teacher's distributions, then train as usual.

        A criterion with ``begin_train_step(update_num, ignore_grad)`` (such
        as ``word_kd``, for its schedules) is told the update number first.
        """
        begin = getattr(criterion, "begin_train_step", None)
        if begin is not None:
            begin(update_num, ignore_grad)
        with self._student_autocast(model, optimizer):
            self.prepare_teacher(sample, model, criterion)
        return super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )

    def valid_step(self, sample, model, criterion):
        """Attach the teacher's distributions, then validate as usual."""
        self.prepare_teacher(sample, model, criterion)
        return super().valid_step(sample, model, criterion)
