"""Backward-model scores of the chosen pairs: log P(source | hypothesis), per chunk."""

import hashlib
import json
import logging
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fairseq_kd.seqkd import parts
from fairseq_kd.seqkd.batching import length_batches
from fairseq_kd.seqkd.parts import DistillError

logger = logging.getLogger(__name__)

#: the side folder of one backward model and one n-best choice: ``W/<BACKWARD>-<tag>``
BACKWARD = "backward"


def reversed_task(task):
    """A translation task over ``task``'s dictionaries, target -> source.

    Args:
        task: the distillation's ``TranslationTask`` (source -> target).
    """
    import copy

    from fairseq.tasks.translation import TranslationTask

    cfg = copy.deepcopy(task.cfg)
    cfg.source_lang, cfg.target_lang = task.cfg.target_lang, task.cfg.source_lang
    return TranslationTask(cfg, task.target_dictionary, task.source_dictionary)


def hyp_crc(hyp: str) -> int:
    """CRC-32 of a hypothesis string (ties a stored score to its hypothesis)."""
    return zlib.crc32(hyp.encode("utf-8"))


class BackwardScorer:
    """Forced decoding of the source given the hypothesis with a backward model.

    The score of a pair is the backward model's log-probability of the source
    tokens and ``</s>`` given the hypothesis, divided by that number of tokens
    (fairseq's ``SequenceScorer``: an ensemble averages probabilities).

    Args:
        paths: ``--backward-path``: checkpoint(s) of a target -> source model
            trained with the data's dictionaries reversed (``:``-separated).
        task: the distillation's translation task (source -> target).
        max_tokens: tokens per batch (``--max-tokens``), or None.
        batch_size: pairs per batch (``--batch-size``), or None.
        cpu: stay on the CPU even when a GPU is there (``--cpu``).
        fp16: half precision on the GPU (``--fp16``).
    """

    def __init__(self, paths, task, max_tokens, batch_size, cpu=False, fp16=False):
        from fairseq import utils
        from fairseq.sequence_scorer import SequenceScorer

        from fairseq_kd.checkpoints import load_teacher_ensemble

        self.task = reversed_task(task)
        try:
            self.models = load_teacher_ensemble(paths, self.task)
        except (ValueError, FileNotFoundError) as e:
            src, tgt = task.cfg.source_lang, task.cfg.target_lang
            raise DistillError(
                f"--backward-path: the backward model must translate {tgt}->{src} "
                f"with DATA's dictionaries reversed (its source dictionary "
                f"dict.{tgt}.txt, its target dict.{src}.txt): {e}"
            ) from e
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.use_cuda, self.fp16 = torch.cuda.is_available() and not cpu, fp16
        self.on_device = False
        self.max_positions = utils.resolve_max_positions(
            self.task.max_positions(), *[m.max_positions() for m in self.models]
        )
        # the hypothesis is the backward model's source and the source its target
        self.hyp_dict, self.src_dict = task.target_dictionary, task.source_dictionary
        self.scorer = SequenceScorer(self.src_dict)

    def _to_device(self):
        if self.on_device:
            return
        for model in self.models:
            if self.fp16:
                model.half()
            if self.use_cuda:
                model.cuda()
        self.on_device = True

    def encode(self, hyp: str, src: str) -> Tuple[np.ndarray, np.ndarray]:
        """Token ids (with ``</s>``) of a subword hypothesis and source line."""
        h = self.hyp_dict.encode_line(hyp, add_if_not_exist=False, append_eos=True)
        s = self.src_dict.encode_line(src, add_if_not_exist=False, append_eos=True)
        return h.numpy(), s.numpy()

    @torch.no_grad()
    def score(self, pairs: Sequence[Tuple[str, str]]) -> List[Optional[float]]:
        """Length-normalised backward log-probability of each ``(hyp, src)`` pair.

        Pairs are batched by length. A pair longer than the backward model's
        positions gets None.

        Args:
            pairs: ``(subword hypothesis, subword source)`` strings.
        """
        from fairseq import utils
        from fairseq.data import data_utils

        self._to_device()
        encoded = [self.encode(h, s) for h, s in pairs]
        max_src, max_tgt = self.max_positions
        fits = [
            j
            for j, (h, s) in enumerate(encoded)
            if len(h) <= max_src and len(s) <= max_tgt
        ]
        out: List[Optional[float]] = [None] * len(pairs)
        if not fits:
            return out
        lengths = np.array([max(len(encoded[j][0]), len(encoded[j][1])) for j in fits])
        pad, eos = self.src_dict.pad(), self.src_dict.eos()
        for batch in length_batches(lengths, self.max_tokens, self.batch_size):
            rows = [fits[b] for b in batch.tolist()]
            hyps = [torch.from_numpy(encoded[j][0]).long() for j in rows]
            srcs = [torch.from_numpy(encoded[j][1]).long() for j in rows]
            sample = {
                "net_input": {
                    # LanguagePairDataset's defaults: source left-padded, target right
                    "src_tokens": data_utils.collate_tokens(
                        hyps, self.hyp_dict.pad(), self.hyp_dict.eos(), left_pad=True
                    ),
                    "src_lengths": torch.tensor([len(x) for x in hyps]),
                    "prev_output_tokens": data_utils.collate_tokens(
                        srcs, pad, eos, left_pad=False, move_eos_to_beginning=True
                    ),
                },
                "target": data_utils.collate_tokens(srcs, pad, eos, left_pad=False),
            }
            if self.use_cuda:
                sample = utils.move_to_cuda(sample)
            for j, hypo in zip(rows, self.scorer.generate(self.models, sample)):
                out[j] = round(float(hypo[0]["score"]), 4)
        return out


def side_settings(args, paths_fingerprint: List[Dict]) -> Dict:
    """What a side folder's scores depend on: the backward model(s) and the choice."""
    return {
        "backward": paths_fingerprint,
        "select": args.select,
        "post_process": args.post_process or "none",
    }


def backward_fingerprint(paths) -> List[Dict]:
    """Absolute path, size and modification time of each backward checkpoint."""
    from fairseq_kd.checkpoints import split_checkpoint_paths

    out = []
    for path in split_checkpoint_paths(paths):
        if not os.path.isfile(path):
            raise DistillError(f"--backward-path: checkpoint not found: {path}")
        st = os.stat(path)
        out.append(
            {"path": os.path.abspath(path), "bytes": st.st_size, "mtime": st.st_mtime}
        )
    if not out:
        raise DistillError("--backward-path names no checkpoint")
    return out


def side_dir(args, work_dir: str) -> str:
    """The folder of this run's backward scores (created, with its settings).

    One folder per backward model and n-best choice, so that runs sharing a
    work folder with other ``--select`` settings or models keep their own.
    """
    settings = side_settings(args, backward_fingerprint(args.backward_path))
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    tag = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    folder = os.path.join(work_dir, f"{BACKWARD}-{tag}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "settings.json")
    if not os.path.exists(path):
        parts.atomic_write_text(path, text)
    return folder


def side_path(folder: str, chunk: int) -> str:
    """Path of one chunk's backward scores."""
    return os.path.join(folder, f"chunk-{chunk:06d}.jsonl")


def score_chunks(args, work_dir, folder, ranges, chunks, selector, scorer_fn):
    """Write the backward scores of ``chunks`` that have none yet, chunk by chunk.

    Each chunk's file holds, per sentence, the chosen index (-1: not
    translated), the CRC-32 of the chosen hypothesis and its backward score
    (None when not translated or too long for the backward model); it is
    written atomically, so a resumed run recomputes only the missing chunks.

    Args:
        args: the ``fairseq-kd-distill`` options.
        work_dir: the run's work folder (part files).
        folder: the side folder (see :func:`side_dir`).
        ranges: the corpus-id range of every chunk.
        chunks: chunk numbers to score (their part files must exist).
        selector: a ``merge.Selector`` without statistics (the n-best choice).
        scorer_fn: returns the :class:`BackwardScorer` (built on first use).

    Returns:
        The number of chunks scored by this call.
    """
    from tqdm import tqdm

    todo = [k for k in chunks if not os.path.exists(side_path(folder, k))]
    if not todo:
        return 0
    bar = tqdm(
        total=sum(len(ranges[k]) for k in todo),
        unit="sent",
        desc="backward scores",
        disable=args.no_progress_bar,
        mininterval=1.0,
    )
    scorer = scorer_fn()
    for k in todo:
        _, recs = parts.read_part(work_dir, k, ranges[k])
        chosen = [selector.choose(r) if r["nbest"] else -1 for r in recs]
        pairs = [(r["nbest"][c], r["src"]) for r, c in zip(recs, chosen) if c >= 0]
        scores = iter(scorer.score(pairs))
        lines = [json.dumps({"chunk": k, "first": ranges[k].start})]
        for r, c in zip(recs, chosen):
            crc = hyp_crc(r["nbest"][c]) if c >= 0 else None
            score = next(scores) if c >= 0 else None
            lines.append(json.dumps([r["id"], c, crc, score]))
        parts.atomic_write_text(side_path(folder, k), "\n".join(lines) + "\n")
        bar.update(len(ranges[k]))
    bar.close()
    return len(todo)


def read_scores(folder: str, chunk: int, ids: range) -> List[list]:
    """One chunk's ``[id, chosen index, hypothesis CRC, score]`` rows, checked.

    Args:
        folder: the side folder.
        chunk: chunk number.
        ids: the corpus ids the chunk holds.
    """
    path = side_path(folder, chunk)
    header, rows = parts.read_jsonl(path, "backward-score file")
    if header.get("chunk") != chunk or [r[0] for r in rows] != list(ids):
        raise DistillError(
            f"{path} does not hold the backward scores of chunk {chunk} "
            f"(ids {ids.start}..{ids.stop - 1}): delete it to recompute it"
        )
    return rows
