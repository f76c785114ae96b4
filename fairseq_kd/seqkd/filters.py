"""Detecting degenerate teacher outputs: empty, bad length ratio, n-gram loops."""

from dataclasses import dataclass
from typing import Optional, Sequence

EMPTY = "empty"
REPEAT = "repeat"
LENGTH_RATIO = "length_ratio"
#: filter names in the order they are tried; a pair counts under the first hit
FILTERS = (EMPTY, REPEAT, LENGTH_RATIO)


@dataclass
class FilterConfig:
    """Bounds that make a hypothesis degenerate.

    Args:
        min_len_ratio: smallest allowed hypothesis/source length ratio (tokens).
        max_len_ratio: largest allowed hypothesis/source length ratio (tokens).
        ratio_min_tokens: the ratio bounds apply only when the longer of the
            two sides has at least this many tokens (short pairs vary a lot).
        repeat_ngram: longest n-gram size checked for loops (0 turns it off).
        repeat_count: an n-gram repeated this many times in a row is a loop.
    """

    min_len_ratio: float = 1 / 3
    max_len_ratio: float = 3.0
    ratio_min_tokens: int = 4
    repeat_ngram: int = 4
    repeat_count: int = 3


def longest_repeat(tokens: Sequence[str], n: int) -> int:
    """Most consecutive copies of any ``n``-gram in ``tokens``.

    Args:
        tokens: the token sequence.
        n: n-gram size.

    Returns:
        The largest ``k`` such that some n-gram occurs ``k`` times back to back
        (1 when nothing repeats, 0 when ``tokens`` is shorter than ``n``).
    """
    if len(tokens) < n:
        return 0
    best = 1
    for start in range(n):  # each phase of the n-gram grid
        run = 1
        prev = None
        for i in range(start, len(tokens) - n + 1, n):
            gram = tuple(tokens[i : i + n])
            run = run + 1 if gram == prev else 1
            best = max(best, run)
            prev = gram
    return best


def has_loop(tokens: Sequence[str], max_n: int, count: int) -> bool:
    """Whether any n-gram (``1 <= n <= max_n``) repeats ``count`` times in a row.

    The same answer as ``longest_repeat(tokens, n) >= count`` for some ``n``,
    found in one pass per ``n``: ``count`` copies of an ``n``-gram are a run of
    ``(count - 1) * n`` positions where a token equals the one ``n`` after it.

    Args:
        tokens: the token sequence.
        max_n: longest n-gram size checked.
        count: number of consecutive copies that makes a loop.
    """
    length = len(tokens)
    for n in range(1, max_n + 1):
        need = (count - 1) * n
        if length < need + n:
            continue
        if need <= 0:
            return True
        run = 0
        for i in range(length - n):
            if tokens[i] == tokens[i + n]:
                run += 1
                if run >= need:
                    return True
            else:
                run = 0
    return False


def degenerate_reason(
    hyp: Sequence[str], src: Sequence[str], cfg: FilterConfig
) -> Optional[str]:
    """Name of the first filter that rejects ``hyp``, or None if it passes.

    Args:
        hyp: hypothesis tokens (subwords, no end-of-sentence).
        src: source tokens (subwords, no end-of-sentence).
        cfg: the filter bounds.

    Returns:
        One of ``FILTERS`` or None.
    """
    if len(hyp) == 0:
        return EMPTY
    if cfg.repeat_ngram > 0 and has_loop(hyp, cfg.repeat_ngram, cfg.repeat_count):
        return REPEAT
    if max(len(hyp), len(src)) >= cfg.ratio_min_tokens:
        ratio = len(hyp) / max(len(src), 1)
        if not cfg.min_len_ratio <= ratio <= cfg.max_len_ratio:
            return LENGTH_RATIO
    return None
