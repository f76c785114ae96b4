"""Multilingual (``translation_multi_simple_epoch``) data and teacher checks."""

import functools
import os

from fairseq.data.multilingual.multilingual_data_manager import (
    MultilingualDatasetManager,
)
from fairseq.data.multilingual.multilingual_utils import (
    augment_dictionary,
    get_lang_tok,
)
from fairseq.tasks.translation_multi_simple_epoch import (
    TranslationMultiSimpleEpochTask,
)

from fairseq_kd.checkpoints import split_checkpoint_paths, teacher_config

MULTILINGUAL_TASKS = (
    "translation_multi_simple_epoch",
    "translation_multi_simple_epoch_kd",
)
# what a teacher must share with the task: (option, flag, fairseq's default)
LANGTOK_OPTIONS = (
    ("lang_tok_style", "--lang-tok-style", "multilingual"),
    ("encoder_langtok", "--encoder-langtok", None),
    ("decoder_langtok", "--decoder-langtok", False),
    ("lang_tok_replacing_bos_eos", "--lang-tok-replacing-bos-eos", False),
    ("langtoks_specs", "--langtoks-specs", ["main"]),
)


def is_multilingual(task):
    """Whether ``task`` is fairseq's ``translation_multi_simple_epoch`` (or ours).

    Args:
        task: a fairseq task.
    """
    return isinstance(task, TranslationMultiSimpleEpochTask)


def langtok_ids(task):
    """Ids of every language tag in ``task``'s target dictionary (sorted).

    Args:
        task: a multilingual task.
    """
    args, tgt_dict = task.args, task.target_dictionary
    ids = {
        tgt_dict.index(get_lang_tok(lang, args.lang_tok_style, spec))
        for lang in task.langs
        for spec in args.langtoks_specs
    } - {tgt_dict.unk()}
    return sorted(ids)


def _as_list(value):
    """A comma-separated string or a sequence, as a list (None: None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


def _config_value(cfg, key, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else None
    if value is None and not hasattr(cfg, "get"):
        value = getattr(cfg, key, default)
    return default if value is None else value


def teacher_languages(task_cfg):
    """The language list a multilingual checkpoint's tokens were built from.

    As fairseq builds it: ``--langs``, else the ``--lang-dict`` file, else the
    sorted languages of ``--lang-pairs``. None when the ``--lang-dict`` file
    is not at hand.

    Args:
        task_cfg: the checkpoint's ``cfg.task``.
    """
    langs = _as_list(_config_value(task_cfg, "langs"))
    if langs:
        return langs
    lang_dict = _config_value(task_cfg, "lang_dict")
    if lang_dict:
        if not os.path.isfile(lang_dict):
            return None
        with open(lang_dict, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    pairs = _as_list(_config_value(task_cfg, "lang_pairs")) or []
    return sorted({lang for pair in pairs for lang in pair.split("-")})


def direction_signature(task, src, tgt, langtok_spec):
    """What ties a store to one direction (see ``topk_store.data_signature``).

    Args:
        task: a multilingual task (fairseq's or ours).
        src: source language.
        tgt: target language.
        langtok_spec: ``(encoder spec, decoder spec)`` of its data category.
    """
    manager, tgt_dict = task.data_manager, task.target_dictionary
    enc = manager.get_encoder_langtok(src, tgt, langtok_spec[0])
    dec = manager.get_decoder_langtok(tgt, langtok_spec[1])
    return {
        "lang_pair": f"{src}-{tgt}",
        "source_langtok": None if enc is None else tgt_dict[enc],
        "target_langtok": None if dec is None else tgt_dict[dec],
    }


def direction_datasets(task, split, pairs=None, combine=False):
    """The unwrapped datasets of ``split``'s directions, as the student sees them.

    Args:
        task: a multilingual task (fairseq's or ours).
        split: the split's name.
        pairs: the directions (``SRC-TGT``) to load; default: all of
            ``--lang-pairs``.
        combine: concatenate ``split``, ``split1``... as fairseq does.

    Returns:
        A list of ``(pair, dataset, direction signature)``.
    """
    out = []
    params = task.data_manager.get_split_data_param_list(split, epoch=1)
    for param in params:
        pair = f"{param['src']}-{param['tgt']}"
        if param["data_category"] != "main" or (pairs and pair not in pairs):
            continue
        dataset = MultilingualDatasetManager.load_a_dataset(
            task.data_manager, combine=combine, **param
        )
        signature = direction_signature(
            task, param["src"], param["tgt"], param["langtok_spec"]
        )
        out.append((pair, dataset, signature))
    unknown = sorted(set(pairs or ()) - {pair for pair, _, _ in out})
    if unknown:
        raise ValueError(
            f"direction(s) {', '.join(unknown)} are not among --lang-pairs "
            f"{','.join(task.lang_pairs)}"
        )
    return out


def check_teacher_settings(task, path, state):
    """Refuse a teacher trained with other languages or language tokens.

    The teacher must come from a multilingual task, with the same
    language list (it gives the tags' ids) and language-token options,
    and must have been trained on every direction of ``--lang-pairs``.

    Args:
        task: a multilingual task (fairseq's or ours).
        path: the checkpoint.
        state: its loaded state.
    """
    task_cfg = teacher_config(state).task
    name = _config_value(task_cfg, "_name") or _config_value(task_cfg, "task")
    if name not in MULTILINGUAL_TASKS:
        raise ValueError(
            f"teacher {path} was trained with task {name}, not "
            "translation_multi_simple_epoch: it knows no language tokens. "
            "Distil it with --task translation_kd, direction by direction"
        )
    differences = []
    for key, flag, default in LANGTOK_OPTIONS:
        theirs = _config_value(task_cfg, key, default)
        ours = getattr(task.args, key, default)
        if key == "langtoks_specs":
            theirs, ours = _as_list(theirs), _as_list(ours)
        if theirs != ours:
            differences.append(
                f"{flag}: the teacher's {theirs!r}, this task's {ours!r}"
            )
    langs = teacher_languages(task_cfg)
    if langs is not None and list(langs) != list(task.langs):
        differences.append(
            f"languages (their order gives the language tokens' ids): the "
            f"teacher's {','.join(langs)}, this task's {','.join(task.langs)}; "
            f"give --langs {','.join(langs)}"
        )
    pairs = _as_list(_config_value(task_cfg, "lang_pairs")) or []
    unknown = [pair for pair in task.lang_pairs if pair not in pairs]
    if unknown:
        differences.append(
            f"--lang-pairs: this task's {','.join(unknown)} not among the "
            f"teacher's {','.join(pairs)}"
        )
    if differences:
        raise ValueError(
            f"teacher {path} was trained with other multilingual settings than "
            "this task's:\n  - "
            + "\n  - ".join(differences)
            + "\nThe teacher must see its input as it was trained: give this "
            "run the teacher's --langs and language-token options, and "
            "directions it was trained on."
        )


def teacher_hooks(task):
    """The teacher checks of fairseq's multilingual task, for ``load_teacher_ensemble``.

    This package's ``translation_multi_simple_epoch_kd`` checks its teachers
    itself (``check_teacher_state``, ``teacher_dictionaries``); fairseq's
    ``translation_multi_simple_epoch`` gets the same checks here. Other tasks
    get none.

    Args:
        task: a fairseq task.

    Returns:
        ``{"check_state": ..., "find_dicts": ...}`` or ``{}``: keyword
        arguments of :func:`fairseq_kd.checkpoints.load_teacher_ensemble` and
        :func:`fairseq_kd.checkpoints.check_teacher`.
    """
    if not is_multilingual(task) or hasattr(task, "check_teacher_state"):
        return {}
    return {
        "check_state": functools.partial(check_teacher_settings, task),
        "find_dicts": functools.partial(teacher_dictionaries, task),
    }


def teacher_dictionaries(task, path, state, dict_dir=None):
    """The teacher's dictionaries with its language tokens added.

    Read from ``dict_dir`` (``--teacher-dict-dir``) or the first folder
    of the checkpoint's ``task.data``: ``dict.SRC.txt`` and
    ``dict.TGT.txt`` of this task's first direction, or the teacher's
    ``--source-dict``/``--target-dict``/``--fixed-dictionary``; then
    augmented as fairseq does (its languages and ``--lang-tok-style``).

    Args:
        task: a multilingual task (fairseq's or ours).
        path: the checkpoint.
        state: its loaded state.
        dict_dir: ``--teacher-dict-dir``.
    """
    task_cfg = teacher_config(state).task
    fixed = _config_value(task_cfg, "fixed_dictionary")
    src, tgt = task.source_langs[0], task.target_langs[0]
    data = _config_value(task_cfg, "data")
    folder = dict_dir or (split_checkpoint_paths(data)[0] if data else None)
    files = []
    for side, lang in (("source", src), ("target", tgt)):
        own = fixed or _config_value(task_cfg, f"{side}_dict")
        if dict_dir and own:
            own = os.path.join(dict_dir, os.path.basename(own))
        files.append(own or (folder and os.path.join(folder, f"dict.{lang}.txt")))
    missing = [f for f in files if not (f and os.path.isfile(f))]
    if missing:
        if dict_dir:
            raise FileNotFoundError(
                f"--teacher-dict-dir {dict_dir}: no {', '.join(map(str, missing))}"
            )
        return (
            None,
            f"its dictionaries {', '.join(map(str, missing))} are not at hand",
        )
    langs = teacher_languages(task_cfg) or task.langs
    dicts = []
    for file in files:
        dictionary = task.load_dictionary(file)
        augment_dictionary(
            dictionary=dictionary,
            language_list=langs,
            lang_tok_style=_config_value(task_cfg, "lang_tok_style", "multilingual"),
            langtoks_specs=_as_list(_config_value(task_cfg, "langtoks_specs"))
            or ["main"],
            extra_data=_config_value(task_cfg, "extra_data"),
        )
        dicts.append(dictionary)
    return dicts, tuple(f"{f} (with its language tokens)" for f in files)
