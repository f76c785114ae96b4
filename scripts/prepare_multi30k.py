"""Prepare Multi30k (or any gzipped raw parallel corpus) for fairseq: spm + binarize.

Normalises whitespace, trains one joint sentencepiece model on the training
split (both sides), encodes every split into subword pieces and binarizes them
with ``fairseq-preprocess --joined-dictionary``. Example::

    python scripts/prepare_multi30k.py --raw ../shared/data/multi30k \\
        --src de --tgt en --out work/m30k
"""

import argparse
import gzip
import os
import subprocess
import sys

from kd_bench.data import normalise_line

SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


def normalise(line):
    """The harness's normalisation (:func:`kd_bench.data.normalise_line`)."""
    return normalise_line(line)


def read_raw(raw_dir, prefix, lang):
    """Lines of ``<raw_dir>/<prefix>.<lang>[.gz]``, normalised."""
    path = os.path.join(raw_dir, f"{prefix}.{lang}")
    opener = gzip.open if os.path.exists(path + ".gz") else open
    with opener(path + ".gz" if opener is gzip.open else path, "rt") as f:
        return [normalise(line) for line in f]


def main(argv=None):
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="folder of raw (gzipped) text")
    parser.add_argument("--src", default="de", help="source language suffix")
    parser.add_argument("--tgt", default="en", help="target language suffix")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=8000, help="spm vocab")
    parser.add_argument(
        "--splits",
        default=",".join(f"{k}={v}" for k, v in SPLITS.items()),
        help="fairseq split=raw file prefix pairs, comma-separated",
    )
    parser.add_argument("--workers", type=int, default=1, help="preprocess workers")
    args = parser.parse_args(argv)

    import sentencepiece as spm

    splits = dict(item.split("=") for item in args.splits.split(","))
    text_dir = os.path.join(args.out, "spm")
    os.makedirs(text_dir, exist_ok=True)
    raw = {
        (split, lang): read_raw(args.raw, prefix, lang)
        for split, prefix in splits.items()
        for lang in (args.src, args.tgt)
    }
    for split in splits:
        if len(raw[split, args.src]) != len(raw[split, args.tgt]):
            sys.exit(f"{split}: source and target line counts differ")

    joint = os.path.join(text_dir, "spm_train.txt")
    with open(joint, "w") as f:
        for lang in (args.src, args.tgt):
            f.writelines(line + "\n" for line in raw["train", lang])
    model_prefix = os.path.join(args.out, "spm")
    spm.SentencePieceTrainer.train(
        input=joint,
        model_prefix=model_prefix,
        vocab_size=args.vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
    )
    os.remove(joint)
    sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    for (split, lang), lines in raw.items():
        with open(os.path.join(text_dir, f"{split}.{lang}"), "w") as f:
            for line in lines:
                f.write(" ".join(sp.encode(line, out_type=str)) + "\n")
        # detokenised references, for scoring against --post-process output
        with open(os.path.join(args.out, f"{split}.raw.{lang}"), "w") as f:
            f.writelines(line + "\n" for line in lines)

    bindir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bindir, "fairseq-preprocess")]
    cmd += ["--source-lang", args.src, "--target-lang", args.tgt]
    for split in splits:
        cmd += [f"--{split}pref", os.path.join(text_dir, split)]
    cmd += ["--destdir", os.path.join(args.out, "bin"), "--joined-dictionary"]
    cmd += ["--workers", str(args.workers)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
