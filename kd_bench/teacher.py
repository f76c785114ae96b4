"""Bring your own teacher: a given checkpoint, its dictionaries and subword model."""

import os
import shutil
from dataclasses import dataclass
from typing import Dict, Optional

from kd_bench.files import read_json, sha256_file, write_json

#: What the ``teacher`` stage writes beside the given teacher's link.
GIVEN_JSON = "given.json"

#: The installed subword model's name in ``WORK/models/teacher``, per scheme.
SUBWORD_FILE = {"spm": "spm.model", "bpe": "bpe.codes"}

#: The subword options, per scheme.
SUBWORD_OPTION = {"spm": "--teacher-spm", "bpe": "--teacher-bpe-codes"}


@dataclass
class GivenTeacher:
    """A teacher the recipe distils instead of training one.

    Args:
        checkpoint: the fairseq checkpoint (``--teacher-checkpoint``).
        dict_dir: the folder of its dictionaries (``--teacher-dict-dir``).
        dicts: each language of the recipe -> the teacher's dictionary file of
            it (``dict.LANG.txt``, or one ``dict.txt`` for all), source and
            target first for the bilingual recipe, the sorted languages of
            ``--lang-pairs`` for the multilingual one.
        subword: ``spm`` or ``bpe``.
        subword_model: its sentencepiece model or subword-nmt BPE codes.
    """

    checkpoint: str
    dict_dir: str
    dicts: Dict[str, str]
    subword: str
    subword_model: str

    @property
    def files(self):
        """The distinct dictionary files, in the order of :attr:`dicts`."""
        return list(dict.fromkeys(self.dicts.values()))

    @property
    def joined(self):
        """Whether every language shares one dictionary (the same file content)."""
        first, *others = self.files
        if not others:
            return True
        with open(first, "rb") as f:
            text = f.read()
        for other in others:
            with open(other, "rb") as f:
                if f.read() != text:
                    return False
        return True

    @property
    def inputs(self):
        """The given files (the ``teacher`` stage's inputs)."""
        return [self.checkpoint] + self.files + [self.subword_model]

    def describe(self):
        """What the results say about the teacher (paths; sha256 at run time)."""
        return {
            "checkpoint": self.checkpoint,
            "dict_dir": self.dict_dir,
            "subword": self.subword,
            "subword_model": self.subword_model,
        }


def teacher_dict_files(dict_dir, langs):
    """The teacher's dictionary file of each language, found in ``dict_dir``.

    ``dict.LANG.txt`` for every language (what ``fairseq-preprocess`` writes
    per language), else one ``dict.txt`` for all of them.

    Args:
        dict_dir: ``--teacher-dict-dir``.
        langs: the recipe's languages (source and target, or every language
            of ``--lang-pairs``).

    Returns:
        ``{lang: file}``, in the order of ``langs``.
    """
    own = {lang: os.path.join(dict_dir, f"dict.{lang}.txt") for lang in langs}
    missing = [lang for lang, f in own.items() if not os.path.isfile(f)]
    if not missing:
        return own
    joined = os.path.join(dict_dir, "dict.txt")
    if len(missing) == len(own) and os.path.isfile(joined):
        return {lang: joined for lang in langs}
    names = [f"dict.{lang}.txt" for lang in missing]
    names = " and ".join(names) if len(names) < 3 else ", ".join(names)
    raise SystemExit(
        f"--teacher-dict-dir {dict_dir}: no {names} (nor one joined dict.txt "
        f"for {'both sides' if len(langs) == 2 else 'every language'}): give the "
        "folder of the dictionaries the teacher was trained with, dict.LANG.txt "
        f"for each of {', '.join(langs)}"
    )


def _existing(path, option):
    if not os.path.isfile(path):
        raise SystemExit(f"{option} {path}: no such file")
    return os.path.abspath(path)


def given_teacher(args, langs):
    """The :class:`GivenTeacher` of the command line, or None (train one).

    Args:
        args: the parsed options (``teacher_checkpoint``, ``teacher_dict_dir``,
            ``teacher_spm``, ``teacher_bpe_codes``, ``subword``).
        langs: the recipe's languages: ``[src, tgt]``, or every language of
            ``--lang-pairs``.
    """
    options = ("teacher_dict_dir", "teacher_spm", "teacher_bpe_codes")
    if args.teacher_checkpoint is None:
        named = [o for o in options if getattr(args, o) is not None]
        if named:
            flag = "--" + named[0].replace("_", "-")
            raise SystemExit(f"{flag} needs --teacher-checkpoint (the teacher)")
        return None
    if args.teacher_dict_dir is None:
        raise SystemExit(
            "--teacher-checkpoint needs --teacher-dict-dir (the folder of the "
            "teacher's dictionaries: dict.LANG.txt for each language, or one "
            "joined dict.txt)"
        )
    if not os.path.isdir(args.teacher_dict_dir):
        raise SystemExit(f"--teacher-dict-dir {args.teacher_dict_dir}: no such folder")
    if args.teacher_spm is None and args.teacher_bpe_codes is None:
        raise SystemExit(
            "--teacher-checkpoint needs the teacher's subword model: "
            "--teacher-spm MODEL (sentencepiece) or --teacher-bpe-codes CODES "
            "(subword-nmt)"
        )
    subword = "spm" if args.teacher_spm is not None else "bpe"
    if args.subword is not None and args.subword != subword:
        raise SystemExit(
            f"--subword {args.subword} contradicts {SUBWORD_OPTION[subword]}: the "
            "teacher's own subword model is used"
        )
    dict_dir = os.path.abspath(args.teacher_dict_dir)
    model = args.teacher_spm if subword == "spm" else args.teacher_bpe_codes
    return GivenTeacher(
        checkpoint=_existing(args.teacher_checkpoint, "--teacher-checkpoint"),
        dict_dir=dict_dir,
        dicts=teacher_dict_files(dict_dir, langs),
        subword=subword,
        subword_model=_existing(model, SUBWORD_OPTION[subword]),
    )


def _task_config(state):
    from fairseq_kd.checkpoints import teacher_config

    return getattr(teacher_config(state), "task", None)


def _task_name(task_cfg):
    return getattr(task_cfg, "_name", None) or getattr(task_cfg, "task", None)


def load_given(teacher):
    """The given checkpoint, loaded weights-only (as every later tool loads it).

    Args:
        teacher: the :class:`GivenTeacher`.
    """
    from fairseq_kd.checkpoints import UnsafeCheckpointError, load_checkpoint

    try:
        return load_checkpoint(teacher.checkpoint, trusted_fallback=False)
    except UnsafeCheckpointError as e:
        raise ValueError(
            f"--teacher-checkpoint {teacher.checkpoint}: {e} (fairseq-kd-export "
            f"{teacher.checkpoint} --output COPY.pt writes one; pass COPY.pt)"
        ) from e


def _record(teacher, state, sizes, out_json):
    from kd_bench.evaluate import state_parameters

    write_json(
        out_json,
        {
            **teacher.describe(),
            "sha256": sha256_file(teacher.checkpoint),
            "params": state_parameters(state),
            "dictionary_sizes": sizes,
        },
    )


def check_teacher(teacher, src, tgt, out_json):
    """Refuse a teacher whose dictionaries do not fit its checkpoint; record it.

    The plugin's own check (:func:`fairseq_kd.checkpoints.check_teacher_dictionaries`)
    compares the checkpoint's embedding sizes with the dictionaries. The
    checkpoint must load weights-only, as every later tool of the recipe
    (``fairseq-generate``, the CTranslate2 converter) loads it.

    Args:
        teacher: the :class:`GivenTeacher`.
        src: the recipe's source language.
        tgt: the recipe's target language.
        out_json: where its path, sha256 and parameter count go.
    """
    from fairseq.data import Dictionary

    from fairseq_kd.checkpoints import check_teacher_dictionaries
    from fairseq_kd.multilingual import MULTILINGUAL_TASKS, _as_list

    state = load_given(teacher)
    task_cfg = _task_config(state)
    if _task_name(task_cfg) in MULTILINGUAL_TASKS:
        pairs = _as_list(getattr(task_cfg, "lang_pairs", None)) or []
        raise ValueError(
            f"--teacher-checkpoint {teacher.checkpoint} is a multilingual model "
            f"(task {_task_name(task_cfg)}, directions {','.join(pairs)}): run the "
            "multilingual recipe, --lang-pairs with directions it was trained on "
            f"(such as --lang-pairs {src}-{tgt})"
        )
    langs = (
        getattr(task_cfg, "source_lang", None),
        getattr(task_cfg, "target_lang", None),
    )
    if any(lang is not None for lang in langs) and langs != (src, tgt):
        raise ValueError(
            f"--teacher-checkpoint {teacher.checkpoint} translates "
            f"{langs[0]}-{langs[1]}, not {src}-{tgt}: run the recipe with --src "
            f"{langs[0]} --tgt {langs[1]} (its text files named so)"
        )
    files = (teacher.dicts[src], teacher.dicts[tgt])
    dicts = tuple(Dictionary.load(f) for f in files)
    try:
        check_teacher_dictionaries(
            teacher.checkpoint, state, *dicts, teacher_dicts=(dicts, files)
        )
    except ValueError as e:
        raise ValueError(
            f"--teacher-dict-dir {teacher.dict_dir} does not fit "
            f"--teacher-checkpoint {teacher.checkpoint}: give the dictionaries "
            f"the teacher was trained with. The plugin's check says: {e}"
        ) from e
    _record(teacher, state, [len(d) for d in dicts], out_json)


def check_one_dictionary(teacher, lang_pairs):
    """Refuse teacher dictionaries that one multilingual model cannot use.

    fairseq's ``translation_multi_simple_epoch`` gives a model one source and
    one target dictionary, those of the first direction's languages, for
    every direction: every source language's dictionary must hold the same
    symbols, and every target language's.

    Args:
        teacher: the :class:`GivenTeacher`.
        lang_pairs: the directions (``SRC-TGT``).

    Returns:
        ``{lang: Dictionary}``.
    """
    from fairseq.data import Dictionary

    from fairseq_kd.topk_store import describe_symbol_difference

    loaded = {f: Dictionary.load(f) for f in teacher.files}
    dicts = {lang: loaded[f] for lang, f in teacher.dicts.items()}
    directions = [pair.split("-") for pair in lang_pairs]
    for side, index in (("source", 0), ("target", 1)):
        langs = list(dict.fromkeys(d[index] for d in directions))
        for lang in langs[1:]:
            diff = describe_symbol_difference(
                dicts[langs[0]],
                dicts[lang],
                teacher.dicts[langs[0]],
                teacher.dicts[lang],
            )
            if diff:
                raise ValueError(
                    f"--teacher-dict-dir {teacher.dict_dir}: the {side} languages "
                    f"{langs[0]} and {lang} have other dictionaries ({diff}), but "
                    "translation_multi_simple_epoch gives a model one "
                    f"{side} dictionary for every direction (the first "
                    "direction's): give the dictionaries the teacher was "
                    "trained with (one dictionary shared by its languages)"
                )
    return dicts


def named_dictionaries(state):
    """The dictionary files a multilingual checkpoint's options name.

    ``--fixed-dictionary``, ``--source-dict``, ``--target-dict``: the plugin
    looks for their names in ``--teacher-dict-dir``
    (:func:`fairseq_kd.multilingual.teacher_dictionaries`).

    Args:
        state: the loaded checkpoint.

    Returns:
        ``{file name: side}``, side 0 for a source dictionary (or the fixed one
        of every language), 1 for the target's.
    """
    task_cfg = _task_config(state)
    names = {}
    for key, side in (("fixed_dictionary", 0), ("source_dict", 0), ("target_dict", 1)):
        value = getattr(task_cfg, key, None)
        if value:
            names.setdefault(os.path.basename(value), side)
    return names


def multilingual_task(data, task_flags):
    """fairseq's multilingual task of the recipe's flags over ``data``.

    Built as ``fairseq-train`` builds it (the dictionaries ``dict.LANG.txt``
    of ``data``, augmented with the language tags), for the plugin's teacher
    checks: the same task every model and tool of the recipe reads.

    Args:
        data: a folder holding ``dict.LANG.txt`` for each language.
        task_flags: ``--task translation_multi_simple_epoch --lang-pairs ...``.
    """
    from fairseq import options, tasks

    parser = options.get_training_parser()
    argv = [data, *map(str, task_flags), "--arch", "transformer", "--cpu"]
    args = options.parse_args_and_arch(parser, input_args=argv)
    return tasks.setup_task(args)


#: What the multilingual recipe lets a user change, said after the plugin's check.
MULTILINGUAL_ADVICE = (
    "The recipe passes --lang-pairs and --langs (default: the sorted languages "
    "of --lang-pairs) to every model and tool, and always tags with "
    "--encoder-langtok src --decoder-langtok (fairseq's multilingual style)"
)


def settings_advice(state, task):
    """What to pass the recipe for a teacher trained with other settings.

    Args:
        state: the teacher's loaded checkpoint.
        task: the run's multilingual task.
    """
    from fairseq_kd.multilingual import MULTILINGUAL_TASKS, _as_list, teacher_languages

    task_cfg = _task_config(state)
    if _task_name(task_cfg) not in MULTILINGUAL_TASKS:
        return (
            "it is a bilingual model: run the bilingual recipe (--src, --tgt, no "
            "--lang-pairs)"
        )
    pairs = _as_list(getattr(task_cfg, "lang_pairs", None)) or []
    shown = ",".join(pairs) if len(pairs) <= 12 else f"{len(pairs)} directions"
    advice = [f"give --lang-pairs of directions it was trained on ({shown})"]
    langs = teacher_languages(task_cfg)
    if langs is not None and list(langs) != list(task.langs):
        advice.append(f"--langs {','.join(langs)} (its languages, in its order)")
    return " and ".join(advice)


def check_multilingual_teacher(teacher, folder, task_flags, lang_pairs, out_json):
    """Refuse a multilingual teacher that does not fit the run; record it.

    The plugin's own checks, on fairseq's multilingual task of the run's
    flags over the installed dictionaries (``folder``): the teacher's task,
    languages, language-token options and directions
    (:func:`fairseq_kd.multilingual.check_teacher_settings`), then its
    embedding sizes and symbols against the dictionaries with the language
    tags added (:func:`fairseq_kd.checkpoints.check_teacher`, as the KD
    students and the tools check it).

    Args:
        teacher: the :class:`GivenTeacher`.
        folder: ``WORK/models/teacher`` (being written), holding the
            installed ``dict.LANG.txt`` (:func:`install_teacher`).
        task_flags: the run's task flags.
        lang_pairs: the run's directions.
        out_json: where its path, sha256 and parameter count go.
    """
    from fairseq_kd.checkpoints import check_teacher as plugin_check
    from fairseq_kd.multilingual import check_teacher_settings, teacher_hooks

    dicts = check_one_dictionary(teacher, lang_pairs)
    state = load_given(teacher)
    first = lang_pairs[0].split("-")  # fairseq's dictionaries are its languages'
    for name, side in named_dictionaries(state).items():  # where the plugin looks
        dest = os.path.join(folder, name)
        if not os.path.exists(dest):
            shutil.copyfile(teacher.dicts[first[side]], dest)
    task = multilingual_task(folder, task_flags)
    path = teacher.checkpoint
    try:
        check_teacher_settings(task, path, state)
    except ValueError as e:
        raise ValueError(
            f"--teacher-checkpoint {path} does not fit this run: "
            f"{settings_advice(state, task)}. {MULTILINGUAL_ADVICE}. The plugin's "
            f"check says: {e}"
        ) from e
    try:
        plugin_check(path, state, task, dict_dir=folder, **teacher_hooks(task))
    except ValueError as e:
        raise ValueError(
            f"--teacher-dict-dir {teacher.dict_dir} does not fit "
            f"--teacher-checkpoint {path}: give the dictionaries the teacher was "
            "trained with (and its languages, --langs: a tag is added to them "
            f"for each). The plugin's check says: {e}"
        ) from e
    _record(teacher, state, {lang: len(d) for lang, d in dicts.items()}, out_json)


def install_teacher(teacher, dest, checkpoint_name):
    """Put the teacher where the later stages look for it.

    ``dest/CHECKPOINT_NAME`` becomes a symbolic link to the checkpoint (it is
    not copied); the dictionaries are copied as ``dict.LANG.txt`` for each
    language and the subword model as ``spm.model`` or ``bpe.codes``.

    Args:
        teacher: the :class:`GivenTeacher`.
        dest: the folder (``WORK/models/teacher``, being written).
        checkpoint_name: the checkpoint's name there (``checkpoint_last.pt``).
    """
    os.makedirs(dest, exist_ok=True)
    link = os.path.join(dest, checkpoint_name)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(teacher.checkpoint, link)
    for lang, file in teacher.dicts.items():
        shutil.copyfile(file, os.path.join(dest, f"dict.{lang}.txt"))
    shutil.copyfile(
        teacher.subword_model, os.path.join(dest, SUBWORD_FILE[teacher.subword])
    )


def read_given(model_dir) -> Optional[dict]:
    """What ``check_teacher`` recorded in a model's folder (None: trained here)."""
    path = os.path.join(model_dir, GIVEN_JSON)
    return read_json(path) if os.path.exists(path) else None
