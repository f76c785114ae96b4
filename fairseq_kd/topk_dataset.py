"""A language-pair dataset whose batches carry the teacher's stored top-k."""

import torch
from fairseq.data import BaseWrapperDataset

TEACHER_KEY = "teacher"


def collate_teacher(entries, target, pad, k):
    """Lay per-sentence top-k entries out like the collated target.

    Entries fill the non-padding positions of each target row in order, so
    right- and left-padded targets (and bucketed ones) are both handled.

    Args:
        entries: one ``{"lprobs": L x k, "indices": L x k}`` per row of
            ``target``, in the batch's row order.
        target: the collated target, ``B x T``.
        pad: padding id.
        k: entries per position.

    Returns:
        ``{"lprobs": B x T x k float16, "indices": B x T x k int64}``; padding
        positions hold a uniform distribution over ``pad`` (masked later).
    """
    mask = target.ne(pad)  # B x T
    lengths = mask.sum(1).tolist()
    for row, (entry, length) in enumerate(zip(entries, lengths)):
        if entry["lprobs"].size(0) != length:
            raise RuntimeError(
                f"top-k store entry of batch row {row} has "
                f"{entry['lprobs'].size(0)} positions but the target has {length}: "
                "store and data are misaligned"
            )
    bsz, tlen = target.shape
    lprobs = torch.zeros(bsz, tlen, k, dtype=torch.float16)  # B x T x k
    indices = torch.full((bsz, tlen, k), pad, dtype=torch.long)  # B x T x k
    if entries:
        lprobs[mask] = torch.cat([e["lprobs"] for e in entries]).to(lprobs.dtype)
        indices[mask] = torch.cat([e["indices"] for e in entries])
    return {"lprobs": lprobs, "indices": indices}


class TopKTeacherDataset(BaseWrapperDataset):
    """Wrap a ``LanguagePairDataset`` to add the stored teacher top-k.

    ``__getitem__`` adds the entry of the item's sentence id (read through
    the store's memory maps); ``collater`` lays the entries out like the
    collated target as ``sample["teacher"]``. Everything else (sizes,
    ordering, batching, filtering, prefetching) is the wrapped dataset's.

    Args:
        dataset: the split's ``LanguagePairDataset``.
        store: a ``TopKStore`` verified against that split.
        pad: padding id of the target dictionary.
    """

    def __init__(self, dataset, store, pad):
        super().__init__(dataset)
        if len(store) != len(dataset):
            raise ValueError(
                f"top-k store has {len(store)} sentences, the dataset {len(dataset)}"
            )
        self.store = store
        self.pad = pad

    def __getattr__(self, name):
        # attributes of LanguagePairDataset (src, tgt, src_sizes, buckets...)
        if name.startswith("__") or name in ("dataset", "store"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        item = self.dataset[index]
        lprobs, indices = self.store.entry(index)  # L x k, L x k
        item[TEACHER_KEY] = {
            "lprobs": torch.from_numpy(lprobs),
            "indices": torch.from_numpy(indices),
        }
        return item

    def collater(self, samples, **kwargs):
        """Collate as the wrapped dataset, then add ``sample["teacher"]``."""
        batch = self.dataset.collater(samples, **kwargs)
        if not batch or batch.get("target") is None:
            return batch
        by_id = {int(s["id"]): s[TEACHER_KEY] for s in samples}
        entries = [by_id[int(i)] for i in batch["id"]]
        batch[TEACHER_KEY] = collate_teacher(
            entries, batch["target"], self.pad, self.store.k
        )
        return batch

    def num_tokens_vec(self, indices):
        return self.dataset.num_tokens_vec(indices)
