"""Multi30k task 1 (de, fr, cs <-> en): a local copy or the public raw files.

``python -m kd_bench multi30k --preset cpu`` (``examples/multi30k/run.sh``);
``--lang-pairs de-en,cs-en`` runs the multilingual recipe (one teacher and one
student for every direction).
"""

import os

from kd_bench.corpus import Corpus
from kd_bench.data import default_shared_folder, download
from kd_bench.preset import CPU, CPU_MULTILINGUAL, GPU, QUICKSTART, TINY

URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
# sha256 of the unzipped text of each file, from ../shared/data/multi30k/README.md
SHA256 = {
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


def local_data(args):
    """--data, else $MULTI30K_DIR or shared/data/multi30k (unless --download)."""
    if args.data:
        return args.data
    if args.download:
        return None
    shared = default_shared_folder("multi30k", env="MULTI30K_DIR")
    if shared is None:
        raise SystemExit(
            "no Multi30k data found: pass --data FOLDER, set $MULTI30K_DIR, or "
            "pass --download to fetch the public files (sha256-checked for de-en)"
        )
    return shared


def fetch(dest, src, tgt):
    """Download the task-1 raw files of a language pair (``<stem>.<lang>.gz``)."""
    for stem in SPLITS.values():
        for lang in (src, tgt):
            download(URL + f"{stem}.{lang}.gz", os.path.join(dest, f"{stem}.{lang}.gz"))


REFERENCE = """\
Kim & Rush (2016), *Sequence-Level Knowledge Distillation* (EMNLP), report
their table on WMT'14 English→German with LSTMs, not on Multi30k: their best
student ran 10× faster than the teacher and was +4.2 BLEU (greedy) / +1.7
(beam) better than the same student trained without distillation (abstract);
their Seq-KD + Seq-Inter + Word-KD student scores 18.5 BLEU there. There is
no published Transformer KD table on Multi30k with this preprocessing to land
near; TOOLCHAIN.md's stock-fairseq calibration (same data, sentencepiece 8k,
1200 updates) gave 35.5 BLEU (beam 5) for a 3+3 d256 teacher and 31.6 for a
3+1 d128 student on references."""

CORPUS = Corpus(
    key="multi30k",
    title="Multi30k",
    src="de",
    tgt="en",
    splits=SPLITS,
    eval_sets={"test": "test_2016_flickr", "valid": "val"},
    presets={"cpu": CPU, "gpu": GPU, "tiny": TINY, "quickstart": QUICKSTART},
    default_preset="cpu",
    local_data=local_data,
    fetch=fetch,
    fetch_describe=f"Multi30k task-1 raw files from {URL}",
    fetched_suffix=".gz",
    checksums=SHA256,
    reference=REFERENCE,
    lang_pairs="de-en,cs-en",
    multilingual_presets={"cpu": CPU_MULTILINGUAL},
)
