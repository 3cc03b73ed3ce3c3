"""Token shards: a `.bin` of token ids plus a Megatron-LM `.idx`, written atomically, read by memmap.

Layout (Megatron-LM `megatron/core/datasets/indexed_dataset.py`, index version 1, "MMIDIDX"):
  `<prefix>.bin`  the tokens of all documents, concatenated (uint16 by default); every document already
                  ends with the end-of-text id, so a nanoGPT-style reader can use the `.bin` alone.
  `<prefix>.idx`  b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code (Megatron's DType enum: uint16=8,
                  int32=4), <Q sequence count N, <Q document-index count D+1, int32[N] sequence lengths
                  (tokens), int64[N] sequence byte pointers into .bin, int64[D+1] document indices
                  (0, then the sequence index where each document ends).
We write one sequence per document (Megatron's `preprocess_data.py --append-eod` does the same), so
N == D and the document indices are 0..N. Megatron-LM and NeMo read these shards as they are.

Atomicity: `.bin` and `.idx` are written under temporary names, the `.bin` is renamed first and the
`.idx` last, so a shard without its `.idx` is unfinished; the reader also checks that the `.bin` size
matches the `.idx`, so a half-written or mismatched pair is never accepted.

Integrity: `ShardWriter.close()` returns the sha256 of the `.bin` and the `.idx` and a `sample_sha256` (the
`.idx` whole plus ten 64 KiB blocks of the `.bin` at fixed places: head, tail and eight between), which the
manifest records. `IndexedDataset(prefix, expect=shard_info)` checks sizes, counts and the sample digest on open
(reads under 1 MB more than opening does); `verify_shard(..., full=True)` checks the full sha256 too.
"""
from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

from fileio import disk_full_as_error, fsync_dir, fsync_file

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-LM's DType enum (the numeric code stored in the .idx); note float64=6, float32=7.
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
               np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))   # the two we write: compact, or explicit wide
MAX_UINT16_VOCAB = 65_500   # Megatron's own cut-off for choosing uint16 (DType.optimal_dtype)
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8   # 34
SAMPLE_BLOCK = 1 << 16      # sample digest: blocks of the .bin read at fixed places
SAMPLE_BLOCKS = 10


class ShardError(ValueError):
    """A shard that is missing, half-written or inconsistent."""


def bin_path(prefix) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix) -> Path:
    return Path(f"{prefix}.idx")


def check_vocab_fits(vocab_size: int, dtype=np.uint16) -> None:
    """Raise ValueError unless every id in [0, vocab_size) fits `dtype` (no silent wrap-around)."""
    dtype = np.dtype(dtype)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype {dtype} is not supported; use uint16 or int32")
    limit = MAX_UINT16_VOCAB if dtype == np.uint16 else np.iinfo(dtype).max
    if not 0 < vocab_size <= limit:
        raise ValueError(f"vocab_size {vocab_size} does not fit {dtype} shards (at most {limit:,}); "
                         f"use a smaller vocabulary or dtype int32")


def _as_tokens(tokens, dtype: np.dtype) -> np.ndarray:
    """Tokens as a 1-D array of `dtype`, refusing any value that does not fit (never wraps around)."""
    if isinstance(tokens, np.ndarray):
        if tokens.dtype == dtype:
            return tokens.reshape(-1)
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        arr = tokens.reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
            raise ValueError(f"token id out of range for {dtype}: min {arr.min()}, max {arr.max()}")
        return arr.astype(dtype)
    try:  # numpy >= 2 raises OverflowError for a Python int that does not fit, instead of wrapping
        return np.array(tokens, dtype=dtype).reshape(-1)
    except OverflowError as e:
        raise ValueError(f"token id out of range for {dtype}: {e}") from None


def _fsync_replace(tmp: Path, final: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_index(path: Path, dtype, doc_lengths: np.ndarray) -> None:
    """Write a Megatron MMIDIDX v1 index for one sequence per document (not atomic by itself)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(doc_lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", n))         # sequence count
        f.write(struct.pack("<Q", n + 1))     # document count = len(document indices), as Megatron writes it
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))


class ShardWriter:
    """Stream documents into `<prefix>.bin` + `<prefix>.idx`; nothing appears under the final names
    until `close()`. Usage: `w = ShardWriter(prefix); w.add(tokens) ...; info = w.close()`.
    Documents are written as given: the caller appends the end-of-text id."""

    def __init__(self, prefix, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype {self.dtype} is not supported; use uint16 or int32")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = self.prefix.with_name(f".{self.prefix.name}.bin{suffix}")
        self._tmp_idx = self.prefix.with_name(f".{self.prefix.name}.idx{suffix}")
        self._file = open(self._tmp_bin, "wb")
        self._hash = hashlib.sha256()
        self._lengths = array("i")   # int32 per document: 4 bytes each, never a Python list of ints
        self.num_tokens = 0

    def add(self, tokens) -> None:
        """Append one document (list or array of ids)."""
        arr = _as_tokens(tokens, self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31-1 tokens does not fit the .idx")
        self._write(arr)
        self._lengths.append(arr.size)

    def add_batch(self, flat_tokens, lengths) -> None:
        """Append many documents at once: their tokens concatenated, and each one's length."""
        arr = _as_tokens(flat_tokens, self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("document lengths must be in [0, 2**31-1]")
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        self._write(arr)
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())

    def _write(self, arr: np.ndarray) -> None:
        data = arr.tobytes(order="C")
        with disk_full_as_error(bin_path(self.prefix), len(data)):
            self._file.write(data)
        self._hash.update(data)
        self.num_tokens += arr.size

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def close(self) -> dict:
        """Finish the shard: .bin renamed into place first, .idx last. Returns its summary."""
        self._file.close()
        idx_final = idx_path(self.prefix)
        idx_final.unlink(missing_ok=True)   # an older complete pair must not pair with the new .bin
        try:
            with disk_full_as_error(idx_final, HEADER_BYTES + 20 * self.num_documents):
                _fsync_replace(self._tmp_bin, bin_path(self.prefix))
                write_index(self._tmp_idx, self.dtype, np.frombuffer(self._lengths, dtype=np.int32))
                _fsync_replace(self._tmp_idx, idx_final)
        except BaseException:
            self.abort()
            raise
        return {"prefix": str(self.prefix), "documents": self.num_documents, "tokens": self.num_tokens,
                "dtype": self.dtype.name, "bin_sha256": self._hash.hexdigest(),
                "bin_bytes": bin_path(self.prefix).stat().st_size, "idx_sha256": _sha256_file(idx_final),
                "sample_sha256": sample_digest(self.prefix)}

    def abort(self) -> None:
        """Drop the unfinished shard (temporary files only; a finished shard is left alone)."""
        if not self._file.closed:
            self._file.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.info = self.close()
        else:
            self.abort()


def write_shard(prefix, docs: Iterable, dtype=np.uint16) -> dict:
    """Write every document of `docs` (arrays or lists of ids) as one shard, atomically."""
    writer = ShardWriter(prefix, dtype)
    try:
        for doc in docs:
            writer.add(doc)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def sample_digest(prefix) -> str:
    """sha256 of the whole .idx and SAMPLE_BLOCKS blocks of the .bin at places fixed by its size (the first and
    the last block, the others evenly between): a cheap check that catches a truncated, swapped or partly
    rewritten shard on every open. A flipped bit outside the blocks needs the full sha256 (`verify_shard`)."""
    h = hashlib.sha256(idx_path(prefix).read_bytes())
    size = bin_path(prefix).stat().st_size
    last = max(size - SAMPLE_BLOCK, 0)
    offsets = sorted({last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    with open(bin_path(prefix), "rb") as f:
        for off in offsets:
            f.seek(off)
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def verify_shard(prefix, expect: dict, full: bool = False) -> list[str]:
    """What is wrong with a shard, compared with the manifest's shard_info for it: it does not open, its sizes or
    counts differ, its sample digest differs, or (full=True) the sha256 of its .bin or .idx differs. [] = fine."""
    try:
        IndexedDataset(prefix, expect=expect)
    except (ShardError, OSError) as e:
        return [str(e)]
    problems = []
    if full:
        for key, path in (("bin_sha256", bin_path(prefix)), ("idx_sha256", idx_path(prefix))):
            if key in expect and _sha256_file(path) != expect[key]:
                problems.append(f"{path}: content differs from the sha256 the manifest recorded (corrupted)")
    return problems


def remove_shard(prefix) -> None:
    """Remove a shard, .idx first (so what is left is never a complete-looking pair)."""
    idx_path(prefix).unlink(missing_ok=True)
    bin_path(prefix).unlink(missing_ok=True)


def remove_temporaries(directory) -> int:
    """Remove temporary files left by killed writers in `directory`; returns how many."""
    stale = list(Path(directory).glob(".*.bin.tmp-*")) + list(Path(directory).glob(".*.idx.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def read_index(path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate an MMIDIDX v1 file: (dtype, sequence lengths, pointers, document indices)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise ShardError(f"{path}: not a Megatron MMIDIDX index (bad header)")
    version, code, n_seq, n_doc_idx = struct.unpack("<QBQQ", head[9:])
    if version != INDEX_VERSION:
        raise ShardError(f"{path}: index version {version}, expected {INDEX_VERSION}")
    if code not in CODE_DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code}")
    expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc_idx * 8
    if size != expected:
        raise ShardError(f"{path}: {size} bytes, expected {expected} for {n_seq} sequences "
                         f"and {n_doc_idx} document indices (truncated or not ours)")
    dtype = CODE_DTYPES[code]
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc_idx, offset=HEADER_BYTES + 12 * n_seq)
    if n_doc_idx < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise ShardError(f"{path}: document indices must start at 0, rise, and end at {n_seq}")
    if n_seq and lengths.min() < 0:
        raise ShardError(f"{path}: negative sequence length")
    expected_ptr = np.zeros(n_seq, dtype=np.int64)
    if n_seq:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=expected_ptr[1:])
    if not np.array_equal(pointers, expected_ptr):
        raise ShardError(f"{path}: sequence pointers do not match the sequence lengths")
    return dtype, lengths, pointers, doc_idx


class IndexedDataset:
    """Memory-mapped reader of one shard; never loads the `.bin`. `ds[i]` is document i's tokens
    (a read-only view, end-of-text included); `ds.tokens` is the whole `.bin` as a memmap."""

    def __init__(self, prefix, expect: dict | None = None):
        """`expect`: the manifest's shard_info for this shard ({documents, tokens, bin_bytes, sample_sha256, ...}):
        when given, a shard whose counts, sizes or sample digest differ raises ShardError."""
        self.prefix = Path(prefix)
        for p in (bin_path(self.prefix), idx_path(self.prefix)):
            if not p.is_file():
                raise ShardError(f"{p}: missing (an unfinished shard has no .idx)")
        self.dtype, seq_lengths, seq_pointers, doc_idx = read_index(idx_path(self.prefix))
        self.num_tokens = int(seq_lengths.sum(dtype=np.int64))
        bin_size = bin_path(self.prefix).stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise ShardError(f"{bin_path(self.prefix)}: {bin_size} bytes, but the .idx says "
                             f"{self.num_tokens} tokens of {self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes)")
        self.seq_lengths = seq_lengths
        self.document_indices = doc_idx
        # Documents may span several sequences in foreign (Megatron sentence-split) shards.
        seq_starts = seq_pointers // self.dtype.itemsize
        bounds = np.append(seq_starts, self.num_tokens)[doc_idx]
        self.doc_starts = bounds[:-1].astype(np.int64)
        self.doc_lengths = np.diff(bounds).astype(np.int32)
        if expect:
            self._check_expected(expect, bin_size)
        if self.num_tokens:
            self.tokens = np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")
        else:  # mmap cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)

    def _check_expected(self, expect: dict, bin_size: int) -> None:
        found = {"documents": len(self.doc_lengths), "tokens": self.num_tokens, "bin_bytes": bin_size}
        for key, value in found.items():
            if key in expect and expect[key] != value:
                raise ShardError(f"{self.prefix}: {key} {value}, the manifest recorded {expect[key]} "
                                 f"(truncated, replaced or rewritten)")
        if "sample_sha256" in expect and sample_digest(self.prefix) != expect["sample_sha256"]:
            raise ShardError(f"{self.prefix}: sampled content differs from the digest the manifest recorded "
                             f"(corrupted)")

    def __getstate__(self):   # pickled (e.g. into DataLoader workers) as its path, never its tokens
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        start = int(self.doc_starts[i])
        return self.tokens[start:start + int(self.doc_lengths[i])]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, documents={len(self)}, tokens={self.num_tokens})"


def is_complete(prefix) -> bool:
    """True when the shard at `prefix` opens and its .bin agrees with its .idx."""
    try:
        IndexedDataset(prefix)
        return True
    except (ShardError, OSError):
        return False
