"""A distillation run: check options, translate this shard's chunks, then merge."""

import copy
import json
import logging
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch

from fairseq_kd.seqkd import backward, directions, filters, parts
from fairseq_kd.seqkd.engines import build_engine
from fairseq_kd.seqkd.inputs import open_corpus
from fairseq_kd.seqkd.merge import TOO_LONG, MergeLock, Selector, merge
from fairseq_kd.seqkd.parts import DistillError

logger = logging.getLogger("fairseq_kd.distill")

#: test hook: stop after writing this many chunks: ``N`` exits with status 3,
#: ``N:kill`` sends the process SIGKILL (as ``kill -9`` would)
ABORT_ENV = "FAIRSEQ_KD_DISTILL_ABORT_AFTER_CHUNKS"


def filter_config(args) -> filters.FilterConfig:
    """The degenerate-output bounds given on the command line."""
    return filters.FilterConfig(
        min_len_ratio=args.min_len_ratio,
        max_len_ratio=args.max_len_ratio,
        ratio_min_tokens=args.ratio_min_tokens,
        repeat_ngram=args.repeat_ngram,
        repeat_count=args.repeat_count,
    )


def check_options(args):
    """Fail early, naming the option, on inconsistent settings.

    Args:
        args: the ``fairseq-kd-distill`` options (completed in place:
            ``--max-tokens`` defaults to 4096 when no batch size is given).
    """
    if args.engine != "fake" and not args.path:
        raise DistillError("--path: give the teacher checkpoint(s)")
    if args.nbest < 1 or args.beam < args.nbest:
        raise DistillError(
            f"--nbest must be in [1, --beam]; got --nbest {args.nbest} "
            f"with --beam {args.beam}"
        )
    if args.select != "top" and args.nbest < 2:
        raise DistillError(
            f"--select {args.select} chooses among the n-best: "
            "use --nbest 5 (and --beam >= 5) for Seq-Inter"
        )
    if args.post_process not in (None,) + ("sentencepiece", "subword_nmt", "none"):
        raise DistillError(
            "--post-process must be sentencepiece, subword_nmt or none for "
            f"fairseq-kd-distill, got {args.post_process!r}"
        )
    if args.fp16 and (args.cpu or not torch.cuda.is_available()):
        raise DistillError("--fp16 needs a GPU (drop --cpu, or drop --fp16)")
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens = 4096
    if args.merge and args.num_shards != 1:
        raise DistillError("--merge merges all shards: do not combine it with shards")
    if args.source_text and args.source_bin:
        raise DistillError("give --source-text or --source-bin, not both")
    if (args.spm_model or args.bpe_codes) and not args.source_text:
        raise DistillError("--spm-model/--bpe-codes encode --source-text input only")
    if args.min_score is not None and args.score_keep_fraction is not None:
        raise DistillError("give --min-score or --score-keep-fraction, not both")
    if args.score_keep_fraction is not None and not 0 < args.score_keep_fraction <= 1:
        raise DistillError(
            f"--score-keep-fraction must be in (0, 1], got {args.score_keep_fraction}"
        )
    bwd = (args.min_backward_score, args.backward_keep_fraction)
    if args.backward_path and bwd == (None, None):
        raise DistillError(
            "--backward-path: give --min-backward-score or --backward-keep-fraction"
        )
    if not args.backward_path and bwd != (None, None):
        raise DistillError(
            "--min-backward-score/--backward-keep-fraction need --backward-path"
        )
    if None not in bwd:
        raise DistillError(
            "give --min-backward-score or --backward-keep-fraction, not both"
        )
    if args.backward_keep_fraction is not None and not (
        0 < args.backward_keep_fraction <= 1
    ):
        raise DistillError(
            "--backward-keep-fraction must be in (0, 1], got "
            f"{args.backward_keep_fraction}"
        )
    parts.shard_chunks(1, args.num_shards, args.shard_id)  # validates the pair


def check_multilingual_options(args):
    """Refuse what the multilingual task's distillation does not do (yet).

    Args:
        args: the ``fairseq-kd-distill`` options, ``--task
            translation_multi_simple_epoch``.
    """
    for option, value in (
        ("--source-text", args.source_text),
        ("--source-bin", args.source_bin),
        ("--backward-path", args.backward_path),
    ):
        if value:
            raise DistillError(
                f"{option} is not supported with --task {args.task} yet: "
                "it distils the binarized directions of DATA"
            )
    if getattr(args, "lang_tok_replacing_bos_eos", False):
        raise DistillError(
            "--lang-tok-replacing-bos-eos is not supported by fairseq-kd-distill: "
            "the teacher must read the tags as separate tokens"
        )
    from fairseq import utils

    if len(utils.split_paths(args.data)) > 1:
        raise DistillError(
            f"the multilingual task is distilled from one data folder: {args.data} "
            "names several"
        )


def setup_task(args):
    """The task over ``args.data``: the teacher's dictionaries (and directions).

    ``--task translation_multi_simple_epoch`` (or ``..._kd``) sets up fairseq's
    multilingual task from the options (``--lang-pairs``, ``--langs``,
    ``--encoder-langtok``, ``--decoder-langtok``, ``--lang-tok-style``...);
    otherwise a ``translation`` task over the language pair of ``args.data``.
    """
    from fairseq.data import data_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_kd.multilingual import MULTILINGUAL_TASKS

    if args.task in MULTILINGUAL_TASKS:
        from fairseq import tasks

        check_multilingual_options(args)
        return tasks.setup_task(args)
    if args.distill_lang_pairs:
        raise DistillError(
            "--distill-lang-pairs needs --task translation_multi_simple_epoch "
            "(the multilingual task, with the teacher's --lang-pairs)"
        )

    src, tgt = args.source_lang, args.target_lang
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(args.data)
        if src is None:
            raise DistillError(
                f"cannot infer the language pair from {args.data}: "
                "give --source-lang and --target-lang"
            )
    args.source_lang, args.target_lang = src, tgt
    cfg = TranslationConfig(
        data=args.data,
        source_lang=src,
        target_lang=tgt,
        # fields that fairseq fills from its global config ("II"):
        train_subset=args.gen_subset,
        dataset_impl=None,  # inferred from the files
        required_seq_len_multiple=1,
    )
    return TranslationTask.setup_task(cfg)


def teacher_fingerprint(args) -> List[Dict]:
    """Identify teacher checkpoints by absolute path, size and modification time."""
    from fairseq_kd.checkpoints import split_checkpoint_paths

    if args.engine == "fake":
        return [{"path": "fake"}]
    out = []
    for path in split_checkpoint_paths(args.path):
        if not os.path.isfile(path):
            raise DistillError(f"--path: teacher checkpoint not found: {path}")
        st = os.stat(path)
        out.append(
            {"path": os.path.abspath(path), "bytes": st.st_size, "mtime": st.st_mtime}
        )
    return out


#: fairseq generation options recorded by name in the run config (older keys)
RECORDED = ("beam", "nbest", "max_len_a", "max_len_b", "lenpen")


def other_generation_options(args) -> Optional[Dict]:
    """fairseq generation options away from their defaults, besides ``RECORDED``."""
    from fairseq.dataclass.configs import GenerationConfig

    defaults = GenerationConfig()
    out = {}
    for name in GenerationConfig.__dataclass_fields__:
        if name in RECORDED or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value != getattr(defaults, name) and isinstance(
            value, (int, float, str, bool, type(None))
        ):
            out[name] = value
    return out or None


def run_config(args, corpus, direction=None) -> Dict:
    """The settings that determine the teacher's outputs (recorded in the work dir).

    Args:
        args: the ``fairseq-kd-distill`` options.
        corpus: the input.
        direction: a multilingual direction's signature (its pair and
            language tags), or None.
    """
    config = {
        "data": os.path.abspath(args.data),
        "split": args.gen_subset,
        "langs": [args.source_lang, args.target_lang],
        "sentences": len(corpus),
        "input": corpus.describe(),
        "teachers": teacher_fingerprint(args),
        "engine": args.engine,
        "beam": args.beam,
        "nbest": args.nbest,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "lenpen": args.lenpen,
        "generation": other_generation_options(args),
        "fp16": args.fp16,
        "ct2_compute_type": (
            args.ct2_compute_type if args.engine == "ctranslate2" else None
        ),
        "chunk_size": args.chunk_size,
    }
    if direction is not None:
        config["direction"] = direction
    return config


class EngineCache:
    """The run's translator, built when a chunk first needs it, once per process.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the task (dictionaries).
        work_dir: the work folder handed to the engine (cached conversions).
    """

    def __init__(self, args, task, work_dir):
        self.args, self.task, self.work_dir = args, task, work_dir
        self.engine = None

    def get(self, direction=None):
        """The engine, set to translate ``direction`` (a multilingual one) if given.

        Args:
            direction: a :class:`~fairseq_kd.seqkd.directions.Direction`, or None.
        """
        if self.engine is None:
            self.engine = build_engine(self.args, self.task, self.work_dir)
        if direction is not None:
            self.engine.set_direction(direction.source_tag, direction.target_tag)
        return self.engine


def _abort_hook():
    value = os.environ.get(ABORT_ENV, "") or "0"
    count, _, mode = value.partition(":")
    return int(count), mode


def translate_chunks(args, task, corpus, work_dir, get_engine=None, desc=None):
    """Translate this shard's unfinished chunks into part files.

    Each record holds the sentence's id, subword source and reference (joined
    once from the token ids), the CRC-32 of its source (``src_crc``, checked
    at merge time), and the n-best hypotheses and scores.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the task (dictionaries).
        corpus: the input.
        work_dir: the work folder of the part files.
        get_engine: a function giving the engine (default: one built here).
        desc: what the progress bar names (default: the split).

    Returns:
        ``(chunks written, sentences translated, seconds)`` of this process.
    """
    from tqdm import tqdm

    ranges = parts.chunk_ranges(len(corpus), args.chunk_size)
    mine = parts.shard_chunks(len(ranges), args.num_shards, args.shard_id)
    todo = [k for k in mine if not os.path.exists(parts.part_path(work_dir, k))]
    done_sents = sum(len(ranges[k]) for k in mine if k not in todo)
    if len(todo) < len(mine):
        logger.info(
            f"resuming: {len(mine) - len(todo)} of this shard's {len(mine)} chunks "
            f"({done_sents} sentences) are already done in {work_dir}"
        )
    if not todo:
        return 0, 0, 0.0
    engine = get_engine() if get_engine else build_engine(args, task, work_dir)
    abort_after, abort_mode = _abort_hook()
    bar = tqdm(
        total=sum(len(ranges[k]) for k in mine),
        initial=done_sents,
        unit="sent",
        desc=f"distill {desc or args.gen_subset} shard "
        f"{args.shard_id}/{args.num_shards}",
        disable=args.no_progress_bar,
        mininterval=1.0,
        smoothing=0.1,
    )
    start, written, sentences = time.time(), 0, 0
    for k in todo:
        t0 = time.time()
        ids = ranges[k]
        chunk = corpus.chunk(ids)
        fits = [j for j, s in enumerate(chunk.src_ids) if not engine.too_long(len(s))]
        t1 = time.time()
        nbest = engine.translate([chunk.src_ids[j] for j in fits]) if fits else []
        engine_seconds = time.time() - t1
        by_pos = dict(zip(fits, nbest))
        records = []
        for j, i in enumerate(ids):
            hyps = by_pos.get(j)
            rec = {
                "id": i,
                "src": chunk.src[j],
                "src_crc": chunk.fingerprints[j],
                "ref": chunk.ref[j] if chunk.ref is not None else None,
                "nbest": [h for h, _ in hyps] if hyps is not None else [],
                "scores": [round(s, 4) for _, s in hyps] if hyps is not None else [],
            }
            if hyps is None:
                rec["skipped"] = TOO_LONG
            records.append(rec)
        meta = {
            "seconds": round(time.time() - t0, 3),
            "engine_seconds": round(engine_seconds, 3),
            "engine": engine.name,
        }
        parts.write_part(work_dir, k, ids, records, meta)
        written += 1
        sentences += len(ids)
        bar.update(len(ids))
        if abort_after and written >= abort_after:
            bar.close()
            logger.error(f"{ABORT_ENV}={abort_after}: aborting after {written} chunks")
            if abort_mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.exit(3)
    bar.close()
    return written, sentences, time.time() - start


class BackwardStep:
    """The backward-score side files of a run (``--backward-path``).

    The model is loaded (and its dictionaries checked) when the run starts,
    on the CPU; it moves to the GPU the first time it scores.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (source -> target dictionaries).
        work_dir: the run's work folder.
    """

    def __init__(self, args, task, work_dir):
        self.args, self.work_dir = args, work_dir
        self.folder = backward.side_dir(args, work_dir)
        self.scorer = backward.BackwardScorer(
            args.backward_path,
            task,
            args.max_tokens,
            args.batch_size,
            cpu=args.cpu,
            fp16=args.fp16,
        )
        post = args.post_process or "none"
        # the same choice as the merge's; no statistics
        self.selector = Selector(
            args.select, post, filter_config(args), args.on_degenerate, False
        )

    def score(self, ranges, chunks) -> int:
        """Score the chunks of ``chunks`` that have no backward scores yet."""
        return backward.score_chunks(
            self.args,
            self.work_dir,
            self.folder,
            ranges,
            chunks,
            self.selector,
            lambda: self.scorer,
        )


def log_summary(summary: Dict, prefix: str = ""):
    """Log the summary of a finished run, one fact per line.

    Args:
        summary: the merge's summary.
        prefix: put before every line (a direction's ``de-en: ``).
    """
    lines = [
        f"sentences: {summary['sentences']} in, {summary['output_pairs']} out "
        f"({summary['dropped']} dropped, {summary['replaced']} replaced by the "
        "reference)",
        f"tokens written: {summary['source_tokens']} source, "
        f"{summary['target_tokens']} target",
        f"generation: {summary['generation_seconds']} s, "
        f"{summary['sentences_per_second']} sentences/s",
        "filtered: " + ", ".join(f"{k} {v}" for k, v in summary["filtered"].items()),
        f"select {summary['select']}: {summary['not_top']} not the teacher's best; "
        f"mean sentence-BLEU chosen {summary['mean_sentence_bleu_chosen']} "
        f"(teacher's best {summary['mean_sentence_bleu_top']}), corpus BLEU "
        f"{summary['corpus_bleu_chosen']}",
    ]
    for line in lines:
        logger.info(prefix + line)


def distill(args) -> Optional[Dict]:
    """Run (a shard of) a distillation, and merge when every chunk is done.

    With ``--task translation_multi_simple_epoch``, every direction of the
    split (or those of ``--distill-lang-pairs``) is distilled in turn, see
    :func:`distill_directions`.

    Args:
        args: parsed ``fairseq-kd-distill`` options.

    Returns:
        The summary when this process merged, else None.
    """
    from fairseq_kd.multilingual import is_multilingual

    check_options(args)
    task = setup_task(args)
    if is_multilingual(task):
        return distill_directions(args, task)
    corpus = open_corpus(args, task, args.chunk_size)
    work_dir = args.work_dir or os.path.join(args.output, "work")
    directions.check_work_dir(work_dir, None, args.gen_subset)
    summary = distill_corpus(
        args, task, corpus, work_dir, EngineCache(args, task, work_dir)
    )
    if summary is not None:
        logger.info(f"wrote {args.output} ({args.gen_subset}.summary.json)")
    return summary


def distill_corpus(
    args, task, corpus, work_dir, engines, direction=None, layout=None
) -> Optional[Dict]:
    """Translate this shard's chunks of one corpus, and merge when all are done.

    Args:
        args: the options (a direction's copy, for a multilingual run).
        task: the task (dictionaries).
        corpus: the input.
        work_dir: the corpus's work folder.
        engines: the process's :class:`EngineCache`.
        direction: a multilingual :class:`~fairseq_kd.seqkd.directions.Direction`.
        layout: where the direction's binarized files go (see ``merge.merge``).

    Returns:
        The summary when this process merged, else None.
    """
    signature = direction.signature if direction is not None else None
    parts.check_config(work_dir, run_config(args, corpus, signature))
    bwd = BackwardStep(args, task, work_dir) if args.backward_path else None
    ranges = parts.chunk_ranges(len(corpus), args.chunk_size)
    n_chunks = len(ranges)
    gen_stats = (0, 0, 0.0)
    name = direction.pair if direction is not None else None
    if not args.merge:
        gen_stats = translate_chunks(
            args,
            task,
            corpus,
            work_dir,
            lambda: engines.get(direction),
            f"{args.gen_subset} {name}" if name else None,
        )
        if bwd is not None:  # this shard's chunks, beside its other shards
            bwd.score(
                ranges, parts.shard_chunks(n_chunks, args.num_shards, args.shard_id)
            )
    if not args.merge and len(parts.finished_chunks(work_dir, n_chunks)) < n_chunks:
        logger.info(
            f"shard {args.shard_id} done{' with ' + name if name else ''}; other "
            "shards are still missing chunks: the last shard to finish merges (or "
            "run with --merge)"
        )
        return None
    with MergeLock(os.path.join(work_dir, "merge.lock")) as lock:
        if not lock.held:
            logger.info("another process is merging this run")
            return None
        if bwd is not None:  # whatever no shard scored yet
            bwd.score(ranges, range(n_chunks))
        summary = merge(
            args,
            task,
            corpus,
            work_dir,
            gen_stats,
            filter_config(args),
            bwd.folder if bwd is not None else None,
            signature,
            layout,
        )
    log_summary(summary, f"{name}: " if name else "")
    return summary


#: per-direction figures added up in a multilingual run's summary
TOTALS = (
    "sentences",
    "output_pairs",
    "dropped",
    "replaced",
    "not_top",
    "source_tokens",
    "target_tokens",
    "generation_seconds",
    "engine_seconds",
)


def distill_directions(args, task) -> Optional[Dict]:
    """Distil the directions of a multilingual split, one corpus each.

    Direction ``SRC-TGT`` is read from ``DATA/SPLIT.SRC-TGT.{SRC,TGT}``; the
    teacher reads each source with the direction's source tag first and
    starts its translation with the target tag, as fairseq's
    ``translation_multi_simple_epoch`` gives them; the tag is not written.
    Each direction has its own work folder, ``WORK/SRC-TGT`` (parts, config
    recording the direction), its text ``OUTPUT/SRC-TGT/SPLIT.{SRC,TGT,ids}``
    and summary, and its binarized files
    ``OUTPUT/bin/SPLIT.SRC-TGT.{SRC,TGT}``, which ``fairseq-train OUTPUT/bin
    --task translation_multi_simple_epoch`` reads with DATA's dictionaries.

    Args:
        args: parsed ``fairseq-kd-distill`` options.
        task: the multilingual task.

    Returns:
        The run's summary (totals, and each direction's under ``directions``)
        when every direction has been merged, else None.
    """
    split = args.gen_subset
    chosen = directions.split_directions(
        task, split, directions.parse_pairs(args.distill_lang_pairs)
    )
    work_root = args.work_dir or os.path.join(args.output, "work")
    engines = EngineCache(args, task, work_root)
    layout = {
        "bin": os.path.join(args.output, "bin"),
        "concat_bin": os.path.join(args.output, "concat", "bin"),
    }
    merged = 0
    for direction in chosen:
        d_args = copy.copy(args)
        d_args.source_lang, d_args.target_lang = direction.src, direction.tgt
        d_args.data = direction.data_path
        d_args.output = os.path.join(args.output, direction.pair)
        work_dir = os.path.join(work_root, direction.pair)
        directions.check_work_dir(work_dir, direction.signature, split)
        directions.check_recorded_direction(
            os.path.join(d_args.output, f"{split}.summary.json"),
            f"corpus {d_args.output}",
            direction.signature,
            split,
        )
        corpus = open_corpus(d_args, task, args.chunk_size, direction)
        d_layout = dict(
            layout, concat=os.path.join(args.output, "concat", direction.pair)
        )
        summary = distill_corpus(
            d_args, task, corpus, work_dir, engines, direction, d_layout
        )
        merged += summary is not None
    summaries = {}
    for direction in chosen:
        path = os.path.join(args.output, direction.pair, f"{split}.summary.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                summaries[direction.pair] = json.load(f)
    if not merged or len(summaries) < len(chosen):
        logger.info(
            f"{len(summaries)} of {len(chosen)} directions merged so far: the run's "
            "summary is written when all are"
        )
        return None
    total = {
        "split": split,
        "lang_pairs": [d.pair for d in chosen],
        **{k: round(sum(s[k] for s in summaries.values()), 2) for k in TOTALS},
        "directions": summaries,
    }
    parts.atomic_write_text(
        os.path.join(args.output, f"{split}.summary.json"),
        json.dumps(total, indent=2) + "\n",
    )
    logger.info(
        f"wrote {args.output}: {', '.join(total['lang_pairs'])} "
        f"({split}.summary.json, bin/)"
    )
    return total
