"""``fairseq-kd-dump-topk``: run a teacher once over a split and store its top-k."""

import argparse
import hashlib
import logging
import os
import sys
import time

import numpy as np
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from tqdm import tqdm

import fairseq_kd
from fairseq_kd.checkpoints import (
    checkpoint_fingerprint,
    load_teacher_ensemble,
    teacher_log_probs,
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
CHUNK_ROWS = 256  # positions normalised at a time by the single-teacher path


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
        "--commit-interval", type=int, default=50, metavar="N",
        help="make progress durable every N batches (an interrupted dump "
        "resumes from the last commit)",
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


def _single_teacher_topk(teacher, net_input, k, rows=CHUNK_ROWS):
    """Top-k log-probabilities of one teacher, normalised ``rows`` at a time.

    Equal to ``teacher_log_probs([teacher], net_input).topk(k)`` (softmax rows
    are independent), but the ``B x T x V`` log-probabilities are never held
    at once, which keeps the work in cache.
    """
    net_output = teacher(**net_input)
    logits = net_output[0]  # B x T x V
    bsz, tlen, vocab = logits.shape
    flat = logits.reshape(-1, vocab)  # BT x V
    values = flat.new_empty(bsz * tlen, k, dtype=torch.float32)  # BT x k
    indices = torch.empty(bsz * tlen, k, dtype=torch.long, device=flat.device)
    for start in range(0, bsz * tlen, rows):
        end = min(start + rows, bsz * tlen)
        chunk = (flat[start:end],) + tuple(net_output[1:])
        lprobs = teacher.get_normalized_probs(chunk, log_probs=True).float()
        torch.topk(lprobs, k, dim=-1, out=(values[start:end], indices[start:end]))
    return values.view(bsz, tlen, k), indices.view(bsz, tlen, k)


@torch.no_grad()
def topk_of_batch(teachers, sample, k, pad):
    """Teacher top-k at every non-padding target position of a batch.

    Args:
        teachers: frozen models on the sample's device.
        sample: a batch collated by the split's ``LanguagePairDataset``.
        k: entries per position.
        pad: padding id.

    Returns:
        ``(values, indices, lengths, mass)``: ``sum(L) x k`` float32
        log-probabilities and int64 ids, positions of row 0 first; ``B``
        target lengths; the summed top-k probability mass.
    """
    net_input = sample["net_input"]
    decoder = getattr(teachers[0], "decoder", None)
    if len(teachers) == 1 and getattr(decoder, "adaptive_softmax", None) is None:
        values, indices = _single_teacher_topk(teachers[0], net_input, k)
    else:
        lprobs = teacher_log_probs(teachers, net_input)  # B x T x V
        values, indices = lprobs.topk(k, dim=-1)  # B x T x k
    mask = sample["target"].ne(pad)  # B x T
    values, indices = values[mask], indices[mask]  # sum(L) x k
    mass = values.double().exp().sum()
    return values, indices, mask.sum(1), mass


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
    with torch.random.fork_rng(devices=[]):
        teachers = load_teacher_ensemble(
            cfg.common_eval.path, task, dict_dir=dump_cfg.teacher_dict_dir
        )
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    for t in teachers:
        if cfg.common.fp16:
            t.half()
        if use_cuda:
            t.cuda()
    folders = utils.split_paths(cfg.task.data)
    if split != cfg.dataset.train_subset:
        folders = folders[:1]  # fairseq reads other splits from the first folder
    runs = []
    for index, folder in enumerate(folders):
        output = data_folder_output(dump_cfg.output, index, len(folders))
        runs.append(
            dump_split(
                cfg, task, teachers, split, index + 1, folder, output, len(folders) > 1
            )
        )
    if len(runs) == 1:
        return runs[0]
    totals = {
        key: sum(r[key] for r in runs)
        for key in ("sentences", "tokens", "seconds", "bytes")
    }
    return dict(totals, stores=runs, output=dump_cfg.output)


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


def dump_split(cfg, task, teachers, split, epoch, folder, output, skip_finished=False):
    """Dump the teachers' top-k of one split of one data folder.

    Args:
        cfg: the dump's config (see :func:`dump`).
        task: the task (its dictionaries are the data's).
        teachers: the loaded teachers, on their device.
        split: the split's name.
        epoch: fairseq's epoch that loads ``folder`` (1 for the first).
        folder: the data folder (for the signature).
        output: the store's folder (before ``--num-shards``).
        skip_finished: keep a finished store of this very dump (same
            signature and k) instead of refusing it, so that rerunning a dump
            of several data folders resumes with the first unfinished one.

    Returns:
        The store's statistics (see :func:`dump`).
    """
    dump_cfg = cfg.dump
    num_shards, shard_id = cfg.dataset.num_shards, cfg.dataset.shard_id
    max_tokens, max_sentences = cfg.dataset.max_tokens, cfg.dataset.batch_size
    if max_tokens is None and max_sentences is None:
        max_tokens = DEFAULT_MAX_TOKENS
    use_cuda = next(teachers[0].parameters()).is_cuda
    task.load_dataset(split, epoch=epoch, combine=split == cfg.dataset.train_subset)
    dataset = task.dataset(split)
    tgt_dict = task.target_dictionary
    _, tgt_sizes = pair_sizes(dataset)
    _check_teacher_positions(teachers, dataset, split)

    plan = make_plan(dataset, max_tokens, max_sentences)
    batches = plan[shard_id::num_shards]
    ids = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    signature = data_signature(dataset, task.source_dictionary, tgt_dict, split)
    signature.update(
        package_version=fairseq_kd.__version__,
        data_folder=os.path.abspath(folder),
        source_lang=task.cfg.source_lang,
        target_lang=task.cfg.target_lang,
        teachers=checkpoint_fingerprint(cfg.common_eval.path),
        dump={
            "fp16": bool(cfg.common.fp16),
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
        cfg, teachers, dataset, writer, batches, start, split
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


def dump_batches(cfg, teachers, dataset, writer, batches, start, split):
    """Run the teachers over ``batches[start:]`` and write their top-k.

    Args:
        cfg: the dump's config.
        teachers: the loaded teachers, on their device.
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
    abort_after = _abort_after()
    pad = dataset.tgt_dict.pad()
    n_sent = n_tok = 0
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
    for step, sample in enumerate(loader, start=start + 1):
        if use_cuda:
            sample = utils.move_to_cuda(sample)
        values, indices, lengths, _ = topk_of_batch(teachers, sample, dump_cfg.k, pad)
        sent_ids = sample["id"].cpu().numpy()
        if not np.array_equal(lengths.cpu().numpy(), tgt_sizes[sent_ids]):
            raise RuntimeError(
                "collated targets do not have the binarized lengths: the dump "
                "must see the targets as training does"
            )
        writer.write(sent_ids, values.cpu().numpy(), indices.cpu().numpy())
        n_sent += len(sent_ids)
        n_tok += int(lengths.sum())
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.update(int(lengths.sum()))
        bar.set_postfix(sent_s=f"{n_sent / elapsed:.0f}", refresh=False)
        if abort_after is not None and step >= abort_after:
            bar.close()
            logger.warning(f"{ABORT_ENV}={abort_after}: stopping hard (test hook)")
            os._exit(3)
        if step % dump_cfg.commit_interval == 0:
            writer.commit(step)
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
                "teacher_dict_dir": args.teacher_dict_dir,
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
