"""CTranslate2 copies of multilingual students, and translating with their tags."""

import json
import logging
import os
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)

#: The language-tag settings a conversion writes beside CTranslate2's files.
SETTINGS_FILE = "fairseq_kd_langtok.json"

MULTILINGUAL_TASK = "translation_multi_simple_epoch"


class LangtokError(ValueError):
    """A model or direction whose language tags cannot be given (says why)."""


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if value is None else value


def langtok_settings(task_cfg):
    """What puts the language tags into a multilingual model's input.

    Args:
        task_cfg: the checkpoint's ``cfg.task`` (a plain dict or a
            ``Namespace``) of ``translation_multi_simple_epoch`` or
            ``translation_multi_simple_epoch_kd``.

    Returns:
        ``{"lang_tok_style", "encoder_langtok" ("src", "tgt" or None),
        "decoder_langtok" (bool), "langs" (the language list), "lang_pairs"}``.
    """
    from fairseq_kd import multilingual

    name = _get(task_cfg, "_name") or _get(task_cfg, "task")
    if name not in multilingual.MULTILINGUAL_TASKS:
        raise LangtokError(
            f"the checkpoint's task is {name}, not {MULTILINGUAL_TASK}: it has no "
            "language tags (translate it with the bilingual CTranslate2 model)"
        )
    if _get(task_cfg, "lang_tok_replacing_bos_eos", False):
        raise LangtokError(
            "--lang-tok-replacing-bos-eos is not supported: CTranslate2's fairseq "
            "converter refuses it (the tags replace the end-of-sentence tokens)"
        )
    langs = multilingual.teacher_languages(task_cfg)
    if langs is None:
        raise LangtokError(
            f"the language list of --lang-dict {_get(task_cfg, 'lang_dict')} is "
            "not at hand: it gives the language tags"
        )
    return {
        "lang_tok_style": _get(task_cfg, "lang_tok_style", "multilingual"),
        "encoder_langtok": _get(task_cfg, "encoder_langtok"),
        "decoder_langtok": bool(_get(task_cfg, "decoder_langtok", False)),
        "langs": list(langs),
        "lang_pairs": multilingual._as_list(_get(task_cfg, "lang_pairs")) or [],
    }


def direction_tags(settings, src, tgt):
    """The source tag and the target prefix of direction ``src``-``tgt``.

    As fairseq's ``translation_multi_simple_epoch`` puts them (main data):
    ``--encoder-langtok src`` (or ``tgt``) prepends the source's (or the
    target's) tag to the source, ``--decoder-langtok`` starts the target with
    the target's tag (fairseq forces it as the first output token).

    Args:
        settings: :func:`langtok_settings`.
        src: source language.
        tgt: target language.

    Returns:
        ``(source tag or None, target tag or None)``.
    """
    from fairseq.data.multilingual.multilingual_utils import get_lang_tok

    unknown = [lang for lang in (src, tgt) if lang not in settings["langs"]]
    if unknown:
        raise LangtokError(
            f"language(s) {', '.join(unknown)} not among the model's languages "
            f"{','.join(settings['langs'])}: it has no tag for them"
        )
    style = settings["lang_tok_style"]
    spec = settings["encoder_langtok"]
    source_tag = None
    if spec:
        source_tag = get_lang_tok(src if spec.startswith("src") else tgt, style, spec)
    target_tag = (
        get_lang_tok(tgt, style, "tgt") if settings["decoder_langtok"] else None
    )
    return source_tag, target_tag


def write_settings(model_dir, settings):
    """Record :func:`langtok_settings` in a CTranslate2 model's folder."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_settings(model_dir):
    """The settings :func:`write_settings` recorded in ``model_dir``."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise LangtokError(
            f"{model_dir} has no {SETTINGS_FILE}: convert the student with "
            "fairseq_kd.ct2_multilingual.convert (or fairseq-kd-export --ct2), or "
            "pass settings=langtok_settings(<the checkpoint's cfg.task>)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def convert(checkpoint, output_dir, data=None, quantization="int8"):
    """Convert a multilingual student to CTranslate2, with its tag settings.

    The student (trained with ``translation_multi_simple_epoch_kd`` or
    fairseq's ``translation_multi_simple_epoch``) is exported in memory
    (:func:`fairseq_kd.export.export_state`: stock task, no teacher options)
    and handed to CTranslate2's fairseq converter weights-only. One model
    serves every direction (the task shares one source and one target
    dictionary across languages); ``SETTINGS_FILE`` beside it records the
    language-tag options for :class:`Translator`.

    Args:
        checkpoint: the student checkpoint.
        output_dir: the CTranslate2 model's folder (replaced when complete).
        data: folder with the dictionaries (``dict.LANG.txt``; default: the
            checkpoint's ``task.data``, its first folder).
        quantization: CTranslate2 weight type (``int8``, ``float32``, ...).

    Returns:
        ``output_dir``.
    """
    from fairseq_kd.checkpoints import load_checkpoint

    state = load_checkpoint(checkpoint, trusted_fallback=True)
    return convert_state(state, output_dir, data, quantization)


def convert_state(state, output_dir, data=None, quantization="int8", pair=None):
    """:func:`convert` of a checkpoint already loaded (a student or a teacher).

    Args:
        state: the checkpoint, as :func:`fairseq_kd.checkpoints.load_checkpoint`
            returns it.
        output_dir: the CTranslate2 model's folder (replaced when complete).
        data: folder with the dictionaries (default: the checkpoint's
            ``task.data``, its first folder).
        quantization: CTranslate2 weight type (``int8``, ``float32``...;
            None: the checkpoint's).
        pair: ``(source, target)``: the direction whose ``dict.SRC.txt`` and
            ``dict.TGT.txt`` the converter reads (default: the first of the
            checkpoint's ``--lang-pairs``).

    Returns:
        ``output_dir``.
    """
    from fairseq import utils

    from fairseq_kd import export

    state = export.export_state(state)
    task_cfg = state["cfg"]["task"]
    langtok_settings(task_cfg)  # refuse a model without tags before converting
    if data is None and task_cfg.get("data"):
        data = utils.split_paths(task_cfg["data"])[0]
    if not data or not os.path.isdir(data):
        raise export.ExportError(
            f"the dictionaries' folder {data!r} does not exist: pass data= "
            "(the folder the student was trained on)"
        )
    src, tgt = export.multilingual_pair(task_cfg, *(pair or ()))
    return export.convert_to_ct2(state, data, src, tgt, output_dir, quantization)


class Translator:
    """A CTranslate2 multilingual model that adds each direction's tags.

    Source lines are subword-encoded text (tokens separated by spaces, no
    tags). The source tag is prepended and the target tag forced as the first
    output token, as ``fairseq-generate --task translation_multi_simple_epoch``
    does; the target tag is not in the returned translations.

    Args:
        model_dir: a CTranslate2 model of a multilingual student.
        settings: :func:`langtok_settings` (default: read from ``model_dir``).
        device: ``cpu`` or ``cuda``.
        compute_type: CTranslate2's compute type (``default``: the model's).
        intra_threads: threads per translation (0: CTranslate2's default).
    """

    def __init__(
        self,
        model_dir,
        settings=None,
        device="cpu",
        compute_type="default",
        intra_threads=0,
    ):
        import ctranslate2

        self.settings = settings or read_settings(model_dir)
        self.translator = ctranslate2.Translator(
            model_dir,
            device=device,
            compute_type=compute_type,
            intra_threads=intra_threads,
        )

    def translate(
        self,
        lines: Sequence[str],
        src: str,
        tgt: str,
        beam_size: int = 1,
        batch_size: int = 32,
        max_len_a: float = 0.0,
        max_len_b: int = 200,
        **options,
    ) -> List[str]:
        """Translate ``lines`` from ``src`` to ``tgt``.

        Args:
            lines: subword-encoded source lines.
            src: source language.
            tgt: target language.
            beam_size: 1 is greedy.
            batch_size: sentences per CTranslate2 batch.
            max_len_a: fairseq's ``--max-len-a``.
            max_len_b: fairseq's ``--max-len-b``: an output has at most
                ``int(a * longest source + b)`` tokens, the source counted
                with its tag and end-of-sentence token, as fairseq counts it.
            options: more ``translate_batch`` options.

        Returns:
            The translations (subword tokens separated by spaces).
        """
        source_tag, target_tag = direction_tags(self.settings, src, tgt)
        sources = [
            ([source_tag] if source_tag else []) + line.split() for line in lines
        ]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: List[Optional[str]] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            batch = [sources[i] for i in ids]
            longest = max(len(s) for s in batch) + 1  # with </s>
            results = self.translator.translate_batch(
                batch,
                target_prefix=[[target_tag]] * len(batch) if target_tag else None,
                beam_size=beam_size,
                max_batch_size=batch_size,
                max_decoding_length=int(max_len_a * longest + max_len_b),
                **options,
            )
            for i, result in zip(ids, results):
                hyp = result.hypotheses[0]
                # fairseq strips the target tag from its output
                # (symbols_to_strip_from_output), wherever it is
                out[i] = " ".join(t for t in hyp if t != target_tag)
        return out


def translate(model_dir, lines, src, tgt, **kwargs):
    """Translate subword-encoded ``lines`` with a converted multilingual student.

    Args:
        model_dir: the folder :func:`convert` wrote.
        lines: subword-encoded source lines (no tags).
        src: source language.
        tgt: target language.
        kwargs: :class:`Translator`'s options (``device``, ``compute_type``,
            ``intra_threads``) and :meth:`Translator.translate`'s.

    Returns:
        The translations (subword tokens, no tags).
    """
    init = {
        k: kwargs.pop(k)
        for k in ("settings", "device", "compute_type", "intra_threads")
        if k in kwargs
    }
    return Translator(model_dir, **init).translate(lines, src, tgt, **kwargs)
