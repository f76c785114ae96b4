"""Benchmark: offline top-k store vs live teacher vs no teacher, on the CPU.

One command prepares a small real configuration (a slice of Multi30k de-en with
a joint sentencepiece vocabulary, or the synthetic test corpus), trains a
teacher briefly, then measures side by side in one run:

* the dump's throughput against a bare no-grad teacher forward over the same
  batches of the same split, and the store's bytes per target token;
* the time per update of one student trained on the same batches with
  (a) ``label_smoothed_cross_entropy``, (b) ``word_kd`` from the store and
  (c) ``word_kd`` with the live teacher, as ratios to (a), and the peak RSS of
  each run (every run is its own process; runs alternate over rounds).

Usage::

    python scripts/bench_offline.py --workdir /tmp/kd_bench
    python scripts/bench_offline.py --corpus synthetic --workdir /tmp/kd_bench_syn

Data, teacher and stores are cached in ``--workdir``; delete it to start over.
"""

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from kd_bench.data import normalise_line

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MULTI30K = os.path.join(REPO, "..", "shared", "data", "multi30k")
RESULT_TAG = "BENCH_RESULT "

TEACHER_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
    "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]  # fmt: skip
STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "3", "--decoder-layers", "1",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]  # fmt: skip
OPTIM = [
    "--optimizer", "adam", "--lr", "0.001", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "50", "--seed", "1", "--cpu", "--num-workers", "0",
]  # fmt: skip
RUNS = {
    "a": ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"],
    "b": ["--task", "translation_kd", "--teacher-topk", "{store}"]
    + ["--criterion", "word_kd", "--kd-alpha", "0.5"],
    "c": ["--task", "translation_kd", "--teacher-path", "{teacher}"]
    + ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-topk", "{k}"],
}
RUN_NAMES = {
    "a": "(a) label_smoothed_cross_entropy",
    "b": "(b) word_kd, offline store",
    "c": "(c) word_kd, live teacher",
}


def sh(cmd, env=None):
    """Run a command (fairseq CLIs from this interpreter's bin folder)."""
    if cmd[0].startswith("fairseq"):
        cmd = [os.path.join(os.path.dirname(sys.executable), cmd[0])] + cmd[1:]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(
            f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def prepare_multi30k(work, sentences, vocab):
    """Slice Multi30k de-en, learn a joint sentencepiece model, binarize."""
    import sentencepiece as spm

    bin_dir = os.path.join(work, "data-bin")
    if os.path.isfile(os.path.join(bin_dir, "dict.en.txt")):
        return bin_dir
    text = os.path.join(work, "text")
    os.makedirs(text, exist_ok=True)

    def read(name, limit=None):
        with gzip.open(os.path.join(MULTI30K, name), "rt", encoding="utf-8") as f:
            lines = [normalise_line(line) for line in f]
        return lines[:limit] if limit else lines

    splits = {
        "train": {lang: read(f"train.{lang}.gz", sentences) for lang in ("de", "en")},
        "valid": {lang: read(f"val.{lang}.gz") for lang in ("de", "en")},
    }
    joint = os.path.join(text, "joint.txt")
    with open(joint, "w") as f:
        for lang in ("de", "en"):
            f.write("\n".join(splits["train"][lang]) + "\n")
    spm.SentencePieceTrainer.train(
        input=joint,
        model_prefix=os.path.join(text, "spm"),
        vocab_size=vocab,
        model_type="unigram",
        character_coverage=1.0,
    )
    sp = spm.SentencePieceProcessor(model_file=os.path.join(text, "spm.model"))
    for split, langs in splits.items():
        for lang, lines in langs.items():
            with open(os.path.join(text, f"{split}.{lang}"), "w") as f:
                for line in lines:
                    f.write(" ".join(sp.encode(line, out_type=str)) + "\n")
    sh(
        ["fairseq-preprocess", "--source-lang", "de", "--target-lang", "en"]
        + ["--trainpref", os.path.join(text, "train")]
        + ["--validpref", os.path.join(text, "valid")]
        + ["--destdir", bin_dir, "--joined-dictionary", "--workers", "2"]
    )
    return bin_dir


def prepare_synthetic(work):
    """The synthetic corpus of the tests, binarized."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import corpus

    bin_dir = os.path.join(work, "data-bin")
    if not os.path.isfile(os.path.join(bin_dir, "dict.tgt.txt")):
        text = corpus.write_corpus(os.path.join(work, "text"))
        corpus.binarize(text, bin_dir)
    return bin_dir


def train_teacher(work, data, updates, max_tokens):
    """A briefly trained teacher (timings do not depend on its quality)."""
    save = os.path.join(work, "teacher")
    path = os.path.join(save, "checkpoint_last.pt")
    done = os.path.join(save, "DONE")
    if os.path.isfile(done):
        return path
    sh(
        ["fairseq-train", data, "--save-dir", save, "--max-update", str(updates)]
        + TEACHER_ARCH
        + OPTIM
        + ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
        + ["--max-tokens", str(max_tokens), "--no-epoch-checkpoints"]
        + ["--disable-validation", "--no-progress-bar"]
    )
    open(done, "w").close()
    return path


def bare_forward_seconds(data, teacher, split, max_tokens):
    """Seconds of a no-grad teacher forward over the dump's batches."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_kd.checkpoints import load_teacher_ensemble
    from fairseq_kd.dump_topk import make_plan

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, input_args=[data, "--task", "translation", "--arch", "transformer"]
    )
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset(split, combine=True)
    dataset = task.dataset(split)
    (model,) = load_teacher_ensemble(teacher, task)
    plan = make_plan(dataset, max_tokens, None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[b.tolist() for b in plan], collate_fn=dataset.collater
    )
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for sample in loader:
            model(**sample["net_input"])
            tokens += sample["ntokens"]
    return time.perf_counter() - start, tokens


def dump_seconds(data, teacher, split, out, k, max_tokens):
    """Run the dump in this process; return its loop seconds and statistics."""
    from fairseq_kd import dump_topk

    if os.path.exists(out):
        shutil.rmtree(out)
    argv = [data, "--path", teacher, "--output", out, "--gen-subset", split]
    argv += ["--k", str(k), "--cpu", "--max-tokens", str(max_tokens)]
    argv += ["--no-progress-bar", "--num-workers", "0"]  # as the bare forward
    start = time.perf_counter()
    stats = dump_topk.dump(dump_topk.parse(argv))
    stats["total_seconds"] = time.perf_counter() - start
    return stats


def child(args):
    """Train one configuration in this process and print per-update times."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    import fairseq_kd  # noqa: F401  (registers the task and criterion)

    torch.set_num_threads(args.threads)
    flags = [
        f.format(store=args.store, teacher=args.teacher, k=args.k)
        for f in RUNS[args.child]
    ]
    argv = [args.data] + STUDENT_ARCH + OPTIM + flags
    argv += ["--label-smoothing", "0.1", "--max-tokens", str(args.max_tokens)]
    argv += ["--dropout", "0.1", "--max-update", str(args.warmup + args.updates)]
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(parser, input_args=argv)
    )
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=True)
    times, losses = [], []
    total = args.warmup + args.updates
    while len(times) < total:
        itr = epoch_itr.next_epoch_itr(shuffle=True)
        last = time.perf_counter()
        for sample in itr:
            log = trainer.train_step([sample])
            now = time.perf_counter()
            times.append(now - last)
            losses.append(float(log["loss"]) if log else float("nan"))
            last = now
            if len(times) >= total:
                break
        else:
            epoch_itr = trainer.get_train_iterator(
                epoch_itr.next_epoch_idx, load_dataset=False
            )
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    result = {
        "run": args.child,
        "times": times[args.warmup :],
        "losses": losses,
        "peak_rss_mib": hwm / 1024,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(args, run, data, teacher, store):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", run]
    cmd += ["--data", data, "--teacher", teacher, "--store", store]
    cmd += ["--k", str(args.k), "--updates", str(args.updates)]
    cmd += ["--warmup", str(args.warmup), "--max-tokens", str(args.max_tokens)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    sys.exit(f"run {run} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def machine():
    """A short description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            )
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores (load average {load:.1f} at start)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/fairseq_kd_bench")
    parser.add_argument(
        "--corpus", choices=["multi30k", "synthetic"], default="multi30k"
    )
    parser.add_argument("--sentences", type=int, default=10000, help="Multi30k slice")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--teacher-updates", type=int, default=100)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--updates", type=int, default=30, help="timed updates per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first updates")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of a, b, c")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    # child mode (internal)
    parser.add_argument("--child", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    desc = machine()
    t0 = time.perf_counter()
    if args.corpus == "multi30k":
        data = prepare_multi30k(args.workdir, args.sentences, args.vocab)
    else:
        data = prepare_synthetic(args.workdir)
    teacher = train_teacher(args.workdir, data, args.teacher_updates, args.max_tokens)
    print(f"data and teacher ready ({time.perf_counter() - t0:.0f}s)", flush=True)

    # dump vs bare forward, alternating, best of rounds
    bare, dumps = [], []
    store = os.path.join(args.workdir, "store")
    for _ in range(args.rounds):
        bare.append(bare_forward_seconds(data, teacher, "train", args.max_tokens))
        dumps.append(
            dump_seconds(data, teacher, "train", store, args.k, args.max_tokens)
        )
    bare_s = min(s for s, _ in bare)
    tokens = bare[0][1]
    dump_s = min(d["seconds"] for d in dumps)
    dump_total = min(d["total_seconds"] for d in dumps)
    last = dumps[-1]
    print(f"dump: {dump_s:.2f}s loop, bare forward {bare_s:.2f}s", flush=True)

    # student runs, alternating order over rounds, each in its own process
    results = {r: [] for r in RUNS}
    for i in range(args.rounds):
        for run in ("a", "b", "c") if i % 2 == 0 else ("c", "b", "a"):
            results[run].append(run_child(args, run, data, teacher, store))
            print(
                f"round {i + 1} {run}: "
                f"{statistics.median(results[run][-1]['times']):.3f}s/update",
                flush=True,
            )
    per_update = {
        r: statistics.median(t for res in results[r] for t in res["times"])
        for r in RUNS
    }
    rss = {r: max(res["peak_rss_mib"] for res in results[r]) for r in RUNS}
    same_losses = results["a"][0]["losses"] == results["a"][-1]["losses"]

    header = last["header"]
    bytes_per_token = last["bytes"] / header["num_tokens"]
    report = {
        "machine": desc,
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "corpus": args.corpus,
        "train_sentences": header["num_sentences"],
        "train_target_tokens": header["num_tokens"],
        "vocab": header["target_dictionary"]["size"],
        "k": args.k,
        "bare_forward_tokens_per_s": tokens / bare_s,
        "dump_tokens_per_s": header["num_tokens"] / dump_s,
        "dump_vs_bare": bare_s / dump_s,
        "dump_total_seconds": dump_total,
        "bytes_per_token": bytes_per_token,
        "bytes_per_token_goal": 4 * args.k + 8,
        "avg_topk_mass": header["avg_topk_mass"],
        "seconds_per_update": per_update,
        "ratio_to_a": {r: per_update[r] / per_update["a"] for r in RUNS},
        "peak_rss_mib": rss,
        "updates_timed": args.updates * args.rounds,
        "deterministic_a": same_losses,
    }
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_report(report, args)


def print_report(r, args):
    """Print the results as a Markdown table."""
    print()
    print(f"Machine: {r['machine']}; torch threads: {args.threads}")
    print(f"Command: `python {r['command']}`")
    print(
        f"Data: {r['corpus']}, {r['train_sentences']:,} training sentences, "
        f"{r['train_target_tokens']:,} target tokens, vocabulary {r['vocab']:,}"
    )
    print()
    print("| run | s/update (median) | ratio to (a) | peak RSS (MiB) |")
    print("| --- | --- | --- | --- |")
    for run in RUNS:
        print(
            f"| {RUN_NAMES[run]} | {r['seconds_per_update'][run]:.3f} | "
            f"{r['ratio_to_a'][run]:.3f} | {r['peak_rss_mib'][run]:.0f} |"
        )
    print()
    print("| dump | value |")
    print("| --- | --- |")
    bare = r["bare_forward_tokens_per_s"]
    print(f"| bare no-grad teacher forward | {bare:,.0f} tokens/s |")
    print(f"| dump (loop) | {r['dump_tokens_per_s']:,.0f} tokens/s |")
    print(f"| dump / bare forward | {r['dump_vs_bare']:.3f} |")
    print(f"| dump, whole command in-process | {r['dump_total_seconds']:.1f} s |")
    print(
        f"| bytes per target token | {r['bytes_per_token']:.2f} "
        f"(goal <= {r['bytes_per_token_goal']}) |"
    )
    print(f"| average top-{r['k']} mass | {r['avg_topk_mass']:.4f} |")


if __name__ == "__main__":
    main()
