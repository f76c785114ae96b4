"""scripts/gpu_check.py: its CPU form prints a complete table of finite figures."""

import importlib.util
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_form_prints_every_row_with_finite_figures_and_agreement():
    gpu_check = load_script()
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES=""
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index(gpu_check.TABLE_HEADER)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 7, line
        rows[(cells[0], cells[1])] = cells[2:]
    names = dict(gpu_check.RUNS)
    dump_rows = [
        "bare teacher forward (no grad)",
        f"dump top-{gpu_check.K} (batch loop, writes)",
    ]
    expected = {
        (p, r)
        for p in gpu_check.PRECISIONS["cpu"]
        for r in [*names.values(), *dump_rows]
    }
    assert set(rows) == expected
    for (precision, run), (peak, ms, kd, rel, ratio) in rows.items():
        assert peak == "—"  # no CUDA: no peak memory
        assert math.isfinite(float(ms)) and float(ms) > 0
        if run.startswith("word_kd"):
            assert math.isfinite(float(kd)) and float(kd) > 0
            assert float(rel) <= gpu_check.TOLERANCE[precision], (precision, run, rel)
        else:
            assert kd == rel == "—"
        if run.startswith("dump"):
            assert 0 < float(ratio) <= 10
