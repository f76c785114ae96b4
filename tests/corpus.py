"""A small synthetic translation corpus and tiny models for end-to-end tests.

Source sentences are random words; each source word translates to one target
word, except a few ambiguous words that have two translations (chosen 70/30),
so a trained teacher has soft distributions worth distilling.
"""

import os
import random
import subprocess
import sys

N_WORDS = 40
AMBIGUOUS = 8  # words 0..7 have two translations

TINY_ARCH = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
]  # fmt: skip

STUDENT_ARCH = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
]  # fmt: skip

TRAIN_FLAGS = [
    "--optimizer", "adam", "--lr", "0.005",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "30",
    "--max-tokens", "2000", "--cpu", "--seed", "1",
    "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
    "--no-progress-bar", "--num-workers", "0",
]  # fmt: skip

BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fairseq_kd")


def translate_word(i, rng):
    """Target word for source word ``i`` (ambiguous words pick one of two)."""
    if i < AMBIGUOUS and rng.random() < 0.3:
        return f"t{N_WORDS + i}"
    return f"t{(i * 7) % N_WORDS}"


def write_corpus(folder, sizes=(("train", 1500), ("valid", 80), ("test", 60)), seed=0):
    """Write ``<split>.src`` / ``<split>.tgt`` text files into ``folder``.

    Args:
        folder: output folder (created).
        sizes: (split, number of sentences) pairs.
        seed: random seed.
    """
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes:
        with open(os.path.join(folder, f"{split}.src"), "w") as fs, open(
            os.path.join(folder, f"{split}.tgt"), "w"
        ) as ft:
            for _ in range(n):
                ids = [rng.randrange(N_WORDS) for _ in range(rng.randint(3, 9))]
                fs.write(" ".join(f"s{i}" for i in ids) + "\n")
                ft.write(" ".join(translate_word(i, rng) for i in ids) + "\n")
    return folder


def run(cmd, env=None, check=True, **kw):
    """Run a fairseq command line; return the completed process (text output)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    if cmd[0].startswith("fairseq"):
        cmd = [os.path.join(BIN, cmd[0])] + list(cmd[1:])
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def binarize(text_dir, dest, extra=()):
    """``fairseq-preprocess`` the corpus in ``text_dir`` with a joined dictionary."""
    pref = lambda s: os.path.join(text_dir, s)  # noqa: E731
    run(
        ["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt"]
        + ["--trainpref", pref("train"), "--validpref", pref("valid")]
        + ["--testpref", pref("test"), "--destdir", dest, "--workers", "1"]
        + (["--joined-dictionary"] if "--srcdict" not in extra else [])
        + list(extra)
    )
    return dest


def train(data, save_dir, extra=(), arch=TINY_ARCH, updates=300, env=None):
    """Train with ``fairseq-train``; return the completed process.

    The plugin is always loaded (``--user-dir``), as the recipes do: it stops
    fairseq's batch prefetching thread at exit (``fairseq_kd.shutdown``).
    """
    user_dir = [] if "--user-dir" in extra else ["--user-dir", USER_DIR]
    return run(
        ["fairseq-train", data, "--save-dir", save_dir, "--max-update", str(updates)]
        + user_dir
        + list(arch)
        + TRAIN_FLAGS
        + list(extra),
        env=env,
    )


def json_logs(output, kind="train"):
    """The JSON log records of one kind (``train_inner``, ``train``, ``valid``)."""
    import json

    records = []
    for line in output.splitlines():
        start = line.find("{")
        if start < 0 or f"| {kind} |" not in line:
            continue
        try:
            records.append(json.loads(line[start:]))
        except ValueError:
            continue
    return records
