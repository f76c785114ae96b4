"""A tiny multilingual corpus (de, cs -> en, en -> de) and its binarization."""

import os
import random

from corpus import run

LANGS = ("cs", "de", "en")
PAIRS = ("de-en", "cs-en", "en-de")
N_WORDS = 12
PREFIX = {"de": "d", "cs": "c", "en": "e"}


def word(lang, i):
    """Word ``i`` of ``lang`` (every language has the same ``N_WORDS``)."""
    return f"{PREFIX[lang]}{i}"


def write_corpus(folder, sizes=(("train", 40), ("valid", 12)), seed=0):
    """Write ``<split>.<src>-<tgt>.<lang>`` text files for every direction.

    Word ``i`` of one language translates to word ``(i * 5) % N_WORDS`` of
    the next (cs, de, en); sentences are 2 to 6 words long.

    Args:
        folder: output folder (created).
        sizes: (split, sentences per direction) pairs.
        seed: random seed.
    """
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for pair in PAIRS:
        src, tgt = pair.split("-")
        for split, n in sizes:
            lines = {src: [], tgt: []}
            for _ in range(n):
                ids = [rng.randrange(N_WORDS) for _ in range(rng.randint(2, 6))]
                lines[src].append(" ".join(word(src, i) for i in ids))
                lines[tgt].append(" ".join(word(tgt, (i * 5) % N_WORDS) for i in ids))
            for lang in (src, tgt):
                with open(os.path.join(folder, f"{split}.{pair}.{lang}"), "w") as f:
                    f.write("\n".join(lines[lang]) + "\n")
    with open(os.path.join(folder, "dict.txt"), "w") as f:  # fairseq's format
        f.writelines(f"{word(lang, i)} 1\n" for lang in LANGS for i in range(N_WORDS))
    return folder


def binarize(text_dir, dest):
    """``fairseq-preprocess`` every direction with one shared dictionary."""
    shared = os.path.join(text_dir, "dict.txt")  # every language's words
    for pair in PAIRS:
        src, tgt = pair.split("-")
        pref = lambda s: os.path.join(text_dir, f"{s}.{pair}")  # noqa: E731
        run(
            ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
            + ["--trainpref", pref("train"), "--validpref", pref("valid")]
            + ["--srcdict", shared, "--tgtdict", shared, "--destdir", dest]
            + ["--workers", "1"]
        )
    return dest


def task_flags(pairs=PAIRS, langs=LANGS, style="multilingual"):
    """The multilingual task's flags: languages, directions and language tags."""
    return [
        "--lang-pairs", ",".join(pairs), "--langs", ",".join(langs),
        "--encoder-langtok", "src", "--decoder-langtok", "--lang-tok-style", style,
    ]  # fmt: skip
