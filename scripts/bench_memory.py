"""Benchmark: peak memory of word_kd's KD term against label-smoothed CE.

Two measurements:

* ``--criterion-level``: the criterion's forward and backward on a fake
  student whose logits come from a linear layer, peak bytes allocated (torch's
  CPU memory profiler) above the memory held before the forward, in units of
  one ``B x T x V`` float32 tensor. The sample (with the teacher's tensor)
  exists before the measurement and is not counted. ``--reference`` measures
  the pre-issue-10 implementation (``tests/kd_reference.py``) instead.
* end to end (the default): the excess peak RSS of a 2-update
  ``fairseq-train`` at ``--max-tokens 4096`` over the same run at
  ``--max-tokens 64``, for label-smoothed CE, ``word_kd`` with a live
  full-vocabulary teacher at T = 1 and T = 2, with ``--kd-topk 8``, and from a
  top-8 store, on a synthetic 32k vocabulary with a tiny model so that the
  logits dominate. It prints the ratios to label-smoothed CE and the goals
  (at most 1.5x with a live full-vocabulary teacher, 1.1x with top-k or a
  store). ``--small`` runs a reduced form in seconds (for the tests).

Usage::

    python scripts/bench_memory.py --criterion-level
    python scripts/bench_memory.py --criterion-level --reference
    python scripts/bench_memory.py            # end to end, about 32k vocabulary
    python scripts/bench_memory.py --small    # the tests' form
"""

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
USER_DIR = os.path.join(REPO, "fairseq_kd")

TINY_ARCH = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
]  # fmt: skip
TRAIN_FLAGS = [
    "--optimizer", "adam", "--lr", "0.0005", "--seed", "1", "--cpu",
    "--num-workers", "0", "--no-progress-bar", "--disable-validation",
    "--label-smoothing", "0.1",
]  # fmt: skip
KD = ["--task", "translation_kd", "--criterion", "word_kd", "--kd-alpha", "0.5"]
E2E_RUNS = [
    ("label_smoothed_cross_entropy", ["--criterion", "label_smoothed_cross_entropy"]),
    ("word_kd live, full vocabulary, T=1", KD + ["--teacher-path", "{teacher}"]),
    (
        "word_kd live, full vocabulary, T=2",
        KD + ["--teacher-path", "{teacher}", "--kd-temperature", "2"],
    ),
    (
        "word_kd live, --kd-topk 8",
        KD + ["--teacher-path", "{teacher}", "--kd-topk", "8"],
    ),
    ("word_kd from a top-8 store", KD + ["--teacher-topk", "{store}"]),
]
GOALS = [None, 1.5, 1.5, 1.1, 1.1]  # excess peak RSS / LS-CE's, at most

CRITERION_RUNS = [
    ("label_smoothed_cross_entropy", None),
    ("word_kd full vocabulary, T=1", {}),
    ("word_kd full vocabulary, T=2", {"kd_temperature": 2.0}),
    ("word_kd full vocabulary, --kd-selection batch", {"kd_selection": "batch"}),
    ("word_kd full vocabulary, --kd-selection global", {"kd_selection": "global"}),
    ("word_kd full vocabulary, reverse_kl", {"kd_divergence": "reverse_kl"}),
    ("word_kd full vocabulary, js", {"kd_divergence": "js"}),
    ("word_kd full teacher, --kd-topk 8", {"kd_topk": 8}),
    ("word_kd full teacher, --kd-topk 8, T=2", {"kd_topk": 8, "kd_temperature": 2.0}),
    ("word_kd top-8 support (store), T=1", {"store": True}),
    ("word_kd top-8 support (store), T=2", {"store": True, "kd_temperature": 2.0}),
]


# --------------------------------------------------------------------------
# criterion level


def peak_allocated(fn):
    """Peak CPU bytes allocated while ``fn()`` runs, above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def criterion_level(args):
    """Print the criterion-level peaks in B x T x V float32 units."""
    import torch
    from fairseq import utils
    from fairseq.criterions.label_smoothed_cross_entropy import (
        LabelSmoothedCrossEntropyCriterion,
    )
    from fairseq.data import Dictionary

    from fairseq_kd.criterions.word_kd import WordKDCriterion

    kd_class = WordKDCriterion
    if args.reference:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from kd_reference import ReferenceWordKD as kd_class

    torch.set_num_threads(1)
    B, T, V, H = args.batch, args.length, args.vocab, 8
    dictionary = Dictionary()
    for i in range(V - len(dictionary)):
        dictionary.add_symbol(f"w{i}")

    class Task:
        source_dictionary = target_dictionary = dictionary
        has_teacher = True

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = torch.nn.Parameter(torch.randn(B, T, H))
            self.out = torch.nn.Linear(H, V)

        def forward(self, **net_input):
            return self.out(self.hidden), {"attn": None}

        def get_normalized_probs(self, net_output, log_probs, sample=None):
            return utils.log_softmax(net_output[0], dim=-1)

        def get_targets(self, sample, net_output):
            return sample["target"]

    torch.manual_seed(0)
    pad = dictionary.pad()
    target = torch.randint(4, V, (B, T))
    target[0, T // 2 :] = pad
    teacher_full = torch.log_softmax(torch.randn(B, T, V), dim=-1)
    unit = B * T * V * 4
    label = "pre-issue-10 reference" if args.reference else "this tree"
    print(
        f"criterion-level peak, {label}: B={B} T={T} V={V}, units of B x T x V float32"
    )
    print(f"{'configuration':<52} {'peak':>6}")
    for name, options in CRITERION_RUNS:
        model = Student()
        sample = {
            "net_input": {},
            "target": target,
            "ntokens": int(target.ne(pad).sum()),
        }
        if options is None:
            crit = LabelSmoothedCrossEntropyCriterion(Task(), False, 0.1)
        else:
            options = dict(options)
            store = options.pop("store", False)
            crit = kd_class(Task(), False, 0.1, kd_alpha=0.5, **options)
            if store:
                values, indices = teacher_full.topk(8, dim=-1)
                sample["teacher"] = {"lprobs": values, "indices": indices}
            else:
                sample["teacher"] = {"lprobs": teacher_full}
        crit.train()

        def step():
            loss, _, _ = crit(model, sample)
            loss.backward()

        step()  # warm-up (lazy allocations, the selection queue)
        model.zero_grad(set_to_none=True)
        peak = peak_allocated(step)
        print(f"{name:<52} {peak / unit:>6.2f}")


# --------------------------------------------------------------------------
# end to end


def fairseq_cli(name):
    """The path of a fairseq console script next to this interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def sh(cmd):
    """Run a command quietly; raise with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def peak_rss_kib(cmd, log_path, glibc_default=False):
    """Run ``cmd`` as a child; return its peak RSS in KiB (``wait4``).

    Unless ``glibc_default``, glibc's mmap threshold is fixed at 128 KiB:
    every large tensor then has its own mapping, returned to the system when
    freed, so the peak RSS follows the tensors alive at once (by default glibc
    raises the threshold after the first large free and keeps later freed
    blocks in its heap, which makes the peak depend on allocation history).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"failed ({code}): {' '.join(cmd)}\n{tail}")
    return usage.ru_maxrss


def make_data(work, vocab, sentences, seed=0):
    """Random sentences over a ``vocab``-word dictionary, binarized."""
    rng = random.Random(seed)
    text = os.path.join(work, "text")
    os.makedirs(text, exist_ok=True)
    dict_path = os.path.join(work, "dict.txt")
    with open(dict_path, "w") as f:
        for i in range(vocab):
            f.write(f"w{i} 1\n")
    for split, n in (("train", sentences), ("valid", 8)):
        for side in ("src", "tgt"):
            with open(os.path.join(text, f"{split}.{side}"), "w") as f:
                for _ in range(n):
                    length = rng.randint(20, 40)
                    f.write(" ".join(f"w{rng.randrange(vocab)}" for _ in range(length)))
                    f.write("\n")
    data = os.path.join(work, "data-bin")
    sh(
        [fairseq_cli("fairseq-preprocess"), "--source-lang", "src"]
        + ["--target-lang", "tgt", "--trainpref", os.path.join(text, "train")]
        + ["--validpref", os.path.join(text, "valid"), "--destdir", data]
        + ["--srcdict", dict_path, "--tgtdict", dict_path, "--workers", "1"]
    )
    return data


def make_teacher(work, data):
    """A randomly initialised tiny teacher, saved by a 1-update fairseq-train."""
    save = os.path.join(work, "teacher")
    sh(
        [fairseq_cli("fairseq-train"), data, "--save-dir", save]
        + ["--max-update", "1", "--max-tokens", "1024", "--no-epoch-checkpoints"]
        + TINY_ARCH
        + TRAIN_FLAGS
        + ["--criterion", "label_smoothed_cross_entropy"]
    )
    return os.path.join(save, "checkpoint_last.pt")


def make_store(work, data, teacher, k=8):
    """A top-``k`` store of the teacher for the train and valid splits."""
    root = os.path.join(work, "store")
    for split in ("train", "valid"):
        sh(
            [sys.executable, "-m", "fairseq_kd.dump_topk", data, "--path", teacher]
            + ["--output", os.path.join(root, split), "--gen-subset", split]
            + ["--k", str(k), "--cpu", "--no-progress-bar", "--max-tokens", "1024"]
        )
    return root


def end_to_end(args):
    """Print the excess peak RSS of each run, its ratio to LS-CE and the goals."""
    vocab, sentences = (2000, 240) if args.small else (args.e2e_vocab, 600)
    big = 1024 if args.small else 4096
    work = args.workdir or tempfile.mkdtemp(prefix="kd_bench_memory_")
    os.makedirs(work, exist_ok=True)
    data = make_data(work, vocab, sentences)
    teacher = make_teacher(work, data)
    store = make_store(work, data, teacher)
    rows = []
    for i, (name, flags) in enumerate(E2E_RUNS):
        flags = [f.format(teacher=teacher, store=store) for f in flags]
        peaks = {}
        for max_tokens in (big, 64):
            cmd = [fairseq_cli("fairseq-train"), data, "--user-dir", USER_DIR]
            cmd += ["--max-update", "2", "--max-tokens", str(max_tokens), "--no-save"]
            cmd += TINY_ARCH + TRAIN_FLAGS + flags
            log = os.path.join(work, f"run{i}_{max_tokens}.log")
            peaks[max_tokens] = peak_rss_kib(cmd, log, args.glibc_default_malloc)
        rows.append((name, peaks[big], peaks[64], peaks[big] - peaks[64]))
    base = rows[0][3]
    unit_mib = big * vocab * 4 / 2**20
    print(
        f"end to end: excess peak RSS of a 2-update fairseq-train at --max-tokens "
        f"{big} over --max-tokens 64 (vocabulary {vocab}; one {big} x {vocab} "
        f"float32 tensor = {unit_mib:.0f} MiB)"
    )
    print(f"{'run':<40} {'peak MiB':>9} {'excess MiB':>11} {'ratio':>6} {'goal':>6}")
    for (name, peak, _, excess), goal in zip(rows, GOALS):
        ratio = excess / base if base > 0 else float("nan")
        verdict = "" if goal is None else ("ok" if ratio <= goal else "MISSED")
        goal_text = "" if goal is None else f"<={goal}"
        print(
            f"{name:<40} {peak / 1024:>9.1f} {excess / 1024:>11.1f} {ratio:>6.2f} "
            f"{goal_text:>6} {verdict}"
        )
    if not math.isfinite(base) or base <= 0:
        print("warning: label-smoothed CE shows no excess memory; ratios undefined")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--criterion-level",
        action="store_true",
        help="measure the criterion alone (torch's CPU memory profiler)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="with --criterion-level: the pre-issue-10 implementation",
    )
    parser.add_argument("--batch", type=int, default=16, help="criterion level: B")
    parser.add_argument("--length", type=int, default=128, help="criterion level: T")
    parser.add_argument("--vocab", type=int, default=8000, help="criterion level: V")
    parser.add_argument(
        "--e2e-vocab", type=int, default=32000, help="end to end: vocabulary size"
    )
    parser.add_argument(
        "--small", action="store_true", help="end to end, reduced (for the tests)"
    )
    parser.add_argument("--workdir", help="end to end: folder for data and models")
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="end to end: keep glibc's dynamic mmap threshold (see peak_rss_kib)",
    )
    args = parser.parse_args(argv)
    if args.criterion_level:
        criterion_level(args)
    else:
        end_to_end(args)


if __name__ == "__main__":
    main()
