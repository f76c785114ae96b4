"""GPU check: peak memory, step time, kd_loss agreement per precision; dump speed.

Builds, in this process and with random weights, a transformer-base-sized
student and a transformer-big-sized teacher through the ``translation_kd``
task (a generated dictionary of 32k symbols, no data files), and measures on
random 4k-token batches, under fp32, fp16, bf16 and amp (float32 weights under
float16 autocast, as fairseq's ``--amp``):

* for ``label_smoothed_cross_entropy``, ``word_kd`` with a live teacher (whole
  vocabulary and ``--kd-topk 8``) and ``word_kd`` from a store (the store's
  sample format: top-8 float16 log-probabilities and int64 ids), the peak
  memory (``torch.cuda.max_memory_allocated``) and the time of one step
  (teacher forward, student forward, criterion and backward);
* the kd_loss of each precision relative to fp32's (same weights, same batch);
* the dump's batch loop (top-8, written to a store in a temporary folder)
  against a bare no-grad teacher forward over the same batches.

It prints one Markdown table. ``--cpu`` (or a machine without CUDA) runs small
sizes (d=64/128 models, a 2k vocabulary, 256-token batches) under fp32, bf16
and amp with bfloat16 autocast, in well under a minute.

Usage::

    python scripts/gpu_check.py            # CUDA: under 8 minutes
    python scripts/gpu_check.py --cpu
"""

import argparse
import copy
import datetime
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fairseq import models, options  # noqa: E402
from fairseq.criterions.label_smoothed_cross_entropy import (  # noqa: E402
    LabelSmoothedCrossEntropyCriterion,
)
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from fairseq_kd import dump_topk  # noqa: E402
from fairseq_kd.criterions.word_kd import WordKDCriterion  # noqa: E402
from fairseq_kd.tasks.translation_kd import (  # noqa: E402
    TranslationKDConfig,
    TranslationKDTask,
)
from fairseq_kd.teacher import resolve_precision, teacher_distribution  # noqa: E402
from fairseq_kd.topk_store import TopKWriter  # noqa: E402

SIZES = {
    "cuda": {
        "vocab": 32000,
        "batch": (128, 32),  # sentences x tokens: 4,096 target tokens
        "student": (6, 6, 512, 2048, 8),  # layers enc/dec, dim, ffn, heads
        "teacher": (6, 6, 1024, 4096, 16),
        "steps": 5,
        "warmup": 2,
        "dump_batches": 10,
    },
    "cpu": {
        "vocab": 2000,
        "batch": (16, 16),
        "student": (1, 1, 64, 128, 2),
        "teacher": (2, 2, 128, 256, 4),
        "steps": 3,
        "warmup": 1,
        "dump_batches": 4,
    },
}
PRECISIONS = {"cuda": ("fp32", "fp16", "bf16", "amp"), "cpu": ("fp32", "bf16", "amp")}
RUNS = (
    ("ls_ce", "label_smoothed_cross_entropy"),
    ("live", "word_kd, live teacher, full vocabulary"),
    ("live_top8", "word_kd, live teacher, --kd-topk 8"),
    ("store_top8", "word_kd, store (top-8 float16)"),
)
K = 8
# relative kd_loss agreement with fp32 accepted by the test of the CPU form
TOLERANCE = {"fp32": 1e-6, "fp16": 2e-2, "bf16": 5e-2, "amp": 5e-2}
TABLE_HEADER = (
    "| precision | run | peak memory (MiB) | ms per step | kd_loss (nats/token) | "
    "kd_loss rel. diff to fp32 | throughput vs bare forward |"
)


def make_task(vocab):
    """A ``translation_kd`` task over a generated dictionary of ``vocab`` symbols."""
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    cfg = TranslationKDConfig(
        data="unused",
        teacher_path="in-memory",
        dataset_impl="mmap",
        train_subset="train",
        required_seq_len_multiple=1,
    )
    return TranslationKDTask(cfg, d, d)


def build_transformer(task, layers_enc, layers_dec, dim, ffn, heads, seed):
    """fairseq's ``transformer`` with the given sizes and random weights."""
    argv = ["unused", "--task", "translation", "--arch", "transformer"]
    argv += ["--encoder-layers", str(layers_enc), "--decoder-layers", str(layers_dec)]
    argv += ["--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim)]
    argv += ["--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn)]
    argv += ["--encoder-attention-heads", str(heads)]
    argv += ["--decoder-attention-heads", str(heads)]
    argv += ["--share-all-embeddings", "--dropout", "0"]  # deterministic losses
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(parser, input_args=argv)
    )
    torch.manual_seed(seed)
    return models.build_model(cfg.model, task)


def random_batch(task, bsz, tlen, seed, device):
    """A collated batch of random tokens (no padding), on ``device``."""
    d = task.target_dictionary
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(d.nspecial, len(d), (bsz, tlen), generator=g)
    target = torch.randint(d.nspecial, len(d), (bsz, tlen), generator=g)
    prev = torch.cat([torch.full((bsz, 1), d.eos()), target[:, :-1]], dim=1)
    return {
        "id": torch.arange(bsz) + seed * bsz,
        "net_input": {
            "src_tokens": src.to(device),
            "src_lengths": torch.full((bsz,), tlen).to(device),
            "prev_output_tokens": prev.to(device),
        },
        "target": target.to(device),
        "ntokens": bsz * tlen,
        "nsentences": bsz,
    }


class Timer:
    """Wall-clock seconds of a block, synchronising CUDA around it."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def student_autocast(precision, device):
    """The student's autocast: fairseq's --amp (float16 on CUDA, bf16 on a CPU)."""
    if precision != "amp":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(
        device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16
    )


def place(model, precision, device):
    """A copy of ``model`` as fairseq's trainer would cast the student."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    model = copy.deepcopy(model).to(device)
    return model.to(dtype) if dtype is not None else model


def store_teacher(teacher, batch, device):
    """The store's sample format: fp32 top-8 under the teacher, as float16."""
    with torch.no_grad():
        values, indices = teacher_distribution(
            [teacher], batch["net_input"], topk=K
        )  # B x T x 8
    return {"lprobs": values.half().to(device), "indices": indices.to(device)}


def step(task, student, criterion, batch, precision, device, store=None):
    """One training step; returns (seconds, peak bytes over the start, kd_loss)."""
    cuda = device.type == "cuda"
    sample = dict(batch)
    if store is not None:
        sample["teacher"] = store
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    student.zero_grad(set_to_none=True)
    with Timer(cuda) as timer:
        with student_autocast(precision, device):
            if isinstance(criterion, WordKDCriterion):
                task.attach_teacher(sample, student, criterion)
            loss, _, log = criterion(student, sample)
        loss.backward()
    peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
    kd = float(log["kd_loss"]) / sample["ntokens"] if "kd_loss" in log else None
    del sample, loss, log
    return timer.seconds, peak, kd


def measure_runs(task, master_student, master_teacher, size, precision, device):
    """Rows of every criterion run under ``precision``."""
    student = place(master_student, precision, device)
    student.train()
    teacher = copy.deepcopy(master_teacher).to(device).eval().requires_grad_(False)
    task.teachers = [teacher]  # the task casts it (--teacher-precision auto)
    bsz, tlen = size["batch"]
    batches = [
        random_batch(task, bsz, tlen, seed, device)
        for seed in range(size["warmup"] + size["steps"])
    ]
    fp32_teacher = master_teacher.to(device)
    stores = [store_teacher(fp32_teacher, b, device) for b in batches]
    rows = {}
    for run, _ in RUNS:
        if run == "ls_ce":
            criterion = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
        else:
            topk = K if run == "live_top8" else 0
            criterion = WordKDCriterion(task, False, 0.1, kd_alpha=0.5, kd_topk=topk)
        if precision == "fp16":
            criterion = criterion.half()  # as fairseq's trainer does
        elif precision == "bf16":
            criterion = criterion.to(torch.bfloat16)
        times, peaks, kds = [], [], []
        for i, batch in enumerate(batches):
            store = stores[i] if run == "store_top8" else None
            seconds, peak, kd = step(
                task, student, criterion, batch, precision, device, store
            )
            if i >= size["warmup"]:
                times.append(seconds)
                peaks.append(peak)
                kds.append(kd)
        rows[run] = {
            "ms": 1000 * statistics.median(times),
            "peak_mib": max(peaks) / 2**20,
            "kd_loss": None if kds[0] is None else statistics.mean(kds),
        }
    task.teachers = None
    del student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_dump(task, master_teacher, size, precision, device):
    """Seconds of a bare forward and of the dump's batch loop, same batches."""
    cuda = device.type == "cuda"
    option = {"amp": "auto"}.get(precision, precision)
    autocast = None
    if precision == "amp":
        autocast = torch.float16 if cuda else torch.bfloat16
    teacher_precision = resolve_precision(option, torch.float32, autocast)
    teacher = copy.deepcopy(master_teacher).to(device, teacher_precision.weights)
    teacher.eval().requires_grad_(False)
    bsz, tlen = size["batch"]
    n = size["dump_batches"]
    batches = [random_batch(task, bsz, tlen, seed, "cpu") for seed in range(n)]
    on_device = [random_batch(task, bsz, tlen, seed, device) for seed in range(n)]
    pad = task.target_dictionary.pad()
    lengths = np.full(n * bsz, tlen, dtype=np.int64)

    def bare():
        with torch.no_grad(), teacher_precision.context(device.type):
            for b in on_device:
                teacher(**b["net_input"])

    def loop(folder):
        """Seconds of the batch loop alone (not the store's creation or header)."""
        signature = {"target_dictionary": {"size": len(task.target_dictionary)}}
        writer = TopKWriter(folder, signature, lengths, K)
        with Timer(cuda) as timer:
            dump_topk.write_batches(
                batches,
                [teacher],
                writer,
                K,
                pad,
                lengths,
                commit_interval=10**9,
                use_cuda=cuda,
                precision=teacher_precision,
            )
        writer.finalize()
        return timer.seconds

    bare()  # warm-up
    with Timer(cuda) as t_bare:
        bare()
    with tempfile.TemporaryDirectory() as tmp:
        loop(os.path.join(tmp, "warmup"))
        dump_seconds = loop(os.path.join(tmp, "store"))
    return {"bare_ms": 1000 * t_bare.seconds / n, "dump_ms": 1000 * dump_seconds / n}


def fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def table(results, precisions):
    """The Markdown table (one string)."""
    lines = [TABLE_HEADER, "| --- | --- | --- | --- | --- | --- | --- |"]
    names = dict(RUNS)
    for precision in precisions:
        rows = results[precision]["runs"]
        for run, _ in RUNS:
            row = rows[run]
            ref = results["fp32"]["runs"][run]["kd_loss"]
            rel = None
            if row["kd_loss"] is not None and ref:
                rel = abs(row["kd_loss"] - ref) / abs(ref)
            lines.append(
                f"| {precision} | {names[run]} | {fmt(row['peak_mib'], '.0f')} | "
                f"{fmt(row['ms'], '.2f')} | {fmt(row['kd_loss'], '.5f')} | "
                f"{fmt(rel, '.2e')} | — |"
            )
        d = results[precision]["dump"]
        lines.append(
            f"| {precision} | bare teacher forward (no grad) | — | "
            f"{fmt(d['bare_ms'], '.2f')} | — | — | 1.000 |"
        )
        lines.append(
            f"| {precision} | dump top-{K} (batch loop, writes) | — | "
            f"{fmt(d['dump_ms'], '.2f')} | — | — | "
            f"{fmt(d['bare_ms'] / d['dump_ms'], '.3f')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    kind = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(kind)
    size = SIZES[kind]
    precisions = PRECISIONS[kind]
    t0 = time.perf_counter()
    task = make_task(size["vocab"])
    master_student = build_transformer(task, *size["student"], seed=1)
    master_teacher = build_transformer(task, *size["teacher"], seed=2)
    master_teacher.eval().requires_grad_(False)
    results = {}
    for precision in precisions:
        results[precision] = {
            "runs": measure_runs(
                task, master_student, master_teacher, size, precision, device
            ),
            "dump": measure_dump(task, master_teacher, size, precision, device),
        }
        master_teacher.to("cpu")
    name = torch.cuda.get_device_name() if kind == "cuda" else "CPU"
    bsz, tlen = size["batch"]
    n_student = sum(p.numel() for p in master_student.parameters())
    n_teacher = sum(p.numel() for p in master_teacher.parameters())
    print(
        f"Device: {name}; torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; {time.perf_counter() - t0:.0f}s"
    )
    print(
        f"Student {n_student:,} parameters, teacher {n_teacher:,}; vocabulary "
        f"{size['vocab']:,}; batches of {bsz} x {tlen} = {bsz * tlen:,} target "
        f"tokens; median of {size['steps']} steps after {size['warmup']}; "
        "dropout 0; amp = float32 weights under "
        f"{'float16' if kind == 'cuda' else 'bfloat16'} autocast; peak memory "
        "is the step's peak over what was allocated before it"
    )
    print()
    print(table(results, precisions))
    return results


if __name__ == "__main__":
    main()
