"""Overhead and peak memory of ``fairseq-kd-distill`` with the instant fake engine.

Usage (each size runs in its own process so that peak RSS is its own)::

    python scripts/bench_distill.py --sizes 100000 1000000 --out /tmp/bench

writes a synthetic binarized parallel corpus of each size (random words of a
joined 1000-word dictionary, 30 tokens a line on average), distils it with
``--engine fake --nbest 5`` and reports, per size: wall seconds, the seconds
spent inside the engine, the tool's own time per sentence (wall minus engine,
divided by sentences) and the process's peak RSS; then the RSS ratio of the
largest to the smallest size. ``--ct2-teacher CKPT --ct2-data BIN`` also
times the CTranslate2 engine per sentence on that teacher's ``--gen-subset``.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_WORDS = 1000


def make_corpus(folder: str, n: int, mean_len: int = 30, seed: int = 0) -> str:
    """Write a synthetic binarized ``train`` split of ``n`` pairs (joined dictionary).

    Args:
        folder: output folder (created).
        n: number of sentence pairs.
        mean_len: mean tokens per line.
        seed: random seed.

    Returns:
        ``folder``.
    """
    from fairseq.data import Dictionary, indexed_dataset

    os.makedirs(folder, exist_ok=True)
    d = Dictionary()
    for i in range(N_WORDS):
        d.add_symbol(f"w{i}")
    for lang in ("src", "tgt"):
        d.save(os.path.join(folder, f"dict.{lang}.txt"))
    import torch

    rng = np.random.default_rng(seed)
    eos, first = d.eos(), d.nspecial
    for lang in ("src", "tgt"):
        prefix = os.path.join(folder, f"train.src-tgt.{lang}")
        builder = indexed_dataset.make_builder(prefix + ".bin", "mmap", len(d))
        for start in range(0, n, 10000):  # in blocks: memory stays small
            m = min(10000, n - start)
            lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=m)
            tokens = rng.integers(first, first + N_WORDS, size=int(lengths.sum()))
            for item in np.split(tokens, np.cumsum(lengths)[:-1]):
                builder.add_item(torch.from_numpy(np.append(item, eos)))
        builder.finalize(prefix + ".idx")
    return folder


def run_one(data: str, out: str, extra=()) -> dict:
    """Distil ``data`` with the fake engine in this process; timings and peak RSS."""
    from fairseq_kd import distill

    t0 = time.time()
    args = distill.parse_args(
        [data, "--output", out, "--engine", "fake", "--beam", "5", "--nbest", "5"]
        + ["--no-progress-bar", "--chunk-size", "2000"]
        + list(extra)
    )
    summary = distill.distill(args)
    wall = time.time() - t0
    n = summary["sentences"]
    return {
        "sentences": n,
        "wall_seconds": round(wall, 2),
        "engine_seconds": summary["engine_seconds"],
        "merge_seconds": summary["merge_seconds"],
        "tool_us_per_sentence": round(1e6 * (wall - summary["engine_seconds"]) / n, 1),
        "peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }


def time_ct2(teacher: str, data: str, out: str, split: str, threads: int) -> dict:
    """The CTranslate2 engine's time per sentence on ``teacher`` (beam 5, 5-best)."""
    from fairseq_kd import distill

    args = distill.parse_args(
        [data, "--path", teacher, "--output", out, "--engine", "ctranslate2"]
        + ["--beam", "5", "--nbest", "5", "--gen-subset", split, "--cpu"]
        + ["--threads", str(threads), "--no-progress-bar", "--max-tokens", "12000"]
    )
    summary = distill.distill(args)
    n = summary["sentences"]
    return {
        "sentences": n,
        "engine_seconds": summary["engine_seconds"],
        "engine_us_per_sentence": round(1e6 * summary["engine_seconds"] / n, 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    p.add_argument("--out", default="/tmp/bench_distill", help="scratch folder")
    p.add_argument(
        "--ct2-teacher", help="teacher checkpoint for the CTranslate2 timing"
    )
    p.add_argument("--ct2-data", help="its binarized data folder")
    p.add_argument("--ct2-split", default="valid")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--make", type=int, help=argparse.SUPPRESS)  # child processes
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import fairseq_kd  # noqa: F401

    if args.make:
        make_corpus(os.path.join(args.out, f"data{args.make}"), args.make)
        return
    if args.one:
        data = os.path.join(args.out, f"data{args.one}")
        shutil.rmtree(os.path.join(args.out, f"out{args.one}"), ignore_errors=True)
        res = run_one(data, os.path.join(args.out, f"out{args.one}"))
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for n in args.sizes:
        me = [sys.executable, os.path.abspath(__file__), "--out", args.out]
        if not os.path.exists(os.path.join(args.out, f"data{n}", "dict.tgt.txt")):
            subprocess.run(me + ["--make", str(n)], check=True, env=env)
        proc = subprocess.run(
            me + ["--one", str(n)], capture_output=True, text=True, env=env
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"size {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[n] = json.loads(line[-1][len("RESULT ") :])
        print(json.dumps({n: results[n]}), flush=True)
    small, large = min(results), max(results)
    report = {
        "fake": results,
        "rss_ratio": round(
            results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"], 3
        ),
    }
    if args.ct2_teacher:
        ct2 = time_ct2(
            args.ct2_teacher,
            args.ct2_data,
            os.path.join(args.out, "ct2"),
            args.ct2_split,
            args.threads,
        )
        report["ctranslate2"] = ct2
        report["tool_over_ct2"] = round(
            results[large]["tool_us_per_sentence"] / ct2["engine_us_per_sentence"], 4
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
