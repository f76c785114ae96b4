"""Translation engines behind one interface: source token ids in, n-best out."""

import zlib
from typing import Dict, List, Tuple

import numpy as np
import torch

from fairseq_kd.seqkd.batching import length_batches
from fairseq_kd.seqkd.parts import DistillError

#: one hypothesis: its subword tokens joined by spaces, and the engine's score
Hypothesis = Tuple[str, float]


def token_string(dictionary, ids, strip=None) -> str:
    """Subword tokens of ``ids`` joined by spaces, ``<s>`` and ``</s>`` left out.

    The same string as ``dictionary.string(ids)`` (no BPE post-processing), at
    a fraction of its cost (one list lookup per token).

    Args:
        dictionary: a fairseq ``Dictionary``.
        ids: token ids (list, numpy array or tensor).
        strip: more ids to leave out (a language tag), as
            ``extra_symbols_to_ignore`` does.
    """
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    symbols, eos, bos = dictionary.symbols, dictionary.eos_index, dictionary.bos_index
    if strip:
        return " ".join(
            [symbols[i] for i in ids if i != eos and i != bos and i not in strip]
        )
    return " ".join([symbols[i] for i in ids if i != eos and i != bos])


class Engine:
    """What the distillation needs of a translator.

    Subclasses set ``name`` and implement :meth:`translate`; the chunk loop
    hands them every source of a chunk that :meth:`too_long` accepts, and they
    batch them as they like.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (its source and target dictionaries).
        work_dir: the run's work folder (for cached converted models).
    """

    name = "engine"
    #: whether the engine translates multilingual directions (see set_direction)
    multilingual = False

    def __init__(self, args, task, work_dir):
        self.args, self.task, self.work_dir = args, task, work_dir
        self.max_source_positions = 1024
        self.source_tag = self.target_tag = None

    def set_direction(self, source_tag=None, target_tag=None):
        """Translate a multilingual direction from now on.

        Args:
            source_tag: the source's language tag id (the sources handed to
                :meth:`translate` already start with it), or None.
            target_tag: the tag the decoder is given first (a forced prefix),
                left out of the hypotheses, or None.
        """
        self.source_tag, self.target_tag = source_tag, target_tag

    def too_long(self, src_len: int) -> bool:
        """Whether a source of ``src_len`` tokens (with ``</s>``) is too long."""
        return src_len > self.max_source_positions

    def translate(self, sources: List[np.ndarray]) -> List[List[Hypothesis]]:
        """n-best lists, best first, of ``sources``.

        Args:
            sources: source token ids, each ending with ``</s>``.

        Returns:
            One list of ``nbest`` ``(subword string, score)`` per source, in
            the order of ``sources``.
        """
        raise NotImplementedError


class FairseqEngine(Engine):
    """Beam search with fairseq's generator (``task.build_generator``) over an ensemble.

    Every generation option of fairseq's own option group (``--beam``,
    ``--lenpen``, ``--max-len-a/b``, ``--min-len``, ``--unkpen``,
    ``--no-repeat-ngram-size``, ``--sampling``...) reaches the generator as it
    would in ``fairseq-generate``.
    """

    name = "fairseq"
    multilingual = True

    def __init__(self, args, task, work_dir):
        super().__init__(args, task, work_dir)
        from fairseq import utils
        from fairseq.tasks import FairseqTask

        from fairseq_kd import multilingual
        from fairseq_kd.checkpoints import load_teacher_ensemble

        self.use_cuda = torch.cuda.is_available() and not args.cpu
        is_multi = multilingual.is_multilingual(task)
        hooks = multilingual.teacher_hooks(task)  # fairseq's multilingual task
        try:
            self.models = models = load_teacher_ensemble(args.path, task, **hooks)
        except ValueError as e:
            raise DistillError(f"--path: {e}") from e
        for model in models:
            if args.fp16:
                model.half()
            if self.use_cuda:
                model.cuda()
        self.max_source_positions = utils.resolve_max_positions(
            task.max_positions(), *[m.max_positions() for m in models]
        )[0]
        if is_multi:
            # fairseq's multilingual build_generator wants one --target-lang; the
            # tag is forced per direction here (prefix_tokens) and stripped as
            # fairseq-generate strips it (symbols_to_strip_from_output)
            self.generator = FairseqTask.build_generator(task, models, args)
        else:
            self.generator = task.build_generator(models, args)
        self.tgt_dict = task.target_dictionary
        src = task.source_dictionary
        self.pad, self.src_eos = src.pad(), src.eos()

    @torch.no_grad()
    def translate(self, sources):
        from fairseq import utils
        from fairseq.data import data_utils

        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        out: List = [None] * len(sources)
        for batch in length_batches(
            lengths, self.args.max_tokens, self.args.batch_size
        ):
            tokens = [torch.as_tensor(sources[j], dtype=torch.long) for j in batch]
            sample = {
                "id": torch.as_tensor(batch, dtype=torch.long),
                "net_input": {
                    # LanguagePairDataset's default: sources padded on the left
                    "src_tokens": data_utils.collate_tokens(
                        tokens, self.pad, self.src_eos, left_pad=True
                    ),
                    "src_lengths": torch.as_tensor(lengths[batch]),
                },
            }
            prefix, strip = None, None
            if self.target_tag is not None:  # as the multilingual inference_step
                prefix = torch.full((len(batch), 1), self.target_tag, dtype=torch.long)
                strip = {self.target_tag}
            if self.use_cuda:
                sample = utils.move_to_cuda(sample)
                prefix = prefix.cuda() if prefix is not None else None
            hypos = self.generator.generate(self.models, sample, prefix_tokens=prefix)
            for j, hyps in zip(batch.tolist(), hypos):
                out[j] = [
                    (
                        token_string(self.tgt_dict, h["tokens"].cpu(), strip),
                        float(h["score"]),
                    )
                    for h in hyps[: self.args.nbest]
                ]
        return out


class FakeEngine(Engine):
    """An instant, deterministic translator for tests and overhead benchmarks.

    Hypothesis ``k`` of a source is its tokens reversed with the first ``k``
    of them left out; its score is ``-(k + 1) / 10`` minus a fraction derived
    from the source ids, so scores differ between sentences. No model is read.
    """

    name = "fake"
    multilingual = True

    def __init__(self, args, task, work_dir):
        super().__init__(args, task, work_dir)
        self.src_dict = task.source_dictionary

    def translate(self, sources):
        out = []
        for ids in sources:
            ids = np.asarray(ids, dtype=np.int32)
            tags = {self.source_tag, self.target_tag} - {None}
            words = token_string(self.src_dict, ids, tags).split()[::-1]
            jitter = (zlib.crc32(ids.tobytes()) % 1000) / 1000
            out.append(
                [
                    (" ".join(words[k:]), round(-(k + 1) / 10 - jitter, 4))
                    for k in range(self.args.nbest)
                ]
            )
        return out


def ct2_engine(args, task, work_dir):
    """The CTranslate2 engine (imported only when asked for)."""
    from fairseq_kd.seqkd.ct2_engine import CTranslate2Engine

    return CTranslate2Engine(args, task, work_dir)


#: ``--engine`` name -> constructor ``(args, task, work_dir) -> Engine``
ENGINES: Dict = {
    "fairseq": FairseqEngine,
    "ctranslate2": ct2_engine,
    "fake": FakeEngine,
}


def build_engine(args, task, work_dir) -> Engine:
    """The translator named by ``--engine``.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (dictionaries).
        work_dir: the run's work folder.
    """
    if args.engine not in ENGINES:
        raise DistillError(f"--engine must be one of {', '.join(ENGINES)}")
    return ENGINES[args.engine](args, task, work_dir)
