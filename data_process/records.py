"""Intermediate record shards: zstd-compressed JSONL, one JSON object per line.

Why zstd JSONL and not parquet: records are nested (message lists, preference pairs) and are produced and
consumed as streams; JSONL keeps one record per line (greppable with `zstdcat`), appends in O(1) memory,
and zstd level 3 compresses Chinese text ~3x at several hundred MB/s. Parquet would need row-group
buffering and a schema per record kind for no gain here.

`write_parts` writes `part-00000.jsonl.zst`, ... atomically (temporary name + rename), so a killed run
never leaves a half-written part under its final name. `iter_records` reads them back in a deterministic
order (part files sorted, lines in order). The record format is documented in CONTRACTS.md.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import orjson
import zstandard

PART_GLOB = "part-*.jsonl.zst"
ZSTD_LEVEL = 3


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.zst"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole small file so that readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_part_writer(path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = open(tmp, "wb")
    return tmp, raw, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False)


def _finish(tmp: Path, raw, writer, path: Path) -> None:
    writer.flush(zstandard.FLUSH_FRAME)
    writer.close()
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()
    os.replace(tmp, path)


def write_parts(records_iter: Iterable[dict], out_dir, part_records: int = 100_000) -> list[Path]:
    """Write records as `out_dir/part-NNNNN.jsonl.zst`, `part_records` per part; returns the part paths.

    Each part is written under a temporary name and renamed when complete. Part files left over from an
    earlier run that this call did not write are removed, so the directory holds exactly this output.
    No records -> no parts (the directory still exists).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".part-*.tmp-*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    paths: list[Path] = []
    state = None  # (tmp, raw, writer, path, count)
    try:
        for record in records_iter:
            if state is None:
                path = out_dir / part_name(len(paths))
                state = [*_atomic_part_writer(path), path, 0]
            state[2].write(orjson.dumps(record) + b"\n")
            state[4] += 1
            if state[4] >= part_records:
                _finish(*state[:4])
                paths.append(state[3])
                state = None
        if state is not None:
            _finish(*state[:4])
            paths.append(state[3])
            state = None
    finally:
        if state is not None:  # an exception mid-part: drop the temporary file
            state[1].close()
            state[0].unlink(missing_ok=True)
    written = set(paths)
    for old in out_dir.glob(PART_GLOB):
        if old not in written:
            old.unlink()
    return paths


def list_parts(dir_or_files) -> list[Path]:
    """The part files of a directory (sorted), or the given file(s) as a list."""
    if isinstance(dir_or_files, (str, os.PathLike)):
        p = Path(dir_or_files)
        if p.is_dir():
            return sorted(p.glob(PART_GLOB))
        return [p]
    return [Path(f) for f in dir_or_files]


def iter_records(dir_or_files) -> Iterator[dict]:
    """Yield records from a part directory (parts sorted) or an explicit list of part files (in order)."""
    for path in list_parts(dir_or_files):
        with open(path, "rb") as raw:
            reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
            for line in reader:
                if line.strip():
                    yield orjson.loads(line)


def count_records(dir_or_files) -> int:
    return sum(1 for _ in iter_records(dir_or_files))
