"""Translating with CTranslate2: a converted copy of a fairseq teacher."""

import logging
import os
import shutil
from typing import List

import numpy as np
import torch

from fairseq_kd.seqkd.batching import length_batches
from fairseq_kd.seqkd.engines import Engine, token_string
from fairseq_kd.seqkd.parts import DistillError

logger = logging.getLogger(__name__)

MODEL_DIR = "ct2-model"


def convert_teacher(checkpoint: str, data_dir: str, src: str, tgt: str, work_dir: str):
    """Convert a fairseq checkpoint to CTranslate2 once; reuse the cached copy.

    The conversion runs ``ctranslate2``'s fairseq converter into a temporary
    folder that is renamed into ``<work_dir>/ct2-model`` when complete. The
    work folder's recorded settings (teacher path, size, time) make sure the
    cache belongs to this teacher. The checkpoint is read weights-only (this
    package lets torch read the ``argparse.Namespace`` of a ``fairseq-train``
    checkpoint); one that holds other pickled objects is unpickled fully, with
    a warning naming it, since the user named it.

    Args:
        checkpoint: the fairseq checkpoint the user named.
        data_dir: folder with ``dict.<src>.txt`` and ``dict.<tgt>.txt``.
        src: source language.
        tgt: target language.
        work_dir: the run's work folder.

    Returns:
        The converted model's folder.
    """
    out = os.path.join(work_dir, MODEL_DIR)
    if os.path.isfile(os.path.join(out, "model.bin")):
        logger.info(f"using the converted teacher cached in {out}")
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_fairseq(checkpoint, data_dir, src, tgt, tmp, trusted_fallback=True)
    os.replace(tmp, out)
    logger.info(f"converted {checkpoint} to CTranslate2 in {out}")
    return out


def convert_fairseq(
    checkpoint,
    data_dir,
    src,
    tgt,
    output_dir,
    quantization=None,
    trusted_fallback=False,
):
    """Run CTranslate2's fairseq converter, weights-only first.

    Args:
        checkpoint: the fairseq checkpoint.
        data_dir: folder with ``dict.<src>.txt`` and ``dict.<tgt>.txt``.
        src: source language.
        tgt: target language.
        output_dir: the CTranslate2 model's folder (replaced).
        quantization: CTranslate2 weight type (``int8``, ``float32``, ...).
        trusted_fallback: the user named ``checkpoint``: unpickle it fully,
            with a warning, if weights-only loading refuses it.
    """
    import pickle

    from ctranslate2.converters.fairseq import FairseqConverter

    import fairseq_kd  # noqa: F401  (its tasks and safe globals for the loader)
    from fairseq_kd.checkpoints import (
        UnsafeCheckpointError,
        refusal_reason,
        warn_full_unpickling,
    )

    def convert(unsafe):
        converter = FairseqConverter(
            checkpoint,
            data_dir,
            source_lang=src,
            target_lang=tgt,
            unsafe_deserialization=unsafe,
        )
        converter.convert(output_dir, quantization=quantization, force=True)

    try:
        convert(unsafe=False)
    except pickle.UnpicklingError as e:
        reason = refusal_reason(e)
        if not trusted_fallback:
            raise UnsafeCheckpointError(
                f"{checkpoint} holds pickled objects that weights-only loading "
                f"refuses ({reason})"
            ) from e
        warn_full_unpickling(checkpoint, reason)
        convert(unsafe=True)


class CTranslate2Engine(Engine):
    """Beam search with CTranslate2 on the teacher (one model, no ensemble).

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (dictionaries).
        work_dir: the run's work folder (holds the converted model).
    """

    name = "ctranslate2"

    def __init__(self, args, task, work_dir):
        super().__init__(args, task, work_dir)
        try:
            import ctranslate2
        except ImportError as e:
            raise DistillError(
                "--engine ctranslate2 needs the ctranslate2 package: "
                "pip install 'fairseq-kd[ct2]'"
            ) from e
        from fairseq_kd.checkpoints import load_checkpoint, split_checkpoint_paths

        unsupported = unsupported_generation_options(args)
        if unsupported:
            raise DistillError(
                "--engine ctranslate2 supports --beam, --nbest, --lenpen and "
                f"--max-len-a/b only; use --engine fairseq for {', '.join(unsupported)}"
            )
        paths = split_checkpoint_paths(args.path)
        if len(paths) != 1:
            raise DistillError(
                "--engine ctranslate2 translates with one teacher: --path names "
                f"{len(paths)}; use --engine fairseq for an ensemble"
            )
        state = load_checkpoint(paths[0])
        model_cfg = state["cfg"]["model"] if state.get("cfg") else state["args"]
        self.max_source_positions = getattr(model_cfg, "max_source_positions", 1024)
        self.max_target_positions = getattr(model_cfg, "max_target_positions", 1024)
        del state
        model_dir = convert_teacher(
            paths[0], args.data, args.source_lang, args.target_lang, work_dir
        )
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        compute_type = args.ct2_compute_type
        if args.fp16 and compute_type == "default":
            compute_type = "float16"
        self.translator = ctranslate2.Translator(
            model_dir,
            device=device,
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=args.threads,
        )
        self.src_dict = task.source_dictionary

    def translate(self, sources):
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        out: List = [None] * len(sources)
        for batch in length_batches(
            lengths, self.args.max_tokens, self.args.batch_size
        ):
            batch = batch.tolist()
            tokens = [token_string(self.src_dict, sources[j]).split() for j in batch]
            # fairseq's limit a * len + b counts the source with its </s>
            longest = int(lengths[batch].max())
            max_len = int(self.args.max_len_a * longest + self.args.max_len_b)
            results = self.translator.translate_batch(
                tokens,
                beam_size=self.args.beam,
                num_hypotheses=self.args.nbest,
                length_penalty=self.args.lenpen,
                max_decoding_length=min(max_len, self.max_target_positions - 1),
                min_decoding_length=1,
                return_scores=True,
            )
            for j, res in zip(batch, results):
                out[j] = [
                    (" ".join(hyp), float(score))
                    for hyp, score in zip(res.hypotheses, res.scores)
                ]
        return out


#: generation options CTranslate2's ``translate_batch`` is given
CT2_OPTIONS = ("beam", "nbest", "lenpen", "max_len_a", "max_len_b")


def unsupported_generation_options(args) -> List[str]:
    """fairseq generation options set away from their defaults that CTranslate2 ignores.

    Args:
        args: the ``fairseq-kd-distill`` options (fairseq's generation group).
    """
    from fairseq.dataclass.configs import GenerationConfig

    defaults = GenerationConfig()
    out = []
    for name in ("min_len", "unkpen", "no_repeat_ngram_size", "sampling",
                 "temperature", "diverse_beam_groups", "match_source_len",
                 "unnormalized", "prefix_size"):  # fmt: skip
        if hasattr(args, name) and getattr(args, name) != getattr(defaults, name):
            out.append("--" + name.replace("_", "-"))
    return out
