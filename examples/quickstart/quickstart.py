"""Quickstart: teacher -> word-level KD student -> BLEU/chrF, on the CPU.

Takes a small parallel corpus (Multi30k by default), trains a sentencepiece
model, binarizes, trains a small teacher, distils a smaller student from the
live teacher with ``--criterion word_kd``, translates the test set with both
and prints detokenised sacreBLEU and chrF. Each stage is skipped when its
output exists, so an interrupted run resumes.
"""

import argparse
import logging
import os
import sys
import time

from fairseq_kd import pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
USER_DIR = os.path.join(REPO, "fairseq_kd")

COMMON_TRAIN = [
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
    "--lr-scheduler", "inverse_sqrt", "--clip-norm", "1.0",
    "--label-smoothing", "0.1", "--cpu", "--seed", "1",
    "--no-epoch-checkpoints", "--no-last-checkpoints",
    "--log-format", "simple", "--log-interval", "50",
    "--share-all-embeddings", "--dropout", "0.1", "--num-workers", "0",
]  # fmt: skip

PRESETS = {
    # a few minutes on 2 CPU cores (a demonstration, not a benchmark)
    "small": {
        "vocab": 4000,
        "limit": None,
        "teacher": ["--encoder-layers", "2", "--decoder-layers", "2"]
        + ["--encoder-embed-dim", "128", "--decoder-embed-dim", "128"]
        + ["--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512"]
        + ["--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
        "student": ["--encoder-layers", "1", "--decoder-layers", "1"]
        + ["--encoder-embed-dim", "64", "--decoder-embed-dim", "64"]
        + ["--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256"]
        + ["--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
        "teacher_updates": 400,
        "student_updates": 300,
        "max_tokens": 4096,
        "lr": "3e-3",
        "warmup": 100,
    },
    # seconds: a smoke test of the whole pipeline on a slice of the corpus
    "tiny": {
        "vocab": 500,
        "limit": {"train": 2000, "valid": 100, "test": 100},
        "teacher": ["--encoder-layers", "1", "--decoder-layers", "1"]
        + ["--encoder-embed-dim", "64", "--decoder-embed-dim", "64"]
        + ["--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128"]
        + ["--encoder-attention-heads", "2", "--decoder-attention-heads", "2"],
        "student": ["--encoder-layers", "1", "--decoder-layers", "1"]
        + ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32"]
        + ["--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64"]
        + ["--encoder-attention-heads", "2", "--decoder-attention-heads", "2"],
        "teacher_updates": 60,
        "student_updates": 40,
        "max_tokens": 2048,
        "lr": "3e-3",
        "warmup": 20,
    },
}


def parse_args(argv=None):
    """Command-line options of the quickstart."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default=None,
        help="raw parallel data folder with Multi30k's layout (<split>.<lang>[.gz],"
        " splits train, val, test_2016_flickr); default: $MULTI30K_DIR, else "
        "../shared/data/multi30k when present",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download Multi30k's public raw files (sha256-checked) into WORK/raw",
    )
    p.add_argument("--no-checksum", action="store_true", help="skip sha256 checks")
    p.add_argument("--src", default="de", help="source language code")
    p.add_argument("--tgt", default="en", help="target language code")
    p.add_argument("--work", default=os.path.join(HERE, "work"), help="work folder")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--kd-alpha", default="0.5", help="word_kd --kd-alpha")
    p.add_argument("--kd-temperature", default="1.0", help="word_kd --kd-temperature")
    p.add_argument("--beam", type=int, default=5, help="beam size for translation")
    return p.parse_args(argv)


def resolve_data(args):
    """The raw data folder: --data, else the shared copy, else a download."""
    if args.data:
        if not os.path.isdir(args.data):
            raise SystemExit(f"--data {args.data}: no such folder")
        return args.data
    shared = pipeline.default_multi30k_folder(REPO)
    if shared and not args.download:
        return shared
    if not args.download:
        raise SystemExit(
            "no data: pass --data FOLDER, or --download to fetch Multi30k's "
            "public files (sha256-checked)"
        )
    return pipeline.download_multi30k(
        os.path.join(args.work, "raw"), args.src, args.tgt
    )


def stage(name, outputs, fn):
    """Run ``fn`` unless every path in ``outputs`` exists; print the time."""
    if all(os.path.exists(o) for o in outputs):
        print(f"[{name}] done already, skipped", flush=True)
        return
    start = time.time()
    print(f"[{name}] ...", flush=True)
    fn()
    print(f"[{name}] {time.time() - start:.0f}s", flush=True)


def train_cmd(data_bin, save_dir, arch, preset, updates, extra):
    """The ``fairseq-train`` command line of one model."""
    return (
        ["fairseq-train", data_bin, "--save-dir", save_dir, "--arch", "transformer"]
        # the plugin on every run, KD or not: it stops fairseq's batch
        # prefetching thread at exit (fairseq_kd/shutdown.py) and lets torch
        # resume from a checkpoint weights-only
        + ([] if "--user-dir" in extra else ["--user-dir", USER_DIR])
        + arch
        + COMMON_TRAIN
        + ["--max-update", updates, "--max-tokens", preset["max_tokens"]]
        + ["--lr", preset["lr"], "--warmup-updates", preset["warmup"]]
        + extra
    )


def train_model(cmd, save_dir):
    """Train into a temporary folder, then rename it: outputs are atomic."""
    tmp = save_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    pipeline.run(
        [c if c != save_dir else tmp for c in cmd],
        log_file=os.path.join(tmp, "train.log"),
        show=("| train |", "| valid |"),
    )
    os.replace(tmp, save_dir)


def main(argv=None):
    """Run the quickstart; return the results dict."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preset = PRESETS[args.preset]
    src, tgt, work = args.src, args.tgt, os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    raw = resolve_data(args)
    if not args.no_checksum:
        pipeline.verify_multi30k(raw, src, tgt)
    text, spm_text = os.path.join(work, "text"), os.path.join(work, "spm_text")
    spm_prefix, data_bin = os.path.join(work, "spm"), os.path.join(work, "bin")
    splits = ("train", "valid", "test")

    stage(
        "normalise",
        [os.path.join(text, f"{s}.{lang}") for s in splits for lang in (src, tgt)],
        lambda: pipeline.prepare_text(raw, text, src, tgt, limits=preset["limit"]),
    )
    stage(
        "sentencepiece",
        [spm_prefix + ".model"],
        lambda: pipeline.train_sentencepiece(
            text, spm_prefix, src, tgt, preset["vocab"]
        ),
    )
    stage(
        "encode",
        [os.path.join(spm_text, f"{s}.{lang}") for s in splits for lang in (src, tgt)],
        lambda: pipeline.encode_sentencepiece(
            spm_prefix + ".model", text, spm_text, splits, (src, tgt)
        ),
    )
    stage(
        "binarize",
        [os.path.join(data_bin, f"dict.{tgt}.txt")],
        lambda: pipeline.binarize(spm_text, data_bin, src, tgt),
    )
    teacher_dir = os.path.join(work, "teacher")
    teacher = os.path.join(teacher_dir, "checkpoint_best.pt")
    ls = ["--criterion", "label_smoothed_cross_entropy"]
    stage(
        "teacher",
        [teacher],
        lambda: train_model(
            train_cmd(
                data_bin,
                teacher_dir,
                preset["teacher"],
                preset,
                preset["teacher_updates"],
                ls,
            ),
            teacher_dir,
        ),
    )
    student_dir = os.path.join(work, "student_word_kd")
    student = os.path.join(student_dir, "checkpoint_best.pt")
    kd = ["--task", "translation_kd"]
    kd += ["--teacher-path", teacher, "--criterion", "word_kd"]
    kd += ["--kd-alpha", args.kd_alpha, "--kd-temperature", args.kd_temperature]
    stage(
        "student (word_kd)",
        [student],
        lambda: train_model(
            train_cmd(
                data_bin,
                student_dir,
                preset["student"],
                preset,
                preset["student_updates"],
                kd,
            ),
            student_dir,
        ),
    )

    refs = pipeline.read_lines(os.path.join(text, f"test.{tgt}"))
    results = {"preset": args.preset, "pair": f"{src}-{tgt}", "models": {}}
    for name, ckpt in (("teacher", teacher), ("student (word_kd)", student)):
        start = time.time()
        hyps, seconds = pipeline.translate(data_bin, ckpt, "test", args.beam)
        if len(hyps) != len(refs):
            raise RuntimeError(f"{name}: {len(hyps)} hypotheses, {len(refs)} refs")
        scores = pipeline.score(hyps, refs)
        scores["params"] = pipeline.count_parameters(ckpt)
        scores["translate_seconds"] = round(time.time() - start, 1)
        results["models"][name] = scores
        results["signature"] = scores.pop("bleu_signature")
        results["chrf_signature"] = scores.pop("chrf_signature")
    pipeline.write_json(os.path.join(work, "results.json"), results)

    print(f"\ntest set: {len(refs)} sentences, beam {args.beam}")
    print(f"{'model':<20} {'params':>10} {'BLEU':>6} {'chrF':>6}")
    for name, s in results["models"].items():
        print(f"{name:<20} {s['params']:>10,} {s['bleu']:>6.2f} {s['chrf']:>6.2f}")
    print(f"sacreBLEU: {results['signature']}\nchrF: {results['chrf_signature']}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
