"""Choosing one hypothesis among a teacher's n-best (``--select`` top or Seq-Inter)."""

import functools
from typing import List, Optional, Sequence

import sacrebleu

POST_PROCESS = ("sentencepiece", "subword_nmt", "none")
#: the ``--select`` methods
METHODS = ("top", "bleu", "chrf")


def detokenize(line: str, post_process: str) -> str:
    """Undo subword segmentation of a space-separated token line.

    Args:
        line: tokens separated by single spaces.
        post_process: ``sentencepiece`` (pieces marked with ``▁`` at word
            starts), ``subword_nmt`` (``@@ `` continuation markers) or ``none``.
    """
    if post_process == "sentencepiece":
        return line.replace(" ", "").replace("\u2581", " ").strip()
    if post_process == "subword_nmt":
        return (line + " ").replace("@@ ", "").rstrip()
    if post_process == "none":
        return line
    raise ValueError(
        f"--post-process must be one of {', '.join(POST_PROCESS)}, got {post_process!r}"
    )


@functools.lru_cache(maxsize=None)
def _metric(metric: str):
    if metric == "bleu":  # the settings of sacrebleu.sentence_bleu
        return sacrebleu.BLEU(effective_order=True)
    if metric == "chrf":
        return sacrebleu.CHRF()
    raise ValueError(f"unknown metric {metric!r}; use bleu or chrf")


def sentence_score(metric: str, hyp: str, ref: str) -> float:
    """Sentence-level sacrebleu score of detokenised ``hyp`` against ``ref``.

    Args:
        metric: ``bleu`` (as ``sacrebleu.sentence_bleu``: exponential
            smoothing, effective order) or ``chrf`` (as ``sentence_chrf``).
        hyp: detokenised hypothesis.
        ref: detokenised reference.
    """
    return _metric(metric).sentence_score(hyp, [ref]).score


def candidate_scores(
    nbest: Sequence[str], ref: str, metric: str, post_process: str
) -> List[float]:
    """Sentence scores of subword hypotheses against a subword reference.

    Args:
        nbest: subword hypotheses.
        ref: the subword reference.
        metric: ``bleu`` or ``chrf``.
        post_process: how to detokenise both before scoring.
    """
    ref_detok = detokenize(ref, post_process)
    return [
        sentence_score(metric, detokenize(h, post_process), ref_detok) for h in nbest
    ]


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score, the earliest one on ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def choose_index(
    nbest: Sequence[str], ref: Optional[str], method: str, post_process: str
) -> int:
    """Index of the chosen hypothesis among ``nbest``.

    ``top`` keeps the teacher's best (index 0); ``bleu``/``chrf`` (Seq-Inter)
    keep the candidate with the highest sentence score against the reference,
    the better-ranked one (by the teacher) on ties.

    Args:
        nbest: subword hypotheses, best first.
        ref: the subword reference.
        method: one of ``METHODS``.
        post_process: how to detokenise before scoring.
    """
    if method not in METHODS:
        raise ValueError(
            f"--select must be one of {', '.join(METHODS)}, got {method!r}"
        )
    if method == "top" or len(nbest) <= 1:
        return 0
    return best_index(candidate_scores(nbest, ref, method, post_process))
