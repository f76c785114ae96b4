"""Batches of corpus ids for the translation engines, every sentence kept."""

import numpy as np


def batches_of(dataset, ids, max_tokens, batch_size):
    """Group ``ids`` (sorted by source length) into batches by size.

    No ``required_batch_size_multiple`` is passed: ve-fairseq 0.12.3 drops the
    final partial batch when it is above 1.

    Args:
        dataset: the ``LanguagePairDataset``.
        ids: corpus ids.
        max_tokens: token budget per batch (or None).
        batch_size: sentences per batch (or None).
    """
    from fairseq.data import data_utils

    ids = np.asarray(ids, dtype=np.int64)
    return data_utils.batch_by_size(
        ids,
        dataset.num_tokens,
        num_tokens_vec=dataset.src_sizes[ids].astype(np.int64),
        max_tokens=max_tokens,
        max_sentences=batch_size,
    )
