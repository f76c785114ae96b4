"""The Kim & Rush distillation table as one staged recipe, from raw text to RESULTS.md.

A recipe (``examples/multi30k``, ``examples/iwslt14``, ``examples/wmt14_en_de``)
describes its data (:class:`Dataset`: where the raw text comes from, its
splits, its presets) and calls :func:`main`. Everything else is shared: the
stages below, built by :func:`build_plan` and run by
:class:`fairseq_kd.stages.Pipeline`::

    fetch (only when the data must be downloaded)
    normalise          raw text -> WORK/text/{train,valid,test}.{src,tgt}
    subword            joint sentencepiece (or subword-nmt BPE) -> WORK/subword
    binarize           fairseq-preprocess --joined-dictionary -> WORK/bin
    teacher            fairseq-train -> WORK/models/teacher
    seqkd:top|bleu     fairseq-kd-distill (teacher's best / Seq-Inter) -> WORK/seqkd/*
    seqkd:engines      fairseq's generator vs CTranslate2 on a head of train
                       (presets with ``distill_compare``) -> WORK/seqkd/engines
    topk:SOURCE        fairseq-kd-dump-topk over each training corpus -> WORK/topk/*
    student:ROW        fairseq-train, one per row of the table -> WORK/models/ROW
    translate:MODEL    fairseq-generate, greedy and beam 5, test and valid
    ct2:MODEL          CTranslate2 int8 speed (when ctranslate2 is installed)
    score              sacreBLEU/chrF, parameters, training times -> WORK/scores.json
    table              RESULTS.md, results.json, the BLEU-vs-speed plot
"""

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from fairseq_kd import pipeline, report
from fairseq_kd.stages import Command, Pipeline, PyStep, Stage

logger = logging.getLogger(__name__)

USER_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(USER_DIR)

#: Where ``fairseq-kd-distill --output DIR`` puts its binarized corpus, relative
#: to DIR ("" when DIR itself is the binarized folder).
DISTILL_BIN = "bin"

#: Console scripts of this package that the recipe calls.
PLUGIN_TOOLS = ("fairseq-kd-dump-topk", "fairseq-kd-distill")

#: Beam sizes every model is evaluated with (1 is greedy search).
EVAL_BEAMS = (1, 5)

#: Training corpora a row can use: "ref" is the original binarized data,
#: "seqkd-top" the teacher's best beam hypothesis (sequence-level KD),
#: "seqkd-bleu" the n-best entry closest to the reference (Seq-Inter).
SEQKD_SELECT = {"seqkd-top": "top", "seqkd-bleu": "bleu"}


def transformer_arch(enc, dec, dim, ffn, heads):
    """``fairseq-train`` flags of a transformer's sizes (for presets).

    Args:
        enc: encoder layers.
        dec: decoder layers.
        dim: embedding dimension of encoder and decoder.
        ffn: feed-forward dimension.
        heads: attention heads.
    """
    return [
        "--encoder-layers", enc, "--decoder-layers", dec,
        "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
        "--encoder-ffn-embed-dim", ffn, "--decoder-ffn-embed-dim", ffn,
        "--encoder-attention-heads", heads, "--decoder-attention-heads", heads,
    ]  # fmt: skip


@dataclass
class Row:
    """One student of the table; every row shares the student architecture.

    Args:
        name: short name (stage ``student:NAME``, ``--rows``).
        label: what the table calls it.
        data: training corpus: ``ref``, ``seqkd-top`` or ``seqkd-bleu``.
        kd: word-level KD: None, ``offline`` (the teacher's top-k store) or
            ``live`` (the teacher run beside the student).
        flags: more ``fairseq-train`` flags (``word_kd`` options).
        enabled: whether the row runs unless ``--rows`` names it.
    """

    name: str
    label: str
    data: str = "ref"
    kd: Optional[str] = None
    flags: Sequence[str] = ()
    enabled: bool = True


ROWS = [
    Row("baseline", "student on references (baseline)"),
    Row("word-kd", "word-KD (offline top-k store)", kd="offline"),
    Row("word-kd-live", "word-KD (live teacher)", kd="live"),
    Row("seq-kd", "seq-KD", data="seqkd-top"),
    Row("seq-kd+word-kd", "seq-KD + word-KD", data="seqkd-top", kd="offline"),
    Row("seq-inter", "Seq-Inter", data="seqkd-bleu", enabled=False),
    Row("seq-inter+word-kd", "Seq-Inter + word-KD", data="seqkd-bleu", kd="offline"),
    Row(
        "selective-batch",
        "word-KD, selective (batch, r=0.5)",
        kd="offline",
        flags=("--kd-selection", "batch", "--kd-selection-ratio", "0.5"),
        enabled=False,
    ),
    Row(
        "selective-global",
        "word-KD, selective (global, r=0.5)",
        kd="offline",
        flags=("--kd-selection", "global", "--kd-selection-ratio", "0.5"),
        enabled=False,
    ),
    Row(
        "word-kd-js",
        "word-KD, Jensen-Shannon",
        kd="offline",
        flags=("--kd-divergence", "js"),
        enabled=False,
    ),
]


@dataclass
class Dataset:
    """What a recipe knows about its data.

    Args:
        key: the recipe's folder name under ``examples/``.
        title: the corpus's name in the results.
        folder: the recipe's folder (default work and results folders).
        src: default source language.
        tgt: default target language.
        splits: fairseq split name -> file stem in the raw folder
            (``{"train": "train", "valid": "val", "test": "test_2016_flickr"}``).
        eval_sets: fairseq split -> name shown in the table, in table order.
        presets: preset name -> settings (see ``examples/multi30k/multi30k.py``).
        default_preset: the preset used without ``--preset``.
        local_data: ``local_data(args)`` -> a raw folder already on disk, or
            None when the data must be fetched.
        fetch: ``fetch(dest, src, tgt)`` downloads and prepares the raw files
            into ``dest`` (None: the recipe cannot download).
        fetch_describe: one line saying what ``fetch`` downloads.
        fetched_suffix: what ``fetch`` appends to ``<stem>.<lang>`` ("" or
            ".gz").
        verify: ``verify(folder, src, tgt)`` raises on corrupted raw files.
        reference: Markdown paragraph of published numbers to compare with.
    """

    key: str
    title: str
    folder: str
    src: str
    tgt: str
    splits: Dict[str, str]
    eval_sets: Dict[str, str]
    presets: Dict[str, dict]
    default_preset: str
    local_data: Callable[[argparse.Namespace], Optional[str]]
    fetch: Optional[Callable[[str, str, str], None]] = None
    fetch_describe: str = ""
    fetched_suffix: str = ""
    verify: Optional[Callable[[str, str, str], None]] = None
    reference: str = ""


@dataclass
class Plan:
    """The stages of one configuration and the paths they share."""

    stages: List[Stage]
    work: str
    results: str
    rows: List[Row]
    paths: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)


# -- command lines ---------------------------------------------------------


def ct2_available():
    """Whether CTranslate2 (and so ``ct2-fairseq-converter``) is installed."""
    return importlib.util.find_spec("ctranslate2") is not None


def ct2_convert_command(checkpoint, data_bin, src, tgt, output_dir):
    """The ``ct2-fairseq-converter`` command of one model (int8).

    ``--user_dir`` loads the plugin in the converter, which lets torch read the
    checkpoint weights-only: no ``--unsafe_deserialization``.
    """
    return (
        ["ct2-fairseq-converter", "--model_path", checkpoint]
        + ["--data_dir", data_bin, "--user_dir", USER_DIR]
        + ["--source_lang", src, "--target_lang", tgt]
        + ["--output_dir", output_dir, "--quantization", "int8"]
    )


def post_process_symbol(subword):
    """fairseq's ``--post-process`` name for a subword scheme."""
    return {"spm": "sentencepiece", "bpe": "subword_nmt"}[subword]


def train_command(ctx, data, save_dir, arch, settings, extra):
    """The ``fairseq-train`` command line of one model.

    Args:
        ctx: the plan context (languages, preset).
        data: binarized data folder.
        save_dir: where checkpoints go.
        arch: architecture flags (``--encoder-layers`` ...).
        settings: ``{"updates", "lr", "warmup", "max_tokens", "dropout"}`` and
            optionally ``"update_freq"``.
        extra: criterion/task flags.
    """
    preset = ctx["preset"]
    return (
        ["fairseq-train", data, "--save-dir", save_dir]
        # the plugin on every run, KD or not: it stops fairseq's batch
        # prefetching thread at exit (fairseq_kd/shutdown.py) and lets torch
        # resume from a checkpoint weights-only
        + ([] if "--user-dir" in extra else ["--user-dir", USER_DIR])
        + ["--source-lang", ctx["src"], "--target-lang", ctx["tgt"]]
        + ["--arch", "transformer"]
        + list(arch)
        + ["--share-all-embeddings", "--dropout", settings["dropout"]]
        + ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0"]
        + ["--lr", settings["lr"], "--lr-scheduler", "inverse_sqrt"]
        + ["--warmup-updates", settings["warmup"], "--weight-decay", "0.0001"]
        + ["--label-smoothing", "0.1"]
        + ["--max-tokens", settings["max_tokens"], "--max-update", settings["updates"]]
        + (
            ["--update-freq", settings["update_freq"]]
            if "update_freq" in settings
            else []
        )
        # ve-fairseq drops the last partial batch with multiples of 8
        + ["--required-batch-size-multiple", "1"]
        # fixed update budgets: the last checkpoint is the model; no validation
        # pass (settings are chosen on the translated valid set instead)
        + ["--disable-validation", "--no-epoch-checkpoints"]
        + ["--seed", "1", "--num-workers", "0"]
        + ["--log-format", "simple", "--log-interval", "50"]
        + list(preset["device"])
        + list(extra)
    )


def train_steps(ctx, data, save_dir, arch, settings, extra):
    """The steps of a training stage: ``fairseq-train`` into ``tmp(save_dir)``.

    Args:
        ctx: the plan context.
        data: binarized data folder.
        save_dir: the stage's output folder.
        arch: architecture flags.
        settings: training settings (see :func:`train_command`).
        extra: criterion/task flags.
    """

    def steps(tmp):
        return [
            Command(
                train_command(ctx, data, tmp(save_dir), arch, settings, extra),
                on_output=_save_train_time(tmp(save_dir), settings["updates"]),
                show=("| train_inner |", "| train |"),
            )
        ]

    return steps


def generate_command(ctx, checkpoint, split, beam):
    """The ``fairseq-generate`` command that translates and times one split."""
    preset = ctx["preset"]
    return (
        ["fairseq-generate", ctx["bin"], "--path", checkpoint, "--gen-subset", split]
        # the plugin lets torch load the checkpoint weights-only
        + ["--user-dir", USER_DIR]
        + ["--source-lang", ctx["src"], "--target-lang", ctx["tgt"]]
        + ["--beam", beam, "--nbest", "1", "--batch-size", preset["gen_batch_size"]]
        # every sentence is kept (ve-fairseq drops a last partial batch otherwise)
        + ["--required-batch-size-multiple", "1"]
        + ["--post-process", post_process_symbol(ctx["subword"])]
        + ["--max-len-a", "0", "--max-len-b", preset.get("gen_max_len", 200)]
        + (["--cpu"] if preset.get("gen_cpu", True) else [])
    )


_SPEED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)


def parse_speed(output):
    """fairseq-generate's own timing line, as a dict (generation time only)."""
    m = _SPEED.search(output)
    if not m:
        raise RuntimeError("fairseq-generate printed no 'Translated ...' line")
    return {
        "sentences": int(m.group(1).replace(",", "")),
        "tokens": int(m.group(2).replace(",", "")),
        "seconds": float(m.group(3)),
        "sentences_per_second": float(m.group(4)),
        "tokens_per_second": float(m.group(5)),
    }


# -- stage bodies -----------------------------------------------------------


def mkdir_step(path):
    """A step that creates a (temporary output) folder."""
    return PyStep(f"mkdir {path}", lambda: os.makedirs(path, exist_ok=True))


def _save_translation(out_dir, name, ref_file):
    def save(output, seconds):
        hyps = pipeline.parse_generate_output(output)
        n_expected = len(pipeline.read_lines(ref_file))
        if len(hyps) != n_expected:
            raise RuntimeError(
                f"{name}: {len(hyps)} translations for {n_expected} sentences"
            )
        speed = parse_speed(output)
        speed["wall_seconds"] = round(seconds, 2)
        pipeline.write_lines(os.path.join(out_dir, name + ".txt"), hyps)
        pipeline.write_json(os.path.join(out_dir, name + ".json"), speed)

    return save


def _save_train_time(save_dir, updates):
    def save(output, seconds):
        pipeline.write_json(
            os.path.join(save_dir, "train_time.json"),
            {"seconds": round(seconds, 1), "updates": int(updates)},
        )

    return save


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
            name = f"train.{pair}.{lang}.{ext}"
            path = os.path.join(distill_dir, name)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: fairseq-kd-distill wrote no binarized train split "
                    f"there (see DISTILL_BIN in {__file__})"
                )
            shutil.copy(path, dest)
    for name in os.listdir(bin_dir):
        if name.startswith(("valid.", "test.")):
            shutil.copy(os.path.join(bin_dir, name), dest)
    return dest


def ct2_translate(
    model_dir, source_file, out_dir, beams, batch_size, symbol, max_len=200
):
    """Translate subword source lines with CTranslate2 and time each beam size.

    Args:
        model_dir: a converted CTranslate2 model.
        source_file: subword-encoded source lines.
        out_dir: where ``test.beamB.txt``/``.json`` go.
        beams: beam sizes.
        batch_size: sentences per batch (as for fairseq-generate).
        symbol: fairseq post-processing symbol (``sentencepiece``...).
        max_len: the most target tokens per sentence (as fairseq-generate's
            ``--max-len-b`` with ``--max-len-a 0``).
    """
    import ctranslate2
    import torch
    from fairseq.data.data_utils import post_process

    threads = torch.get_num_threads()
    translator = ctranslate2.Translator(
        model_dir, device="cpu", compute_type="int8", intra_threads=threads
    )
    batch = [line.split() for line in pipeline.read_lines(source_file)]
    for beam in beams:
        start = time.time()
        results = translator.translate_batch(
            batch,
            beam_size=beam,
            max_batch_size=batch_size,
            max_decoding_length=max_len,
        )
        seconds = time.time() - start
        hyps = [post_process(" ".join(r.hypotheses[0]), symbol) for r in results]
        pipeline.write_lines(os.path.join(out_dir, f"test.beam{beam}.txt"), hyps)
        pipeline.write_json(
            os.path.join(out_dir, f"test.beam{beam}.json"),
            {
                "sentences": len(batch),
                "seconds": round(seconds, 3),
                "sentences_per_second": round(len(batch) / seconds, 2),
                "threads": threads,
            },
        )


def head_lines(src_file, dest_file, n):
    """Write the first ``n`` lines of ``src_file`` to ``dest_file``.

    Raises:
        ValueError: the file has fewer than ``n`` lines.
    """
    lines = pipeline.read_lines(src_file)
    if len(lines) < n:
        raise ValueError(f"{src_file} has {len(lines)} lines, fewer than {n}")
    pipeline.write_lines(dest_file, lines[:n])


def compare_engines(runs, split, tgt, out_path):
    """Speed and agreement of ``fairseq-kd-distill`` engines on one corpus.

    Args:
        runs: ``{engine: the --output folder of a run with that engine}``; the
            first is the reference the others are compared with.
        split: the distilled split.
        tgt: target language (``OUTPUT/<split>.<tgt>`` is compared line by line).
        out_path: the JSON file to write.

    Returns:
        ``{"sentences", "reference": the first engine, "engines": {engine:
        {"sentences_per_second", "generation_seconds"}}, "speedup": {engine:
        ratio to the reference}, "identical_lines": {engine: lines equal to
        the reference's}}``.

    Raises:
        RuntimeError: the runs distilled different numbers of sentences.
    """
    engines, lines = {}, {}
    for engine, folder in runs.items():
        summary = read_json(os.path.join(folder, f"{split}.summary.json"))
        engines[engine] = {
            "sentences_per_second": summary["sentences_per_second"],
            "generation_seconds": summary["generation_seconds"],
        }
        lines[engine] = pipeline.read_lines(os.path.join(folder, f"{split}.{tgt}"))
    first = next(iter(runs))
    counts = {e: len(x) for e, x in lines.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the engines distilled different line counts: {counts}")
    out = {
        "sentences": counts[first],
        "reference": first,
        "engines": engines,
        "speedup": {
            e: round(
                v["sentences_per_second"] / engines[first]["sentences_per_second"], 2
            )
            for e, v in engines.items()
        },
        "identical_lines": {
            e: sum(a == b for a, b in zip(lines[first], x)) for e, x in lines.items()
        },
    }
    pipeline.write_json(out_path, out)
    return out


def compute_scores(ctx, models, out_path):
    """Score every translation; gather parameters and training times.

    Args:
        ctx: the plan context.
        models: model name -> checkpoint.
        out_path: where the JSON goes.
    """
    work = ctx["work"]
    refs = {
        split: pipeline.read_lines(os.path.join(work, "text", f"{split}.{ctx['tgt']}"))
        for split in ctx["eval_sets"]
    }
    scores = {"models": {}, "eval_sets": ctx["eval_sets"], **report.environment()}
    for name, ckpt in models.items():
        entry = {"params": pipeline.count_parameters(ckpt), "scores": {}, "speed": {}}
        timing = os.path.join(os.path.dirname(ckpt), "train_time.json")
        if os.path.exists(timing):
            entry.update({f"train_{k}": v for k, v in read_json(timing).items()})
        tdir = os.path.join(work, "translations", name)
        for split in ctx["eval_sets"]:
            entry["scores"][split], entry["speed"][split] = {}, {}
            for beam in EVAL_BEAMS:
                hyps = pipeline.read_lines(
                    os.path.join(tdir, f"{split}.beam{beam}.txt")
                )
                s = pipeline.score(hyps, refs[split])
                scores["bleu_signature"] = s.pop("bleu_signature")
                scores["chrf_signature"] = s.pop("chrf_signature")
                entry["scores"][split][f"beam{beam}"] = s
                speed = read_json(os.path.join(tdir, f"{split}.beam{beam}.json"))
                entry["speed"][split][f"beam{beam}"] = speed["sentences_per_second"]
        cdir = os.path.join(work, "ct2", name)
        if os.path.isdir(cdir):
            entry["ct2_int8"] = {}
            for beam in EVAL_BEAMS:
                hyps = pipeline.read_lines(os.path.join(cdir, f"test.beam{beam}.txt"))
                speed = read_json(os.path.join(cdir, f"test.beam{beam}.json"))
                s = pipeline.score(hyps, refs["test"])
                entry["ct2_int8"][f"beam{beam}"] = {
                    "sentences_per_second": speed["sentences_per_second"],
                    "bleu": s["bleu"],
                }
        scores["models"][name] = entry
    scores["seqkd"] = seqkd_summaries(work)
    engines = os.path.join(work, "seqkd", "engines", "engines.json")
    if os.path.exists(engines):
        scores["seqkd_engines"] = read_json(engines)
    scores["stage_seconds"] = stage_seconds(os.path.join(work, "stamps"))
    pipeline.write_json(out_path, scores)


#: What the results keep of a ``fairseq-kd-distill`` summary.
SEQKD_SUMMARY_KEYS = (
    "engines",
    "sentences",
    "output_pairs",
    "generation_seconds",
    "sentences_per_second",
    "filtered",
    "dropped",
    "replaced",
    "not_top",
    "mean_sentence_bleu_chosen",
    "mean_sentence_bleu_top",
    "corpus_bleu_chosen",
)


def seqkd_summaries(work):
    """The distillation summaries of the seq-KD corpora that exist, by selection.

    Args:
        work: the recipe's work folder.
    """
    out = {}
    for select in SEQKD_SELECT.values():
        path = os.path.join(work, "seqkd", select, "train.summary.json")
        if os.path.exists(path):
            summary = read_json(path)
            out[select] = {k: summary.get(k) for k in SEQKD_SUMMARY_KEYS}
    return out


def stage_seconds(stamp_dir, exclude=("score", "table")):
    """Wall time of the run that made each stage's outputs, from its stamp.

    Args:
        stamp_dir: the pipeline's stamp folder.
        exclude: stages left out (the report's own, still running).

    Returns:
        ``[[stage, seconds], ...]`` in the order the stages finished (a list:
        the JSON files are written with sorted keys).
    """
    stamps = []
    if os.path.isdir(stamp_dir):
        for name in os.listdir(stamp_dir):
            if name.endswith(".json"):
                stamp = read_json(os.path.join(stamp_dir, name))
                if "seconds" in stamp and stamp.get("stage") not in exclude:
                    stamps.append((stamp.get("finished", ""), stamp["stage"], stamp))
    stamps.sort(key=lambda x: (x[0], x[1]))
    return [[stage, stamp["seconds"]] for _, stage, stamp in stamps]


def read_json(path):
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


# -- the plan ---------------------------------------------------------------


def select_rows(names=None):
    """The rows to run: ``names`` (comma-separated) or every enabled row."""
    if not names:
        return [r for r in ROWS if r.enabled]
    known = {r.name: r for r in ROWS}
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(
            f"--rows: unknown row(s) {', '.join(unknown)}; rows: " + ", ".join(known)
        )
    return [known[n] for n in chosen]


def resolve_raw(ds, args, work):
    """(raw folder, whether a fetch stage must produce it)."""
    local = ds.local_data(args)
    if local is not None:
        if not os.path.isdir(local):
            raise SystemExit(f"--data {local}: no such folder")
        return os.path.abspath(local), False
    if ds.fetch is None:
        raise SystemExit(f"no {ds.title} data: pass --data FOLDER")
    return os.path.join(work, "raw"), True


def reproduce_command(ds, args):
    """The one command that reproduces this configuration (non-defaults only)."""
    parts = ["bash", f"examples/{ds.key}/run.sh", "--preset", args.preset]
    if (args.src, args.tgt) != (ds.src, ds.tgt):
        parts += ["--src", args.src, "--tgt", args.tgt]
    if args.subword != "spm":
        parts += ["--subword", args.subword]
    if args.rows:
        parts += ["--rows", args.rows]
    if getattr(args, "download", False):
        parts += ["--download"]
    if args.results_arg:
        parts += ["--results", os.path.relpath(args.results_arg, REPO)]
    return shlex.join(parts)


def build_plan(ds, args):
    """Every stage of one configuration, in order.

    Args:
        ds: the recipe's :class:`Dataset`.
        args: parsed command-line options (see :func:`parse_args`).
    """
    if args.preset not in ds.presets:
        raise SystemExit(
            f"--preset {args.preset}: unknown; choose from {', '.join(ds.presets)}"
        )
    preset = ds.presets[args.preset]
    src, tgt = args.src, args.tgt
    if src == tgt:
        raise SystemExit(f"--src and --tgt are both {src}")
    work = os.path.abspath(
        args.work
        or os.path.join(ds.folder, "work", f"{src}-{tgt}.{args.preset}.{args.subword}")
    )
    results = os.path.abspath(args.results or os.path.join(work, "results"))
    rows = select_rows(args.rows)
    raw, fetching = resolve_raw(ds, args, work)
    j = os.path.join
    text, sub, data_bin = j(work, "text"), j(work, "subword"), j(work, "bin")
    splits = list(ds.splits)
    ctx = {
        "src": src,
        "tgt": tgt,
        "work": work,
        "bin": data_bin,
        "preset": preset,
        "subword": args.subword,
        "eval_sets": {k: ds.eval_sets[k] for k in ds.eval_sets},
    }
    device = list(preset["device"])
    stages = []

    # data ------------------------------------------------------------------
    if fetching:
        stages.append(
            Stage(
                "fetch",
                outputs=[raw],
                params={"src": src, "tgt": tgt, "what": ds.fetch_describe},
                steps=lambda tmp: [
                    PyStep(
                        f"{ds.fetch_describe} -> {tmp(raw)}",
                        lambda: ds.fetch(tmp(raw), src, tgt),
                    )
                ],
                group="data",
            )
        )
        raw_inputs = [
            j(raw, f"{stem}.{lang}{ds.fetched_suffix}")
            for stem in ds.splits.values()
            for lang in (src, tgt)
        ]
    else:
        raw_inputs = []
        for stem in ds.splits.values():
            for lang in (src, tgt):
                path = pipeline.find_file(raw, f"{stem}.{lang}")
                if path is None:
                    raise SystemExit(
                        f"no {stem}.{lang}[.gz] in {raw}: the {ds.title} recipe "
                        f"needs {', '.join(ds.splits.values())} for {src} and {tgt}"
                    )
                raw_inputs.append(path)
    check = not args.no_checksum and ds.verify is not None

    def normalise_steps(tmp):
        steps = []
        if check:
            steps.append(
                PyStep(
                    f"check the sha256 of the raw {src}/{tgt} files in {raw}",
                    lambda: ds.verify(raw, src, tgt),
                )
            )
        steps.append(
            PyStep(
                f"normalise whitespace of {raw}/{{{','.join(ds.splits.values())}}}"
                f".{{{src},{tgt}}} -> {tmp(text)}/{{{','.join(splits)}}}.*",
                lambda: pipeline.prepare_text(
                    raw, tmp(text), src, tgt, ds.splits, preset.get("limits")
                ),
            )
        )
        return steps

    stages.append(
        Stage(
            "normalise",
            outputs=[text],
            inputs=raw_inputs,
            params={
                "src": src,
                "tgt": tgt,
                "splits": ds.splits,
                "limits": preset.get("limits"),
                "checksum": check,
            },
            steps=normalise_steps,
            group="data",
        )
    )

    def subword_steps(tmp):
        out = tmp(sub)
        if args.subword == "spm":
            return [
                mkdir_step(out),
                PyStep(
                    f"train a joint sentencepiece unigram model ({preset['vocab']} "
                    f"pieces) on {text}/train.{{{src},{tgt}}} -> {out}/spm.model",
                    lambda: pipeline.train_sentencepiece(
                        text, j(out, "spm"), src, tgt, preset["vocab"]
                    ),
                ),
                PyStep(
                    f"encode {text}/* with {out}/spm.model -> {out}/*",
                    lambda: pipeline.encode_sentencepiece(
                        j(out, "spm.model"), text, out, splits, (src, tgt)
                    ),
                ),
            ]
        steps = [
            mkdir_step(out),
            Command(
                ["subword-nmt", "learn-joint-bpe-and-vocab"]
                + ["--input", j(text, f"train.{src}"), j(text, f"train.{tgt}")]
                + ["--symbols", preset["vocab"], "--output", j(out, "bpe.codes")]
                + [
                    "--write-vocabulary",
                    j(out, f"vocab.{src}"),
                    j(out, f"vocab.{tgt}"),
                ],
                describe="joint BPE (subword-nmt) learnt on both sides of train",
            ),
        ]
        for split in splits:
            for lang in (src, tgt):
                steps.append(
                    Command(
                        ["subword-nmt", "apply-bpe", "--codes", j(out, "bpe.codes")]
                        + ["--vocabulary", j(out, f"vocab.{lang}")]
                        + ["--vocabulary-threshold", "50"]
                        + ["--input", j(text, f"{split}.{lang}")]
                        + ["--output", j(out, f"{split}.{lang}")]
                    )
                )
        return steps

    stages.append(
        Stage(
            "subword",
            outputs=[sub],
            inputs=[text],
            params={"subword": args.subword, "vocab": preset["vocab"]},
            steps=subword_steps,
            group="data",
        )
    )
    stages.append(
        Stage(
            "binarize",
            outputs=[data_bin],
            inputs=[sub],
            params={"joined": True},
            steps=lambda tmp: [
                Command(
                    ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
                    + ["--trainpref", j(sub, "train"), "--validpref", j(sub, "valid")]
                    + ["--testpref", j(sub, "test"), "--destdir", tmp(data_bin)]
                    + ["--joined-dictionary", "--workers", preset.get("workers", 2)]
                )
            ],
            group="data",
        )
    )

    # teacher ----------------------------------------------------------------
    teacher_dir = j(work, "models", "teacher")
    teacher = j(teacher_dir, "checkpoint_last.pt")
    t_settings = preset["teacher_train"]
    stages.append(
        Stage(
            "teacher",
            outputs=[teacher_dir],
            inputs=[data_bin],
            params={"arch": preset["teacher_arch"], "train": t_settings, "dev": device},
            steps=train_steps(
                ctx,
                data_bin,
                teacher_dir,
                preset["teacher_arch"],
                t_settings,
                ["--criterion", "label_smoothed_cross_entropy"],
            ),
            group="teacher",
            resumable=True,
        )
    )

    # sequence-level KD corpora ------------------------------------------------
    train_data = {"ref": data_bin}
    needed = {r.data for r in rows}
    # seq-KD and Seq-Inter select from the same n-best lists: seqkd:top runs
    # the teacher's beam search into WORK/seqkd/nbest (fairseq-kd-distill's
    # --work-dir); seqkd:bleu finds every chunk translated there and only
    # selects, filters and writes its corpus
    nbest_dir = j(work, "seqkd", "nbest")
    distill_engine = []
    if preset.get("distill_engine", "fairseq") == "ctranslate2":
        if ct2_available():
            distill_engine = ["--engine", "ctranslate2"]
            distill_engine += ["--threads", str(preset.get("distill_threads", 0))]
        else:
            logger.warning(
                "ctranslate2 is not installed: the seq-KD corpora are translated "
                "with fairseq's generator instead (pip install -e '.[ct2]')"
            )

    def distill_flags(select):
        """fairseq-kd-distill's search, selection and output flags."""
        return (
            ["--beam", preset["distill_beam"], "--nbest", preset["distill_nbest"]]
            + ["--select", select, "--post-process", post_process_symbol(args.subword)]
            + ["--max-tokens", preset["tool_max_tokens"]]
            + list(preset.get("distill_extra", ()))
            + device
        )

    for source, select in SEQKD_SELECT.items():
        if source not in needed and not (
            select == "top" and needed & set(SEQKD_SELECT)
        ):
            continue
        out_dir = j(work, "seqkd", select)
        train_data[source] = j(out_dir, "data")

        def seqkd_steps(tmp, out_dir=out_dir, select=select):
            out = tmp(out_dir)
            nbest = tmp(nbest_dir) if select == "top" else nbest_dir
            return [
                Command(
                    ["fairseq-kd-distill", data_bin, "--path", teacher]
                    + ["--gen-subset", "train", "--output", out]
                    + ["--work-dir", nbest]
                    + distill_engine
                    + distill_flags(select),
                    describe=(
                        "the teacher's beam search over train, its best "
                        "hypothesis (seq-KD)"
                        if select == "top"
                        else "the n-best entry closest to the reference (Seq-Inter),"
                        " from the n-best lists seqkd:top translated"
                    ),
                    show=("sentences/s", "summary"),
                ),
                PyStep(
                    f"assemble {j(out, 'data')}: distilled train from "
                    f"{j(out, DISTILL_BIN)}, valid/test and dictionaries from "
                    f"{data_bin}",
                    lambda: assemble_distilled(
                        j(out, DISTILL_BIN), data_bin, j(out, "data"), src, tgt
                    ),
                ),
            ]

        stages.append(
            Stage(
                f"seqkd:{select}",
                outputs=[out_dir] + ([nbest_dir] if select == "top" else []),
                inputs=[data_bin, teacher] + ([nbest_dir] if select != "top" else []),
                params={
                    "beam": preset["distill_beam"],
                    "nbest": preset["distill_nbest"],
                    "select": select,
                    "extra": list(preset.get("distill_extra", ())),
                    "max_tokens": preset["tool_max_tokens"],
                    "distill_bin": DISTILL_BIN,
                    "engine": distill_engine,
                },
                steps=seqkd_steps,
                group="seqkd",
                resumable=True,
            )
        )

    # the two distillation engines side by side on the first sentences of train
    n_compare = preset.get("distill_compare")
    engines_json = None
    if distill_engine and n_compare:
        engines_dir = j(work, "seqkd", "engines")
        engines_json = j(engines_dir, "engines.json")
        compare_flags = distill_flags("top")  # the search seqkd:top runs
        runs = {"fairseq": ["--engine", "fairseq"], "ctranslate2": distill_engine}

        def engines_steps(tmp, out_dir=engines_dir):
            out = tmp(out_dir)
            head = j(out, "head")
            steps = [mkdir_step(head)]
            for lang in (src, tgt):
                steps.append(
                    PyStep(
                        f"first {n_compare} lines of {j(sub, f'train.{lang}')}",
                        lambda lang=lang: head_lines(
                            j(sub, f"train.{lang}"),
                            j(head, f"train.{lang}"),
                            n_compare,
                        ),
                    )
                )
            steps.append(
                Command(
                    ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
                    + ["--trainpref", j(head, "train"), "--destdir", j(out, "bin")]
                    + ["--srcdict", j(data_bin, f"dict.{src}.txt")]
                    + ["--tgtdict", j(data_bin, f"dict.{tgt}.txt")]
                    + ["--workers", preset.get("workers", 2)]
                )
            )
            for engine, flags in runs.items():
                steps.append(
                    Command(
                        ["fairseq-kd-distill", j(out, "bin"), "--path", teacher]
                        + ["--gen-subset", "train", "--output", j(out, engine)]
                        + ["--work-dir", j(out, engine + ".work")]
                        + flags
                        + compare_flags,
                        describe=f"the teacher's beam search over the first "
                        f"{n_compare} train sentences with the {engine} engine",
                        show=("sentences/s", "summary"),
                    )
                )
            steps.append(
                PyStep(
                    f"compare the engines' speed and outputs -> "
                    f"{j(out, 'engines.json')}",
                    lambda: compare_engines(
                        {e: j(out, e) for e in runs},
                        "train",
                        tgt,
                        j(out, "engines.json"),
                    ),
                )
            )
            return steps

        stages.append(
            Stage(
                "seqkd:engines",
                outputs=[engines_dir],
                inputs=[sub, data_bin, teacher],
                params={
                    "sentences": n_compare,
                    "flags": compare_flags,
                    "engines": runs,
                },
                steps=engines_steps,
                group="seqkd",
            )
        )

    # teacher top-k stores, one per training corpus used with offline word-KD --
    stores = {}
    for source in sorted({r.data for r in rows if r.kd == "offline"}):
        store = j(work, "topk", source)
        stores[source] = store
        data_dir = train_data[source]
        stages.append(
            Stage(
                f"topk:{source}",
                outputs=[store],
                inputs=[data_dir, teacher],
                params={"k": preset["topk"], "max_tokens": preset["tool_max_tokens"]},
                steps=lambda tmp, store=store, data_dir=data_dir, source=source: [
                    Command(
                        ["fairseq-kd-dump-topk", data_dir, "--path", teacher]
                        + ["--gen-subset", "train", "--output", tmp(store)]
                        + ["--k", preset["topk"]]
                        + ["--max-tokens", preset["tool_max_tokens"]]
                        + device,
                        describe=f"the teacher's top-{preset['topk']} distributions "
                        f"over {source} train",
                        show=("summary",),
                    )
                ],
                group="topk",
                resumable=True,
            )
        )

    # students -----------------------------------------------------------------
    models = {"teacher": teacher}
    s_arch = preset["student_arch"]
    for row in rows:
        settings = dict(preset["student_train"])
        settings["updates"] = preset.get("row_updates", {}).get(
            row.name, settings["updates"]
        )
        save = j(work, "models", row.name)
        data_dir = train_data[row.data]
        inputs = [data_dir]
        if row.kd is None:
            extra = ["--criterion", "label_smoothed_cross_entropy"]
        else:
            extra = ["--task", "translation_kd"]
            if row.kd == "offline":
                extra += ["--teacher-topk", stores[row.data]]
                inputs.append(stores[row.data])
            else:
                extra += ["--teacher-path", teacher, "--kd-topk", preset["topk"]]
                inputs.append(teacher)
            extra += ["--criterion", "word_kd", "--kd-alpha", preset["kd_alpha"]]
            extra += ["--kd-temperature", preset["kd_temperature"]]
        extra += list(row.flags)
        models[row.name] = j(save, "checkpoint_last.pt")
        stages.append(
            Stage(
                f"student:{row.name}",
                outputs=[save],
                inputs=inputs,
                params={
                    "arch": s_arch,
                    "train": settings,
                    "extra": extra,
                    "dev": device,
                },
                steps=train_steps(ctx, data_dir, save, s_arch, settings, extra),
                group="students",
                resumable=True,
            )
        )

    # translation and speed ------------------------------------------------------
    for name, ckpt in models.items():
        out_dir = j(work, "translations", name)

        def translate_steps(tmp, out_dir=out_dir, ckpt=ckpt):
            out = tmp(out_dir)
            steps = [mkdir_step(out)]
            for split in ctx["eval_sets"]:
                for beam in EVAL_BEAMS:
                    steps.append(
                        Command(
                            generate_command(ctx, ckpt, split, beam),
                            on_output=_save_translation(
                                out, f"{split}.beam{beam}", j(text, f"{split}.{tgt}")
                            ),
                        )
                    )
            return steps

        stages.append(
            Stage(
                f"translate:{name}",
                outputs=[out_dir],
                inputs=[data_bin, ckpt],
                params={
                    "beams": list(EVAL_BEAMS),
                    "batch_size": preset["gen_batch_size"],
                    "cpu": preset.get("gen_cpu", True),
                    "max_len": preset.get("gen_max_len", 200),
                    "splits": list(ctx["eval_sets"]),
                },
                steps=translate_steps,
                group="translate",
            )
        )

    use_ct2 = not args.no_ct2 and ct2_available()
    ct2_dirs = []
    if use_ct2:
        test_src = j(sub, f"test.{src}")
        for name, ckpt in models.items():
            out_dir = j(work, "ct2", name)
            ct2_dirs.append(out_dir)

            def ct2_steps(tmp, out_dir=out_dir, ckpt=ckpt):
                out = tmp(out_dir)
                return [
                    mkdir_step(out),
                    Command(
                        ct2_convert_command(ckpt, data_bin, src, tgt, j(out, "model"))
                    ),
                    PyStep(
                        f"translate {test_src} with CTranslate2 int8 on the CPU, "
                        f"beams {list(EVAL_BEAMS)}, timed -> {out}",
                        lambda: ct2_translate(
                            j(out, "model"),
                            test_src,
                            out,
                            EVAL_BEAMS,
                            preset["gen_batch_size"],
                            post_process_symbol(args.subword),
                            preset.get("gen_max_len", 200),
                        ),
                    ),
                ]

            stages.append(
                Stage(
                    f"ct2:{name}",
                    outputs=[out_dir],
                    inputs=[ckpt, data_bin, test_src],
                    params={
                        "quantization": "int8",
                        "beams": list(EVAL_BEAMS),
                        "batch_size": preset["gen_batch_size"],
                        "max_len": preset.get("gen_max_len", 200),
                    },
                    steps=ct2_steps,
                    group="ct2",
                )
            )

    # score and table ------------------------------------------------------------
    scores = j(work, "scores.json")
    score_inputs = [j(text, f"{s}.{tgt}") for s in ctx["eval_sets"]]
    score_inputs += [j(work, "translations", n) for n in models] + ct2_dirs
    score_inputs += list(models.values())
    score_inputs += [engines_json] if engines_json else []
    score_inputs += [j(os.path.dirname(c), "train_time.json") for c in models.values()]
    stages.append(
        Stage(
            "score",
            outputs=[scores],
            inputs=score_inputs,
            params={"models": list(models)},
            steps=lambda tmp: [
                PyStep(
                    "sacreBLEU and chrF of every translation against the raw "
                    f"references, parameters and training times -> {tmp(scores)}",
                    lambda: compute_scores(ctx, models, tmp(scores)),
                )
            ],
            group="report",
        )
    )
    meta = {
        "recipe": ds.key,
        "corpus": ds.title,
        "pair": f"{src}-{tgt}",
        "preset": args.preset,
        "subword": args.subword,
        "command": reproduce_command(ds, args),
        "eval_sets": ctx["eval_sets"],
        "rows": [{"name": "teacher", "label": "teacher"}]
        + [
            {"name": r.name, "label": r.label, "data": r.data, "kd": r.kd} for r in rows
        ],
        "settings": {
            "teacher_arch": " ".join(map(str, preset["teacher_arch"])),
            "student_arch": " ".join(map(str, preset["student_arch"])),
            "teacher_train": preset["teacher_train"],
            "student_train": preset["student_train"],
            "row_updates": preset.get("row_updates", {}),
            "kd_alpha": preset["kd_alpha"],
            "kd_temperature": preset["kd_temperature"],
            "topk": preset["topk"],
            "gen_batch_size": preset["gen_batch_size"],
            "gen_max_len": preset.get("gen_max_len", 200),
            "gen_device": "cpu" if preset.get("gen_cpu", True) else "gpu",
            "vocab": preset["vocab"],
        },
        "reference": ds.reference,
    }
    outputs = {k: j(results, v) for k, v in report.OUTPUT_FILES.items()}
    stages.append(
        Stage(
            "table",
            outputs=list(outputs.values()),
            inputs=[scores],
            params={"meta": meta},
            steps=lambda tmp: [
                PyStep(
                    f"write {', '.join(report.OUTPUT_FILES.values())} into {results}",
                    lambda: report.write_results(
                        read_json(scores),
                        meta,
                        {k: tmp(v) for k, v in outputs.items()},
                        existing_md=outputs["markdown"],
                    ),
                )
            ],
            group="report",
        )
    )
    return Plan(
        stages=stages,
        work=work,
        results=results,
        rows=rows,
        paths={
            "raw": raw,
            "text": text,
            "subword": sub,
            "bin": data_bin,
            "teacher": teacher,
            "scores": scores,
            **{f"data:{k}": v for k, v in train_data.items()},
            **{f"topk:{k}": v for k, v in stores.items()},
        },
        meta=meta,
    )


# -- command line -------------------------------------------------------------


def parse_args(ds, argv=None):
    """Command-line options of a recipe."""
    p = argparse.ArgumentParser(
        description=f"{ds.title}: the Kim & Rush distillation table, staged and "
        "resumable (see fairseq_kd/recipe.py for the stages)"
    )
    p.add_argument("--preset", default=ds.default_preset, choices=list(ds.presets))
    p.add_argument("--src", default=ds.src, help="source language code")
    p.add_argument("--tgt", default=ds.tgt, help="target language code")
    p.add_argument(
        "--data",
        default=None,
        help="folder of raw parallel text named <stem>.<lang>[.gz] with stems "
        + ", ".join(ds.splits.values()),
    )
    if ds.fetch is not None:
        p.add_argument(
            "--download",
            action="store_true",
            help=f"download the public data into WORK/raw ({ds.fetch_describe})",
        )
    p.add_argument("--no-checksum", action="store_true", help="skip sha256 checks")
    p.add_argument(
        "--subword",
        default="spm",
        choices=["spm", "bpe"],
        help="joint sentencepiece unigram (default) or subword-nmt BPE",
    )
    p.add_argument(
        "--work",
        default=None,
        help="work folder (default: <recipe>/work/<src>-<tgt>.<preset>.<subword>)",
    )
    p.add_argument(
        "--results",
        default=None,
        help="where RESULTS.md, results.json and the plot go (default: WORK/results)",
    )
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated student rows to run (default: every enabled row; "
        "see --list)",
    )
    p.add_argument("--no-ct2", action="store_true", help="skip CTranslate2 speeds")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--from",
        dest="start",
        default=None,
        help="rerun this stage (or group) and every later one",
    )
    group.add_argument(
        "--only",
        default=None,
        help="run only these stages (names, groups or patterns such as "
        "'student:*', comma-separated)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print every command, run nothing"
    )
    p.add_argument("--list", action="store_true", help="list stages and rows")
    args = p.parse_args(argv)
    args.results_arg = os.path.abspath(args.results) if args.results else None
    return args


def main(ds, argv=None):
    """Run (or print) a recipe; returns the :class:`Plan`.

    Args:
        ds: the recipe's :class:`Dataset`.
        argv: command-line options (default ``sys.argv[1:]``).
    """
    args = parse_args(ds, argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import lowers it
    plan = build_plan(ds, args)
    runner = Pipeline(
        plan.stages,
        stamp_dir=os.path.join(plan.work, "stamps"),
        log_dir=os.path.join(plan.work, "logs"),
        dry_run=args.dry_run,
        aliases={"$WORK": plan.work, "$USER_DIR": USER_DIR},
    )
    if args.list:
        for stage in plan.stages:
            print(f"{stage.name:<28} {stage.group}")
        print("\nrows:")
        for row in ROWS:
            mark = "*" if row in plan.rows else " "
            print(f" {mark} {row.name:<22} {row.label}")
        return plan
    print(
        f"{ds.title} {args.src}-{args.tgt}, preset {args.preset}, "
        f"{args.subword}" + (" (dry run: nothing is executed)" if args.dry_run else ""),
        flush=True,
    )
    print(f"WORK={shlex.quote(plan.work)}\nUSER_DIR={shlex.quote(USER_DIR)}")
    if args.dry_run:
        print("# outputs are written as X.partial and renamed to X on success")
    start = time.time()
    runner.run(start=args.start, only=args.only)
    if not args.dry_run:
        print(f"all stages done in {time.time() - start:.0f}s; results: {plan.results}")
    return plan


def entry(ds):
    """``if __name__ == "__main__"`` helper for recipe scripts."""
    try:
        main(ds)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
