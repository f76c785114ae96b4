"""The streaming merge: part files in id order -> chosen, filtered pairs -> corpus."""

import json
import logging
import math
import os
import time
from array import array
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from fairseq_kd.seqkd import backward, filters, nbest_choice, parts
from fairseq_kd.seqkd.parts import DistillError
from fairseq_kd.seqkd.writer import CorpusWriter

logger = logging.getLogger(__name__)

DROP, REFERENCE = "drop", "reference"
TOO_LONG = "too_long"  # source longer than the teacher accepts: never translated
SCORE = "score"  # the teacher's score of the chosen hypothesis is below the threshold
#: the backward model's score of the pair is below its threshold (or none)
BACKWARD_SCORE = "backward_score"
#: every reason a pair is filtered, in the order they are tried
REASONS = (TOO_LONG,) + filters.FILTERS + (SCORE, BACKWARD_SCORE)


class CorpusBleu:
    """Corpus BLEU (``sacrebleu.corpus_bleu`` settings) from summed statistics."""

    def __init__(self):
        import sacrebleu

        self.metric, self.stats, self.n = sacrebleu.BLEU(), None, 0

    def add(self, hyp: str, ref: str):
        """Add one detokenised hypothesis and its reference."""
        s = np.array(self.metric._extract_corpus_statistics([hyp], [[ref]])[0])
        self.stats = s if self.stats is None else self.stats + s
        self.n += 1

    def score(self) -> Optional[float]:
        """The corpus BLEU so far (None before the first sentence)."""
        if self.stats is None:
            return None
        return self.metric._compute_score_from_stats(self.stats.tolist()).score


class Selector:
    """Chooses, filters and counts, one record at a time (in constant memory).

    Args:
        method: the ``--select`` method (``top``, ``bleu``, ``chrf``).
        post_process: how hypotheses and references are detokenised for scoring.
        fcfg: the degenerate-output bounds.
        on_degenerate: ``reference`` (the pair keeps its reference) or ``drop``.
        nbest_stats: also compute the corpus BLEU of the chosen hypotheses, and
            the mean sentence-BLEU of the chosen ones and of the teacher's best
            (always with ``--select bleu``/``chrf``).
        min_score: drop (or replace) a chosen hypothesis whose teacher score is
            below this (None: no score filter).
        min_backward: drop (or replace) a chosen hypothesis whose backward
            score (see :meth:`target`) is below this, or None (no such filter).
    """

    def __init__(
        self,
        method,
        post_process,
        fcfg,
        on_degenerate,
        nbest_stats,
        min_score=None,
        min_backward=None,
    ):
        self.method, self.post, self.fcfg = method, post_process, fcfg
        self.on_degenerate, self.nbest_stats = on_degenerate, nbest_stats
        self.min_score, self.min_backward = min_score, min_backward
        self.counts = {name: 0 for name in REASONS}
        self.dropped = self.replaced = self.not_top = 0
        self.bleu_chosen_sum = self.bleu_top_sum = 0.0
        self.bleu_n = 0
        self.corpus = CorpusBleu()
        #: statistics against the references: asked for, or cheap next to Seq-Inter
        self.reference_stats = nbest_stats or method != "top"

    def choose(self, rec: Dict) -> int:
        """Index of the chosen hypothesis of a record with an n-best list."""
        nbest, ref, post = rec["nbest"], rec["ref"], self.post
        if ref is None and self.method != "top":
            raise DistillError(f"--select {self.method} needs references (target side)")
        if self.method == "bleu" and len(nbest) > 1:
            scores = nbest_choice.candidate_scores(nbest, ref, "bleu", post)
            idx = nbest_choice.best_index(scores)
            self._sentence_stats(scores[idx], scores[0])
            return idx
        idx = nbest_choice.choose_index(nbest, ref, self.method, post)
        if self.nbest_stats and ref is not None:
            pair = [nbest[idx]] + ([nbest[0]] if idx else [])
            s = nbest_choice.candidate_scores(pair, ref, "bleu", post)
            self._sentence_stats(s[0], s[-1])
        return idx

    def _sentence_stats(self, chosen, top):
        self.bleu_chosen_sum += chosen
        self.bleu_top_sum += top
        self.bleu_n += 1

    def target(
        self, rec: Dict, idx: Optional[int] = None, backward: Optional[float] = None
    ) -> Optional[str]:
        """The target line of one record, or None when the pair is dropped.

        Args:
            rec: a part-file record (``src``, ``ref``, ``nbest``, ``scores``).
            idx: the chosen index when already known (see :meth:`choose`).
            backward: the backward model's score of the chosen pair, with
                ``min_backward`` set (None there: the pair could not be
                scored, and is filtered).
        """
        ref, nbest = rec["ref"], rec["nbest"]
        if not nbest:
            reason, hyp = rec.get("skipped", TOO_LONG), ""
        else:
            if idx is None:
                idx = self.choose(rec)
            self.not_top += idx != 0
            hyp = nbest[idx]
            if ref is not None and self.reference_stats:
                self.corpus.add(
                    nbest_choice.detokenize(hyp, self.post),
                    nbest_choice.detokenize(ref, self.post),
                )
            reason = filters.degenerate_reason(
                hyp.split(), rec["src"].split(), self.fcfg
            )
            if (
                reason is None
                and self.min_score is not None
                and rec["scores"][idx] < self.min_score
            ):
                reason = SCORE
            if (
                reason is None
                and self.min_backward is not None
                and (backward is None or backward < self.min_backward)
            ):
                reason = BACKWARD_SCORE
        if reason is not None:
            self.counts[reason] += 1
            if self.on_degenerate == DROP or ref is None:
                self.dropped += 1
                return None
            self.replaced += 1
            hyp = ref
        return hyp

    def summary(self) -> Dict:
        """Counts and statistics of the records seen so far."""
        mean = lambda x: round(x / self.bleu_n, 2) if self.bleu_n else None  # noqa
        bleu = self.corpus.score()
        return {
            "filtered": dict(self.counts),
            "dropped": self.dropped,
            "replaced": self.replaced,
            "not_top": self.not_top,
            "mean_sentence_bleu_chosen": mean(self.bleu_chosen_sum),
            "mean_sentence_bleu_top": mean(self.bleu_top_sum),
            "corpus_bleu_chosen": round(bleu, 2) if bleu is not None else None,
        }


def score_threshold(
    scores: np.ndarray, keep_fraction: float, option="--score-keep-fraction"
) -> float:
    """The lowest score kept when keeping the best ``keep_fraction`` of ``scores``.

    The threshold is the ``ceil(keep_fraction * n)``-th highest score; every
    score at or above it is kept (ties may keep a few more).

    Args:
        scores: one score per translated sentence.
        keep_fraction: in ``(0, 1]``.
        option: the option that gave ``keep_fraction`` (for the message).
    """
    if not 0 < keep_fraction <= 1:
        raise DistillError(f"{option} must be in (0, 1], got {keep_fraction}")
    if len(scores) == 0:
        return -math.inf
    m = max(1, math.ceil(keep_fraction * len(scores)))
    return float(np.sort(scores)[::-1][m - 1])


def backward_threshold(args, backward_dir, ranges) -> float:
    """The backward-score threshold: ``--min-backward-score``, or the one that
    keeps ``--backward-keep-fraction`` of the scored pairs (a pass over the
    backward-score files, 8 bytes per sentence).

    Args:
        args: the ``fairseq-kd-distill`` options.
        backward_dir: the folder of every chunk's backward scores.
        ranges: the corpus-id range of every chunk.
    """
    if args.backward_keep_fraction is None:
        return args.min_backward_score
    scores = array("d")
    for k, ids in enumerate(ranges):
        for row in backward.read_scores(backward_dir, k, ids):
            if row[3] is not None:
                scores.append(row[3])
    threshold = score_threshold(
        np.frombuffer(scores, dtype=np.float64),
        args.backward_keep_fraction,
        "--backward-keep-fraction",
    )
    logger.info(
        f"--backward-keep-fraction {args.backward_keep_fraction}: keeping "
        f"backward scores >= {threshold:.4f}"
    )
    return threshold


def iter_records(work_dir: str, ranges) -> Iterator[Tuple[int, Dict, Dict]]:
    """``(chunk, header, record)`` of every part file in corpus order, chunk by chunk.

    Chunks are consecutive id ranges and shards write disjoint chunks, so a
    sequential pass over the chunk files in order is the ordered merge.
    """
    for k, ids in enumerate(ranges):
        header, recs = parts.read_part(work_dir, k, ids)
        for rec in recs:
            yield k, header, rec


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


def merge(
    args,
    task,
    corpus,
    work_dir,
    gen_stats,
    fcfg,
    backward_dir=None,
    direction=None,
    layout=None,
) -> Dict:
    """Stream the part files in id order: verify, choose, filter, write, summarise.

    Memory holds one chunk's records, running counts, and (with
    ``--score-keep-fraction`` or ``--backward-keep-fraction``) 8 bytes (and
    one byte) per sentence.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (dictionaries).
        corpus: the input (see ``inputs.open_corpus``), to check the parts against.
        work_dir: the run's work folder.
        gen_stats: ``(chunks, sentences, seconds)`` translated by this process.
        fcfg: the degenerate-output bounds.
        backward_dir: the folder of every chunk's backward scores (see
            ``backward.score_chunks``), or None without the backward filter.
        direction: a multilingual direction's signature (recorded in the
            summary), or None.
        layout: where a multilingual direction's files go: ``bin`` (the
            binarized folder shared by the directions), ``concat`` and
            ``concat_bin`` (the same for ``--concat-original``); default:
            ``OUTPUT/bin``, ``OUTPUT/concat`` and ``OUTPUT/concat/bin``.

    Returns:
        The summary dict (also written to ``OUTPUT/<split>.summary.json``).
    """
    t0 = time.time()
    n = len(corpus)
    ranges = parts.chunk_ranges(n, args.chunk_size)
    done = set(parts.finished_chunks(work_dir, len(ranges)))
    missing = [k for k in range(len(ranges)) if k not in done]
    if missing:
        raise DistillError(
            f"cannot merge: {len(missing)} of {len(ranges)} chunks have no part "
            f"file in {work_dir} (first: {missing[:10]}); run the missing shards"
        )
    if args.select != "top" and not corpus.has_reference:
        raise DistillError(f"--select {args.select} needs references (target side)")
    if args.concat_original and not corpus.has_reference:
        raise DistillError(
            "--concat-original needs references (target side); for source-only "
            "input, concatenate with the original corpus as docs/sequence_kd.md shows"
        )
    post = args.post_process or "none"
    selector = Selector(
        args.select, post, fcfg, args.on_degenerate, args.nbest_stats, args.min_score
    )
    chosen = None
    if args.score_keep_fraction is not None:  # first pass: the chosen scores
        chosen, scores = array("b"), array("d")  # the scores exactly
        # the selector itself chooses (and counts its statistics) here, once
        for _, _, rec in iter_records(work_dir, ranges):
            idx = selector.choose(rec) if rec["nbest"] else -1
            chosen.append(idx)
            if idx >= 0:
                scores.append(rec["scores"][idx])
        selector.min_score = score_threshold(
            np.frombuffer(scores, dtype=np.float64), args.score_keep_fraction
        )
        del scores
        logger.info(
            f"--score-keep-fraction {args.score_keep_fraction}: keeping teacher "
            f"scores >= {selector.min_score:.4f}"
        )
    if backward_dir is not None:
        selector.min_backward = backward_threshold(args, backward_dir, ranges)
    split, src, tgt = args.gen_subset, args.source_lang, args.target_lang
    d_src, d_tgt = task.source_dictionary, task.target_dictionary
    layout = layout or {}
    writers = [
        CorpusWriter(
            args.output, split, src, tgt, d_src, d_tgt, args.data, True,
            bin_dir=layout.get("bin"),
        )
    ]  # fmt: skip
    if args.concat_original:
        concat_dir = layout.get("concat") or os.path.join(args.output, "concat")
        writers.append(
            CorpusWriter(
                concat_dir, split, src, tgt, d_src, d_tgt, args.data,
                bin_dir=layout.get("concat_bin"),
            )
        )  # fmt: skip
    out, concat = writers[0], writers[-1] if args.concat_original else None
    gen_seconds = engine_seconds = 0.0
    engines, src_tokens, tgt_tokens = set(), 0, 0
    try:
        fps, last_chunk = None, -1
        for k, header, rec in iter_records(work_dir, ranges):
            i = rec["id"]
            if k != last_chunk:  # a new chunk: its facts, and its sources' identity
                gen_seconds += header.get("seconds", 0.0)
                engine_seconds += header.get("engine_seconds", 0.0)
                engines.add(header.get("engine"))
                fps = corpus.fingerprints(ranges[k])
                srcs = None if "src_crc" in rec else corpus.chunk(ranges[k]).src
                if backward_dir is not None:
                    rows = backward.read_scores(backward_dir, k, ranges[k])
                last_chunk = k
            j = i - ranges[k].start
            same = rec["src_crc"] == fps[j] if srcs is None else rec["src"] == srcs[j]
            if not same:  # the parts must describe this very input
                raise DistillError(
                    f"{work_dir}: sentence {i} of the part files does not match "
                    f"source line {i} of the input ({args.gen_subset})"
                )
            if concat is not None:
                concat.add(rec["src"], rec["ref"])
            idx = None if chosen is None or chosen[i] < 0 else chosen[i]
            bwd = None
            if backward_dir is not None:
                _, b_idx, b_crc, bwd = rows[j]
                if rec["nbest"]:
                    idx = selector.choose(rec) if idx is None else idx
                    b_ok = b_crc == backward.hyp_crc(rec["nbest"][idx])
                if b_idx != (idx if rec["nbest"] else -1) or (
                    rec["nbest"] and not b_ok
                ):
                    raise DistillError(
                        f"{backward_dir}: the backward score of sentence {i} is "
                        "not that of its chosen hypothesis: delete the folder "
                        "to recompute it"
                    )
            hyp = selector.target(rec, idx, bwd)
            if hyp is None:
                continue
            out.add(rec["src"], hyp, i)
            src_tokens += len(rec["src"].split())
            tgt_tokens += len(hyp.split())
        out.finalize()
        if concat is not None:
            concat.append(out)
            concat.commit()
        out.commit()
    except BaseException:
        for w in writers:
            w.discard()
        raise
    summary = {
        "split": split,
        **({"direction": direction} if direction is not None else {}),
        "select": args.select,
        "on_degenerate": args.on_degenerate,
        "engines": sorted(e for e in engines if e),
        "sentences": n,
        "output_pairs": out.pairs,
        "source_tokens": src_tokens,
        "target_tokens": tgt_tokens,
        "generation_seconds": round(gen_seconds, 2),
        "engine_seconds": round(engine_seconds, 2),
        "sentences_per_second": round(n / gen_seconds, 1) if gen_seconds else None,
        "this_process": {
            "chunks": gen_stats[0],
            "sentences": gen_stats[1],
            "seconds": round(gen_stats[2], 2),
        },
        "merge_seconds": round(time.time() - t0, 2),
    }
    summary.update(selector.summary())
    summary["score_filter"] = {
        "min_score": args.min_score,
        "keep_fraction": args.score_keep_fraction,
        "threshold": selector.min_score,
        "score": f"the {args.engine} engine's hypothesis score (see docs)",
    }
    summary["backward_filter"] = {
        "backward_path": getattr(args, "backward_path", None),
        "min_score": getattr(args, "min_backward_score", None),
        "keep_fraction": getattr(args, "backward_keep_fraction", None),
        "threshold": selector.min_backward,
        "score": "the backward model's mean log-probability of the source tokens "
        "and </s> given the chosen hypothesis",
    }
    summary["filter_settings"] = vars(fcfg)
    parts.atomic_write_text(
        os.path.join(args.output, f"{split}.summary.json"),
        json.dumps(summary, indent=2) + "\n",
    )
    return summary
