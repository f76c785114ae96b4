"""Bring your own teacher: a given checkpoint, its dictionaries and subword model."""

import os
import shutil
from dataclasses import dataclass
from typing import Optional

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
        src_dict: its source dictionary file.
        tgt_dict: its target dictionary file (may be ``src_dict``).
        subword: ``spm`` or ``bpe``.
        subword_model: its sentencepiece model or subword-nmt BPE codes.
    """

    checkpoint: str
    dict_dir: str
    src_dict: str
    tgt_dict: str
    subword: str
    subword_model: str

    @property
    def joined(self):
        """Whether source and target share one dictionary (same symbols)."""
        if self.src_dict == self.tgt_dict:
            return True
        with open(self.src_dict, "rb") as a, open(self.tgt_dict, "rb") as b:
            return a.read() == b.read()

    @property
    def inputs(self):
        """The given files (the ``teacher`` stage's inputs)."""
        dicts = [self.src_dict] + [self.tgt_dict] * (self.tgt_dict != self.src_dict)
        return [self.checkpoint] + dicts + [self.subword_model]

    def describe(self):
        """What the results say about the teacher (paths; sha256 at run time)."""
        return {
            "checkpoint": self.checkpoint,
            "dict_dir": self.dict_dir,
            "subword": self.subword,
            "subword_model": self.subword_model,
        }


def teacher_dict_files(dict_dir, src, tgt):
    """The teacher's ``(source, target)`` dictionary files in ``dict_dir``.

    ``dict.SRC.txt`` and ``dict.TGT.txt`` (what ``fairseq-preprocess`` writes),
    else one joined ``dict.txt`` for both sides.

    Args:
        dict_dir: ``--teacher-dict-dir``.
        src: source language.
        tgt: target language.
    """
    pair = tuple(os.path.join(dict_dir, f"dict.{lang}.txt") for lang in (src, tgt))
    if all(os.path.isfile(f) for f in pair):
        return pair
    joined = os.path.join(dict_dir, "dict.txt")
    if not any(os.path.isfile(f) for f in pair) and os.path.isfile(joined):
        return joined, joined
    raise SystemExit(
        f"--teacher-dict-dir {dict_dir}: no dict.{src}.txt and dict.{tgt}.txt "
        "(nor one joined dict.txt): give the folder of the dictionaries the "
        "teacher was trained with"
    )


def _existing(path, option):
    if not os.path.isfile(path):
        raise SystemExit(f"{option} {path}: no such file")
    return os.path.abspath(path)


def given_teacher(args, src, tgt):
    """The :class:`GivenTeacher` of the command line, or None (train one).

    Args:
        args: the parsed options (``teacher_checkpoint``, ``teacher_dict_dir``,
            ``teacher_spm``, ``teacher_bpe_codes``, ``subword``).
        src: source language.
        tgt: target language.
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
            "teacher's dict.SRC.txt and dict.TGT.txt)"
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
    src_dict, tgt_dict = teacher_dict_files(dict_dir, src, tgt)
    model = args.teacher_spm if subword == "spm" else args.teacher_bpe_codes
    return GivenTeacher(
        checkpoint=_existing(args.teacher_checkpoint, "--teacher-checkpoint"),
        dict_dir=dict_dir,
        src_dict=src_dict,
        tgt_dict=tgt_dict,
        subword=subword,
        subword_model=_existing(model, SUBWORD_OPTION[subword]),
    )


def _checkpoint_languages(state):
    from fairseq_kd.checkpoints import teacher_config

    task = getattr(teacher_config(state), "task", None)
    return getattr(task, "source_lang", None), getattr(task, "target_lang", None)


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

    from fairseq_kd.checkpoints import (
        UnsafeCheckpointError,
        check_teacher_dictionaries,
        load_checkpoint,
    )
    from kd_bench.evaluate import state_parameters

    try:
        state = load_checkpoint(teacher.checkpoint, trusted_fallback=False)
    except UnsafeCheckpointError as e:
        raise ValueError(
            f"--teacher-checkpoint {teacher.checkpoint}: {e} (fairseq-kd-export "
            f"{teacher.checkpoint} --output COPY.pt writes one; pass COPY.pt)"
        ) from e
    langs = _checkpoint_languages(state)
    if any(lang is not None for lang in langs) and langs != (src, tgt):
        raise ValueError(
            f"--teacher-checkpoint {teacher.checkpoint} translates "
            f"{langs[0]}-{langs[1]}, not {src}-{tgt}: run the recipe with --src "
            f"{langs[0]} --tgt {langs[1]} (its text files named so)"
        )
    files = (teacher.src_dict, teacher.tgt_dict)
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
    write_json(
        out_json,
        {
            **teacher.describe(),
            "sha256": sha256_file(teacher.checkpoint),
            "params": state_parameters(state),
            "dictionary_sizes": [len(d) for d in dicts],
        },
    )


def install_teacher(teacher, dest, checkpoint_name, src, tgt):
    """Put the teacher where the later stages look for it.

    ``dest/CHECKPOINT_NAME`` becomes a symbolic link to the checkpoint (it is
    not copied); the dictionaries are copied as ``dict.SRC.txt`` and
    ``dict.TGT.txt`` and the subword model as ``spm.model`` or ``bpe.codes``.

    Args:
        teacher: the :class:`GivenTeacher`.
        dest: the folder (``WORK/models/teacher``, being written).
        checkpoint_name: the checkpoint's name there (``checkpoint_last.pt``).
        src: source language.
        tgt: target language.
    """
    os.makedirs(dest, exist_ok=True)
    link = os.path.join(dest, checkpoint_name)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(teacher.checkpoint, link)
    shutil.copyfile(teacher.src_dict, os.path.join(dest, f"dict.{src}.txt"))
    shutil.copyfile(teacher.tgt_dict, os.path.join(dest, f"dict.{tgt}.txt"))
    shutil.copyfile(
        teacher.subword_model, os.path.join(dest, SUBWORD_FILE[teacher.subword])
    )


def read_given(model_dir) -> Optional[dict]:
    """What ``check_teacher`` recorded in a model's folder (None: trained here)."""
    path = os.path.join(model_dir, GIVEN_JSON)
    return read_json(path) if os.path.exists(path) else None
