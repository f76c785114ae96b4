"""Translating with CTranslate2: a converted copy of a fairseq teacher."""

import functools
import json
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
#: what a cached conversion was made from (see :func:`conversion_key`)
KEY_FILE = "fairseq_kd_teacher.json"


def conversion_key(checkpoint, source_dictionary, target_dictionary, langtok=None):
    """What a converted teacher depends on: its cache is reused only for the same.

    Args:
        checkpoint: the fairseq checkpoint (identified by its sha256, so a
            copy elsewhere is the same teacher and a file rewritten in place
            is another one).
        source_dictionary: the source dictionary its tokens are read with.
        target_dictionary: the target dictionary.
        langtok: a multilingual teacher's language-tag settings
            (:func:`fairseq_kd.ct2_multilingual.langtok_settings`), or None.

    Returns:
        A JSON-able dict.
    """
    import ctranslate2

    from fairseq_kd.checkpoints import checkpoint_fingerprint
    from fairseq_kd.topk_store import dictionary_signature

    return {
        "teacher_sha256": checkpoint_fingerprint(checkpoint)[0]["sha256"],
        "source_dictionary": dictionary_signature(source_dictionary),
        "target_dictionary": dictionary_signature(target_dictionary),
        "langtok": langtok,
        "ctranslate2": ctranslate2.__version__,
    }


def _read_key(model_dir):
    path = os.path.join(model_dir, KEY_FILE)
    if not os.path.isfile(os.path.join(model_dir, "model.bin")):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a conversion of an older version: no key


def convert_teacher(
    checkpoint: str, data_dir: str, src: str, tgt: str, work_dir: str,
    key=None, convert=None,
):  # fmt: skip
    """Convert a fairseq checkpoint to CTranslate2 once; reuse the cached copy.

    The conversion runs ``ctranslate2``'s fairseq converter into a temporary
    folder that is renamed into ``<work_dir>/ct2-model`` when complete, with
    ``key`` written beside the model (:data:`KEY_FILE`). A cached copy is
    used only when it recorded the same key (same teacher file content, same
    dictionaries, same language-tag settings, same CTranslate2 version);
    otherwise the teacher is converted again and replaces it. The checkpoint
    is read weights-only (this package lets torch read the
    ``argparse.Namespace`` of a ``fairseq-train`` checkpoint); one that holds
    other pickled objects is unpickled fully, with a warning naming it, since
    the user named it.

    Args:
        checkpoint: the fairseq checkpoint the user named.
        data_dir: folder with ``dict.<src>.txt`` and ``dict.<tgt>.txt``.
        src: source language.
        tgt: target language.
        work_dir: the run's work folder.
        key: :func:`conversion_key` (default: that of ``checkpoint`` and
            the two dictionaries of ``data_dir``).
        convert: ``convert(output_dir)`` writing the CTranslate2 model
            (default: :func:`convert_fairseq` of the bilingual model).

    Returns:
        The converted model's folder.
    """
    if key is None:
        from fairseq.data import Dictionary

        dicts = [
            Dictionary.load(os.path.join(data_dir, f"dict.{lang}.txt"))
            for lang in (src, tgt)
        ]
        key = conversion_key(checkpoint, *dicts)
    if convert is None:

        def convert(output_dir):
            convert_fairseq(
                checkpoint, data_dir, src, tgt, output_dir, trusted_fallback=True
            )

    out = os.path.join(work_dir, MODEL_DIR)
    cached = _read_key(out)
    if cached == key:
        logger.info(f"using the converted teacher cached in {out}")
        return out
    if cached is not None:
        differs = sorted(k for k in key if cached.get(k) != key[k]) or ["its key"]
        logger.info(
            f"the teacher cached in {out} was converted with another "
            f"{', '.join(differs)}: converting {checkpoint} again"
        )
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    convert(tmp)
    with open(os.path.join(tmp, KEY_FILE), "w", encoding="utf-8") as f:
        json.dump(key, f, indent=2, sort_keys=True)
        f.write("\n")
    if _read_key(out) is not None:
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another shard of the run put its conversion there first
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_key(out) != key:
            raise
    logger.info(f"converted {checkpoint} to CTranslate2 in {out}")
    return out


def check_vocabularies(model_dir, src_dict, tgt_dict):
    """Refuse a CTranslate2 model whose vocabularies are not the dictionaries'.

    The engine hands CTranslate2 the dictionaries' symbols and reads its
    output back with them: the two must list the same symbols in the same
    order (fairseq's ``<pad>`` is CTranslate2's ``<blank>``).

    Args:
        model_dir: the converted model.
        src_dict: the task's source dictionary.
        tgt_dict: the task's target dictionary.
    """
    shared = os.path.join(model_dir, "shared_vocabulary.json")
    files = (
        (shared, shared)
        if os.path.isfile(shared)
        else tuple(
            os.path.join(model_dir, f"{side}_vocabulary.json")
            for side in ("source", "target")
        )
    )
    for side, path, dictionary in zip(
        ("source", "target"), files, (src_dict, tgt_dict)
    ):
        if not os.path.isfile(path):
            continue  # another layout of CTranslate2's files: not checked
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        ours = ["<blank>" if s == "<pad>" else s for s in dictionary.symbols]
        if vocab != ours:
            first = next(
                (i for i, (a, b) in enumerate(zip(vocab, ours)) if a != b),
                min(len(vocab), len(ours)),
            )
            raise DistillError(
                f"the CTranslate2 teacher in {model_dir} has another {side} "
                f"vocabulary than this task's dictionary ({len(vocab)} against "
                f"{len(ours)} symbols, first difference at id {first}): the "
                "teacher was converted with other dictionaries or language tags "
                "than this run's"
            )


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


def convert_multilingual(state, data_dir, pair, output_dir):
    """Convert a loaded multilingual teacher as ``fairseq-kd-export --ct2`` does.

    Args:
        state: the teacher's loaded checkpoint.
        data_dir: the folder of the dictionaries.
        pair: ``(source, target)``: the direction whose dictionaries are read.
        output_dir: the CTranslate2 model's folder.
    """
    from fairseq_kd import ct2_multilingual

    ct2_multilingual.convert_state(
        state, output_dir, data_dir, quantization=None, pair=pair
    )


class CTranslate2Engine(Engine):
    """Beam search with CTranslate2 on the teacher (one model, no ensemble).

    A bilingual teacher (``translation`` task) or a multilingual one
    (``translation_multi_simple_epoch`` or ``..._kd``): the teacher is checked
    against the task as the fairseq engine checks it
    (:func:`fairseq_kd.checkpoints.check_teacher`), converted once (a
    multilingual one by :func:`fairseq_kd.ct2_multilingual.convert_state`,
    one model for every direction) and cached in ``<work_dir>/ct2-model``.
    In a multilingual direction (:meth:`set_direction`) the sources already
    start with their source tag; the target tag is given as CTranslate2's
    ``target_prefix`` and left out of the hypotheses, as the fairseq engine
    forces it (``prefix_tokens``) and strips it.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (dictionaries).
        work_dir: the run's work folder (holds the converted model).
    """

    name = "ctranslate2"
    multilingual = True

    def __init__(self, args, task, work_dir):
        super().__init__(args, task, work_dir)
        try:
            import ctranslate2
        except ImportError as e:
            raise DistillError(
                "--engine ctranslate2 needs the ctranslate2 package: "
                "pip install 'fairseq-kd[ct2]'"
            ) from e
        from fairseq import utils

        from fairseq_kd import multilingual
        from fairseq_kd.checkpoints import (
            check_teacher,
            load_checkpoint,
            split_checkpoint_paths,
            teacher_config,
        )

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
        path = paths[0]
        self.src_dict, self.tgt_dict = task.source_dictionary, task.target_dictionary
        state = load_checkpoint(path)
        try:  # the fairseq engine's checks (load_teacher_ensemble)
            check_teacher(path, state, task, **multilingual.teacher_hooks(task))
        except ValueError as e:
            raise DistillError(f"--path: {e}") from e
        cfg = teacher_config(state)
        # the fairseq engine's limits: sources up to the task's and the model's
        # positions, outputs up to the model's (its generator's max_len)
        model_positions = (
            getattr(cfg.model, "max_source_positions", 1024),
            getattr(cfg.model, "max_target_positions", 1024),
        )
        self.max_source_positions = utils.resolve_max_positions(
            task.max_positions(), model_positions
        )[0]
        self.max_target_positions = model_positions[1]
        langtok = convert = None
        if multilingual.is_multilingual(task):
            from fairseq_kd import ct2_multilingual

            try:
                langtok = ct2_multilingual.langtok_settings(cfg.task)
            except ct2_multilingual.LangtokError as e:
                raise DistillError(f"--path {path}: {e}") from e
            # one model for every direction, with the dictionaries of the
            # task's first direction (every direction shares them)
            convert = functools.partial(
                convert_multilingual,
                state,
                args.data,
                (task.source_langs[0], task.target_langs[0]),
            )
        state = None  # the bilingual converter reads the checkpoint itself
        key = conversion_key(path, self.src_dict, self.tgt_dict, langtok)
        model_dir = convert_teacher(
            path, args.data, args.source_lang, args.target_lang, work_dir, key, convert
        )
        convert = None  # the weights are CTranslate2's now
        check_vocabularies(model_dir, self.src_dict, self.tgt_dict)
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

    def translate(self, sources):
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        out: List = [None] * len(sources)
        d = self.tgt_dict
        # what token_string leaves out of the fairseq engine's hypotheses
        strip = {d.eos_word, d.bos_word}
        prefix = None
        if self.target_tag is not None:
            tag = d[self.target_tag]
            strip.add(tag)
        for batch in length_batches(
            lengths, self.args.max_tokens, self.args.batch_size
        ):
            batch = batch.tolist()
            # a multilingual source starts with its tag, a token like the others
            tokens = [token_string(self.src_dict, sources[j]).split() for j in batch]
            if self.target_tag is not None:
                prefix = [[tag]] * len(batch)
            # fairseq's limit a * len + b counts the source with its tag and
            # </s>, and the output with the forced target tag (CTranslate2
            # counts its target prefix in max_decoding_length too)
            longest = int(lengths[batch].max())
            max_len = int(self.args.max_len_a * longest + self.args.max_len_b)
            results = self.translator.translate_batch(
                tokens,
                target_prefix=prefix,
                beam_size=self.args.beam,
                num_hypotheses=self.args.nbest,
                length_penalty=self.args.lenpen,
                max_input_length=0,  # too_long() has kept out the longer sources
                max_decoding_length=min(max_len, self.max_target_positions - 1),
                min_decoding_length=1,
                return_scores=True,
            )
            for j, res in zip(batch, results):
                out[j] = [
                    (" ".join(t for t in hyp if t not in strip), float(score))
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
