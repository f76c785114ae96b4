"""One direction of a multilingual split: rows that say their direction, and top-k."""

import torch
from fairseq.data import BaseWrapperDataset

from fairseq_kd.topk_dataset import TEACHER_KEY, collate_teacher

DIRECTION_KEY = "direction"  # sample["direction"]: the direction index of each row


class DirectionDataset(BaseWrapperDataset):
    """Wrap one direction's ``LanguagePairDataset`` of a multilingual split.

    fairseq's multilingual datasets (``SampledMultiDataset``,
    ``ConcatDataset``) collate a batch of every direction with the first
    direction's ``collater``, and the batch's ``id`` are each direction's own
    sentence ids, which repeat across directions. Here each item carries its
    direction's index (and, with a store, its stored top-k), and
    :meth:`collater` lays them out in the batch's row order as
    ``sample["direction"]`` (a list of ints) and ``sample["teacher"]``.

    Args:
        dataset: the direction's ``LanguagePairDataset`` (language tags
            included, as the student sees it).
        direction: the direction's index (the task's ``kd_directions``).
        store: a ``TopKStore`` verified against ``dataset``, or None.
        pad: padding id of the target dictionary.
        k: entries per position to collate (the smallest ``k`` of the
            split's stores; required with a store).
    """

    def __init__(self, dataset, direction, store=None, pad=1, k=None):
        super().__init__(dataset)
        if store is not None and len(store) != len(dataset):
            raise ValueError(
                f"top-k store has {len(store)} sentences, the dataset {len(dataset)}"
            )
        self.direction = direction
        self.store = store
        self.pad = pad
        self.k = k if k is not None else (store.k if store is not None else None)

    def __getattr__(self, name):
        # attributes of LanguagePairDataset (src, tgt, src_sizes, buckets...)
        if name.startswith("__") or name in ("dataset", "store"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        item = self.dataset[index]
        item[DIRECTION_KEY] = self.direction
        if self.store is not None:
            lprobs, indices = self.store.entry(index)  # L x k, L x k
            item[TEACHER_KEY] = {
                "lprobs": torch.from_numpy(lprobs[:, : self.k]),
                "indices": torch.from_numpy(indices[:, : self.k]),
            }
        return item

    def collater(self, samples, **kwargs):
        """Collate samples of any direction of the split (see the class doc)."""
        if not samples:
            return self.dataset.collater(samples, **kwargs)
        # number the samples so that the batch's row order can be read back
        numbered = [dict(s, id=i) for i, s in enumerate(samples)]
        batch = self.dataset.collater(numbered, **kwargs)
        if not batch:
            return batch
        order = batch["id"].tolist()
        batch["id"] = torch.LongTensor([int(samples[i]["id"]) for i in order])
        batch[DIRECTION_KEY] = [int(samples[i][DIRECTION_KEY]) for i in order]
        with_teacher = [TEACHER_KEY in samples[i] for i in order]
        if any(with_teacher) and batch.get("target") is not None:
            if not all(with_teacher):
                raise RuntimeError(
                    "a batch mixes directions with and without a top-k store: "
                    "every direction of a split needs its store"
                )
            k = min(samples[i][TEACHER_KEY]["lprobs"].size(-1) for i in order)
            entries = [
                {name: t[:, :k] for name, t in samples[i][TEACHER_KEY].items()}
                for i in order
            ]
            batch[TEACHER_KEY] = collate_teacher(entries, batch["target"], self.pad, k)
        return batch

    def num_tokens_vec(self, indices):
        return self.dataset.num_tokens_vec(indices)


def select_rows(sample, rows, pad):
    """The sub-batch of ``sample`` made of ``rows`` (in that order).

    Every tensor (and list) whose first dimension is the batch size is
    indexed, in nested dicts too (``net_input``, ``teacher``);
    ``nsentences`` and ``ntokens`` are recounted.

    Args:
        sample: a collated batch (with ``id`` and ``target``).
        rows: row numbers.
        pad: padding id of the target.
    """
    bsz = len(sample["id"])
    index = torch.tensor(rows, dtype=torch.long)

    def pick(value):
        if isinstance(value, dict):
            return {key: pick(v) for key, v in value.items()}
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == bsz:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, list) and len(value) == bsz:
            return [value[i] for i in rows]
        return value

    part = pick(sample)
    part["nsentences"] = len(rows)
    part["ntokens"] = int(part["target"].ne(pad).sum())
    return part
