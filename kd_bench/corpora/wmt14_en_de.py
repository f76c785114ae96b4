"""WMT'14 English-German (Vaswani et al.'s data), Transformer-base sizes (GPU).

Same stages as every corpus (``kd_bench/plan.py``). The data
are the WMT'14 training corpora used by Vaswani et al. (2017): Europarl v7,
Common Crawl and News Commentary v9 (about 4.5M pairs), newstest2013 as
valid and newstest2014 (full, 3,003 sentences) as test; kept cased and
untokenised (sentencepiece segments raw text, sacreBLEU scores detokenised
output). Usage::

    python -m kd_bench wmt14_en_de --dry-run
    python -m kd_bench wmt14_en_de       # on a GPU machine with internet access
"""

import os
import re

from kd_bench.corpus import Corpus
from kd_bench.data import clean_pairs, download, extract, write_pairs
from kd_bench.preset import Curve, Preset, TrainSettings, transformer_arch

# (archive URL, path of the corpus inside it without the ".<lang>" suffix)
TRAIN = {
    "europarl-v7": (
        "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
        "training/europarl-v7.de-en",
    ),
    "commoncrawl": (
        "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
        "commoncrawl.de-en",
    ),
    "news-commentary-v9": (
        "http://statmt.org/wmt14/training-parallel-nc-v9.tgz",
        "training/news-commentary-v9.de-en",
    ),
}
DEV_URL = "http://statmt.org/wmt14/dev.tgz"  # dev/newstest2013.{de,en}
TEST_URL = "http://statmt.org/wmt14/test-full.tgz"  # newstest2014, 3,003 lines
_SEG = re.compile(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>")


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in f]


def _sgm(path):
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for m in _SEG.finditer(f.read())]


def fetch(dest, src, tgt):
    """Download WMT'14 en-de and write ``{train,valid,test}.{src,tgt}``.

    Args:
        dest: output folder.
        src: source language (en or de).
        tgt: target language (de or en).
    """
    if {src, tgt} != {"de", "en"}:
        raise ValueError(f"this recipe covers en-de only, not {src}-{tgt}")
    orig = os.path.join(dest, "orig")
    train = []
    for url, inner in TRAIN.values():
        extract(download(url, os.path.join(orig, os.path.basename(url))), orig)
        s = _read(os.path.join(orig, f"{inner}.{src}"))
        t = _read(os.path.join(orig, f"{inner}.{tgt}"))
        if len(s) != len(t):
            raise ValueError(f"{inner}: {len(s)} {src} lines, {len(t)} {tgt}")
        train.extend(clean_pairs(zip(s, t), max_words=250, ratio=1.5))
    write_pairs(dest, "train", src, tgt, train)
    del train
    extract(download(DEV_URL, os.path.join(orig, "dev.tgz")), orig)
    dev = zip(
        _read(os.path.join(orig, "dev", f"newstest2013.{src}")),
        _read(os.path.join(orig, "dev", f"newstest2013.{tgt}")),
    )
    write_pairs(dest, "valid", src, tgt, dev)
    extract(download(TEST_URL, os.path.join(orig, "test-full.tgz")), orig)
    test_dir = os.path.join(orig, "test-full")
    s = _sgm(os.path.join(test_dir, f"newstest2014-deen-src.{src}.sgm"))
    t = _sgm(os.path.join(test_dir, f"newstest2014-deen-ref.{tgt}.sgm"))
    if len(s) != len(t):
        raise ValueError(f"newstest2014: {len(s)} {src} segments, {len(t)} {tgt}")
    write_pairs(dest, "test", src, tgt, zip(s, t))


PRESETS = {
    # GPUs. Teacher: Transformer base (6+6, d512, FFN 2048, 8 heads), 25k
    # tokens per update as in Vaswani et al. (4096 x update-freq 6 on one GPU;
    # divide update_freq by the number of GPUs). Students: 6+1 layers, d512.
    "gpu": Preset(
        vocab=32000,
        device=("--fp16",),
        teacher_arch=transformer_arch(6, 6, 512, 2048, 8),
        teacher_train=TrainSettings(100000, "7e-4", 4000, 4096, 0.1, update_freq=6),
        student_arch=transformer_arch(6, 1, 512, 2048, 8),
        student_train=TrainSettings(60000, "7e-4", 4000, 4096, 0.1, update_freq=6),
        tool_max_tokens=16000,
        gen_cpu=False,  # 3,003 test sentences: translated on the GPU
        curve=Curve("seq-kd+word-kd", every=15000),
    ),
}

REFERENCE = """\
Vaswani et al. (2017), *Attention Is All You Need*, Table 2: Transformer base
27.3 BLEU and big 28.4 on newstest2014 English→German (tokenised BLEU with
compound splitting, not sacreBLEU: cased detokenised sacreBLEU of the same
models is lower). Kim & Rush (2016), *Sequence-Level Knowledge Distillation*,
ran their table on this task with LSTMs: their best student was 10× faster
than the teacher and +4.2 BLEU (greedy) / +1.7 (beam) over the same student
without distillation (abstract); Seq-KD + Seq-Inter + Word-KD reached 18.5
BLEU. Expect the teacher near the Transformer-base figure and KD rows to
close part of the teacher-student gap."""

CORPUS = Corpus(
    key="wmt14_en_de",
    title="WMT'14",
    src="en",
    tgt="de",
    splits={"train": "train", "valid": "valid", "test": "test"},
    eval_sets={"test": "newstest2014", "valid": "newstest2013"},
    presets=PRESETS,
    default_preset="gpu",
    fetch=fetch,
    fetch_describe="WMT'14 en-de (Europarl v7, Common Crawl, News Commentary v9; "
    "newstest2013/2014) from statmt.org",
    reference=REFERENCE,
)
