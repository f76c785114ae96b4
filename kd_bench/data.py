"""Data preparation of the recipes: normalisation, downloads, subwords, corpora."""

import logging
import os
import shutil
import tarfile
import urllib.request

from kd_bench.files import (
    atomic_write,
    find_file,
    read_lines,
    sha256_file,
    write_lines,
)

logger = logging.getLogger(__name__)


def normalise_line(line):
    """The one text normalisation of the harness: whitespace only.

    Every run of Unicode whitespace (spaces, tabs, no-break spaces, ...) becomes
    one space and the ends are stripped; characters are left as they are (no
    NFKC: the references are scored as published, and sentencepiece applies its
    own normalisation to what it encodes).

    Args:
        line: one line of raw text.
    """
    return " ".join(line.split())


def download(url, path):
    """Download ``url`` to ``path`` (atomically) unless it is there.

    Args:
        url: the address.
        path: the file to write.
    """
    if os.path.exists(path):
        return path
    logger.warning("downloading %s", url)
    with urllib.request.urlopen(url) as r, atomic_write(path, "wb") as f:
        shutil.copyfileobj(r, f)
    return path


def extract(archive, dest):
    """Unpack a tar archive into ``dest`` (refusing paths that leave it)."""
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python < 3.11.4 has no extraction filters
            root = os.path.realpath(dest)
            for member in tar.getmembers():
                target = os.path.realpath(os.path.join(dest, member.name))
                if not target.startswith(root + os.sep):
                    raise ValueError(f"{archive}: {member.name} leaves {dest}")
            tar.extractall(dest)
    return dest


def verify_sha256(folder, expected, stems):
    """Refuse raw files whose sha256 differs from the published one.

    Args:
        folder: the raw data folder.
        expected: ``{"<stem>.<lang>": sha256 of the (unzipped) text}``.
        stems: the ``<stem>.<lang>`` names to check; those without a published
            checksum, or absent, are not checked.
    """
    for stem in stems:
        path = find_file(folder, stem)
        if stem not in expected or path is None:
            continue
        actual = sha256_file(path, gunzip=True)
        if actual != expected[stem]:
            raise ValueError(
                f"{path}: sha256 {actual} differs from the published "
                f"{expected[stem]}; the file is corrupted or not the expected "
                "corpus (pass --no-checksum to use your own)"
            )


def clean_pairs(pairs, max_words, ratio, min_words=1):
    """Keep sentence pairs whose lengths are plausible for training.

    Both sides are normalised (:func:`normalise_line`); a pair is dropped when a
    side has fewer than ``min_words`` or more than ``max_words`` words, or when
    one side is more than ``ratio`` times longer than the other (in words), the
    rules of Moses' ``clean-corpus-n`` that fairseq's data scripts apply.

    Args:
        pairs: iterable of (source, target) strings.
        max_words: most words per side.
        ratio: largest length ratio between the sides.
        min_words: fewest words per side.

    Returns:
        The kept pairs, in order.
    """
    kept = []
    for s, t in pairs:
        s, t = normalise_line(s), normalise_line(t)
        ls, lt = len(s.split()), len(t.split())
        if not (min_words <= ls <= max_words and min_words <= lt <= max_words):
            continue
        if ls > ratio * lt or lt > ratio * ls:
            continue
        kept.append((s, t))
    return kept


def write_pairs(dest, split, src, tgt, pairs):
    """Write ``dest/<split>.<src>`` and ``dest/<split>.<tgt>`` line-aligned."""
    pairs = list(pairs)
    write_lines(os.path.join(dest, f"{split}.{src}"), [p[0] for p in pairs])
    write_lines(os.path.join(dest, f"{split}.{tgt}"), [p[1] for p in pairs])


def prepare_text(folder, out_dir, src, tgt, splits, limits=None, more=()):
    """Normalise the raw corpus into ``out_dir/<split>.<lang>``.

    Args:
        folder: raw data folder with ``<stem>.<lang>[.gz]`` files.
        out_dir: output folder.
        src: source language code.
        tgt: target language code.
        splits: fairseq split name -> file stem in ``folder``.
        limits: optional fairseq split name -> maximum number of lines.
        more: further languages, line-aligned with ``src`` and ``tgt`` (a
            multi-parallel corpus such as Multi30k: the multilingual recipe).
    """
    langs = [src, tgt] + [x for x in more if x not in (src, tgt)]
    os.makedirs(out_dir, exist_ok=True)
    for split, stem in splits.items():
        sides = {}
        for lang in langs:
            path = find_file(folder, f"{stem}.{lang}")
            if path is None:
                raise FileNotFoundError(f"no {stem}.{lang}[.gz] in {folder}")
            limit = (limits or {}).get(split)
            sides[lang] = [normalise_line(x) for x in read_lines(path, limit)]
        for lang in langs[1:]:
            if len(sides[lang]) != len(sides[src]):
                raise ValueError(
                    f"{split}: {len(sides[src])} {src} lines but "
                    f"{len(sides[lang])} {lang} lines"
                )
        for lang in langs:
            write_lines(os.path.join(out_dir, f"{split}.{lang}"), sides[lang])
    return out_dir


def train_sentencepiece(text_dir, model_prefix, src, tgt, vocab_size, more=()):
    """Train a joint sentencepiece unigram model on the training text.

    Args:
        text_dir: folder with ``train.<src>`` and ``train.<tgt>``.
        model_prefix: output prefix (``.model`` and ``.vocab`` are written).
        src: source language code.
        tgt: target language code.
        vocab_size: subword vocabulary size.
        more: further languages learnt with them (``train.<lang>``).
    """
    import sentencepiece as spm

    langs = [src, tgt] + [x for x in more if x not in (src, tgt)]
    inputs = ",".join(os.path.join(text_dir, f"train.{lang}") for lang in langs)
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


def concatenate(files, dest):
    """Write the lines of ``files`` one after the other into ``dest``.

    Args:
        files: text files.
        dest: the file to write.
    """
    lines = []
    for path in files:
        lines += read_lines(path)
    write_lines(dest, lines)
    return dest


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


def head_lines(src_file, dest_file, n):
    """Write the first ``n`` lines of ``src_file`` to ``dest_file``.

    Raises:
        ValueError: the file has fewer than ``n`` lines.
    """
    lines = read_lines(src_file)
    if len(lines) < n:
        raise ValueError(f"{src_file} has {len(lines)} lines, fewer than {n}")
    write_lines(dest_file, lines[:n])


def default_shared_folder(name, start=None, env=None):
    """A local copy of a corpus: ``$ENV``, else ``shared/data/<name>`` upwards.

    Looks at the environment variable ``env`` first, then for
    ``shared/data/<name>`` in ``start`` (default: the current folder) and each
    of its parents.

    Args:
        name: the corpus folder's name (``multi30k``).
        start: the folder to search from.
        env: an environment variable naming the folder (``MULTI30K_DIR``).
    """
    if env and os.environ.get(env):
        return os.environ[env]
    folder = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(folder, "shared", "data", name)
        if os.path.isdir(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
