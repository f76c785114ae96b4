"""Data preparation helpers of the recipes that download public corpora."""

import logging
import os
import shutil
import tarfile
import urllib.request

from fairseq_kd.pipeline import normalise_line, write_lines

logger = logging.getLogger(__name__)


def download(url, path):
    """Download ``url`` to ``path`` (via ``path.part``) unless it is there.

    Args:
        url: the address.
        path: the file to write.
    """
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    logger.warning("downloading %s", url)
    tmp = path + ".part"
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, path)
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


def clean_pairs(pairs, max_words, ratio, min_words=1):
    """Keep sentence pairs whose lengths are plausible for training.

    Both sides are whitespace-normalised; a pair is dropped when a side has
    fewer than ``min_words`` or more than ``max_words`` words, or when one side
    is more than ``ratio`` times longer than the other (in words), the rules
    of Moses' ``clean-corpus-n`` that fairseq's data scripts apply.

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
