"""IWSLT'14 de-en, downloaded and split as fairseq's example does (GPU preset).

Same stages as every corpus (``kd_bench/plan.py``); the data
are downloaded and split the way fairseq's IWSLT'14 example does it (train
minus every 23rd line; valid = every 23rd line; test = dev2010, TEDX.dev2012,
tst2010, tst2011 and tst2012), kept cased and untokenised: sentencepiece
segments the raw text and sacreBLEU scores detokenised output. Usage::

    python -m kd_bench iwslt14 --dry-run
    python -m kd_bench iwslt14           # on a GPU machine with internet access
"""

import os
import re

from kd_bench.corpus import Corpus
from kd_bench.data import clean_pairs, download, extract, normalise_line, write_pairs
from kd_bench.preset import Curve, Preset, TrainSettings, transformer_arch

# fairseq's mirror of the WIT3 2014-01 de-en archive (the original host,
# wit3.fbk.eu, no longer serves it); the URL is the one fairseq's
# examples/translation/prepare-iwslt14.sh downloads.
URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
TEST_SETS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)
_DROP = re.compile(r"<(url|talkid|keywords)>")
_STRIP = re.compile(r"</?(title|description)>")
_SEG = re.compile(r"<seg id=\"\d+\">\s*(.*?)\s*</seg>")


def _train_lines(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _DROP.search(line):
                continue
            yield normalise_line(_STRIP.sub("", line))


def _xml_segments(path):
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for m in _SEG.finditer(f.read())]


def fetch(dest, src, tgt):
    """Download the IWSLT'14 de-en archive and write train/valid/test raw text.

    Args:
        dest: output folder (``{train,valid,test}.{src,tgt}``).
        src: source language (de or en).
        tgt: target language (en or de).
    """
    if {src, tgt} != {"de", "en"}:
        raise ValueError(f"IWSLT'14 here is de-en only, not {src}-{tgt}")
    os.makedirs(dest, exist_ok=True)
    archive = download(URL, os.path.join(dest, "de-en.tgz"))
    extract(archive, dest)
    orig = os.path.join(dest, "de-en")
    sides = {
        lang: list(_train_lines(os.path.join(orig, f"train.tags.de-en.{lang}")))
        for lang in (src, tgt)
    }
    pairs = clean_pairs(zip(sides[src], sides[tgt]), max_words=175, ratio=1.5)
    valid = [p for i, p in enumerate(pairs, 1) if i % 23 == 0]
    train = [p for i, p in enumerate(pairs, 1) if i % 23 != 0]
    test = []
    for name in TEST_SETS:
        s = _xml_segments(os.path.join(orig, f"{name}.de-en.{src}.xml"))
        t = _xml_segments(os.path.join(orig, f"{name}.de-en.{tgt}.xml"))
        if len(s) != len(t):
            raise ValueError(f"{name}: {len(s)} {src} segments, {len(t)} {tgt}")
        test.extend(zip(s, t))
    for split, data in (("train", train), ("valid", valid), ("test", test)):
        write_pairs(dest, split, src, tgt, data)


PRESETS = {
    # One GPU. Teacher: transformer_iwslt_de_en's sizes (6+6 layers, d512,
    # FFN 1024, 4 heads) with fairseq's IWSLT'14 optimisation settings;
    # students: deep encoder, one decoder layer, d256.
    "gpu": Preset(
        vocab=10000,
        device=("--fp16",),
        teacher_arch=transformer_arch(6, 6, 512, 1024, 4),
        teacher_train=TrainSettings(40000, "5e-4", 4000, 4096, 0.3),
        student_arch=transformer_arch(6, 1, 256, 1024, 4),
        student_train=TrainSettings(30000, "7e-4", 4000, 4096, 0.1),
        tool_max_tokens=16000,
        gen_cpu=False,  # 6,750 test sentences: translated on the GPU
        curve=Curve("seq-kd+word-kd", every=7500),
    ),
}

REFERENCE = """\
fairseq's `transformer_iwslt_de_en` on this split is commonly reported at
about 34–35 BLEU, tokenised and lowercased (fairseq's own BLEU on Moses-
tokenised, lowercased BPE data): for example 34.4 for the Transformer baseline
of Wu et al. (2019), *Pay Less Attention with Lightweight and Dynamic
Convolutions* (ICLR), Table 3. This recipe keeps case and scores detokenised
output with sacreBLEU, so expect a lower figure for the same model; compare
rows with each other, and the teacher with that range. Kim & Rush (2016)
report their word/sequence-KD table on WMT'14 English→German and IWSLT'15
Thai→English, not on IWSLT'14."""

CORPUS = Corpus(
    key="iwslt14",
    title="IWSLT'14",
    src="de",
    tgt="en",
    splits={"train": "train", "valid": "valid", "test": "test"},
    eval_sets={"test": "test", "valid": "valid"},
    presets=PRESETS,
    default_preset="gpu",
    fetch=fetch,
    fetch_describe=f"IWSLT'14 de-en from {URL}, split as fairseq's example does",
    reference=REFERENCE,
)
