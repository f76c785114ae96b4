"""Files of the harness: text lines, JSON, atomic writes and sha256."""

import contextlib
import gzip
import hashlib
import json
import os


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8"):
    """Open ``path.tmp`` for writing; rename it to ``path`` when the block succeeds.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"``.
        encoding: text encoding (ignored for binary modes).
    """
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path, gunzip=False):
    """sha256 of a file's bytes.

    Args:
        path: the file.
        gunzip: hash the unzipped bytes of a file ending in ``.gz`` (published
            checksums are of the text).
    """
    opener = gzip.open if gunzip and path.endswith(".gz") else open
    h = hashlib.sha256()
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lines(path, limit=None):
    """Lines of a (possibly gzipped) UTF-8 text file, without newlines.

    Args:
        path: the file.
        limit: the most lines to read (None: all).
    """
    opener = gzip.open if path.endswith(".gz") else open
    lines = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            lines.append(line.rstrip("\n"))
    return lines


def write_lines(path, lines):
    """Write lines atomically, one per line.

    Args:
        path: the file.
        lines: strings without newlines.
    """
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")


def read_json(path):
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """Write JSON atomically (sorted keys, indented).

    Args:
        path: the file.
        obj: a JSON-serialisable object.
    """
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def find_file(folder, stem):
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (else None)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None
