"""Building blocks of the recipes: data, subwords, binarization, scoring."""

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

logger = logging.getLogger(__name__)

#: This package's folder: ``--user-dir`` for fairseq's commands.
USER_DIR = os.path.dirname(os.path.abspath(__file__))

MULTI30K_URL = (
    "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
)
# sha256 of the unzipped text of each file, from ../shared/data/multi30k/README.md
MULTI30K_SHA256 = {
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test_2016_flickr.de": (
        "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"
    ),
    "test_2016_flickr.en": (
        "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"
    ),
}
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}

_SPACES = re.compile(r"\s+")


def default_multi30k_folder(start):
    """Where a local copy of Multi30k's raw files lives, or None.

    Looks at ``$MULTI30K_DIR``, then ``shared/data/multi30k`` beside ``start``
    or any of its parent folders (our machines keep it at ``../shared`` from
    the repository's root).

    Args:
        start: the folder to search from (the repository's root).
    """
    env = os.environ.get("MULTI30K_DIR")
    if env:
        return env
    folder = os.path.abspath(start)
    while True:
        candidate = os.path.join(folder, "shared", "data", "multi30k")
        if os.path.isdir(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def fairseq_env():
    """Environment for fairseq's own commands: unbuffered output.

    Nothing here relaxes torch's weights-only loading: the recipes pass
    ``--user-dir fairseq_kd`` to the fairseq commands that load checkpoints,
    and the plugin lets torch read the ``argparse.Namespace`` of a
    ``fairseq-train`` checkpoint and nothing else.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream fairseq's progress lines
    return env


def bin_path(name):
    """Path of a console script installed beside this Python."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def run(cmd, log_file=None, show=()):
    """Run a command, failing loudly with the tail of its output on error.

    The output is streamed: lines containing one of ``show`` are echoed as
    they come (fairseq's progress lines), all of it goes to ``log_file``.

    Args:
        cmd: the command line (list); a first item naming a console script is
            resolved next to the running Python.
        log_file: where to keep the full output (optional).
        show: substrings of the lines to echo while the command runs.

    Returns:
        The command's whole output (stdout and stderr together).
    """
    cmd = [bin_path(cmd[0])] + [str(c) for c in cmd[1:]]
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        env=fairseq_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    log = open(log_file, "w") if log_file else None
    try:
        for line in proc.stdout:
            lines.append(line)
            if log:
                log.write(line)
            if any(s in line for s in show):
                print("    " + line.rstrip()[-150:], flush=True)
    finally:
        proc.wait()
        if log:
            log.close()
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            + output[-3000:]
        )
    return output


def sha256_text(path):
    """sha256 of a text file's bytes (gunzipped when it ends in ``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    h = hashlib.sha256()
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_file(folder, stem):
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (else None)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def download_multi30k(dest, src, tgt):
    """Download Multi30k task-1 raw files for a language pair, checking sha256.

    Args:
        dest: folder to write ``<split>.<lang>.gz`` into.
        src: source language code.
        tgt: target language code.
    """
    os.makedirs(dest, exist_ok=True)
    for split in MULTI30K_SPLITS.values():
        for lang in (src, tgt):
            name = f"{split}.{lang}.gz"
            path = os.path.join(dest, name)
            if os.path.exists(path):
                continue
            logger.info("downloading %s", MULTI30K_URL + name)
            tmp = path + ".part"
            with urllib.request.urlopen(MULTI30K_URL + name) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(tmp, path)
    return dest


def verify_multi30k(folder, src, tgt):
    """Refuse Multi30k files whose sha256 differs from the published ones.

    Only files with a known checksum (de-en here) are checked.

    Args:
        folder: the data folder.
        src: source language code.
        tgt: target language code.
    """
    for split in MULTI30K_SPLITS.values():
        for lang in (src, tgt):
            stem = f"{split}.{lang}"
            expected = MULTI30K_SHA256.get(stem)
            path = find_file(folder, stem)
            if expected is None or path is None:
                continue
            actual = sha256_text(path)
            if actual != expected:
                raise ValueError(
                    f"{path}: sha256 {actual} differs from the published "
                    f"{expected}; the file is corrupted or not Multi30k "
                    "(pass --no-checksum to use your own corpus)"
                )


def normalise_line(line):
    """Normalise whitespace: non-breaking and repeated spaces, trailing blanks."""
    return _SPACES.sub(" ", line.replace("\u00a0", " ")).strip()


def read_lines(path, limit=None):
    """Lines of a (possibly gzipped) UTF-8 text file, without newlines."""
    opener = gzip.open if path.endswith(".gz") else open
    lines = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            lines.append(line.rstrip("\n"))
    return lines


def write_lines(path, lines):
    """Write lines atomically (a temporary file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def prepare_text(folder, out_dir, src, tgt, splits=MULTI30K_SPLITS, limits=None):
    """Normalise the raw corpus into ``out_dir/<split>.<lang>``.

    Args:
        folder: raw data folder with ``<name>.<lang>[.gz]`` files.
        out_dir: output folder.
        src: source language code.
        tgt: target language code.
        splits: fairseq split name -> file stem in ``folder``.
        limits: optional fairseq split name -> maximum number of lines.
    """
    os.makedirs(out_dir, exist_ok=True)
    for split, stem in splits.items():
        sides = {}
        for lang in (src, tgt):
            path = find_file(folder, f"{stem}.{lang}")
            if path is None:
                raise FileNotFoundError(
                    f"no {stem}.{lang}[.gz] in {folder} (expected the layout of "
                    "Multi30k's data/task1/raw)"
                )
            limit = (limits or {}).get(split)
            sides[lang] = [normalise_line(x) for x in read_lines(path, limit)]
        if len(sides[src]) != len(sides[tgt]):
            raise ValueError(
                f"{split}: {len(sides[src])} {src} lines but {len(sides[tgt])} "
                f"{tgt} lines"
            )
        for lang in (src, tgt):
            write_lines(os.path.join(out_dir, f"{split}.{lang}"), sides[lang])
    return out_dir


def train_sentencepiece(text_dir, model_prefix, src, tgt, vocab_size, seed=1):
    """Train a joint sentencepiece unigram model on the training text.

    Args:
        text_dir: folder with ``train.<src>`` and ``train.<tgt>``.
        model_prefix: output prefix (``.model`` and ``.vocab`` are written).
        src: source language code.
        tgt: target language code.
        vocab_size: subword vocabulary size.
        seed: unused by sentencepiece's unigram trainer; kept for the record.
    """
    import sentencepiece as spm

    inputs = ",".join(os.path.join(text_dir, f"train.{lang}") for lang in (src, tgt))
    spm.SentencePieceTrainer.train(
        input=inputs,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        input_sentence_size=1000000,
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    return model_prefix + ".model"


def encode_sentencepiece(model, text_dir, out_dir, splits, langs):
    """Encode ``text_dir/<split>.<lang>`` into subword pieces in ``out_dir``.

    Args:
        model: sentencepiece model file.
        text_dir: folder of normalised text.
        out_dir: output folder.
        splits: split names.
        langs: language codes.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    os.makedirs(out_dir, exist_ok=True)
    for split in splits:
        for lang in langs:
            lines = read_lines(os.path.join(text_dir, f"{split}.{lang}"))
            pieces = [" ".join(sp.encode(x, out_type=str)) for x in lines]
            write_lines(os.path.join(out_dir, f"{split}.{lang}"), pieces)
    return out_dir


def binarize(spm_dir, dest, src, tgt, workers=2):
    """``fairseq-preprocess`` with a joined dictionary into ``dest``."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run(
        ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
        + ["--trainpref", os.path.join(spm_dir, "train")]
        + ["--validpref", os.path.join(spm_dir, "valid")]
        + ["--testpref", os.path.join(spm_dir, "test")]
        + ["--destdir", tmp, "--joined-dictionary", "--workers", str(workers)]
    )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def parse_generate_output(output):
    """Hypotheses (detokenised ``D-`` lines, else ``H-``) in corpus order."""
    hyps = {}
    for line in output.splitlines():
        for tag in ("D-", "H-"):
            if line.startswith(tag):
                sid, _, text = line[len(tag) :].split("\t", 2)
                if tag == "D-" or int(sid) not in hyps:
                    hyps[int(sid)] = text
    if sorted(hyps) != list(range(len(hyps))):
        raise RuntimeError("fairseq-generate output is missing sentence ids")
    return [hyps[i] for i in range(len(hyps))]


def translate(data_bin, checkpoint, split, beam, batch_size=128, extra=()):
    """Translate a split with ``fairseq-generate``; return (hyps, seconds).

    Args:
        data_bin: binarized data folder.
        checkpoint: model checkpoint.
        split: split to translate.
        beam: beam size (1 is greedy).
        batch_size: sentences per batch.
        extra: more ``fairseq-generate`` flags.
    """
    start = time.time()
    output = run(
        ["fairseq-generate", data_bin, "--path", checkpoint, "--gen-subset", split]
        # the plugin lets torch load the checkpoint weights-only
        + ["--user-dir", USER_DIR]
        + ["--beam", beam, "--batch-size", batch_size, "--cpu"]
        + ["--post-process", "sentencepiece"]
        # ve-fairseq 0.12.3 drops the final partial batch when batch sizes must
        # be multiples of 8 (fairseq's default): with 1 every sentence is kept
        + ["--required-batch-size-multiple", "1"]
        # hypotheses of at most 1.2 x source + 10 tokens (fairseq's default is
        # 200 tokens, which lets an undertrained model loop for long)
        + ["--max-len-a", "1.2", "--max-len-b", "10"]
        + list(extra)
    )
    seconds = time.time() - start
    return parse_generate_output(output), seconds


def score(hyps, refs):
    """Corpus BLEU and chrF (sacrebleu, detokenised) and their signatures."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    return {
        "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def count_parameters(checkpoint):
    """Number of model parameters stored in a fairseq checkpoint.

    The checkpoint is loaded weights-only (see
    :func:`fairseq_kd.checkpoints.load_checkpoint`): the recipes count the
    parameters of checkpoints they wrote, never of a file to trust blindly.
    """
    from fairseq_kd.checkpoints import load_checkpoint

    state = load_checkpoint(checkpoint, trusted_fallback=False)
    return sum(
        t.numel()
        for k, t in state["model"].items()
        if hasattr(t, "numel") and not k.endswith("_float_tensor")
    )


def write_json(path, obj):
    """Write JSON atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
