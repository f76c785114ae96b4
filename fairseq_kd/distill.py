"""``fairseq-kd-distill``: build a sequence-level KD corpus with a teacher."""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from fairseq_kd.seqkd import filters, parts, selection
from fairseq_kd.seqkd.batching import batches_of
from fairseq_kd.seqkd.parts import DistillError

logger = logging.getLogger("fairseq_kd.distill")

#: test hook: abort (exit status 3) after writing this many chunks
ABORT_ENV = "FAIRSEQ_KD_DISTILL_ABORT_AFTER_CHUNKS"
DROP, REFERENCE = "drop", "reference"
TOO_LONG = "too_long"  # source longer than the teacher accepts: never translated
ENGINES = ("fairseq", "ctranslate2")


def get_parser():
    """The command-line parser of ``fairseq-kd-distill``."""
    p = argparse.ArgumentParser(
        prog="fairseq-kd-distill",
        description="Translate a binarized split with a teacher and write a "
        "sequence-level KD corpus (text and binarized) in corpus order.",
    )
    p.add_argument("data", help="binarized data folder (fairseq-preprocess output)")
    p.add_argument(
        "--path",
        required=True,
        help="teacher checkpoint(s); several separated by ':' form an ensemble",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--work-dir",
        help="folder for part files, run settings and converted models "
        "(default: OUTPUT/work); runs that share it share their translations",
    )
    p.add_argument("--gen-subset", default="train", help="split to translate")
    p.add_argument("-s", "--source-lang", help="source language (default: inferred)")
    p.add_argument("-t", "--target-lang", help="target language (default: inferred)")

    g = p.add_argument_group("generation")
    g.add_argument("--engine", choices=ENGINES, default="fairseq", help="translator")
    g.add_argument("--cpu", action="store_true", help="run on the CPU")
    g.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    g.add_argument("--max-tokens", type=int, help="source tokens per batch")
    g.add_argument("--batch-size", type=int, help="sentences per batch")
    g.add_argument("--beam", type=int, default=5, help="beam size")
    g.add_argument("--nbest", type=int, default=1, help="hypotheses kept per sentence")
    g.add_argument(
        "--max-len-a", type=float, default=0, help="max length = a * src_len + b"
    )
    g.add_argument(
        "--max-len-b", type=int, default=200, help="max length = a * src_len + b"
    )
    g.add_argument("--lenpen", type=float, default=1.0, help="length penalty")
    g.add_argument(
        "--ct2-compute-type",
        default="default",
        help="CTranslate2 compute type (default, int8, float16, ...)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for the translator (0: library default)",
    )

    g = p.add_argument_group("selection and filtering")
    g.add_argument(
        "--select",
        choices=selection.SELECT,
        default="top",
        help="top: the teacher's best; bleu/chrf: the n-best hypothesis with the "
        "highest sentence score against the reference (Seq-Inter)",
    )
    g.add_argument(
        "--post-process",
        choices=selection.POST_PROCESS,
        default="none",
        help="subword scheme removed before scoring with sacrebleu",
    )
    g.add_argument(
        "--on-degenerate",
        choices=(DROP, REFERENCE),
        default=REFERENCE,
        help="what replaces a degenerate hypothesis: drop the pair, or keep the "
        "reference as target",
    )
    defaults = filters.FilterConfig()
    g.add_argument(
        "--min-len-ratio",
        type=float,
        default=defaults.min_len_ratio,
        help="smallest hypothesis/source length ratio (subword tokens)",
    )
    g.add_argument(
        "--max-len-ratio",
        type=float,
        default=defaults.max_len_ratio,
        help="largest hypothesis/source length ratio (subword tokens)",
    )
    g.add_argument(
        "--ratio-min-tokens",
        type=int,
        default=defaults.ratio_min_tokens,
        help="apply the ratio bounds only when a side has this many tokens",
    )
    g.add_argument(
        "--repeat-ngram",
        type=int,
        default=defaults.repeat_ngram,
        help="longest n-gram checked for loops (0: no loop filter)",
    )
    g.add_argument(
        "--repeat-count",
        type=int,
        default=defaults.repeat_count,
        help="an n-gram repeated this many times in a row is a loop",
    )

    g = p.add_argument_group("long runs and output")
    g.add_argument(
        "--chunk-size",
        type=int,
        default=2000,
        help="sentences per part file (unit of resumption and sharding)",
    )
    g.add_argument("--num-shards", type=int, default=1, help="cooperating processes")
    g.add_argument("--shard-id", type=int, default=0, help="this process's shard")
    g.add_argument(
        "--merge",
        action="store_true",
        help="only merge existing part files (fails if any chunk is missing)",
    )
    g.add_argument(
        "--concat-original",
        action="store_true",
        help="also write OUTPUT/concat: the original pairs followed by the "
        "distilled ones, as text and binarized",
    )
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar")
    return p


def filter_config(args) -> filters.FilterConfig:
    """The degenerate-output bounds given on the command line."""
    return filters.FilterConfig(
        min_len_ratio=args.min_len_ratio,
        max_len_ratio=args.max_len_ratio,
        ratio_min_tokens=args.ratio_min_tokens,
        repeat_ngram=args.repeat_ngram,
        repeat_count=args.repeat_count,
    )


def check_args(args):
    """Fail early, naming the option, on inconsistent settings."""
    if args.nbest < 1 or args.beam < args.nbest:
        raise DistillError(
            f"--nbest must be between 1 and --beam ({args.beam}), got {args.nbest}"
        )
    if args.select != "top" and args.nbest == 1:
        logger.warning(
            f"--select {args.select} with --nbest 1 has nothing to choose from: "
            "use --nbest 5 (and --beam >= 5) for Seq-Inter"
        )
    if args.fp16 and (args.cpu or not torch.cuda.is_available()):
        raise DistillError("--fp16 needs a GPU (drop --cpu, or drop --fp16)")
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens = 4096
    if args.merge and args.num_shards != 1:
        raise DistillError("--merge merges all shards: do not combine it with shards")
    parts.shard_chunks(1, args.num_shards, args.shard_id)  # validates the pair


def setup_task(args):
    """The translation task over ``args.data`` with the split loaded."""
    from fairseq.data import data_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

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
    task = TranslationTask.setup_task(cfg)
    try:
        task.load_dataset(args.gen_subset)
    except FileNotFoundError as e:
        raise DistillError(f"--gen-subset {args.gen_subset}: {e}") from e
    return task


def teacher_fingerprint(paths: str) -> List[Dict]:
    """Identify teacher checkpoints by absolute path, size and modification time."""
    from fairseq_kd.checkpoints import split_checkpoint_paths

    out = []
    for path in split_checkpoint_paths(paths):
        if not os.path.isfile(path):
            raise DistillError(f"--path: teacher checkpoint not found: {path}")
        st = os.stat(path)
        out.append(
            {"path": os.path.abspath(path), "bytes": st.st_size, "mtime": st.st_mtime}
        )
    return out


def run_config(args, n_sentences: int) -> Dict:
    """The settings that determine the teacher's outputs (recorded in the work dir)."""
    return {
        "data": os.path.abspath(args.data),
        "split": args.gen_subset,
        "langs": [args.source_lang, args.target_lang],
        "sentences": n_sentences,
        "teachers": teacher_fingerprint(args.path),
        "engine": args.engine,
        "beam": args.beam,
        "nbest": args.nbest,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "lenpen": args.lenpen,
        "fp16": args.fp16,
        "ct2_compute_type": args.ct2_compute_type if args.engine != "fairseq" else None,
        "chunk_size": args.chunk_size,
    }


def source_text(dataset, src_dict, i: int) -> str:
    """The subword source line of sentence ``i`` (end-of-sentence removed)."""
    return src_dict.string(dataset.src[i])


def reference_text(dataset, tgt_dict, i: int) -> Optional[str]:
    """The subword reference of sentence ``i``, None without a target side."""
    if dataset.tgt is None:
        return None
    return tgt_dict.string(dataset.tgt[i])


class FairseqEngine:
    """Beam search with fairseq's ``SequenceGenerator`` over a teacher ensemble.

    Args:
        args: the command-line options.
        task: the translation task (dictionaries, dataset).
    """

    name = "fairseq"

    def __init__(self, args, task):
        from fairseq import utils
        from fairseq.sequence_generator import SequenceGenerator

        from fairseq_kd.checkpoints import load_teacher_ensemble

        self.args, self.task = args, task
        self.use_cuda = torch.cuda.is_available() and not args.cpu
        self.models = models = load_teacher_ensemble(args.path, task)
        for model in models:
            if args.fp16:
                model.half()
            if self.use_cuda:
                model.cuda()
        self.max_positions = utils.resolve_max_positions(
            task.max_positions(), *[m.max_positions() for m in models]
        )
        self.generator = SequenceGenerator(
            models,
            task.target_dictionary,
            beam_size=args.beam,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
            len_penalty=args.lenpen,
        )

    def too_long(self, src_len: int) -> bool:
        """Whether a source of ``src_len`` tokens exceeds the teacher's positions."""
        return src_len > self.max_positions[0]

    @torch.no_grad()
    def translate(self, dataset, ids: List[int]) -> Dict[int, List]:
        """n-best ``(subword string, score)`` lists of the sentences ``ids``.

        Args:
            dataset: the ``LanguagePairDataset``.
            ids: corpus ids, already sorted by source length.
        """
        from fairseq import utils

        tgt_dict = self.task.target_dictionary
        batches = batches_of(dataset, ids, self.args.max_tokens, self.args.batch_size)
        out = {}
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            if self.use_cuda:
                sample = utils.move_to_cuda(sample)
            hypos = self.generator.generate(self.models, sample)
            for j, sid in enumerate(sample["id"].tolist()):
                out[sid] = [
                    (
                        tgt_dict.string(h["tokens"].int().cpu()),
                        float(h["score"]),
                    )
                    for h in hypos[j][: self.args.nbest]
                ]
        return out


def translate_chunks(args, task, config, work_dir):
    """Translate this shard's unfinished chunks into part files.

    Returns:
        ``(chunks written, sentences translated, seconds)`` of this process.
    """
    from tqdm import tqdm

    dataset = task.dataset(args.gen_subset)
    n = len(dataset)
    ranges = parts.chunk_ranges(n, args.chunk_size)
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
    engine = build_engine(args, task, work_dir)
    abort_after = int(os.environ.get(ABORT_ENV, "0") or 0)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    bar = tqdm(
        total=sum(len(ranges[k]) for k in mine),
        initial=done_sents,
        unit="sent",
        desc=f"distill {args.gen_subset} shard {args.shard_id}/{args.num_shards}",
        disable=args.no_progress_bar,
        mininterval=1.0,
        smoothing=0.1,
    )
    start, written, sentences = time.time(), 0, 0
    for k in todo:
        t0 = time.time()
        ids = np.array(ranges[k], dtype=np.int64)
        ids = ids[np.argsort(dataset.src_sizes[ids], kind="stable")]
        fits = [int(i) for i in ids if not engine.too_long(int(dataset.src_sizes[i]))]
        nbest = engine.translate(dataset, fits) if fits else {}
        records = []
        for i in ranges[k]:
            hyps = nbest.get(i)
            rec = {
                "id": i,
                "src": source_text(dataset, src_dict, i),
                "ref": reference_text(dataset, tgt_dict, i),
                "nbest": [h for h, _ in hyps] if hyps is not None else [],
                "scores": [round(s, 4) for _, s in hyps] if hyps is not None else [],
            }
            if hyps is None:
                rec["skipped"] = TOO_LONG
            records.append(rec)
        seconds = time.time() - t0
        meta = {"seconds": round(seconds, 3), "engine": engine.name}
        parts.write_part(work_dir, k, ranges[k], records, meta)
        written += 1
        sentences += len(ranges[k])
        bar.update(len(ranges[k]))
        if abort_after and written >= abort_after:
            bar.close()
            logger.error(f"{ABORT_ENV}={abort_after}: aborting after {written} chunks")
            sys.exit(3)
    bar.close()
    return written, sentences, time.time() - start


def build_engine(args, task, work_dir):
    """The translator named by ``--engine``."""
    if args.engine == "ctranslate2":
        from fairseq_kd.seqkd.ct2_engine import CTranslate2Engine

        return CTranslate2Engine(args, task, work_dir)
    return FairseqEngine(args, task)


def choose(records, args, fcfg) -> Dict:
    """Select, filter and score every record (sorted by id).

    Returns:
        A dict with the output ``pairs`` (id, source, target), the per-filter
        ``counts`` and the sentence-BLEU statistics.
    """
    post = args.post_process
    pairs, counts = [], {name: 0 for name in (TOO_LONG,) + filters.FILTERS}
    bleu_chosen, bleu_top, chosen_lines, refs = [], [], [], []
    replaced = dropped = not_top = 0
    for rec in records:
        ref = rec["ref"]
        nbest = rec["nbest"]
        if args.select != "top" and ref is None:
            raise DistillError(f"--select {args.select} needs references (target side)")
        if not nbest:
            reason, hyp = rec.get("skipped", TOO_LONG), ""
        else:
            if args.select == "bleu" and len(nbest) > 1:
                scores = selection.candidate_scores(nbest, ref, "bleu", post)
                idx = selection.best_index(scores)
                if ref is not None:
                    bleu_chosen.append(scores[idx])
                    bleu_top.append(scores[0])
            else:
                idx = selection.select(nbest, ref, args.select, post)
                if ref is not None:
                    chosen_top = [nbest[idx]] + ([nbest[0]] if idx else [])
                    s = selection.candidate_scores(chosen_top, ref, "bleu", post)
                    bleu_chosen.append(s[0])
                    bleu_top.append(s[-1])
            not_top += idx != 0
            hyp = nbest[idx]
            if ref is not None:
                chosen_lines.append(selection.detokenize(hyp, post))
                refs.append(selection.detokenize(ref, post))
            reason = filters.degenerate_reason(hyp.split(), rec["src"].split(), fcfg)
        if reason is not None:
            counts[reason] += 1
            if args.on_degenerate == DROP or ref is None:
                dropped += 1
                continue
            replaced += 1
            hyp = ref
        pairs.append((rec["id"], rec["src"], hyp))
    corpus_bleu = None
    if refs:
        import sacrebleu

        corpus_bleu = round(sacrebleu.corpus_bleu(chosen_lines, [refs]).score, 2)
    mean = lambda xs: round(float(np.mean(xs)), 2) if xs else None  # noqa: E731
    return {
        "pairs": pairs,
        "counts": counts,
        "dropped": dropped,
        "replaced": replaced,
        "not_top": not_top,
        "mean_sentence_bleu_chosen": mean(bleu_chosen),
        "mean_sentence_bleu_top": mean(bleu_top),
        "corpus_bleu_chosen": corpus_bleu,
    }


def binarize_lines(lines: List[str], dictionary, prefix: str):
    """Write ``prefix.bin/.idx`` as ``fairseq-preprocess`` would (mmap, with eos).

    Args:
        lines: space-separated token lines.
        dictionary: the fairseq dictionary (unknown tokens map to ``<unk>``).
        prefix: output path without extension.
    """
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(
        prefix + ".bin", impl="mmap", vocab_size=len(dictionary)
    )
    for line in lines:
        builder.add_item(
            dictionary.encode_line(line, add_if_not_exist=False, append_eos=True)
        )
    builder.finalize(prefix + ".idx")


def write_corpus(folder, split, src, tgt, src_lines, tgt_lines, task, data_dir):
    """Write text and binarized corpus into ``folder`` (and ``folder/bin``).

    The binarized folder gets the teacher's dictionaries and copies of the
    other splits of ``data_dir`` so that ``fairseq-train folder/bin`` runs.
    Everything is built under temporary names and moved into place at the end.
    """
    os.makedirs(folder, exist_ok=True)
    for lang, lines in ((src, src_lines), (tgt, tgt_lines)):
        parts.atomic_write_text(
            os.path.join(folder, f"{split}.{lang}"), "".join(x + "\n" for x in lines)
        )
    bin_dir = os.path.join(folder, "bin")
    tmp = f"{bin_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pair = f"{src}-{tgt}"
    for name in os.listdir(data_dir):
        is_split = name.startswith(f"{split}.") or name.startswith(f"{split}{pair}")
        if name.startswith("dict.") or (pair in name and not is_split):
            shutil.copy2(os.path.join(data_dir, name), os.path.join(tmp, name))
    for lang, lines, d in (
        (src, src_lines, task.source_dictionary),
        (tgt, tgt_lines, task.target_dictionary),
    ):
        binarize_lines(lines, d, os.path.join(tmp, f"{split}.{pair}.{lang}"))
    old = f"{bin_dir}.old{os.getpid()}"
    if os.path.exists(bin_dir):
        os.replace(bin_dir, old)
    os.replace(tmp, bin_dir)
    shutil.rmtree(old, ignore_errors=True)


class MergeLock:
    """An exclusive lock file so that only one shard merges.

    Args:
        path: the lock file.
    """

    def __init__(self, path):
        self.path, self.held = path, False

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    return self
                logger.warning(f"removing stale merge lock {self.path}")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            break
        return self

    def _owner_alive(self):
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)
            return True
        except (ValueError, ProcessLookupError, FileNotFoundError):
            return False
        except PermissionError:
            return True

    def __exit__(self, *exc):
        if self.held:
            os.remove(self.path)


def merge(args, task, work_dir, gen_stats) -> Dict:
    """Verify all part files, select and filter, write the corpus and summary.

    Args:
        args: the command-line options.
        task: the translation task (dictionaries, dataset).
        work_dir: the run's work folder.
        gen_stats: ``(chunks, sentences, seconds)`` translated by this process.

    Returns:
        The summary dict (also written to ``OUTPUT/<split>.summary.json``).
    """
    t0 = time.time()
    dataset = task.dataset(args.gen_subset)
    n = len(dataset)
    ranges = parts.chunk_ranges(n, args.chunk_size)
    missing = [
        k
        for k in range(len(ranges))
        if k not in set(parts.finished_chunks(work_dir, len(ranges)))
    ]
    if missing:
        raise DistillError(
            f"cannot merge: {len(missing)} of {len(ranges)} chunks have no part "
            f"file in {work_dir} (first: {missing[:10]}); run the missing shards"
        )
    records, gen_seconds, engines = [], 0.0, set()
    for k, ids in enumerate(ranges):
        header, recs = parts.read_part(work_dir, k, ids)
        gen_seconds += header.get("seconds", 0.0)
        engines.add(header.get("engine"))
        records.extend(recs)
    parts.check_ids([r["id"] for r in records], range(n), f"{work_dir} (all chunks)")
    src_dict = task.source_dictionary
    for rec in records:  # the parts must describe this very dataset
        if rec["src"] != source_text(dataset, src_dict, rec["id"]):
            raise DistillError(
                f"{work_dir}: sentence {rec['id']} of the part files does not match "
                f"source line {rec['id']} of {args.data}/{args.gen_subset}"
            )
    result = choose(records, args, filter_config(args))
    pairs = result.pop("pairs")
    ids = [p[0] for p in pairs]
    if ids != sorted(set(ids)):  # strictly increasing: corpus order, no duplicate
        raise DistillError("internal error: output pairs are not in corpus order")
    split, src, tgt = args.gen_subset, args.source_lang, args.target_lang
    src_lines = [p[1] for p in pairs]
    tgt_lines = [p[2] for p in pairs]
    write_corpus(args.output, split, src, tgt, src_lines, tgt_lines, task, args.data)
    parts.atomic_write_text(
        os.path.join(args.output, f"{split}.ids"), "".join(f"{i}\n" for i in ids)
    )
    if args.concat_original:
        orig_src = [r["src"] for r in records]
        orig_tgt = [r["ref"] for r in records]
        if any(x is None for x in orig_tgt):
            raise DistillError("--concat-original needs references (target side)")
        write_corpus(
            os.path.join(args.output, "concat"),
            split,
            src,
            tgt,
            orig_src + src_lines,
            orig_tgt + tgt_lines,
            task,
            args.data,
        )
    summary = {
        "split": split,
        "select": args.select,
        "on_degenerate": args.on_degenerate,
        "engines": sorted(e for e in engines if e),
        "sentences": n,
        "output_pairs": len(pairs),
        "source_tokens": int(sum(len(x.split()) for x in src_lines)),
        "target_tokens": int(sum(len(x.split()) for x in tgt_lines)),
        "generation_seconds": round(gen_seconds, 2),
        "sentences_per_second": round(n / gen_seconds, 1) if gen_seconds else None,
        "this_process": {
            "chunks": gen_stats[0],
            "sentences": gen_stats[1],
            "seconds": round(gen_stats[2], 2),
        },
        "filtered": result.pop("counts"),
        "merge_seconds": round(time.time() - t0, 2),
    }
    summary.update(result)
    summary["filter_settings"] = vars(filter_config(args))
    parts.atomic_write_text(
        os.path.join(args.output, f"{split}.summary.json"),
        json.dumps(summary, indent=2) + "\n",
    )
    return summary


def log_summary(summary: Dict):
    """Log the summary of a finished run, one fact per line."""
    lines = [
        f"sentences: {summary['sentences']} in, {summary['output_pairs']} out "
        f"({summary['dropped']} dropped, {summary['replaced']} replaced by the "
        "reference)",
        f"tokens written: {summary['source_tokens']} source, "
        f"{summary['target_tokens']} target",
        f"generation: {summary['generation_seconds']} s, "
        f"{summary['sentences_per_second']} sentences/s",
        "degenerate: " + ", ".join(f"{k} {v}" for k, v in summary["filtered"].items()),
        f"select {summary['select']}: {summary['not_top']} not the teacher's best; "
        f"mean sentence-BLEU chosen {summary['mean_sentence_bleu_chosen']} "
        f"(teacher's best {summary['mean_sentence_bleu_top']}), corpus BLEU "
        f"{summary['corpus_bleu_chosen']}",
    ]
    for line in lines:
        logger.info(line)


def main(args) -> Optional[Dict]:
    """Run (a shard of) a distillation, and merge when every chunk is done.

    Args:
        args: parsed options of ``get_parser()``.

    Returns:
        The summary when this process merged, else None.
    """
    check_args(args)
    task = setup_task(args)
    n = len(task.dataset(args.gen_subset))
    work_dir = args.work_dir or os.path.join(args.output, "work")
    parts.check_config(work_dir, run_config(args, n))
    gen_stats = (0, 0, 0.0)
    if not args.merge:
        gen_stats = translate_chunks(args, task, run_config(args, n), work_dir)
    n_chunks = len(parts.chunk_ranges(n, args.chunk_size))
    if not args.merge and len(parts.finished_chunks(work_dir, n_chunks)) < n_chunks:
        logger.info(
            f"shard {args.shard_id} done; other shards are still missing chunks: "
            "the last shard to finish merges (or run with --merge)"
        )
        return None
    with MergeLock(os.path.join(work_dir, "merge.lock")) as lock:
        if not lock.held:
            logger.info("another process is merging this run")
            return None
        summary = merge(args, task, work_dir, gen_stats)
    log_summary(summary)
    logger.info(f"wrote {args.output} ({args.gen_subset}.summary.json)")
    return summary


def cli_main(argv=None):
    """Console entry point of ``fairseq-kd-distill``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
    )
    import fairseq_kd  # noqa: F401  (torch-safe checkpoint types, registries)

    args = get_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        main(args)
    except DistillError as e:
        logger.error(str(e))
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
