"""Batches of sentences for the translation engines, every sentence kept."""

import numpy as np


def length_batches(lengths, max_tokens, batch_size):
    """Positions of sentences grouped into batches of similar source length.

    Sentences are sorted by length (stable) and cut by fairseq's
    ``batch_by_size``. No ``required_batch_size_multiple`` is passed:
    ve-fairseq 0.12.3 drops the final partial batch when it is above 1.

    Args:
        lengths: source lengths in tokens (with ``</s>``), one per sentence.
        max_tokens: token budget per batch (or None).
        batch_size: sentences per batch (or None).

    Returns:
        A list of integer arrays of positions into ``lengths``.
    """
    from fairseq.data import data_utils

    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable").astype(np.int64)
    return data_utils.batch_by_size(
        order,
        lambda i: lengths[i],
        num_tokens_vec=lengths[order],
        max_tokens=max_tokens,
        max_sentences=batch_size,
    )
