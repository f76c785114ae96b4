"""Per-chunk part files of a distillation run: atomic writes, resume, verification.

A split of ``N`` sentences is cut into chunks of consecutive corpus ids
(``chunk k`` holds ids ``[k * size, min((k + 1) * size, N))``). Each chunk's
teacher n-best lists are written to ``<work>/parts/chunk-<k>.jsonl`` through a
temporary file and an atomic rename, so a part file is either complete or
absent: an interrupted run redoes only the chunks without a file, whatever the
number of shards or the batch size. ``<work>/config.json`` records every
setting that changes the teacher's output; a run with other settings refuses
to mix its chunks with the existing ones.
"""

import json
import os
from typing import Dict, List

PARTS = "parts"
CONFIG = "config.json"


class DistillError(RuntimeError):
    """A distillation run or its part files are inconsistent."""


def chunk_ranges(n: int, size: int) -> List[range]:
    """Corpus-id ranges of the chunks of an ``n``-sentence split.

    Args:
        n: number of sentences.
        size: sentences per chunk.
    """
    if size < 1:
        raise ValueError(f"--chunk-size must be positive, got {size}")
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def shard_chunks(n_chunks: int, num_shards: int, shard_id: int) -> List[int]:
    """Chunk numbers handled by shard ``shard_id`` of ``num_shards`` (round robin).

    Args:
        n_chunks: number of chunks.
        num_shards: number of cooperating processes.
        shard_id: this process's shard, ``0 <= shard_id < num_shards``.
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(
            f"--shard-id must be in [0, --num-shards); got --shard-id {shard_id} "
            f"with --num-shards {num_shards}"
        )
    return list(range(shard_id, n_chunks, num_shards))


def part_path(work_dir: str, chunk: int) -> str:
    """Path of a chunk's part file."""
    return os.path.join(work_dir, PARTS, f"chunk-{chunk:06d}.jsonl")


def atomic_write_text(path: str, text: str):
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    Args:
        path: destination.
        text: full content.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_config(work_dir: str, config: Dict):
    """Record ``config`` in ``work_dir``, or check it matches the recorded one.

    Args:
        work_dir: the run's work folder (created).
        config: JSON-serialisable settings that determine the teacher outputs.
    """
    os.makedirs(os.path.join(work_dir, PARTS), exist_ok=True)
    path = os.path.join(work_dir, CONFIG)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            details = "; ".join(
                f"{k}: recorded {old.get(k)!r}, now {config.get(k)!r}" for k in diff
            )
            raise DistillError(
                f"{work_dir} holds parts of a run with other settings ({details}). "
                "Use another --output/--work-dir, or delete it to start over."
            )
        return
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_part(work_dir: str, chunk: int, ids: range, records: List[Dict], meta: Dict):
    """Check and atomically write one chunk's records.

    Args:
        work_dir: the run's work folder.
        chunk: chunk number.
        ids: the corpus ids the chunk must hold, each exactly once.
        records: one dict per sentence with at least ``id``.
        meta: chunk-level facts (time taken, engine) stored in the header line.
    """
    check_ids(sorted(r["id"] for r in records), ids, f"chunk {chunk}")
    records = sorted(records, key=lambda r: r["id"])
    header = dict(meta, chunk=chunk, first=ids.start, stop=ids.stop)
    lines = [json.dumps(header)] + [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(part_path(work_dir, chunk), "\n".join(lines) + "\n")


def read_jsonl(path: str, what: str):
    """A header line and one JSON value a line after it, as written atomically.

    Args:
        path: the file.
        what: what the file is (for the message).

    Returns:
        ``(header, rows)``.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except (ValueError, IndexError) as e:
        raise DistillError(f"{path} is not a valid {what}: {e}") from e


def read_part(work_dir: str, chunk: int, ids: range):
    """Read and verify one chunk's part file.

    Args:
        work_dir: the run's work folder.
        chunk: chunk number.
        ids: the corpus ids the chunk must hold.

    Returns:
        ``(header, records)``, records sorted by id.
    """
    path = part_path(work_dir, chunk)
    header, records = read_jsonl(path, "part file")
    if header.get("chunk") != chunk or (header.get("first"), header.get("stop")) != (
        ids.start,
        ids.stop,
    ):
        raise DistillError(f"{path}: header {header} does not describe chunk {chunk}")
    check_ids([r["id"] for r in records], ids, path)
    return header, records


def finished_chunks(work_dir: str, n_chunks: int) -> List[int]:
    """Chunk numbers whose part file exists."""
    return [k for k in range(n_chunks) if os.path.exists(part_path(work_dir, k))]


def check_ids(ids: List[int], expected: range, where: str):
    """Fail unless ``ids`` (sorted) hold every id of ``expected`` exactly once.

    Args:
        ids: ids found, in increasing order.
        expected: the ids that must be there.
        where: what is checked (for the message).
    """
    if list(ids) == list(expected):
        return
    found = set(ids)
    missing = [i for i in expected if i not in found]
    seen, duplicated = set(), set()
    for i in ids:
        (duplicated if i in seen else seen).add(i)
    extra = sorted(found - set(expected))
    raise DistillError(
        f"{where}: expected ids {expected.start}..{expected.stop - 1} once each; "
        f"missing {missing[:10]} ({len(missing)}), duplicated "
        f"{sorted(duplicated)[:10]} ({len(duplicated)}), unexpected "
        f"{extra[:10]} ({len(extra)})"
    )
