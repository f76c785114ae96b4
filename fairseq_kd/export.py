"""fairseq-kd-export: a student checkpoint that stock fairseq loads weights-only."""

import argparse
import collections
import dataclasses
import enum
import logging
import os
import shutil
import sys
import tempfile

import torch

logger = logging.getLogger("fairseq_kd.export")

#: This package's tasks and criteria, and the stock ones an export names instead.
STOCK_TASK = {
    "translation_kd": "translation",
    "translation_multi_simple_epoch_kd": "translation_multi_simple_epoch",
}
STOCK_CRITERION = {"word_kd": "label_smoothed_cross_entropy"}

#: What a weights-only ``torch.load`` reads without any allow-listed class.
_PLAIN = (str, int, float, bool, type(None))


class ExportError(Exception):
    """A checkpoint that cannot be exported as asked (the message says why)."""


def _field_names(config_class):
    return {f.name for f in dataclasses.fields(config_class)}


def _plain(obj, where="state"):
    """``obj`` with every ``Namespace``/omegaconf/enum turned into plain types.

    Args:
        obj: a checkpoint entry.
        where: its path in the checkpoint (for the message).
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value if isinstance(obj.value, _PLAIN) else obj.name
    if isinstance(obj, dict):
        kind = (
            collections.OrderedDict
            if isinstance(obj, collections.OrderedDict)
            else dict
        )
        return kind((k, _plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise ExportError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which a "
        "weights-only load refuses; fairseq-kd-export only writes tensors and "
        "plain Python values"
    )


def _as_stock(component_cfg, stock_names, registry):
    """A plugin component's config as its stock counterpart's: its fields only.

    Args:
        component_cfg: the task's or criterion's config (a plain dict or None).
        stock_names: plugin registry name -> stock registry name.
        registry: fairseq's dataclass registry of that kind of component.

    Returns:
        ``(config, dropped field names)``; a stock component is returned as
        it is.
    """
    name = (component_cfg or {}).get("_name")
    if name not in stock_names:
        return component_cfg, set()
    stock = stock_names[name]
    keep = _field_names(registry[stock])
    drop = _field_names(registry[name]) - keep
    out = {k: v for k, v in component_cfg.items() if k in keep}
    out["_name"] = stock
    return out, drop


def _option_names(task_class):
    """The ``dest`` of every option that an argparse task's ``add_args`` adds."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    task_class.add_args(parser)
    return {action.dest for action in parser._actions}


def _legacy_task_drop(name):
    """The options of argparse task ``name`` (a plugin's) that its stock task lacks.

    fairseq saves an argparse task's config (``translation_multi_simple_epoch``
    is one) as the ``Namespace`` of every command-line option, so the plugin's
    options are found as the ones its ``add_args`` adds beyond the stock task's.

    Args:
        name: the plugin task's registry name (a key of :data:`STOCK_TASK`).
    """
    from fairseq.tasks import TASK_REGISTRY

    return _option_names(TASK_REGISTRY[name]) - _option_names(
        TASK_REGISTRY[STOCK_TASK[name]]
    )


def _stock_flags(flags, drop, task, criterion):
    """A legacy ``Namespace``-style dict of every option, stock-fairseq's.

    Args:
        flags: the options (a plain dict).
        drop: option names to leave out (the plugin's).
        task: the stock task's name.
        criterion: the stock criterion's name (None: keep the flag's value).
    """
    out = {k: v for k, v in flags.items() if k not in drop}
    out["task"] = task
    if criterion is not None and "criterion" in out:
        out["criterion"] = criterion
    out["user_dir"] = None
    return out


def export_state(state):
    """The exported form of a loaded student checkpoint.

    The task becomes its stock counterpart (``translation_kd``:
    ``translation``, its fields only; ``translation_multi_simple_epoch_kd``:
    ``translation_multi_simple_epoch``, an argparse task whose config holds
    every option: the plugin's own options are left out) and a plugin
    criterion becomes ``label_smoothed_cross_entropy`` with the same label
    smoothing; teacher and KD options, ``user_dir``, the optimizer state, the
    task's and the trainer's extra state are dropped; ``args`` is ``None`` and
    ``cfg`` a plain dict (the legacy model options too), so the file holds only
    tensors and plain Python values.

    Args:
        state: the student's state, as :func:`fairseq_kd.checkpoints.load_checkpoint`
            returns it.

    Returns:
        The state to save.
    """
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    cfg = _plain(state["cfg"], "cfg")
    task_name = (cfg["task"] or {}).get("_name")
    legacy_task = task_name in STOCK_TASK and task_name not in TASK_DATACLASS_REGISTRY
    if legacy_task:
        task, task_drop = dict(cfg["task"]), _legacy_task_drop(task_name)
    else:
        task, task_drop = _as_stock(cfg["task"], STOCK_TASK, TASK_DATACLASS_REGISTRY)
    criterion, criterion_drop = _as_stock(
        cfg.get("criterion"), STOCK_CRITERION, CRITERION_DATACLASS_REGISTRY
    )
    criterion_name = None if criterion is None else criterion["_name"]
    if legacy_task:
        stock = STOCK_TASK[task_name]
        task = _stock_flags(task, task_drop | criterion_drop, stock, criterion_name)
        task["_name"] = stock
    cfg["task"], cfg["criterion"] = task, criterion
    cfg["common"]["user_dir"] = None
    model = cfg.get("model")
    if isinstance(model, dict) and "arch" in model:  # legacy options: every flag
        cfg["model"] = _stock_flags(
            model, task_drop | criterion_drop, task["_name"], criterion_name
        )
    history = state.get("optimizer_history") or [{}]
    last = history[-1]
    criterion_name = last.get("criterion_name")
    if criterion is not None and criterion.get("_name") in CRITERION_REGISTRY:
        criterion_name = CRITERION_REGISTRY[criterion["_name"]].__name__
    extra = state.get("extra_state") or {}
    return {
        "args": None,
        "cfg": cfg,
        "model": _plain(state["model"], "model"),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": criterion_name,
                "optimizer_name": last.get("optimizer_name"),
                "lr_scheduler_state": {},
                "num_updates": last.get("num_updates", 0),
            }
        ],
        "task_state": {},
        "extra_state": {"train_iterator": _plain(extra.get("train_iterator"))},
    }


def is_multilingual(cfg):
    """Whether an exported ``cfg`` is ``translation_multi_simple_epoch``'s."""
    return (cfg.get("task") or {}).get("_name") == "translation_multi_simple_epoch"


def multilingual_pair(task_cfg, source_lang=None, target_lang=None):
    """A direction of a multilingual model, for its CTranslate2 conversion.

    The multilingual task shares one dictionary across source languages and
    one across target languages, so every direction converts to the same
    CTranslate2 model; the converter reads the dictionaries of one
    (``dict.SRC.txt``, ``dict.TGT.txt``). Default: the first of
    ``--lang-pairs``.

    Args:
        task_cfg: the exported ``cfg["task"]``.
        source_lang: the direction's source language, if given.
        target_lang: its target language, if given.
    """
    from fairseq_kd.multilingual import _as_list

    pairs = _as_list(task_cfg.get("lang_pairs")) or []
    if (source_lang is None or target_lang is None) and not pairs:
        raise ExportError(
            "the multilingual checkpoint names no --lang-pairs: pass "
            "--source-lang and --target-lang"
        )
    first = pairs[0].split("-") if pairs else (None, None)
    return source_lang or first[0], target_lang or first[1]


def _dictionary_path(path, data_dir, option):
    """A dictionary file the checkpoint names, or its namesake in ``data_dir``."""
    if os.path.isfile(path):
        return path
    moved = os.path.join(data_dir, os.path.basename(path))
    if os.path.isfile(moved):
        return moved
    raise ExportError(
        f"the student's {option} {path} does not exist, nor does {moved} "
        "(see --data)"
    )


def multilingual_dictionaries(task_cfg, data_dir):
    """The dictionary files a multilingual model loads, by option name.

    ``--fixed-dictionary`` (one file for every language), else
    ``--source-dict``/``--target-dict`` and ``dict.LANG.txt`` of the other
    side's languages in ``data_dir``; a file the checkpoint names that has
    moved is looked for in ``data_dir``.

    Args:
        task_cfg: the exported ``cfg["task"]``.
        data_dir: the dictionaries' folder.

    Returns:
        ``{option or "dict.LANG.txt": path}``.
    """
    from fairseq_kd.multilingual import _as_list

    found = {}
    for key, option in (
        ("fixed_dictionary", "--fixed-dictionary"),
        ("source_dict", "--source-dict"),
        ("target_dict", "--target-dict"),
    ):
        if task_cfg.get(key):
            found[key] = _dictionary_path(task_cfg[key], data_dir, option)
    if "fixed_dictionary" in found:
        return {"fixed_dictionary": found["fixed_dictionary"]}
    pairs = [p.split("-") for p in _as_list(task_cfg.get("lang_pairs")) or []]
    sides = [(0, "source_dict"), (1, "target_dict")]
    langs = [p[i] for i, key in sides if key not in found for p in pairs]
    for lang in dict.fromkeys(langs):
        name = f"dict.{lang}.txt"
        found[name] = _dictionary_path(os.path.join(data_dir, name), data_dir, name)
    return found


def language_pair(cfg, data_dir):
    """``(source, target)`` languages of an exported config, or from ``data_dir``.

    Args:
        cfg: the exported ``cfg`` (plain dict).
        data_dir: folder with the dictionaries (``dict.<lang>.txt``).
    """
    from fairseq.data import data_utils

    src, tgt = cfg["task"].get("source_lang"), cfg["task"].get("target_lang")
    if (src is None or tgt is None) and data_dir and os.path.isdir(data_dir):
        src, tgt = data_utils.infer_language_pair(data_dir)
    if src is None or tgt is None:
        raise ExportError(
            "the checkpoint names no language pair and none can be inferred from "
            f"--data {data_dir}: pass --source-lang and --target-lang"
        )
    return src, tgt


def copy_dictionaries(data_dir, dest_dir, langs):
    """Copy ``dict.<lang>.txt`` of each language from ``data_dir`` to ``dest_dir``.

    Args:
        data_dir: the folder the student was trained on (or any with its dictionaries).
        dest_dir: the exported checkpoint's folder.
        langs: the languages.

    Returns:
        The copied files.
    """
    copied = []
    for lang in dict.fromkeys(langs):
        src = os.path.join(data_dir, f"dict.{lang}.txt")
        if not os.path.isfile(src):
            raise ExportError(f"--copy-dicts: {src} does not exist (see --data)")
        dest = os.path.join(dest_dir, f"dict.{lang}.txt")
        if os.path.abspath(src) != os.path.abspath(dest):
            shutil.copyfile(src, dest)
        copied.append(dest)
    return copied


def copy_files(paths, dest_dir):
    """Copy ``paths`` into ``dest_dir`` (same names); return the copies."""
    copied = []
    for path in paths:
        dest = os.path.join(dest_dir, os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(dest):
            shutil.copyfile(path, dest)
        copied.append(dest)
    return copied


def convert_to_ct2(state, data_dir, src, tgt, output_dir, quantization):
    """Write a CTranslate2 model of an exported state, without unsafe loading.

    CTranslate2's converter reads the legacy model options as attributes
    (``checkpoint["args"]``), so it is handed a temporary copy whose ``args``
    is an ``argparse.Namespace`` of the exported options; torch reads that
    weights-only, ``Namespace`` being allow-listed by this package. A
    multilingual model's dictionaries that have moved are looked for in
    ``data_dir`` (:func:`multilingual_dictionaries`), and its language-tag
    settings are written beside the model
    (:data:`fairseq_kd.ct2_multilingual.SETTINGS_FILE`).

    Args:
        state: the exported state.
        data_dir: folder with ``dict.<src>.txt`` and ``dict.<tgt>.txt``.
        src: source language.
        tgt: target language.
        output_dir: the CTranslate2 model's folder (replaced).
        quantization: CTranslate2 weight type (``int8``, ``float32``, ...).
    """
    from fairseq_kd import ct2_multilingual
    from fairseq_kd.seqkd.ct2_engine import convert_fairseq

    cfg = state["cfg"]
    model = cfg["model"] if "arch" in cfg["model"] else None
    if model is None:
        raise ExportError(
            "--ct2: the checkpoint's model options are not a legacy fairseq "
            "architecture's (no 'arch'); convert it with ct2-fairseq-converter"
        )
    settings = None
    args = argparse.Namespace(**model)
    if is_multilingual(cfg):
        settings = ct2_multilingual.langtok_settings(cfg["task"])
        for key, path in multilingual_dictionaries(cfg["task"], data_dir).items():
            if not key.startswith("dict."):
                setattr(args, key, path)
    args.data, args.source_lang, args.target_lang = data_dir, src, tgt
    with tempfile.TemporaryDirectory(dir=os.path.dirname(output_dir) or ".") as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(dict(state, args=args, cfg=None), path)
        staging = os.path.join(tmp, "ct2")
        convert_fairseq(path, data_dir, src, tgt, staging, quantization=quantization)
        if settings is not None:
            ct2_multilingual.write_settings(staging, settings)
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(staging, output_dir)
    return output_dir


def export(
    checkpoint,
    output,
    data=None,
    copy_dicts=False,
    ct2=None,
    ct2_dir=None,
    source_lang=None,
    target_lang=None,
):
    """Export a student checkpoint (see :func:`export_state`) and its companions.

    Args:
        checkpoint: the student checkpoint (named by the user: a file that
            needs full unpickling is loaded with a warning).
        output: the exported checkpoint's path.
        data: folder with the dictionaries (default: the checkpoint's
            ``task.data``, its first folder).
        copy_dicts: copy the dictionaries next to ``output``.
        ct2: write a CTranslate2 model with this quantization.
        ct2_dir: the CTranslate2 model's folder (default ``<output dir>/ct2-<ct2>``).
        source_lang: source language (default: the checkpoint's, or inferred).
            For a multilingual model, only the direction whose dictionaries
            the CTranslate2 conversion reads (default: the first of
            ``--lang-pairs``); nothing is recorded.
        target_lang: target language (the same).

    Returns:
        ``{"checkpoint": ..., "dicts": [...], "ct2": ...}``.
    """
    from fairseq import utils

    from fairseq_kd.checkpoints import load_checkpoint

    state = export_state(load_checkpoint(checkpoint, trusted_fallback=True))
    cfg = state["cfg"]
    multilingual = is_multilingual(cfg)
    if not multilingual:
        for key, value in (("source_lang", source_lang), ("target_lang", target_lang)):
            if value is not None:
                cfg["task"][key] = value
                if "arch" in cfg["model"]:
                    cfg["model"][key] = value
    if data is None and cfg["task"].get("data"):
        data = utils.split_paths(cfg["task"]["data"])[0]
    langs = None
    if multilingual:
        # nothing recorded: a language pair in the task's config would make
        # it a one-direction model (fairseq's inference mode)
        langs = multilingual_pair(cfg["task"], source_lang, target_lang)
    elif data and os.path.isdir(data):
        # recorded, so that a folder with only the dictionaries is enough to
        # load the model (from_pretrained(DIR) cannot infer the pair there)
        langs = language_pair(cfg, data)
        for key, lang in zip(("source_lang", "target_lang"), langs):
            cfg["task"][key] = lang
            if "arch" in cfg["model"]:
                cfg["model"][key] = lang
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, output)
    logger.info(f"exported {checkpoint} to {output}")
    result = {"checkpoint": output, "dicts": [], "ct2": None}
    if (copy_dicts or ct2) and not (data and os.path.isdir(data)):
        raise ExportError(
            f"the dictionaries' folder {data!r} does not exist: pass --data "
            "(the folder the student was trained on)"
        )
    src, tgt = langs or (None, None)
    if copy_dicts and multilingual:
        result["dicts"] = copy_files(
            multilingual_dictionaries(cfg["task"], data).values(), out_dir
        )
    elif copy_dicts:
        result["dicts"] = copy_dictionaries(data, out_dir, (src, tgt))
    if ct2:
        ct2_dir = ct2_dir or os.path.join(out_dir, f"ct2-{ct2}")
        result["ct2"] = convert_to_ct2(state, data, src, tgt, ct2_dir, ct2)
        logger.info(f"wrote a CTranslate2 {ct2} model to {ct2_dir}")
    return result


def get_parser():
    """The command line of ``fairseq-kd-export``."""
    p = argparse.ArgumentParser(
        prog="fairseq-kd-export",
        description="Write a student checkpoint that stock fairseq loads without "
        "the plugin: task 'translation' (or 'translation_multi_simple_epoch' for "
        "a multilingual student), a stock criterion, no teacher or KD "
        "options, no optimizer state, no pickled objects (torch.load with "
        "weights_only=True reads it on torch >= 2.6 with no environment switch).",
    )
    p.add_argument("checkpoint", help="the student checkpoint (fairseq-train's)")
    p.add_argument("--output", "-o", required=True, help="the exported checkpoint")
    p.add_argument(
        "--data",
        help="folder with the dictionaries (dict.SRC.txt, dict.TGT.txt; a "
        "multilingual student's dict.LANG.txt or --fixed-dictionary); default: "
        "the data folder the checkpoint was trained on",
    )
    p.add_argument(
        "--copy-dicts",
        action="store_true",
        help="copy the dictionaries next to the exported checkpoint, so that "
        "TransformerModel.from_pretrained(DIR) finds them there",
    )
    p.add_argument(
        "--ct2",
        metavar="QUANTIZATION",
        help="also write a CTranslate2 model with this quantization (int8, "
        "int8_float16, int16, float16, bfloat16, float32)",
    )
    p.add_argument(
        "--ct2-dir", help="the CTranslate2 model's folder (default: OUTPUT_DIR/ct2-Q)"
    )
    p.add_argument(
        "--source-lang",
        help="source language (default: inferred); of a multilingual student, "
        "the direction whose dictionaries --ct2 reads (default: the first of "
        "--lang-pairs; one CTranslate2 model serves every direction)",
    )
    p.add_argument("--target-lang", help="target language (see --source-lang)")
    return p


def cli_main(argv=None):
    """Entry point of ``fairseq-kd-export``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=logging.INFO,
        stream=sys.stdout,
    )
    args = get_parser().parse_args(argv)
    import fairseq_kd  # noqa: F401  (registers the plugin's task and criterion)

    try:
        result = export(
            args.checkpoint,
            args.output,
            data=args.data,
            copy_dicts=args.copy_dicts,
            ct2=args.ct2,
            ct2_dir=args.ct2_dir,
            source_lang=args.source_lang,
            target_lang=args.target_lang,
        )
    except (ExportError, FileNotFoundError) as e:
        sys.exit(f"fairseq-kd-export: error: {e}")
    for key in ("checkpoint", "ct2"):
        if result[key]:
            print(f"{key}\t{result[key]}")
    for path in result["dicts"]:
        print(f"dict\t{path}")


if __name__ == "__main__":
    cli_main()
