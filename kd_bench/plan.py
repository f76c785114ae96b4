"""The Kim & Rush distillation table as stages, built per stage family.

:func:`build_plan` composes the builders below into the stages that
:class:`kd_bench.stage_runner.StageRunner` runs::

    fetch (only when the data must be downloaded)
    normalise          raw text -> WORK/text/{train,valid,test}.{src,tgt}
    subword            joint sentencepiece (or subword-nmt BPE) -> WORK/subword
    binarize           fairseq-preprocess --joined-dictionary -> WORK/bin
    teacher            fairseq-train -> WORK/models/teacher; or, for a teacher
                       given (--teacher-checkpoint), first of all: its
                       dictionaries checked against its checkpoint, linked and
                       copied there with its subword model, which subword and
                       binarize then use
    seqkd:top|bleu     fairseq-kd-distill (teacher's best / Seq-Inter) -> WORK/seqkd/*
    seqkd:engines      fairseq's generator vs CTranslate2 on a head of train
    topk:SOURCE        fairseq-kd-dump-topk over each training corpus -> WORK/topk/*
    student:ROW        fairseq-train, one per row of the table -> WORK/models/ROW
    curve:ROW          valid BLEU at the curve row's intermediate checkpoints
    translate:MODEL    fairseq-generate, greedy and beam 5, test and valid
    ct2:MODEL          CTranslate2 int8, greedy and beam 5 (when installed)
    score              sacreBLEU/chrF, parameters, training times -> WORK/scores.json
    table              RESULTS.md, results.json, the BLEU-vs-speed plot
"""

import glob
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Dict, List, Optional

from kd_bench import report
from kd_bench.commands import (
    ct2_convert_command,
    generate_command,
    post_process_symbol,
    train_command,
)
from kd_bench.corpus import Corpus
from kd_bench.data import (
    concatenate,
    encode_sentencepiece,
    head_lines,
    prepare_text,
    train_sentencepiece,
    verify_sha256,
)
from kd_bench.evaluate import (
    EVAL_BEAMS,
    compare_engines,
    compute_scores,
    ct2_translate,
    save_translation,
    score_curve,
)
from kd_bench.files import find_file, read_json, read_lines, write_json
from kd_bench.preset import Preset, Row
from kd_bench.process import Progress
from kd_bench.stage_runner import Command, PyStep, Stage
from kd_bench.teacher import (
    GIVEN_JSON,
    SUBWORD_FILE,
    GivenTeacher,
    check_multilingual_teacher,
    check_teacher,
    install_teacher,
)

logger = logging.getLogger(__name__)

#: Where ``fairseq-kd-distill --output DIR`` puts its binarized corpus, relative
#: to DIR ("" when DIR itself is the binarized folder).
DISTILL_BIN = "bin"

#: Console scripts of the plugin that the recipes call.
PLUGIN_TOOLS = ("fairseq-kd-dump-topk", "fairseq-kd-distill")

#: fairseq's multilingual task (the teacher, the baseline, the tools) and the
#: plugin's KD task over it (the KD students).
MULTILINGUAL_TASK = "translation_multi_simple_epoch"
MULTILINGUAL_KD_TASK = "translation_multi_simple_epoch_kd"


def multilingual_flags(lang_pairs, langs):
    """The multilingual task's directions, languages and language tags.

    Every model of the recipe reads the source with its language's tag first
    (``--encoder-langtok src``) and starts the target with the target's tag
    (``--decoder-langtok``), fairseq's ``multilingual`` tag style.
    """
    return ["--lang-pairs", ",".join(lang_pairs), "--langs", ",".join(langs)] + [
        "--encoder-langtok",
        "src",
        "--decoder-langtok",
    ]


#: Training corpora a row can use: "ref" is the original binarized data,
#: "seqkd-top" the teacher's best beam hypothesis (sequence-level KD),
#: "seqkd-bleu" the n-best entry closest to the reference (Seq-Inter).
SEQKD_SELECT = {"seqkd-top": "top", "seqkd-bleu": "bleu"}


@dataclass
class Paths:
    """Where every stage of one configuration reads and writes.

    Args:
        work: the work folder.
        raw: the raw text folder (``WORK/raw`` when fetched).
        results: where RESULTS.md, results.json and the plot go.
    """

    work: str
    raw: str
    results: str

    def _w(self, *parts):
        return os.path.join(self.work, *parts)

    text = property(lambda self: self._w("text"))
    subword = property(lambda self: self._w("subword"))
    bin = property(lambda self: self._w("bin"))
    stamps = property(lambda self: self._w("stamps"))
    logs = property(lambda self: self._w("logs"))
    nbest = property(lambda self: self._w("seqkd", "nbest"))
    engines = property(lambda self: self._w("seqkd", "engines"))
    engines_json = property(lambda self: self._w("seqkd", "engines", "engines.json"))
    curve = property(lambda self: self._w("curve"))
    scores = property(lambda self: self._w("scores.json"))

    def model_dir(self, name):
        """A model's folder (``teacher`` or a row's name)."""
        return self._w("models", name)

    def checkpoint(self, name):
        """A model's final checkpoint."""
        return os.path.join(self.model_dir(name), "checkpoint_last.pt")

    def seqkd(self, select):
        """The folder of a seq-KD corpus (``top``, ``bleu``)."""
        return self._w("seqkd", select)

    def topk(self, source):
        """The teacher's top-k store of one training corpus."""
        return self._w("topk", source)

    def translations(self, name, pair=None):
        """A model's fairseq translations and speeds (of one direction: ``pair``)."""
        return in_direction(self._w("translations", name), pair)

    def ct2(self, name, pair=None):
        """A model's CTranslate2 model, translations and speeds (``pair``'s)."""
        return in_direction(self._w("ct2", name), pair)

    def curve_dir(self, row, pair=None):
        """One row's valid curve: translations and scores (of one direction)."""
        return in_direction(os.path.join(self.curve, row), pair)


@dataclass
class Config:
    """One configuration: corpus, preset, language pair, rows and paths.

    Args:
        corpus: the :class:`~kd_bench.corpus.Corpus`.
        preset_name: the preset's name.
        preset: the :class:`~kd_bench.preset.Preset`.
        src: source language.
        tgt: target language.
        subword: ``spm`` or ``bpe``.
        paths: the :class:`Paths`.
        rows: the student rows.
        fetching: whether a ``fetch`` stage downloads the raw text.
        checksum: whether the raw files' sha256 is checked.
        use_ct2: whether the CTranslate2 stages run.
        command: the command that reproduces this configuration.
        teacher: a :class:`~kd_bench.teacher.GivenTeacher` distilled instead of
            training one (None: the ``teacher`` stage trains it).
        lang_pairs: the directions of the multilingual recipe (``["de-en",
            "cs-en"]``; None: the bilingual recipe, ``src``-``tgt``). ``src``
            and ``tgt`` are then its first direction's.
        tag_langs: ``--langs``: the multilingual task's language list, whose
            order gives the language tags' ids (a given teacher's own); None:
            the sorted languages of ``lang_pairs``.
    """

    corpus: Corpus
    preset_name: str
    preset: Preset
    src: str
    tgt: str
    subword: str
    paths: Paths
    rows: List[Row]
    fetching: bool = False
    checksum: bool = True
    use_ct2: bool = False
    command: str = ""
    teacher: Optional[GivenTeacher] = None
    lang_pairs: Optional[List[str]] = None
    tag_langs: Optional[List[str]] = None

    @property
    def multilingual(self):
        """Whether this is the multilingual recipe (``--lang-pairs``)."""
        return bool(self.lang_pairs)

    @property
    def pair_label(self):
        """``de-en``, or the multilingual recipe's directions (``de-en, cs-en``)."""
        if self.multilingual:
            return ", ".join(self.lang_pairs)
        return f"{self.src}-{self.tgt}"

    @property
    def directions(self):
        """``[(src, tgt)]``: every direction (one for the bilingual recipe)."""
        if not self.multilingual:
            return [(self.src, self.tgt)]
        return [tuple(pair.split("-")) for pair in self.lang_pairs]

    @property
    def pairs(self):
        """The directions as ``src-tgt`` (None for the bilingual recipe, whose
        files have no per-direction folder)."""
        return list(self.lang_pairs) if self.multilingual else [None]

    @property
    def langs(self):
        """Every language of the data: ``(src, tgt)``, or the sorted languages
        of the multilingual recipe's directions."""
        if not self.multilingual:
            return [self.src, self.tgt]
        return sorted({lang for d in self.directions for lang in d})

    @property
    def task_langs(self):
        """The multilingual task's ``--langs`` (the order gives the language
        tags' ids): ``tag_langs`` when given, else :attr:`langs`."""
        return list(self.tag_langs or self.langs)

    def task_flags(self, kd=False):
        """The task's flags: ``--task translation_kd`` for a KD student (none
        otherwise), or the multilingual task with its directions and tags.

        Args:
            kd: a student with a teacher (the plugin's KD task).
        """
        if not self.multilingual:
            return ["--task", "translation_kd"] if kd else []
        task = MULTILINGUAL_KD_TASK if kd else MULTILINGUAL_TASK
        return ["--task", task] + multilingual_flags(self.lang_pairs, self.task_langs)

    @property
    def eval_sets(self):
        """fairseq split -> its name in the table."""
        return dict(self.corpus.eval_sets)

    @property
    def joined(self):
        """Whether the binarized data has one dictionary for both sides."""
        return self.teacher is None or self.teacher.joined


@dataclass
class Plan:
    """The stages of one configuration and what they share."""

    stages: List[Stage]
    config: Config
    models: Dict[str, str] = field(default_factory=dict)
    train_data: Dict[str, str] = field(default_factory=dict)
    stores: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)

    work = property(lambda self: self.config.paths.work)
    results = property(lambda self: self.config.paths.results)
    rows = property(lambda self: self.config.rows)


def generate(cfg, checkpoint, split, beam, direction=None):
    """The ``fairseq-generate`` command of one model, split, beam and direction.

    Args:
        direction: ``(src, tgt)`` (default: the recipe's first direction).
    """
    src, tgt = direction or (cfg.src, cfg.tgt)
    return generate_command(
        cfg.paths.bin,
        checkpoint,
        split,
        beam,
        src,
        tgt,
        cfg.preset,
        cfg.subword,
        task=cfg.task_flags(),
    )


def in_direction(folder, pair):
    """``folder/SRC-TGT`` for a direction of the multilingual recipe, else
    ``folder`` (the bilingual recipe's files have no per-direction folder)."""
    return os.path.join(folder, pair) if pair else folder


def mkdir_step(path):
    """A step that creates a (temporary output) folder."""
    return PyStep(f"mkdir {path}", lambda: os.makedirs(path, exist_ok=True))


def teacher_file(cfg, name):
    """A file of the teacher's folder (``WORK/models/teacher/NAME``)."""
    return os.path.join(cfg.paths.model_dir("teacher"), name)


def teacher_dict_flags(cfg):
    """``(flags, inputs)``: the plugin tools' ``--teacher-dict-dir`` of a given teacher.

    Both are empty for a teacher trained here (its checkpoint names its data).
    """
    if cfg.teacher is None:
        return [], []
    folder = cfg.paths.model_dir("teacher")
    return ["--teacher-dict-dir", folder], [folder]


def save_train_time(save_dir, updates):
    """``on_output`` of a training step: its wall time to ``train_time.json``."""

    def save(output, seconds):
        write_json(
            os.path.join(save_dir, "train_time.json"),
            {"seconds": round(seconds, 1), "updates": int(updates)},
        )

    return save


def train_stage(cfg, name, data, arch, train, extra, inputs, group, more=()):
    """A ``fairseq-train`` stage into ``WORK/models/NAME``.

    Args:
        cfg: the :class:`Config`.
        name: the model's name (``teacher`` or a row's).
        data: binarized training data.
        arch: transformer size flags.
        train: :class:`~kd_bench.preset.TrainSettings`.
        extra: criterion/task flags.
        inputs: the stage's inputs.
        group: the stage's group.
        more: flags appended after ``extra`` (intermediate checkpoints).
    """
    save = cfg.paths.model_dir(name)
    device = list(cfg.preset.device)
    flags = list(extra) + list(more)
    params = {"arch": list(arch), "train": train.to_json(), "extra": flags}
    params["dev"] = device
    if not cfg.joined:
        params["embeddings"] = "decoder"  # two dictionaries: no shared encoder's

    def steps(tmp):
        return [
            Command(
                train_command(
                    data,
                    tmp(save),
                    arch,
                    train,
                    None if cfg.multilingual else cfg.src,
                    None if cfg.multilingual else cfg.tgt,
                    device,
                    flags,
                    joined=cfg.joined,
                ),
                on_output=save_train_time(tmp(save), train.updates),
                progress=lambda: Progress("train", train.updates, name),
            )
        ]

    return Stage(
        "teacher" if name == "teacher" else f"student:{name}",
        outputs=[save],
        inputs=list(inputs),
        params=params,
        steps=steps,
        group=group,
        resumable=True,
    )


# -- data ---------------------------------------------------------------------


def raw_inputs(cfg):
    """The raw files the ``normalise`` stage reads."""
    corpus, raw = cfg.corpus, cfg.paths.raw
    langs = cfg.langs
    if cfg.fetching:
        return [
            os.path.join(raw, f"{stem}.{lang}{corpus.fetched_suffix}")
            for stem in corpus.splits.values()
            for lang in langs
        ]
    found = []
    for stem in corpus.splits.values():
        for lang in langs:
            path = find_file(raw, f"{stem}.{lang}")
            if path is None:
                raise SystemExit(
                    f"no {stem}.{lang}[.gz] in {raw}: the {corpus.title} recipe "
                    f"needs {', '.join(corpus.splits.values())} for "
                    f"{', '.join(langs)}"
                )
            found.append(path)
    return found


def data_stages(cfg):
    """``fetch`` (downloads only), ``normalise``, ``subword``, ``binarize``."""
    corpus, preset, p = cfg.corpus, cfg.preset, cfg.paths
    src, tgt, langs = cfg.src, cfg.tgt, cfg.langs
    splits = list(corpus.splits)
    stages = []
    if cfg.fetching:
        stages.append(
            Stage(
                "fetch",
                outputs=[p.raw],
                params={
                    "src": src,
                    "tgt": tgt,
                    "what": corpus.fetch_describe,
                    **({"lang_pairs": cfg.lang_pairs} if cfg.multilingual else {}),
                },
                steps=lambda tmp: [
                    PyStep(
                        f"{corpus.fetch_describe} -> {tmp(p.raw)}",
                        lambda: [
                            corpus.fetch(tmp(p.raw), a, b) for a, b in cfg.directions
                        ],
                    )
                ],
                group="data",
            )
        )
    check = cfg.checksum and bool(corpus.checksums)
    stems = [f"{stem}.{lang}" for stem in corpus.splits.values() for lang in langs]

    stems_only = list(corpus.splits.values())

    def normalise_steps(tmp):
        steps = []
        if check:
            steps.append(
                PyStep(
                    f"check the sha256 of the raw {'/'.join(langs)} files in {p.raw}",
                    lambda: verify_sha256(p.raw, corpus.checksums, stems),
                )
            )
        steps.append(
            PyStep(
                f"normalise whitespace of {p.raw}/{{{','.join(stems_only)}}}"
                f".{{{','.join(langs)}}} -> {tmp(p.text)}/{{{','.join(splits)}}}.*",
                lambda: prepare_text(
                    p.raw, tmp(p.text), src, tgt, corpus.splits, preset.limits, langs
                ),
            )
        )
        return steps

    stages.append(
        Stage(
            "normalise",
            outputs=[p.text],
            inputs=raw_inputs(cfg),
            params={
                "src": src,
                "tgt": tgt,
                **({"langs": langs} if cfg.multilingual else {}),
                "splits": corpus.splits,
                "limits": preset.limits,
                "checksum": check,
            },
            steps=normalise_steps,
            group="data",
        )
    )

    return stages + [subword_stage(cfg), binarize_stage(cfg)]


def learned_subword_steps(cfg, tmp):
    """A joint sentencepiece model or BPE codes learnt on train, and applied."""
    preset, p, src, tgt, j = cfg.preset, cfg.paths, cfg.src, cfg.tgt, os.path.join
    splits, langs = list(cfg.corpus.splits), cfg.langs
    out = tmp(p.subword)
    if cfg.subword == "spm":
        return [
            mkdir_step(out),
            PyStep(
                f"train a joint sentencepiece unigram model ({preset.vocab} "
                f"pieces) on {p.text}/train.{{{','.join(langs)}}} -> {out}/spm.model",
                lambda: train_sentencepiece(
                    p.text, j(out, "spm"), src, tgt, preset.vocab, langs
                ),
            ),
            PyStep(
                f"encode {p.text}/* with {out}/spm.model -> {out}/*",
                lambda: encode_sentencepiece(
                    j(out, "spm.model"), p.text, out, splits, langs
                ),
            ),
        ]
    steps = [
        mkdir_step(out),
        Command(
            ["subword-nmt", "learn-joint-bpe-and-vocab"]
            + ["--input"]
            + [j(p.text, f"train.{lang}") for lang in langs]
            + ["--symbols", preset.vocab, "--output", j(out, "bpe.codes")]
            + ["--write-vocabulary"]
            + [j(out, f"vocab.{lang}") for lang in langs],
            describe="joint BPE (subword-nmt) learnt on every language of train",
        ),
    ]
    for split in splits:
        for lang in langs:
            steps.append(
                Command(
                    ["subword-nmt", "apply-bpe", "--codes", j(out, "bpe.codes")]
                    + ["--vocabulary", j(out, f"vocab.{lang}")]
                    + ["--vocabulary-threshold", "50"]
                    + ["--input", j(p.text, f"{split}.{lang}")]
                    + ["--output", j(out, f"{split}.{lang}")]
                )
            )
    return steps


def given_subword_steps(cfg, tmp):
    """The given teacher's sentencepiece model or BPE codes, applied."""
    p, j, out = cfg.paths, os.path.join, tmp(cfg.paths.subword)
    model = teacher_file(cfg, SUBWORD_FILE[cfg.subword])
    splits, langs = list(cfg.corpus.splits), cfg.langs
    if cfg.subword == "spm":
        encode = partial(encode_sentencepiece, model, p.text, out, splits, langs)
        describe = f"encode {p.text}/* with the teacher's {model} -> {out}/*"
        return [mkdir_step(out), PyStep(describe, encode)]
    steps = [mkdir_step(out)]
    for split in splits:
        for lang in langs:
            steps.append(
                Command(
                    ["subword-nmt", "apply-bpe", "--codes", model]
                    + ["--input", j(p.text, f"{split}.{lang}")]
                    + ["--output", j(out, f"{split}.{lang}")],
                    describe=f"the teacher's BPE codes on {split}.{lang}",
                )
            )
    return steps


def subword_stage(cfg):
    """``subword``: learnt on train, or the given teacher's model applied."""
    p = cfg.paths
    if cfg.teacher is None:
        inputs, params = [p.text], {"subword": cfg.subword, "vocab": cfg.preset.vocab}
        steps = partial(learned_subword_steps, cfg)
    else:
        model = teacher_file(cfg, SUBWORD_FILE[cfg.subword])
        inputs, params = [p.text, model], {"subword": cfg.subword, "model": "given"}
        steps = partial(given_subword_steps, cfg)
    return Stage(
        "subword",
        outputs=[p.subword],
        inputs=inputs,
        params=params,
        steps=steps,
        group="data",
    )


def dictionary_flags(cfg):
    """``fairseq-preprocess``'s dictionary flags: learnt joined, or the teacher's."""
    if cfg.teacher is None:
        return ["--joined-dictionary"]
    src_dict = teacher_file(cfg, f"dict.{cfg.src}.txt")
    if cfg.joined:
        return ["--srcdict", src_dict, "--joined-dictionary"]
    return [
        "--srcdict",
        src_dict,
        "--tgtdict",
        teacher_file(cfg, f"dict.{cfg.tgt}.txt"),
    ]


def given_multilingual_binarize_steps(cfg, tmp):
    """Each direction binarized with the given teacher's dictionaries.

    ``fairseq-preprocess --srcdict/--tgtdict`` with the teacher's
    ``dict.SRC.txt`` and ``dict.TGT.txt`` (installed in ``WORK/models/teacher``),
    nothing learnt; it writes them into ``WORK/bin`` as ``dict.LANG.txt``, for
    every language of the directions (the teacher stage checked that the
    languages of each side share one dictionary).
    """
    out = tmp(cfg.paths.bin)
    return [
        binarize_direction(
            cfg,
            out,
            src,
            tgt,
            teacher_file(cfg, f"dict.{src}.txt"),
            teacher_file(cfg, f"dict.{tgt}.txt"),
            "the teacher's dictionaries",
        )
        for src, tgt in cfg.directions
    ]


def multilingual_binarize_steps(cfg, tmp):
    """One dictionary learnt on every language's train, then each direction.

    fairseq-preprocess learns the dictionary from the concatenation of the
    languages' subword train files (``--only-source --dict-only``, as
    ``--joined-dictionary`` learns it from both sides of a pair), and
    binarizes every direction with it into the same folder: the data
    ``translation_multi_simple_epoch`` reads (``dict.LANG.txt`` per language,
    all equal, and ``SPLIT.SRC-TGT.LANG.{bin,idx}``).
    """
    p, j, out = cfg.paths, os.path.join, tmp(cfg.paths.bin)
    joint = j(out, "joint")
    train = [j(p.subword, f"train.{lang}") for lang in cfg.langs]
    dictionary = j(out, "dict.txt")
    steps = [
        mkdir_step(joint),
        PyStep(
            f"concatenate {', '.join(train)} -> {j(joint, 'train.joint')}",
            partial(concatenate, train, j(joint, "train.joint")),
        ),
        Command(
            ["fairseq-preprocess", "--only-source", "--source-lang", "joint"]
            + ["--trainpref", j(joint, "train"), "--destdir", joint, "--dict-only"]
            + ["--workers", cfg.preset.workers],
            describe="one dictionary learnt on the train text of every language",
        ),
        PyStep(
            f"move {j(joint, 'dict.joint.txt')} to {dictionary}; remove {joint}",
            lambda: (
                shutil.move(j(joint, "dict.joint.txt"), dictionary),
                shutil.rmtree(joint),
            ),
        ),
    ]
    for src, tgt in cfg.directions:
        steps.append(
            binarize_direction(
                cfg, out, src, tgt, dictionary, dictionary, "the shared dictionary"
            )
        )
    return steps


def binarize_direction(cfg, out, src, tgt, src_dict, tgt_dict, which):
    """``fairseq-preprocess`` of one direction with given dictionaries into
    ``out`` (the multilingual recipe's shared folder).

    Args:
        which: what the dictionaries are (for the step's description).
    """
    p, j = cfg.paths, os.path.join
    return Command(
        ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
        + ["--trainpref", j(p.subword, "train")]
        + ["--validpref", j(p.subword, "valid")]
        + ["--testpref", j(p.subword, "test"), "--destdir", out]
        + ["--srcdict", src_dict, "--tgtdict", tgt_dict]
        + ["--workers", cfg.preset.workers],
        describe=f"binarize {src}-{tgt} with {which}",
    )


def binarize_steps(cfg, tmp):
    """``fairseq-preprocess`` of the subword text."""
    p, j = cfg.paths, os.path.join
    if cfg.multilingual and cfg.teacher is not None:
        return given_multilingual_binarize_steps(cfg, tmp)
    if cfg.multilingual:
        return multilingual_binarize_steps(cfg, tmp)
    return [
        Command(
            ["fairseq-preprocess", "--source-lang", cfg.src, "--target-lang", cfg.tgt]
            + ["--trainpref", j(p.subword, "train")]
            + ["--validpref", j(p.subword, "valid")]
            + ["--testpref", j(p.subword, "test"), "--destdir", tmp(p.bin)]
            + dictionary_flags(cfg)
            + ["--workers", cfg.preset.workers]
        )
    ]


def binarize_stage(cfg):
    """``binarize``: a joined dictionary learnt, or the given teacher's."""
    p, params = cfg.paths, {"joined": cfg.joined}
    if cfg.multilingual:
        params["lang_pairs"] = cfg.lang_pairs
    inputs = [p.subword]
    if cfg.teacher is not None:
        params["dicts"] = "given"
        inputs += [teacher_file(cfg, f"dict.{lang}.txt") for lang in cfg.langs]
    return Stage(
        "binarize",
        outputs=[p.bin],
        inputs=inputs,
        params=params,
        steps=partial(binarize_steps, cfg),
        group="data",
    )


# -- teacher ------------------------------------------------------------------


def given_teacher_steps(cfg, tmp):
    """Check the given teacher against its dictionaries (and the multilingual
    run's settings); link and copy it."""
    teacher, dest = cfg.teacher, tmp(cfg.paths.model_dir("teacher"))
    name = os.path.basename(cfg.paths.checkpoint("teacher"))
    out_json = os.path.join(dest, GIVEN_JSON)
    install = PyStep(
        f"link {dest}/{name} to {teacher.checkpoint} (no copy); copy its "
        "dictionaries and "
        f"{os.path.basename(teacher.subword_model)} as {dest}/dict.*.txt, "
        f"{SUBWORD_FILE[teacher.subword]}",
        partial(install_teacher, teacher, dest, name),
    )
    if not cfg.multilingual:
        check = PyStep(
            f"check that {teacher.checkpoint}'s embeddings fit the dictionaries "
            f"of {teacher.dict_dir}; its path, sha256, parameters -> {out_json}",
            partial(check_teacher, teacher, cfg.src, cfg.tgt, out_json),
        )
        return [mkdir_step(dest), check, install]
    # the multilingual check reads the installed dictionaries, as the tools do
    task = cfg.task_flags()
    check = PyStep(
        f"check {teacher.checkpoint} against this run ({' '.join(task[2:])}): "
        "its languages, language tags and directions, then its embeddings "
        f"against the dictionaries of {dest} with the language tags (the "
        f"plugin's checks); its path, sha256, parameters -> {out_json}",
        partial(
            check_multilingual_teacher, teacher, dest, task, cfg.lang_pairs, out_json
        ),
    )
    return [mkdir_step(dest), install, check]


def teacher_stages(cfg):
    """The teacher: trained with label-smoothed cross-entropy, or given."""
    preset, p = cfg.preset, cfg.paths
    if cfg.teacher is not None:
        return [
            Stage(
                "teacher",
                outputs=[p.model_dir("teacher")],
                inputs=cfg.teacher.inputs,
                params={
                    "given": True,
                    "subword": cfg.teacher.subword,
                    **({"task": cfg.task_flags()} if cfg.multilingual else {}),
                },
                steps=partial(given_teacher_steps, cfg),
                group="teacher",
            )
        ]
    return [
        train_stage(
            cfg,
            "teacher",
            p.bin,
            preset.teacher_arch,
            preset.teacher_train,
            cfg.task_flags() + ["--criterion", "label_smoothed_cross_entropy"],
            inputs=[p.bin],
            group="teacher",
        )
    ]


# -- sequence-level KD --------------------------------------------------------


def assemble_distilled(distill_dir, bin_dir, dest, src, tgt):
    """A training folder: the distilled train split plus the original rest.

    ``fairseq-kd-distill`` binarizes the distilled train split with the
    teacher's dictionaries; fairseq-train also needs the valid split and the
    dictionaries, taken from the original binarized folder.

    Args:
        distill_dir: the folder holding the distilled ``train.*.bin/.idx``.
        bin_dir: the original binarized folder.
        dest: the folder to create.
        src: source language.
        tgt: target language.
    """
    os.makedirs(dest, exist_ok=True)
    pair = f"{src}-{tgt}"
    for lang in (src, tgt):
        mine = os.path.join(bin_dir, f"dict.{lang}.txt")
        theirs = os.path.join(distill_dir, f"dict.{lang}.txt")
        if os.path.exists(theirs) and open(theirs).read() != open(mine).read():
            raise RuntimeError(
                f"{theirs} differs from {mine}: the distilled corpus was not "
                "binarized with the teacher's dictionaries"
            )
        shutil.copy(mine, dest)
        for ext in ("bin", "idx"):
            path = os.path.join(distill_dir, f"train.{pair}.{lang}.{ext}")
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: fairseq-kd-distill wrote no binarized train split "
                    "there (see kd_bench.plan.DISTILL_BIN)"
                )
            shutil.copy(path, dest)
    for name in os.listdir(bin_dir):
        if name.startswith(("valid.", "test.")):
            shutil.copy(os.path.join(bin_dir, name), dest)
    return dest


def distill_engine_flags(preset):
    """``--engine``/``--threads`` of fairseq-kd-distill ([] for fairseq's).

    Args:
        preset: the :class:`~kd_bench.preset.Preset`.
    """
    from kd_bench.commands import ct2_available

    if preset.distill_engine != "ctranslate2":
        return []
    if not ct2_available():
        logger.warning(
            "ctranslate2 is not installed: the seq-KD corpora are translated "
            "with fairseq's generator instead (pip install -e '.[bench]')"
        )
        return []
    return ["--engine", "ctranslate2", "--threads", str(preset.distill_threads)]


def distill_flags(cfg, select):
    """fairseq-kd-distill's search, selection, length bound and output flags."""
    preset = cfg.preset
    return (
        cfg.task_flags()
        + ["--beam", preset.distill_beam, "--nbest", preset.distill_nbest]
        + ["--select", select, "--post-process", post_process_symbol(cfg.subword)]
        # the table's sentence-BLEU statistics (computed anyway by bleu/chrf)
        + ["--nbest-stats"]
        + ["--max-tokens", preset.tool_max_tokens]
        + preset.length_flags()
        + list(preset.device)
    )


def seqkd_stages(cfg):
    """The seq-KD corpora the rows need, and the engines' comparison.

    seq-KD and Seq-Inter select from the same n-best lists: ``seqkd:top`` runs
    the teacher's beam search into ``WORK/seqkd/nbest`` (fairseq-kd-distill's
    ``--work-dir``); ``seqkd:bleu`` finds every chunk translated there and only
    selects, filters and writes its corpus.

    Returns:
        ``(stages, {training corpus: binarized folder})``.
    """
    preset, p, src, tgt, j = cfg.preset, cfg.paths, cfg.src, cfg.tgt, os.path.join
    teacher = p.checkpoint("teacher")
    train_data = {"ref": p.bin}
    needed = {r.data for r in cfg.rows}
    engine = distill_engine_flags(preset)
    stages = []
    for source, select in SEQKD_SELECT.items():
        if source not in needed and not (
            select == "top" and needed & set(SEQKD_SELECT)
        ):
            continue
        out_dir = p.seqkd(select)
        # the multilingual distillation writes every split of the training
        # folder beside the distilled train (OUTPUT/bin): nothing to assemble
        train_data[source] = j(out_dir, DISTILL_BIN if cfg.multilingual else "data")

        def steps(tmp, out_dir=out_dir, select=select):
            out = tmp(out_dir)
            nbest = tmp(p.nbest) if select == "top" else p.nbest
            assemble = PyStep(
                f"assemble {j(out, 'data')}: distilled train from "
                f"{j(out, DISTILL_BIN)}, valid/test and dictionaries from {p.bin}",
                lambda: assemble_distilled(
                    j(out, DISTILL_BIN), p.bin, j(out, "data"), src, tgt
                ),
            )
            return [
                Command(
                    ["fairseq-kd-distill", p.bin, "--path", teacher]
                    + ["--gen-subset", "train", "--output", out]
                    + ["--work-dir", nbest]
                    + engine
                    + distill_flags(cfg, select),
                    describe=(
                        "the teacher's beam search over train, its best "
                        "hypothesis (seq-KD)"
                        if select == "top"
                        else "the n-best entry closest to the reference (Seq-Inter),"
                        " from the n-best lists seqkd:top translated"
                    ),
                    show=("summary",),
                    progress=lambda: Progress("bar", label=f"seqkd:{select}"),
                ),
            ] + ([] if cfg.multilingual else [assemble])

        stages.append(
            Stage(
                f"seqkd:{select}",
                outputs=[out_dir] + ([p.nbest] if select == "top" else []),
                inputs=[p.bin, teacher] + ([p.nbest] if select != "top" else []),
                params={
                    "beam": preset.distill_beam,
                    "nbest": preset.distill_nbest,
                    "select": select,
                    "length": preset.length_flags(),
                    "max_tokens": preset.tool_max_tokens,
                    "distill_bin": DISTILL_BIN,
                    "engine": engine,
                },
                steps=steps,
                group="seqkd",
                resumable=True,
            )
        )
    n = preset.distill_compare
    if engine and n and len(stages):
        stages.append(engines_stage(cfg, engine, n))
    return stages, train_data


def engines_stage(cfg, engine, n):
    """fairseq's generator against CTranslate2 on the first ``n`` train sentences."""
    p, src, tgt, j = cfg.paths, cfg.src, cfg.tgt, os.path.join
    teacher = p.checkpoint("teacher")
    flags = distill_flags(cfg, "top")  # the search seqkd:top runs
    runs = {"fairseq": ["--engine", "fairseq"], "ctranslate2": engine}

    def steps(tmp):
        out = tmp(p.engines)
        head = j(out, "head")
        steps = [mkdir_step(head)]
        for lang in (src, tgt):
            steps.append(
                PyStep(
                    f"first {n} lines of {j(p.subword, f'train.{lang}')}",
                    lambda lang=lang: head_lines(
                        j(p.subword, f"train.{lang}"), j(head, f"train.{lang}"), n
                    ),
                )
            )
        steps.append(
            Command(
                ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
                + ["--trainpref", j(head, "train"), "--destdir", j(out, "bin")]
                + ["--srcdict", j(p.bin, f"dict.{src}.txt")]
                + ["--tgtdict", j(p.bin, f"dict.{tgt}.txt")]
                + ["--workers", cfg.preset.workers]
            )
        )
        for name, engine_flags in runs.items():
            steps.append(
                Command(
                    ["fairseq-kd-distill", j(out, "bin"), "--path", teacher]
                    + ["--gen-subset", "train", "--output", j(out, name)]
                    + ["--work-dir", j(out, name + ".work")]
                    + engine_flags
                    + flags,
                    describe=f"the teacher's beam search over the first {n} train "
                    f"sentences with the {name} engine",
                    show=("summary",),
                    progress=lambda name=name: Progress("bar", label=name),
                )
            )
        steps.append(
            PyStep(
                f"compare the engines' speed and outputs -> {j(out, 'engines.json')}",
                lambda: compare_engines(
                    {e: j(out, e) for e in runs}, "train", tgt, j(out, "engines.json")
                ),
            )
        )
        return steps

    return Stage(
        "seqkd:engines",
        outputs=[p.engines],
        inputs=[p.subword, p.bin, teacher],
        params={"sentences": n, "flags": flags, "engines": runs},
        steps=steps,
        group="seqkd",
    )


# -- offline word-KD: the teacher's top-k stores -------------------------------


def topk_stages(cfg, train_data):
    """One top-k store per training corpus used with offline word-KD.

    Returns:
        ``(stages, {training corpus: store})``.
    """
    preset, p = cfg.preset, cfg.paths
    teacher = p.checkpoint("teacher")
    stages, stores = [], {}
    dict_flags, dict_inputs = teacher_dict_flags(cfg)
    for source in sorted({r.data for r in cfg.rows if r.kd == "offline"}):
        store, data_dir = p.topk(source), train_data[source]
        stores[source] = store
        stages.append(
            Stage(
                f"topk:{source}",
                outputs=[store],
                inputs=[data_dir, teacher] + dict_inputs,
                params={"k": preset.topk, "max_tokens": preset.tool_max_tokens},
                steps=lambda tmp, store=store, data_dir=data_dir, source=source: [
                    Command(
                        ["fairseq-kd-dump-topk", data_dir, "--path", teacher]
                        + cfg.task_flags()
                        + ["--gen-subset", "train", "--output", tmp(store)]
                        + ["--k", preset.topk]
                        + ["--max-tokens", preset.tool_max_tokens]
                        + list(preset.device)
                        + dict_flags,
                        describe=f"the teacher's top-{preset.topk} distributions "
                        f"over {source} train",
                        show=("summary",),
                        progress=lambda: Progress("bar", label=f"topk:{source}"),
                    )
                ],
                group="topk",
                resumable=True,
            )
        )
    return stages, stores


# -- students -----------------------------------------------------------------


def word_kd_flags(cfg, row, stores):
    """The task/criterion flags of a row, and the inputs they add."""
    preset, teacher = cfg.preset, cfg.paths.checkpoint("teacher")
    if row.kd is None:
        extra = cfg.task_flags() + ["--criterion", "label_smoothed_cross_entropy"]
        return extra + list(row.flags), []
    extra, inputs = cfg.task_flags(kd=True), []
    if row.kd == "offline":
        extra += ["--teacher-topk", stores[row.data]]
        inputs.append(stores[row.data])
    else:
        dict_flags, dict_inputs = teacher_dict_flags(cfg)
        extra += ["--teacher-path", teacher, "--kd-topk", preset.topk] + dict_flags
        inputs += [teacher] + dict_inputs
    extra += ["--criterion", "word_kd", "--kd-alpha", preset.kd_alpha]
    extra += ["--kd-temperature", preset.kd_temperature]
    return extra + list(row.flags), inputs


def curve_flags(cfg, row):
    """Intermediate checkpoints of a curve row (none for other rows)."""
    curve = cfg.preset.curve
    if curve is None or row.name not in curve.rows:
        return []
    return ["--save-interval-updates", curve.every, "--keep-interval-updates", -1]


def student_stages(cfg, train_data, stores):
    """One ``student:ROW`` training per row.

    Returns:
        ``(stages, {row: checkpoint})``.
    """
    preset, stages, models = cfg.preset, [], {}
    for row in cfg.rows:
        data_dir = train_data[row.data]
        extra, inputs = word_kd_flags(cfg, row, stores)
        stages.append(
            train_stage(
                cfg,
                row.name,
                data_dir,
                preset.student_arch,
                preset.student_settings(row.name),
                extra,
                inputs=[data_dir] + inputs,
                group="students",
                more=curve_flags(cfg, row),
            )
        )
        models[row.name] = cfg.paths.checkpoint(row.name)
    return stages, models


def curve_points(cfg, row):
    """The updates at which a curve row is scored (its budget last)."""
    curve, updates = cfg.preset.curve, cfg.preset.student_settings(row).updates
    return sorted(set(range(curve.every, updates, curve.every)) | {updates})


def curve_checkpoint(model_dir, updates, final):
    """The checkpoint after ``updates`` (``checkpoint_*_U.pt``; last for the final).

    Args:
        model_dir: the row's folder.
        updates: the update count.
        final: the row's budget (its ``checkpoint_last.pt``).
    """
    if updates == final:
        return os.path.join(model_dir, "checkpoint_last.pt")
    found = glob.glob(os.path.join(model_dir, f"checkpoint_*_{updates}.pt"))
    return found[0] if found else os.path.join(model_dir, f"checkpoint_*_{updates}.pt")


def curve_rows(cfg):
    """The preset's curve rows that this run trains (in the preset's order)."""
    if cfg.preset.curve is None:
        return []
    trained = {r.name for r in cfg.rows}
    return [row for row in cfg.preset.curve.rows if row in trained]


def curve_stages(cfg):
    """``curve:ROW``: valid BLEU of each curve row at its intermediate
    checkpoints (in every direction of the multilingual recipe)."""
    p = cfg.paths
    refs = {tgt: os.path.join(p.text, f"valid.{tgt}") for _, tgt in cfg.directions}
    return [curve_stage(cfg, row, refs) for row in curve_rows(cfg)]


def curve_stage(cfg, row, refs):
    """The ``curve:ROW`` stage of one row (``refs``: target -> valid refs)."""
    curve, p = cfg.preset.curve, cfg.paths
    model_dir, points = p.model_dir(row), curve_points(cfg, row)

    def steps(tmp):
        steps = []
        for pair, direction in zip(cfg.pairs, cfg.directions):
            out = in_direction(tmp(p.curve_dir(row)), pair)
            ref = refs[direction[1]]
            steps.append(mkdir_step(out))
            for u in points:
                ckpt = curve_checkpoint(model_dir, u, points[-1])
                label = f"{row}, valid{f' {pair}' if pair else ''}, {u} updates"
                steps.append(
                    Command(
                        generate(cfg, ckpt, "valid", curve.beam, direction),
                        on_output=save_translation(out, f"valid.{u}", ref),
                        progress=lambda ref=ref, label=label: Progress(
                            "translate", len(read_lines(ref)), label
                        ),
                    )
                )
            steps.append(
                PyStep(
                    f"sacreBLEU of each checkpoint on valid -> {out}/curve.json",
                    partial(
                        score_curve,
                        {u: os.path.join(out, f"valid.{u}.txt") for u in points},
                        ref,
                        os.path.join(out, "curve.json"),
                    ),
                )
            )
        return steps

    return Stage(
        f"curve:{row}",
        outputs=[p.curve_dir(row)],
        inputs=[p.bin, model_dir] + sorted(set(refs.values())),
        params={"every": curve.every, "beam": curve.beam, "points": points},
        steps=steps,
        group="translate",
    )


# -- evaluation ---------------------------------------------------------------


def translate_stages(cfg, models):
    """``translate:MODEL``: fairseq-generate, greedy and beam 5, every eval set,
    every direction (``WORK/translations/MODEL[/SRC-TGT]``)."""
    p, stages = cfg.paths, []
    for name, ckpt in models.items():
        out_dir = p.translations(name)

        def steps(tmp, ckpt=ckpt, name=name):
            steps = []
            for pair, direction in zip(cfg.pairs, cfg.directions):
                out = in_direction(tmp(p.translations(name)), pair)
                steps.append(mkdir_step(out))
                for split in cfg.eval_sets:
                    ref = os.path.join(p.text, f"{split}.{direction[1]}")
                    label = f"{name}{f' {pair}' if pair else ''} {split}"
                    for beam in EVAL_BEAMS:
                        steps.append(
                            Command(
                                generate(cfg, ckpt, split, beam, direction),
                                on_output=save_translation(
                                    out, f"{split}.beam{beam}", ref
                                ),
                                progress=lambda ref=ref, label=label, beam=beam: (
                                    Progress(
                                        "translate",
                                        len(read_lines(ref)),
                                        f"{label} beam {beam}",
                                    )
                                ),
                            )
                        )
            return steps

        params = {
            "beams": list(EVAL_BEAMS),
            "batch_size": cfg.preset.gen_batch_size,
            "cpu": cfg.preset.gen_cpu,
            "length": cfg.preset.length_flags(),
            "splits": list(cfg.eval_sets),
        }
        if cfg.multilingual:
            params["lang_pairs"] = cfg.lang_pairs
        stages.append(
            Stage(
                f"translate:{name}",
                outputs=[out_dir],
                inputs=[p.bin, ckpt],
                params=params,
                steps=steps,
                group="translate",
            )
        )
    return stages


def ct2_convert_steps(cfg, ckpt, model):
    """Convert one model to CTranslate2 int8 (the multilingual one with its tags)."""
    if not cfg.multilingual:
        return [
            Command(ct2_convert_command(ckpt, cfg.paths.bin, cfg.src, cfg.tgt, model))
        ]
    return [
        PyStep(
            f"convert {ckpt} to CTranslate2 int8 -> {model} (fairseq_kd."
            "ct2_multilingual.convert: exported in memory, weights-only, the "
            "language-tag settings beside it)",
            lambda: ct2_multilingual_convert(ckpt, model, cfg.paths.bin),
        )
    ]


def ct2_multilingual_convert(checkpoint, model, data):
    """:func:`fairseq_kd.ct2_multilingual.convert` to int8 (imported when run)."""
    from fairseq_kd import ct2_multilingual

    return ct2_multilingual.convert(checkpoint, model, data=data, quantization="int8")


def ct2_stages(cfg, models):
    """``ct2:MODEL``: CTranslate2 int8 on the test set, greedy and beam 5, every
    direction (one converted model serves them all)."""
    if not cfg.use_ct2:
        return []
    p, preset, stages = cfg.paths, cfg.preset, []
    sources = {src: os.path.join(p.subword, f"test.{src}") for src, _ in cfg.directions}
    for name, ckpt in models.items():
        out_dir = p.ct2(name)

        def steps(tmp, out_dir=out_dir, ckpt=ckpt):
            model = os.path.join(tmp(out_dir), "model")
            steps = [mkdir_step(tmp(out_dir))] + ct2_convert_steps(cfg, ckpt, model)
            for pair, direction in zip(cfg.pairs, cfg.directions):
                out, test_src = in_direction(tmp(out_dir), pair), sources[direction[0]]
                steps += [mkdir_step(out)] if pair else []
                steps.append(
                    PyStep(
                        f"translate {test_src} with CTranslate2 int8 on the CPU"
                        + (f" ({pair}, its language tags)" if pair else "")
                        + f", beams {list(EVAL_BEAMS)}, timed -> {out}",
                        partial(
                            ct2_translate,
                            model,
                            test_src,
                            out,
                            EVAL_BEAMS,
                            preset.gen_batch_size,
                            post_process_symbol(cfg.subword),
                            preset.max_len_a,
                            preset.max_len_b,
                            direction=direction if pair else None,
                        ),
                    )
                )
            return steps

        params = {
            "quantization": "int8",
            "beams": list(EVAL_BEAMS),
            "batch_size": preset.gen_batch_size,
            "length": preset.length_flags(),
        }
        if cfg.multilingual:
            params["lang_pairs"] = cfg.lang_pairs
        stages.append(
            Stage(
                f"ct2:{name}",
                outputs=[out_dir],
                inputs=[ckpt, p.bin] + sorted(set(sources.values())),
                params=params,
                steps=steps,
                group="ct2",
            )
        )
    return stages


# -- report -------------------------------------------------------------------


def describe(cfg):
    """What the results say about the configuration (``meta``)."""
    preset = cfg.preset
    meta = {
        "recipe": cfg.corpus.key,
        "corpus": cfg.corpus.title,
        "pair": cfg.pair_label,
        "preset": cfg.preset_name,
        "subword": cfg.subword,
        "command": cfg.command,
        "eval_sets": cfg.eval_sets,
        "rows": [{"name": "teacher", "label": "teacher"}]
        + [
            {"name": r.name, "label": r.label, "data": r.data, "kd": r.kd}
            for r in cfg.rows
        ],
        "goal_settings": asdict(preset.goals),
        "settings": {
            "teacher_arch": " ".join(map(str, preset.teacher_arch)),
            "student_arch": " ".join(map(str, preset.student_arch)),
            "teacher_train": preset.teacher_train.to_json(),
            "student_train": preset.student_train.to_json(),
            "row_updates": dict(preset.row_updates),
            "kd_alpha": preset.kd_alpha,
            "kd_temperature": preset.kd_temperature,
            "topk": preset.topk,
            "gen_batch_size": preset.gen_batch_size,
            "max_len_a": preset.max_len_a,
            "max_len_b": preset.max_len_b,
            "gen_device": "cpu" if preset.gen_cpu else "gpu",
            "vocab": preset.vocab,
            "curve": asdict(preset.curve) if preset.curve else None,
        },
        "reference": cfg.corpus.reference,
    }
    if cfg.multilingual:
        meta["lang_pairs"] = list(cfg.lang_pairs)
        meta["langs"] = cfg.task_langs
        meta["task"] = MULTILINGUAL_TASK
    if cfg.teacher is not None:  # not trained here: no architecture or budget
        meta["teacher_given"] = cfg.teacher.describe()
        meta["rows"][0]["label"] = "teacher (given)"
        meta["settings"].update(teacher_arch=None, teacher_train=None, vocab=None)
    return meta


def report_stages(cfg, models, extra_inputs=()):
    """``score`` (sacreBLEU/chrF, parameters, times) and ``table``."""
    p, meta = cfg.paths, describe(cfg)
    tgts = sorted({tgt for _, tgt in cfg.directions})
    inputs = [os.path.join(p.text, f"{s}.{t}") for s in cfg.eval_sets for t in tgts]
    inputs += [p.translations(n) for n in models]
    inputs += [p.ct2(n) for n in models] if cfg.use_ct2 else []
    inputs += list(models.values()) + list(extra_inputs)
    inputs += [
        os.path.join(os.path.dirname(c), "train_time.json") for c in models.values()
    ]
    outputs = {k: os.path.join(p.results, v) for k, v in report.OUTPUT_FILES.items()}
    return [
        Stage(
            "score",
            outputs=[p.scores],
            inputs=inputs,
            params={"models": list(models)},
            steps=lambda tmp: [
                PyStep(
                    "sacreBLEU and chrF of every translation against the raw "
                    f"references, parameters and training times -> {tmp(p.scores)}",
                    lambda: compute_scores(
                        p,
                        models,
                        cfg.eval_sets,
                        cfg.tgt,
                        report.environment(),
                        tmp(p.scores),
                        lang_pairs=cfg.lang_pairs,
                        curve_rows=curve_rows(cfg),
                    ),
                )
            ],
            group="report",
        ),
        Stage(
            "table",
            outputs=list(outputs.values()),
            inputs=[p.scores],
            params={"meta": meta},
            steps=lambda tmp: [
                PyStep(
                    f"write {', '.join(report.OUTPUT_FILES.values())} into {p.results}",
                    lambda: report.write_results(
                        read_json(p.scores),
                        meta,
                        {k: tmp(v) for k, v in outputs.items()},
                        existing_md=outputs["markdown"],
                    ),
                )
            ],
            group="report",
        ),
    ]


def build_plan(cfg):
    """Every stage of one configuration, in order.

    Args:
        cfg: the :class:`Config`.
    """
    if cfg.teacher is None:
        stages = data_stages(cfg) + teacher_stages(cfg)
    else:  # checked first: its subword model and dictionaries make the data
        stages = teacher_stages(cfg) + data_stages(cfg)
    seqkd, train_data = seqkd_stages(cfg)
    topk, stores = topk_stages(cfg, train_data)
    students, rows = student_stages(cfg, train_data, stores)
    models = {"teacher": cfg.paths.checkpoint("teacher"), **rows}
    curve = curve_stages(cfg)
    extra = [cfg.paths.engines_json for s in seqkd if s.name == "seqkd:engines"]
    extra += [
        os.path.join(cfg.paths.curve_dir(row, pair), "curve.json")
        for row in curve_rows(cfg)
        for pair in cfg.pairs
    ]
    stages += seqkd + topk + students + curve
    stages += translate_stages(cfg, models) + ct2_stages(cfg, models)
    stages += report_stages(cfg, models, extra)
    return Plan(
        stages=stages,
        config=cfg,
        models=models,
        train_data=train_data,
        stores=stores,
        meta=describe(cfg),
    )
