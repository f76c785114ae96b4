"""fairseq-train exits cleanly: the batch prefetching thread is stopped at exit."""

import os
import queue
import subprocess
import sys
import threading
import time

import torch
from corpus import BIN, STUDENT_ARCH, USER_DIR
from fairseq.data.iterators import BufferedIterator

from fairseq_kd import shutdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A BufferedIterator whose producer is always inside a torch operation (which
# releases the GIL) when the main thread ends: the situation of fairseq-train
# stopped by --max-update in the middle of an epoch, made certain.
BUSY_PRODUCER = """
import sys, time
import torch
if sys.argv[1] == "plugin":
    import fairseq_kd  # noqa: F401
from fairseq.data.iterators import BufferedIterator

class Source:
    def __len__(self):
        return 10 ** 6

    def __iter__(self):
        x = torch.randn(96, 96)
        while True:
            for _ in range(400):
                x = torch.tanh(x @ x)
            yield x.sum()

it = BufferedIterator(2, Source())
next(it)
time.sleep(0.01)
print("main thread done", flush=True)
"""


class Endless:
    """An endless iterable of small tensors (fills any queue at once)."""

    def __len__(self):
        return 10**6

    def __iter__(self):
        while True:
            yield torch.zeros(2)


def run_probe(mode):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", BUSY_PRODUCER, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_busy_prefetch_thread_at_exit_does_not_abort_with_the_plugin():
    # without the plugin this probe dies with SIGABRT on Python 3.11
    # ("terminate called without an active exception", exit status 134)
    proc = run_probe("plugin")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "main thread done" in proc.stdout
    assert "terminate called" not in proc.stderr


def test_stop_background_consumers_ends_a_producer_blocked_on_a_full_queue():
    it = BufferedIterator(3, Endless())
    next(it)
    deadline = time.monotonic() + 10
    while it._queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the producer fills the queue, then blocks
    consumer = it._consumer
    assert consumer.is_alive()
    assert consumer in shutdown.background_consumers()
    assert shutdown.stop_background_consumers(timeout=10) >= 1
    assert not consumer.is_alive()
    assert consumer not in shutdown.background_consumers()
    with_items = [t for t in threading.enumerate() if t is consumer]
    assert with_items == []
    assert isinstance(it._queue, queue.Queue) and it._queue.qsize() == 0


#: consecutive runs of the statistical test (the issue's full form: 20); before
#: the fix 6 of 6 such runs aborted, and the probe above fails deterministically
EXIT_RUNS = int(os.environ.get("FAIRSEQ_KD_EXIT_RUNS", "8"))


def test_offline_training_exits_0_in_consecutive_runs(data_bin, topk_root):
    cmd = [
        os.path.join(BIN, "fairseq-train"), data_bin,
        "--user-dir", USER_DIR, "--task", "translation_kd",
        "--teacher-topk", topk_root, "--criterion", "word_kd", "--kd-alpha", "1",
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "2000",
        "--cpu", "--num-workers", "0", "--max-update", "1", "--no-save",
        "--no-progress-bar",
    ] + STUDENT_ARCH  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    codes, last_failure = [], ""
    for _ in range(EXIT_RUNS):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        codes.append(proc.returncode)
        if proc.returncode != 0:
            last_failure = proc.stderr[-1500:]
        else:
            assert "done training" in proc.stdout + proc.stderr
    assert codes == [0] * EXIT_RUNS, f"exit statuses {codes}\n{last_failure}"
