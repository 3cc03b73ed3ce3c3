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
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import orjson
import zstandard

from fileio import disk_full_as_error, file_sha256, fsync_dir, tmp_path_for

PART_GLOB = "part-*.jsonl.zst"
ZSTD_LEVEL = 3


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.zst"


def _atomic_part_writer(path: Path):
    tmp = tmp_path_for(path)
    raw = open(tmp, "wb")
    # the frame checksum (xxh64 of the content) makes a flipped bit a read error, not a changed record
    return tmp, raw, zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(raw, closefd=False)


def _finish(tmp: Path, raw, writer, path: Path) -> None:
    writer.flush(zstandard.FLUSH_FRAME)
    writer.close()
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
        with disk_full_as_error(out_dir):   # a full disk: one line naming the directory, not a bare OSError
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


class ZstdReader(io.RawIOBase):
    """A zstd file as a raw stream (wrap it in io.BufferedReader) that raises EOFError when the file ends inside a
    frame: zstandard's stream_reader returns the short data silently, which would turn a truncated part into
    fewer records without a word. Concatenated frames are read one after another."""

    def __init__(self, f):
        self._f = f
        self._dctx = zstandard.ZstdDecompressor()
        self._d = self._dctx.decompressobj()
        self._buf, self._pos = b"", 0
        self._in_frame = False

    def readable(self):
        return True

    def readinto(self, b):
        while self._pos >= len(self._buf):
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame (truncated file)")
                return 0
            self._buf, self._pos = self._decompress(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._d.decompress(chunk))
            if self._d.eof:  # a frame ended; concatenated frames continue in unused_data
                self._in_frame = False
                chunk = self._d.unused_data
                self._d = self._dctx.decompressobj()
            else:
                chunk = b""
        return b"".join(out)

    def tell(self):  # compressed offset, for reject locations
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()



class RecordsError(ValueError):
    """A part file that is truncated, corrupt or holds a line that is not JSON."""


def iter_records(dir_or_files) -> Iterator[dict]:
    """Yield records from a part directory (parts sorted) or an explicit list of part files (in order). A part
    that is truncated or corrupt, or a line that is not JSON, raises RecordsError naming the file and line:
    parts are written atomically, so that is damage to re-run the step for, never records to skip."""
    for path in list_parts(dir_or_files):
        for line_no, line in _numbered_lines(path):
            yield load_record(line, path, f"line {line_no}")


def load_record(line: bytes, path, where: str):
    """One stored record line as a dict (or whatever JSON it holds); a line that is not JSON raises
    RecordsError naming the file and `where` in it (damage to re-run the step for)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise RecordsError(f"{path}, {where}: not a JSON record ({e}); the file is damaged: "
                           f"re-run the step that wrote it") from None


def iter_record_lines(path) -> Iterator[bytes]:
    """The record lines of one part file as they are stored (JSON bytes, blank lines skipped), for a step
    that passes records through unchanged (dedup's survivors): no parse and re-serialize per record. A part
    that is truncated or corrupt raises RecordsError, as in iter_records."""
    for _, line in _numbered_lines(path):
        yield line


def _numbered_lines(path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line of one zstd part; unreadable zstd raises RecordsError."""
    line_no = 0
    try:
        with io.BufferedReader(ZstdReader(open(path, "rb")), 1 << 20) as reader:
            for line_no, line in enumerate(reader, 1):
                if line.strip():
                    yield line_no, line
    except (EOFError, zstandard.ZstdError) as e:
        raise RecordsError(f"{path}: unreadable zstd ({e}) after line {line_no}; the file is damaged: "
                           f"re-run the step that wrote it") from None


def corpus_fingerprint(corpus_dir: Path) -> str:
    """What a record directory holds: its manifest.json without the volatile timing fields (a re-run of the read
    step that produced the same parts must not force the tokenizer and staging to be redone), else its part files'
    names, sizes and mtimes."""
    manifest = corpus_dir / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(m, dict):
                m = {k: v for k, v in m.items() if k not in ("seconds", "elapsed", "created", "time")}
            return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        except ValueError:
            return file_sha256(manifest)
    parts = sorted(corpus_dir.glob("part-*.jsonl.zst")) if corpus_dir.is_dir() else []
    listing = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in parts)
    return hashlib.sha256(listing.encode()).hexdigest()


class MissingInputError(RuntimeError):
    """A step's input is missing, unfinished or damaged; the message names the step that makes it."""


def step_that_writes(directory) -> str:
    """The pipeline step whose output a record directory is: data/clean/<c> -> "read", data/dedup/<c> -> "dedup"."""
    return {"clean": "read", "dedup": "dedup"}.get(Path(directory).parent.name, "read or dedup")


def checked_parts(directory, *, content: bool = False, require_manifest: bool = False) -> list[Path]:
    """The part files a finished record directory holds, checked against its manifest.json: every listed part is
    there with the recorded size (and sha256 with content=True) and no unlisted part lies beside them. Raises
    MissingInputError naming the step to run. A directory of parts without a manifest (written by hand or by
    `write_parts` alone) is taken as it is, unless `require_manifest` (the pipeline's own directories)."""
    from fileio import check_files

    directory = Path(directory)
    step = step_that_writes(directory)
    redo = f"run `python data_process.py --steps {step}`" if " " not in step else "re-run the step that wrote it"
    if not directory.is_dir():
        raise MissingInputError(f"{directory} does not exist: {redo}")
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        if not require_manifest:
            return list_parts(directory)
        raise MissingInputError(f"{manifest_file} is missing (the {step} step did not finish): {redo}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        names = list(manifest["parts"])
    except (ValueError, KeyError, TypeError):
        raise MissingInputError(f"{manifest_file} is unreadable: {redo}") from None
    recorded = manifest.get("part_info") or {name: {} for name in names}
    problems = check_files(directory, recorded, content=content, exact_glob=PART_GLOB)
    if problems:
        raise MissingInputError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                + f": {redo}")
    return [directory / name for name in names]
