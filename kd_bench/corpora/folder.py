"""Your own corpus: a folder of ``{train,valid,test}.{src,tgt}`` text files.

``python -m kd_bench folder --data DIR`` reads ``DIR/train.src``,
``DIR/train.tgt``, ... (``--src de --tgt en`` for ``train.de``/``train.en``);
the files may be gzipped (``train.src.gz``).
"""

from kd_bench.corpus import Corpus
from kd_bench.preset import CPU, GPU, QUICKSTART, TINY


def local_data(args):
    """--data (required: this corpus is never downloaded)."""
    if not args.data:
        raise SystemExit(
            "the folder recipe needs --data DIR with {train,valid,test}.{src,tgt}"
        )
    return args.data


CORPUS = Corpus(
    key="folder",
    title="your corpus",
    src="src",
    tgt="tgt",
    splits={"train": "train", "valid": "valid", "test": "test"},
    eval_sets={"test": "test", "valid": "valid"},
    presets={"cpu": CPU, "gpu": GPU, "tiny": TINY, "quickstart": QUICKSTART},
    default_preset="cpu",
    local_data=local_data,
)
