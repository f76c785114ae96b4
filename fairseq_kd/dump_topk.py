"""``fairseq-kd-dump-topk``: run a teacher once over a split and store its top-k."""

import argparse
import hashlib
import logging
import os
import queue
import sys
import threading
import time

import numpy as np
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from tqdm import tqdm

import fairseq_kd
from fairseq_kd import multilingual
from fairseq_kd.checkpoints import checkpoint_fingerprint, load_teacher_ensemble
from fairseq_kd.teacher import (
    DTYPES,
    PRECISIONS,
    place_teachers,
    resolve_precision,
    teacher_distribution,
)
from fairseq_kd.topk_store import (
    HEADER,
    TopKStore,
    TopKWriter,
    data_folder_output,
    data_signature,
    differing_keys,
    pair_sizes,
)

logger = logging.getLogger("fairseq_kd.dump_topk")

ABORT_ENV = "FAIRSEQ_KD_DUMP_ABORT_AFTER"  # test hook: die after N batches
DEFAULT_MAX_TOKENS = 4096
QUEUE_DEPTH = 2  # batches computed ahead of the background writer


def add_dump_args(parser):
    """Add the dump's own options to a fairseq parser.

    Args:
        parser: an ``argparse`` parser from ``fairseq.options.get_parser``.
    """
    group = parser.add_argument_group("top-k dump")
    group.add_argument(
        "--output", required=True, metavar="DIR",
        help="folder of the store (with --num-shards: the folder holding one "
        "shard-III-of-NNN subfolder per shard; with data in several folders "
        "DATA=bin1:bin2, the training split is dumped once per folder, to "
        "DIR/data-000, DIR/data-001...)",
    )  # fmt: skip
    group.add_argument(
        "--k", type=int, default=8,
        help="teacher tokens stored per target position (most probable first)",
    )  # fmt: skip
    group.add_argument(
        "--teacher-dict-dir", default=None, metavar="DIR",
        help="folder of the teacher's dictionaries (dict.SRC.txt, dict.TGT.txt), "
        "whose symbols must equal the data's; by default the data folder named "
        "in the teacher's checkpoint",
    )  # fmt: skip
    group.add_argument(
        "--dump-lang-pairs", default=None, metavar="PAIRS",
        help="with --task translation_multi_simple_epoch: the directions to "
        "dump, comma-separated (default: every --lang-pairs direction); each "
        "goes to its own store, DIR/SRC-TGT",
    )  # fmt: skip
    group.add_argument(
        "--commit-interval", type=int, default=50, metavar="N",
        help="make progress durable every N batches (an interrupted dump "
        "resumes from the last commit)",
    )  # fmt: skip
    group.add_argument(
        "--teacher-precision", choices=PRECISIONS, default="auto",
        help="precision of the teacher's forward pass: auto follows --fp16 "
        "(fp16), --bf16 (bf16) or --amp (float32 weights under float16 "
        "autocast, on CUDA), fp32 otherwise; the softmax and top-k are always "
        "computed in float32",
    )  # fmt: skip
    return group


def get_parser():
    """The parser of ``fairseq-kd-dump-topk`` (fairseq's usual flags plus ours)."""
    parser = options.get_parser("Dump a teacher's top-k", default_task="translation")
    options.add_dataset_args(parser, gen=True)
    group = parser.add_argument_group("teacher")
    options.add_common_eval_args(group)
    add_dump_args(parser)
    parser.set_defaults(gen_subset="train")
    return parser


def make_plan(dataset, max_tokens, max_sentences):
    """Deterministic batches over a whole split, independent of any RNG.

    Sentences are sorted by source length, then target length, then id, and
    cut into batches by ``--max-tokens``/``--batch-size``.

    Args:
        dataset: the split's ``LanguagePairDataset``.
        max_tokens: token budget per batch (padded).
        max_sentences: sentence budget per batch.

    Returns:
        A list of int64 arrays of sentence ids.
    """
    src_sizes, tgt_sizes = pair_sizes(dataset)
    n = len(tgt_sizes)
    order = np.lexsort((np.arange(n), tgt_sizes, src_sizes)).astype(np.int64)
    batches = dataset.batch_by_size(
        order, max_tokens=max_tokens, max_sentences=max_sentences
    )
    return [np.asarray(b, dtype=np.int64) for b in batches]


def plan_sha256(batches):
    """sha256 of a batch plan (to refuse resuming with another one).

    Args:
        batches: list of id arrays.
    """
    digest = hashlib.sha256()
    for b in batches:
        digest.update(np.asarray(b, dtype="<i8").tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def shard_output(output, num_shards, shard_id):
    """Folder of one shard's store.

    Args:
        output: the ``--output`` folder.
        num_shards: ``--num-shards``.
        shard_id: ``--shard-id``.
    """
    if num_shards <= 1:
        return output
    return os.path.join(output, f"shard-{shard_id:03d}-of-{num_shards:03d}")


def dump_precision(option, common, use_cuda):
    """The teacher's precision for the dump's ``--teacher-precision``.

    Args:
        option: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        common: fairseq's ``cfg.common`` (``fp16``, ``bf16``, ``amp``).
        use_cuda: whether the dump runs on CUDA (``--amp`` is CUDA's autocast).

    Returns:
        A :class:`~fairseq_kd.teacher.TeacherPrecision`.
    """
    student = DTYPES["fp32"]
    if common.fp16:
        student = DTYPES["fp16"]
    elif common.bf16:
        student = DTYPES["bf16"]
    autocast = DTYPES["fp16"] if common.amp and use_cuda else None
    return resolve_precision(option, student, autocast)


@torch.no_grad()
def topk_of_batch(teachers, sample, k, pad):
    """Teacher top-k at every non-padding target position of a batch.

    Only the non-padding positions are normalised (a chunk at a time, see
    :func:`fairseq_kd.teacher.teacher_distribution`); they are chosen on
    the host from the target, so nothing waits for the device.

    Args:
        teachers: frozen models on the sample's device.
        sample: a batch collated by the split's ``LanguagePairDataset``; its
            ``target`` may stay on the CPU while ``net_input`` is on the device.
        k: entries per position.
        pad: padding id.

    Returns:
        ``(values, indices, lengths)``: ``sum(L) x k`` float32
        log-probabilities and int64 ids on the device, positions of row 0
        first; ``B`` target lengths (on the target's device).
    """
    mask = sample["target"].ne(pad)  # B x T
    positions = mask.reshape(-1).nonzero().squeeze(1)  # sum(L)
    device = sample["net_input"]["src_tokens"].device
    values, indices = teacher_distribution(
        teachers, sample["net_input"], topk=k, positions=positions.to(device)
    )  # sum(L) x k
    return values, indices, mask.sum(1)


class BatchWriter:
    """Write computed batches to a ``TopKWriter``, in a background thread.

    :meth:`put` hands over a batch's device tensors; they are copied to the
    host (into pinned memory, without waiting, on CUDA) and the thread
    converts and writes them into the memory maps while the next batch is
    computed. At most ``depth`` batches wait in the queue. :meth:`commit`
    is queued behind the writes before it. Use it as a context manager: the
    thread is stopped and joined on every exit, and an error raised in the
    thread is raised again in the caller.

    Args:
        writer: the ``TopKWriter``.
        background: False writes in the caller's thread (same bytes).
        depth: batches the queue holds.
    """

    def __init__(self, writer, background=True, depth=QUEUE_DEPTH):
        self.writer = writer
        self.error = None
        self.thread = None
        if background:
            self.queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(
                target=self._run, name="fairseq-kd-dump-writer", daemon=True
            )
            self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(raise_error=exc_type is None)  # keep the caller's error
        return False

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._do(item)
                except BaseException as error:  # raised again by the caller
                    self.error = error

    def _do(self, item):
        kind, payload = item
        if kind == "commit":
            self.writer.commit(payload)
            return
        sent_ids, values, indices, ready = payload
        if ready is not None:
            ready.synchronize()  # the device-to-host copies are done
        self.writer.write(sent_ids, values.numpy(), indices.numpy())

    def _submit(self, item):
        self._check()
        if self.thread is None:
            self._do(item)
        else:
            self.queue.put(item)

    def _check(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    @staticmethod
    def to_host(tensor):
        """Start copying ``tensor`` to the host (pinned memory on CUDA)."""
        if not tensor.is_cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def put(self, sent_ids, values, indices):
        """Queue the top-k of whole sentences (see ``TopKWriter.write``).

        Args:
            sent_ids: the sentences (a numpy array), in row order.
            values: ``sum(L) x k`` float32 log-probabilities (any device).
            indices: ``sum(L) x k`` int64 ids (same device).
        """
        ready = None
        if values.is_cuda:
            values, indices = self.to_host(values), self.to_host(indices)
            ready = torch.cuda.Event()
            ready.record()  # after the copies, on the current stream
        self._submit(("write", (sent_ids, values, indices, ready)))

    def commit(self, batches_done):
        """Queue ``TopKWriter.commit(batches_done)`` after the writes before it."""
        self._submit(("commit", batches_done))

    def close(self, raise_error=True):
        """Finish the queued work, stop and join the thread; raise its error.

        Args:
            raise_error: raise an error the thread met (else drop it).
        """
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if raise_error:
            self._check()


def write_batches(
    loader,
    teachers,
    writer,
    k,
    pad,
    tgt_sizes,
    first_step=1,
    commit_interval=50,
    use_cuda=False,
    precision=None,
    progress=None,
    abort_after=None,
    background=True,
):
    """The dump's batch loop: teacher top-k of every batch, written to ``writer``.

    The device computes batch ``i + 1`` while the host copies and writes
    batch ``i`` (see :class:`BatchWriter`).

    Args:
        loader: batches of the split, in plan order.
        teachers: frozen models, placed and cast.
        writer: the store's ``TopKWriter``.
        k: entries per position.
        pad: padding id.
        tgt_sizes: binarized target lengths, by sentence id.
        first_step: number of the loader's first batch in the plan (1-based).
        commit_interval: commit after every N-th batch of the plan.
        use_cuda: move each batch to CUDA.
        precision: the teachers' :class:`~fairseq_kd.teacher.TeacherPrecision`
            (its autocast state; None: no autocast).
        progress: called with ``(sentences, tokens)`` after each batch.
        abort_after: test hook: stop the process after this batch number.
        background: write in a background thread.

    Returns:
        ``(sentences, tokens)`` done.
    """
    device_type = "cuda" if use_cuda else "cpu"
    autocast = (
        precision.context(device_type)
        if precision is not None
        else torch.autocast(device_type, enabled=False)
    )
    n_sent = n_tok = 0
    with BatchWriter(writer, background=background) as out, autocast:
        for step, sample in enumerate(loader, start=first_step):
            sent_ids = sample["id"].numpy()
            lengths = sample["target"].ne(pad).sum(1).numpy()
            if not np.array_equal(lengths, tgt_sizes[sent_ids]):
                raise RuntimeError(
                    "collated targets do not have the binarized lengths: the dump "
                    "must see the targets as training does"
                )
            target = sample["target"]
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            sample = dict(sample, target=target)  # positions chosen on the host
            values, indices, _ = topk_of_batch(teachers, sample, k, pad)
            out.put(sent_ids, values, indices)
            n_sent += len(sent_ids)
            n_tok += int(lengths.sum())
            if progress is not None:
                progress(len(sent_ids), int(lengths.sum()))
            if abort_after is not None and step >= abort_after:
                out.close()  # this batch is written, as without the thread
                logger.warning(f"{ABORT_ENV}={abort_after}: stopping hard (test hook)")
                os._exit(3)
            if step % commit_interval == 0:
                out.commit(step)
    return n_sent, n_tok


def _abort_after():
    value = os.environ.get(ABORT_ENV)
    return int(value) if value else None


def dump(cfg):
    """Run the dump described by a fairseq config (see ``get_parser``).

    With data in several folders (``DATA=bin1:bin2``, one per epoch), the
    training split is dumped once per folder, to ``--output``'s
    ``data-000``, ``data-001``... subfolders (see
    :func:`fairseq_kd.topk_store.data_folder_output`); other splits come from
    the first folder, as fairseq reads them.

    Args:
        cfg: the omegaconf config; ``cfg.dump`` holds ``output``, ``k``,
            ``commit_interval`` and ``teacher_dict_dir``.

    Returns:
        A dict of statistics (sentences, tokens, seconds, bytes, header) of
        the store written; with several data folders, the sums and a
        ``stores`` list with each folder's statistics.
    """
    utils.import_user_module(cfg.common)
    dump_cfg = cfg.dump
    if dump_cfg.k < 1:
        raise ValueError(f"--k must be >= 1, got {dump_cfg.k}")
    if not cfg.common_eval.path:
        raise ValueError("--path: give the teacher checkpoint(s) to dump")
    num_shards, shard_id = cfg.dataset.num_shards, cfg.dataset.shard_id
    if not 0 <= shard_id < num_shards:
        raise ValueError(
            f"--shard-id {shard_id} must be in [0, --num-shards {num_shards})"
        )
    split = cfg.dataset.gen_subset
    task = tasks.setup_task(cfg.task)
    if dump_cfg.k > len(task.target_dictionary):
        raise ValueError(
            f"--k {dump_cfg.k} is larger than the target dictionary "
            f"({len(task.target_dictionary)})"
        )
    is_multi = multilingual.is_multilingual(task)
    hooks = multilingual.teacher_hooks(task)  # fairseq's task: its checks
    pairs = _as_pairs(dump_cfg.get("lang_pairs"))
    if pairs and not is_multi:
        raise ValueError(
            "--dump-lang-pairs needs --task translation_multi_simple_epoch (the "
            "multilingual task)"
        )
    with torch.random.fork_rng(devices=[]):
        teachers = load_teacher_ensemble(
            cfg.common_eval.path, task, dict_dir=dump_cfg.teacher_dict_dir, **hooks
        )
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    precision = dump_precision(dump_cfg.teacher_precision, cfg.common, use_cuda)
    place_teachers(
        teachers, torch.device("cuda" if use_cuda else "cpu"), precision.weights
    )
    folders = utils.split_paths(cfg.task.data)
    if split != cfg.dataset.train_subset:
        folders = folders[:1]  # fairseq reads other splits from the first folder
    if is_multi:
        return dump_directions(cfg, task, teachers, precision, split, folders, pairs)
    runs = []
    for index, folder in enumerate(folders):
        output = data_folder_output(dump_cfg.output, index, len(folders))
        runs.append(
            dump_split(
                cfg,
                task,
                teachers,
                precision,
                split,
                index + 1,
                folder,
                output,
                len(folders) > 1,
            )
        )
    if len(runs) == 1:
        return runs[0]
    totals = {
        key: sum(r[key] for r in runs)
        for key in ("sentences", "tokens", "seconds", "bytes")
    }
    return dict(totals, stores=runs, output=dump_cfg.output)


def _as_pairs(value):
    if not value:
        return None
    return [p.strip() for p in str(value).split(",") if p.strip()]


def dump_directions(cfg, task, teachers, precision, split, folders, pairs=None):
    """Dump one store per direction of a multilingual split, ``OUTPUT/SRC-TGT``.

    Each direction's dataset is the student's (language tags included, see
    :func:`fairseq_kd.multilingual.direction_datasets`); its store records
    the direction, so that it is refused for another one.

    Args:
        cfg: the dump's config (see :func:`dump`).
        task: the multilingual task.
        teachers: the loaded teachers, on their device.
        precision: the teachers' precision.
        split: the split's name.
        folders: the data folders (one: several are refused).
        pairs: the directions to dump (default: all of ``--lang-pairs``).

    Returns:
        The sums of the stores' statistics and a ``stores`` list.
    """
    if len(folders) > 1:
        raise ValueError(
            f"the multilingual task's stores are dumped from one data folder: "
            f"{cfg.task.data} names {len(folders)}"
        )
    runs = []
    combine = split == cfg.dataset.train_subset
    for pair, dataset, direction in multilingual.direction_datasets(
        task, split, pairs, combine=combine
    ):
        output = os.path.join(cfg.dump.output, pair)
        runs.append(
            dump_split(
                cfg,
                task,
                teachers,
                precision,
                split,
                1,
                folders[0],
                output,
                skip_finished=True,
                dataset=dataset,
                direction=direction,
            )
        )
    totals = {
        key: sum(r[key] for r in runs)
        for key in ("sentences", "tokens", "seconds", "bytes")
    }
    return dict(totals, stores=runs, output=cfg.dump.output)


def _check_teacher_positions(teachers, dataset, split):
    """Refuse a split with sentences longer than a teacher's positional table."""
    limits = utils.resolve_max_positions(*(t.max_positions() for t in teachers))
    _, ignored = dataset.filter_indices_by_size(np.arange(len(dataset)), limits)
    if len(ignored):
        i = int(ignored[0])
        raise ValueError(
            f"{len(ignored)} sentences of split '{split}' are longer than the "
            f"teacher's maximum positions {limits} (the first: sentence {i}, "
            f"{int(dataset.src_sizes[i])} source and {int(dataset.tgt_sizes[i])} "
            "target tokens). A store holds every sentence of its split: drop "
            "those sentences from the data, or use a teacher with longer positions"
        )


def dump_split(
    cfg,
    task,
    teachers,
    precision,
    split,
    epoch,
    folder,
    output,
    skip_finished=False,
    dataset=None,
    direction=None,
):
    """Dump the teachers' top-k of one split of one data folder.

    Args:
        cfg: the dump's config (see :func:`dump`).
        task: the task (its dictionaries are the data's).
        teachers: the loaded teachers, on their device.
        precision: the teachers' :class:`~fairseq_kd.teacher.TeacherPrecision`.
        split: the split's name.
        epoch: fairseq's epoch that loads ``folder`` (1 for the first).
        folder: the data folder (for the signature).
        output: the store's folder (before ``--num-shards``).
        skip_finished: keep a finished store of this very dump (same
            signature and k) instead of refusing it, so that rerunning a dump
            of several data folders resumes with the first unfinished one.
        dataset: the ``LanguagePairDataset`` to dump (default: the task's
            ``split``, loaded here).
        direction: a multilingual direction's signature (see
            :func:`fairseq_kd.topk_store.data_signature`).

    Returns:
        The store's statistics (see :func:`dump`).
    """
    dump_cfg = cfg.dump
    num_shards, shard_id = cfg.dataset.num_shards, cfg.dataset.shard_id
    max_tokens, max_sentences = cfg.dataset.max_tokens, cfg.dataset.batch_size
    if max_tokens is None and max_sentences is None:
        max_tokens = DEFAULT_MAX_TOKENS
    use_cuda = next(teachers[0].parameters()).is_cuda
    if dataset is None:
        task.load_dataset(split, epoch=epoch, combine=split == cfg.dataset.train_subset)
        dataset = task.dataset(split)
        langs = (task.cfg.source_lang, task.cfg.target_lang)
    else:
        langs = tuple(direction["lang_pair"].split("-"))
    tgt_dict = task.target_dictionary
    _, tgt_sizes = pair_sizes(dataset)
    _check_teacher_positions(teachers, dataset, split)

    plan = make_plan(dataset, max_tokens, max_sentences)
    batches = plan[shard_id::num_shards]
    ids = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    signature = data_signature(
        dataset, task.source_dictionary, tgt_dict, split, direction
    )
    signature.update(
        package_version=fairseq_kd.__version__,
        data_folder=os.path.abspath(folder),
        source_lang=langs[0],
        target_lang=langs[1],
        teachers=checkpoint_fingerprint(cfg.common_eval.path),
        dump={
            "precision": precision.name,
            "max_tokens": max_tokens,
            "batch_size": max_sentences,
        },
    )
    if num_shards > 1:
        signature["shard"] = {"num_shards": num_shards, "shard_id": shard_id}
    out = shard_output(output, num_shards, shard_id)
    if skip_finished and os.path.isfile(os.path.join(out, HEADER)):
        header = TopKStore(out).header
        if header["k"] == dump_cfg.k and not differing_keys(
            {key: header.get(key) for key in signature}, signature
        ):
            logger.info(f"{out} already holds this dump's finished store: kept")
            n_bytes = sum(spec["bytes"] for spec in header["arrays"].values())
            return {
                "sentences": 0, "tokens": 0, "seconds": 0.0, "bytes": n_bytes,
                "bytes_per_token": n_bytes / max(header["num_tokens"], 1),
                "header": header, "output": out,
            }  # fmt: skip
    writer = TopKWriter(
        out,
        signature,
        tgt_sizes[ids],
        dump_cfg.k,
        ids=ids if num_shards > 1 else None,
        run_key={"plan_sha256": plan_sha256(plan), "cuda": use_cuda},
    )
    start = writer.batches_done
    if start:
        logger.info(f"resuming {out} after {start} of {len(batches)} batches")
    n_sent, n_tok, loop_seconds = dump_batches(
        cfg, teachers, precision, dataset, writer, batches, start, split
    )
    header = writer.finalize()
    n_bytes = sum(spec["bytes"] for spec in header["arrays"].values())
    total_tokens = header["num_tokens"]
    stats = {
        "sentences": n_sent,
        "tokens": n_tok,
        "seconds": loop_seconds,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / max(total_tokens, 1),
        "header": header,
        "output": out,
    }
    logger.info(
        f"dumped top-{dump_cfg.k} of split '{split}' of {folder}"
        + (f" (shard {shard_id} of {num_shards})" if num_shards > 1 else "")
        + f": {len(ids):,} sentences, {total_tokens:,} target tokens, "
        f"{n_bytes:,} bytes ({stats['bytes_per_token']:.2f} bytes/token) in {out}; "
        f"average top-k mass {header['avg_topk_mass']:.4f}; "
        f"{loop_seconds:.1f}s this run "
        f"({n_sent / max(loop_seconds, 1e-9):.0f} sentences/s, "
        f"{n_tok / max(loop_seconds, 1e-9):.0f} tokens/s)"
    )
    return stats


def dump_batches(cfg, teachers, precision, dataset, writer, batches, start, split):
    """Run the teachers over ``batches[start:]`` and write their top-k.

    Args:
        cfg: the dump's config.
        teachers: the loaded teachers, on their device.
        precision: the teachers' :class:`~fairseq_kd.teacher.TeacherPrecision`.
        dataset: the split's ``LanguagePairDataset``.
        writer: the store's ``TopKWriter`` (committed every
            ``--commit-interval`` batches).
        batches: the whole plan of this store (lists of sentence ids).
        start: batches already done (a resumed dump).
        split: the split's name (for the progress bar).

    Returns:
        ``(sentences, target tokens, seconds)`` of this run.
    """
    dump_cfg = cfg.dump
    use_cuda = next(teachers[0].parameters()).is_cuda
    _, tgt_sizes = pair_sizes(dataset)
    tokens_done = int(sum(tgt_sizes[b].sum() for b in batches[:start]))
    todo = batches[start:]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[b.tolist() for b in todo],
        collate_fn=dataset.collater,
        num_workers=cfg.dataset.num_workers,
    )
    t0 = time.perf_counter()
    bar = tqdm(
        total=writer.num_tokens,
        initial=tokens_done,
        unit="tok",
        unit_scale=True,
        desc=f"top-{dump_cfg.k} {split}",
        disable=cfg.common.no_progress_bar,
        file=sys.stderr,
    )
    done = {"sentences": 0}

    def progress(sentences, tokens):
        done["sentences"] += sentences
        bar.update(tokens)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(sent_s=f"{done['sentences'] / elapsed:.0f}", refresh=False)

    try:
        n_sent, n_tok = write_batches(
            loader,
            teachers,
            writer,
            dump_cfg.k,
            dataset.tgt_dict.pad(),
            tgt_sizes,
            first_step=start + 1,
            commit_interval=dump_cfg.commit_interval,
            use_cuda=use_cuda,
            precision=precision,
            progress=progress,
            abort_after=_abort_after(),
            background=dump_cfg.get("background_writer", True),
        )
    finally:
        bar.close()
    return n_sent, n_tok, time.perf_counter() - t0


def parse(argv=None):
    """Parse ``fairseq-kd-dump-topk`` arguments into a fairseq config.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = get_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        cfg.dump = OmegaConf.create(
            {
                "output": args.output,
                "k": args.k,
                "commit_interval": args.commit_interval,
                "teacher_precision": args.teacher_precision,
                "teacher_dict_dir": args.teacher_dict_dir,
                "lang_pairs": args.dump_lang_pairs,
            }
        )
    return cfg


def cli_main(argv=None):
    """Entry point of ``fairseq-kd-dump-topk``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
        force=True,
    )
    dump(parse(argv))


def merge_main(argv=None):
    """Entry point of ``fairseq-kd-merge-topk``."""
    from fairseq_kd.topk_store import merge_shards

    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=logging.INFO,
        stream=sys.stdout,
        force=True,
    )
    parser = argparse.ArgumentParser(
        description="Merge the shards written by fairseq-kd-dump-topk --num-shards N"
    )
    parser.add_argument("folder", help="the --output folder of the sharded dump")
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the merged store (default: folder)",
    )
    parser.add_argument(
        "--delete-shards", action="store_true", help="remove the shards once merged"
    )
    args = parser.parse_args(argv)
    header = merge_shards(args.folder, args.output, args.delete_shards)
    logger.info(
        f"merged {args.folder} into {args.output or args.folder}: "
        f"{header['num_sentences']:,} sentences, {header['num_tokens']:,} tokens"
    )


if __name__ == "__main__":
    cli_main()
