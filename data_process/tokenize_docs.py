"""The tokenize step: cleaned documents -> `data/pretrain/<corpus>/{train,val}-NNNNN.bin/.idx` + manifest.

`run(recipe, docs_root, tokenizer_dir, out_root)` tokenizes every corpus with role "pretrain" (records
from `docs_root/<corpus>/part-*.jsonl.zst`), and for each stage in `recipe.tokenize.sft_as_pretrain` the
conversations of the SFT corpora of that stage, rendered with the chat template, as corpus `sft_<stage>`
(MiniCPM: SFT-style data in the decay phase beats adding it only at SFT).

- Split: a document goes to val when the hash of its text falls under `val_fraction` (stable across runs
  and machines, and independent of the order of documents). A small corpus (under 20 expected val
  documents) that has at least two documents always gets its smallest-hash document into val, so every
  corpus has a validation loss.
- Shards: a train shard is closed at the first document boundary at or past `shard_tokens`; the val
  documents seen meanwhile are closed with it as the next val shard. Each closed pair is a checkpoint
  (`progress.json`: input position + counts), so a killed run resumes after the last one and never redoes
  a finished shard. `manifest.json` is written last; its presence (with the same fingerprint: tokenizer
  hash, settings, input files) means the corpus is done, once every shard it lists has the sizes and sha256 it
  recorded (a missing or damaged shard retokenizes the corpus). Input parts must be the ones their manifest
  lists, with its sizes and sha256 (records.checked_parts): a deleted part is an error, never fewer documents.
- Speed: threads mode (the local engine's default) reads the records in the driver and encodes batches,
  in order, on SentencePiece's own C++ threads (the GIL is released while it encodes). Processes mode (a
  local pool) and the Ray engine hand out runs of a part's stored record lines (`line_runs`, RUN_BYTES
  each): the worker parses, splits and encodes them and returns only tokens and counts, so the driver's
  share is decompressing and writing, and no text travels twice. The output depends on none of this: not
  the mode, the engine, the worker count or the batch size. Each text is encoded to UTF-8 once, for its
  split hash, and SentencePiece gets those bytes and returns int32 arrays: no Python int per token, no
  second UTF-8 conversion. `bench/bench_tokenize.py` measures both modes against raw SentencePiece.
- Memory: at most a few batches (or runs) of text and tokens are held at once, whatever the corpus size.

Later steps check shards against their tokenizer with `check_manifest(corpus_dir, tokenizer_sha256)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import sentencepiece as spm
import xxhash

from data_process.executor import Executor, on_ray
from data_process.records import (MissingInputError, checked_parts, iter_record_lines, iter_records, load_record,
                                  step_that_writes)
from fileio import atomic_write_json
from data_process.shards import (ShardWriter, check_vocab_fits, remove_shard, remove_temporaries, verify_shard)

log = logging.getLogger(__name__)

SPLIT_SCHEME = "xxh3_64(utf-8 text) < max(val_fraction * 2**64, smallest hash + 1 if < 20 expected val docs)"
SMALL_VAL_DOCS = 20   # below this many expected val documents, make sure there is at least one
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
BATCH_CHARS = 1_000_000   # ~650K tokens a batch: big enough to keep both cores busy, small enough for RAM
RUN_BYTES = 8 << 20       # stored JSON per worker unit (~2.6M chars of Chinese): fewer units cost Ray less per byte
SHARD_INFO_KEYS = ("documents", "tokens", "bin_sha256", "bin_bytes", "idx_sha256", "sample_sha256")


class ManifestError(ValueError):
    """Shards that are missing, unfinished, or made with another tokenizer."""


@dataclass
class Settings:
    """Everything besides the inputs and the tokenizer that decides the bytes of the output."""
    val_fraction: float
    shard_tokens: int
    dtype: str = "uint16"
    split: str = SPLIT_SCHEME
    kind: str = "doc"             # "doc": record["text"]; "conv": render_chat(record["messages"])


@dataclass
class Batch:
    payloads: list                 # UTF-8 texts (bytes), or message lists
    is_val: np.ndarray             # bool per document
    chars: np.ndarray              # int64 per document
    positions: list                # (part index, records to skip in it) after each document
    rejects: list = field(default_factory=list)   # (position, reason, id) of records dropped while batching


# ---------------------------------------------------------------------------------------------------
# Encoding: the same function runs in the main process (threads mode) or in pool workers (processes)

_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from tokenizer import Tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def encode_documents(tok, kind: str, payloads: list, dtype: str, num_threads: int, thread_pool=None):
    """Token ids of each document followed by eos, concatenated -> (flat tokens, lengths incl. eos).
    kind "doc": payloads are UTF-8 texts (bytes); "conv": message lists, rendered with the chat template."""
    if kind == "doc":
        arrays = tok.encode_batch_arrays(payloads, num_threads=num_threads, thread_pool=thread_pool)
    else:
        arrays = [np.asarray(tok.render_chat(messages).ids, dtype=np.int32) for messages in payloads]
    if not arrays:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64)
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays)) + 1
    # one pass: every document's ids then eos, cast straight to the shard dtype. The cast cannot wrap:
    # SentencePiece ids are < vocab_size, which check_vocab_fits has checked against the dtype.
    eos = np.array([tok.eos_id], dtype=np.int32)
    flat = np.concatenate([x for ids in arrays for x in (ids, eos)], dtype=dtype, casting="unsafe")
    return flat, lengths


def _tokenize_lines(job):
    """A worker's unit (a process-pool worker or a Ray task): a run of one part's stored record lines, parsed,
    split and encoded here -> (Batch without payloads, flat tokens, lengths). The driver only cuts the part
    into runs of lines (decompression, no parsing) and writes shards."""
    kind, path, part_i, first, lines, threshold, dtype = job
    numbered = (((part_i, first + k), load_record(line, path, f"record {first + k}"))
                for k, line in enumerate(lines, 1))
    (batch,) = batches_of(numbered, kind, threshold, batch_chars=None)   # lines is never empty: one batch
    flat, lengths = encode_documents(_worker_tokenizer, kind, batch.payloads, dtype, num_threads=1)
    batch.payloads = []
    return batch, flat, lengths


def line_runs(parts: list, start, run_bytes: int = RUN_BYTES):
    """(part index, records before the run in that part, part path, lines) of the record lines of `parts` from
    position `start` on, in runs of about `run_bytes` within a part: the work units the Encoder hands to workers."""
    run_part, first, lines, size = None, 0, [], 0
    for part_i, k, line in _past(parts, start, iter_record_lines):
        if part_i != run_part or size >= run_bytes:
            if lines:
                yield run_part, first, parts[run_part], lines
            run_part, first, lines, size = part_i, k - 1, [], 0
        lines.append(line)
        size += len(line)
    if lines:
        yield run_part, first, parts[run_part], lines


def _past(parts: list, start, read):
    """(part index, record number in its part from 1, item) of `read(part)` for the parts from position `start`
    on: (index into parts, records of that part already done)."""
    for part_i in range(start[0], len(parts)):
        skip = start[1] if part_i == start[0] else 0
        for k, item in enumerate(read(parts[part_i]), 1):
            if k > skip:
                yield part_i, k, item


class Encoder:
    """Yields (batch, flat tokens, lengths) for a corpus's parts from a position on, in order, with at most a
    few batches in flight. Threads mode: the driver reads the records and SentencePiece's C++ threads encode
    them. Processes mode (a local pool) and the Ray engine: runs of a part's stored record lines (`line_runs`)
    are the work units (`_tokenize_lines`), parsed and encoded in the worker, through data_process/executor.py;
    each worker loads the tokenizer from the shared data dir."""

    def __init__(self, tok, tokenizer_dir, workers: int, mode: str, executor=None):
        if mode not in ("threads", "processes"):
            raise ValueError(f"mode must be 'threads' or 'processes', got {mode!r}")
        self.tok, self.workers, self.mode = tok, workers, mode
        self.tokenizer_dir = str(tokenizer_dir)
        self.executor, self.pool = None, None
        if on_ray(executor):
            self.executor = executor
        elif mode == "processes" and workers > 1:
            self.executor = Executor("local", workers)
        else:
            # Two Python threads, each handing a batch to SentencePiece's C++ threads (GIL released): while
            # one turns its ids into an array (GIL held), the other batch keeps the cores encoding. Each
            # Python thread keeps its own SentencePiece ThreadPool, so no threads are started per batch.
            self.pool = ThreadPoolExecutor(2 if workers > 1 else 1)
            self.depth = 3
            self._local = threading.local()

    def _encode_here(self, kind, payloads, dtype):
        sp_pool = getattr(self._local, "sp_pool", None)
        if sp_pool is None and self.workers > 1:
            sp_pool = self._local.sp_pool = spm.ThreadPool(self.workers)
        return encode_documents(self.tok, kind, payloads, dtype, self.workers, sp_pool)

    def encoded(self, parts: list, kind: str, threshold: int, start, dtype: str, batch_chars: int = BATCH_CHARS):
        if self.executor is not None:
            jobs = ((kind, path, part_i, first, lines, threshold, dtype)
                    for part_i, first, path, lines in line_runs(parts, start))
            yield from self.executor.map(_tokenize_lines, jobs, ordered=True, initializer=_init_worker,
                                         initargs=(self.tokenizer_dir,), start_method="spawn",
                                         describe=lambda job: f"tokenize {job[1]} records {job[3] + 1}-"
                                                              f"{job[3] + len(job[4])}")
            return
        pending = deque()
        for batch in iter_batches(parts, kind, threshold, start, batch_chars):
            pending.append((batch, self.pool.submit(self._encode_here, kind, batch.payloads, dtype)))
            if len(pending) >= self.depth:
                batch, future = pending.popleft()
                yield batch, *future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, *future.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------
# Reading records into batches

def split_hash(key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(key)


def val_threshold(sources: list, kind: str, val_fraction: float) -> int:
    """Documents whose split_hash is below this go to val. Normally val_fraction of the hash range; for a
    small corpus, raised to just above its smallest hash so that val is never empty. Deciding "small"
    reads at most SMALL_VAL_DOCS / val_fraction records, so it costs nothing on a big corpus."""
    base = int(val_fraction * 2 ** 64)
    if val_fraction <= 0:
        return 0
    enough = int(np.ceil(SMALL_VAL_DOCS / val_fraction))
    hashes = []
    for part in sources:
        for record in iter_records(part):
            doc = _document(record, kind) if isinstance(record, dict) else None
            if isinstance(doc, tuple):
                hashes.append(split_hash(doc[1]))
                if len(hashes) >= enough:
                    return base
    return max(base, min(hashes) + 1) if len(hashes) >= 2 else base


def _document(record: dict, kind: str):
    """(payload, split key, chars) of a record, or a reject reason string. For a text document the
    payload is its UTF-8 encoding, which is also its split key: encoded once, hashed, and handed to
    SentencePiece as bytes (no second conversion)."""
    if kind == "doc":
        if record.get("kind", "doc") != "doc":
            return f"kind {record.get('kind')!r} in a pretrain corpus"
        text = record.get("text")
        if not isinstance(text, str):
            return "text missing or not a string"
        if not text:
            return "empty text"
        utf8 = _utf8(text)
        if utf8 is None:   # a lone surrogate (orjson never loads one; a hand-made dict might)
            return "text is not valid Unicode"
        return utf8, utf8, len(text)
    if record.get("kind") != "conv":
        return f"kind {record.get('kind')!r} where a conversation was expected"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(   # what Tokenizer.render_chat accepts
            isinstance(m, dict) and isinstance(m.get("content"), str) and
            m.get("role") in (("system", "user", "assistant") if i == 0 else ("user", "assistant"))
            for i, m in enumerate(messages)):
        return "messages missing or malformed"
    try:
        key = orjson.dumps(messages)
    except orjson.JSONEncodeError:
        return "messages are not valid Unicode"
    return messages, key, sum(len(m["content"]) for m in messages)


def iter_batches(sources: list, kind: str, threshold: int, start=(0, 0), batch_chars=BATCH_CHARS):
    """Batches of documents from `sources` (part files in order), from position `start` on; a document
    is val when its split_hash < threshold. A position is (index into sources, records to skip in that part)."""
    numbered = (((part_i, k), record) for part_i, k, record in _past(sources, start, iter_records))
    return batches_of(numbered, kind, threshold, batch_chars)


def batches_of(numbered, kind: str, threshold: int, batch_chars: int | None = BATCH_CHARS):
    """Batches of the documents among (position, record) pairs, closed at `batch_chars` (None: one batch);
    records that are not documents go to the batch's rejects with their reason."""
    batch = Batch([], [], [], [])
    size = 0
    for position, record in numbered:
        text = record.get("text") if type(record) is dict else None
        if kind == "doc" and type(text) is str and text and record.get("kind", "doc") == "doc" and \
                (key := _utf8(text)) is not None:   # the common case, inline
            payload, chars = key, len(text)
        else:
            doc = _document(record, kind) if isinstance(record, dict) else "record is not an object"
            if isinstance(doc, str):
                rid = record.get("id") if isinstance(record, dict) else None
                batch.rejects.append((position, doc, rid))
                continue
            payload, key, chars = doc
        batch.payloads.append(payload)
        batch.is_val.append(xxhash.xxh3_64_intdigest(key) < threshold)
        batch.chars.append(chars)
        batch.positions.append(position)
        size += chars
        if batch_chars is not None and size >= batch_chars:
            yield _finish_batch(batch)
            batch, size = Batch([], [], [], []), 0
    if batch.payloads or batch.rejects:
        yield _finish_batch(batch)


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _finish_batch(batch: Batch) -> Batch:
    batch.is_val = np.asarray(batch.is_val, dtype=bool)
    batch.chars = np.asarray(batch.chars, dtype=np.int64)
    return batch


# ---------------------------------------------------------------------------------------------------
# One corpus: resumable writing of train/val shards

def _empty_split() -> dict:
    return {"shards": [], "documents": 0, "tokens": 0, "chars": 0}


class CorpusWriter:
    """Routes encoded documents to the open train/val shards, closes them at `shard_tokens` and records
    a checkpoint after each close. Counts are committed only at checkpoints, so a resume is exact."""

    def __init__(self, out_dir: Path, settings: Settings, state: dict):
        self.out_dir, self.settings, self.state = out_dir, settings, state
        self.open = {"train": None, "val": None}
        self.pending = {"train": _empty_split(), "val": _empty_split()}
        self.pending_rejects: list = []

    def _writer(self, split: str) -> ShardWriter:
        if self.open[split] is None:
            name = f"{split}-{len(self.state['splits'][split]['shards']):05d}"
            self.open[split] = ShardWriter(self.out_dir / name, np.dtype(self.settings.dtype))
        return self.open[split]

    def _add(self, split, flat, lengths, chars, sel):
        if not sel.any():
            return
        doc_ids = np.flatnonzero(sel)
        token_mask = np.repeat(sel, lengths)
        self._writer(split).add_batch(flat[token_mask], lengths[doc_ids])
        p = self.pending[split]
        p["documents"] += len(doc_ids)
        p["tokens"] += int(lengths[doc_ids].sum())
        p["chars"] += int(chars[doc_ids].sum())

    def add(self, batch: Batch, flat: np.ndarray, lengths: np.ndarray) -> None:
        self.pending_rejects.extend(batch.rejects)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        train_tokens = np.where(batch.is_val, 0, lengths)
        lo = 0
        while lo < len(lengths):
            # the first document at which the open train shard reaches shard_tokens closes it
            already = self.open["train"].num_tokens if self.open["train"] else 0
            room = self.settings.shard_tokens - already
            cum = np.cumsum(train_tokens[lo:])
            hit = np.flatnonzero(cum >= room)
            hi = lo + int(hit[0]) + 1 if hit.size else len(lengths)
            seg = slice(lo, hi)
            flat_seg = flat[starts[lo]:starts[hi]]
            for split, sel in (("train", ~batch.is_val[seg]), ("val", batch.is_val[seg])):
                self._add(split, flat_seg, lengths[seg], batch.chars[seg], sel)
            if hit.size:
                self.checkpoint(batch.positions[hi - 1])
            lo = hi

    def checkpoint(self, position) -> None:
        """Close the open shards and record that everything before `position` is done."""
        for split in ("train", "val"):
            writer = self.open[split]
            if writer is None:
                continue
            if writer.num_documents == 0:
                writer.abort()
            else:
                info = writer.close()
                name = Path(info["prefix"]).name
                self.state["splits"][split]["shards"].append(name)
                self.state["shard_info"][name] = {k: info[k] for k in SHARD_INFO_KEYS}
            self.open[split] = None
        for split, p in self.pending.items():
            for key in ("documents", "tokens", "chars"):
                self.state["splits"][split][key] += p[key]
        self.pending = {"train": _empty_split(), "val": _empty_split()}
        committed = [r for r in self.pending_rejects if tuple(r[0]) <= tuple(position)]
        self.pending_rejects = [r for r in self.pending_rejects if tuple(r[0]) > tuple(position)]
        for _, reason, record_id in committed:
            self.state["rejects"][reason] = self.state["rejects"].get(reason, 0) + 1
            if len(self.state["reject_examples"]) < 20:
                self.state["reject_examples"].append({"id": record_id, "reason": reason})
        self.state["position"] = list(position)
        _write_json(self.out_dir / PROGRESS, self.state)

    def abort(self):
        for writer in self.open.values():
            if writer is not None:
                writer.abort()


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_sources(docs_root: Path, parts: list[Path]) -> list[dict]:
    """Each input part with its size and sha256 (the fingerprint of the inputs)."""
    out = []
    for p in parts:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        rel = p.relative_to(docs_root) if p.is_relative_to(docs_root) else p
        out.append({"file": str(rel), "bytes": p.stat().st_size, "sha256": h.hexdigest()})
    return out


def fingerprint(tokenizer_sha256: str, settings: Settings, sources: list[dict]) -> str:
    blob = orjson.dumps({"tokenizer": tokenizer_sha256, "settings": asdict(settings),
                         "sources": [(s["file"], s["bytes"], s["sha256"]) for s in sources]})
    return hashlib.sha256(blob).hexdigest()


def _shard_files(out_dir: Path) -> list[Path]:
    return sorted(p for pat in ("train-*.bin", "train-*.idx", "val-*.bin", "val-*.idx")
                  for p in out_dir.glob(pat))


def _wipe(out_dir: Path) -> None:
    """Remove every output of this step in `out_dir` (idx before bin, manifest first)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    for p in _shard_files(out_dir):
        if p.suffix == ".idx":
            p.unlink(missing_ok=True)
    for p in _shard_files(out_dir):
        p.unlink(missing_ok=True)
    remove_temporaries(out_dir)


def shard_problems(out_dir: Path, state: dict, full: bool = False) -> list[str]:
    """What is wrong with the shards a manifest (or progress.json) lists: missing, not opening, sizes, counts or the
    sample digest not as recorded, and with full=True a .bin or .idx whose sha256 is not the recorded one."""
    info = state.get("shard_info") or {}
    return [problem for split in state["splits"].values() for name in split["shards"]
            for problem in verify_shard(out_dir / name, info.get(name, {}), full=full)]


def _listed_shards_complete(out_dir: Path, state: dict, full: bool = True) -> bool:
    problems = shard_problems(out_dir, state, full=full)
    if problems:
        log.warning("%s: %s%s; tokenizing the corpus again", out_dir.name, problems[0],
                    f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    return not problems


def tokenize_corpus(name: str, parts: list[Path], docs_root: Path, tok, tokenizer_dir, out_dir: Path,
                    settings: Settings, *, workers: int = 2, mode: str = "threads",
                    batch_chars: int = BATCH_CHARS, progress: bool = True, executor=None) -> dict:
    """Tokenize one corpus (its part files, in order) into `out_dir`. Returns a report."""
    t0 = time.perf_counter()
    check_vocab_fits(tok.vocab_size, np.dtype(settings.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = describe_sources(docs_root, parts)
    _check_source_digests(sources, parts)
    fp = fingerprint(tok.sha256, settings, sources)
    manifest = _read_json(out_dir / MANIFEST)
    if manifest and manifest.get("fingerprint") == fp and _listed_shards_complete(out_dir, manifest):
        log.info("%s: up to date, kept (%s train tokens)", name, f"{manifest['splits']['train']['tokens']:,}")
        (out_dir / PROGRESS).unlink(missing_ok=True)   # left if a run died between manifest and cleanup
        return {"corpus": name, "status": "kept", **_totals(manifest)}
    if manifest:
        log.info("%s: tokenizer, settings or inputs changed since the last run; re-tokenizing", name)
    state = _read_json(out_dir / PROGRESS)
    if state and state.get("fingerprint") == fp and _listed_shards_complete(out_dir, state):
        status = "resumed"
        listed = {n for s in state["splits"].values() for n in s["shards"]}
        for p in _shard_files(out_dir):   # shards closed after the last checkpoint: redo them
            if p.name.rsplit(".", 1)[0] not in listed:
                remove_shard(out_dir / p.name.rsplit(".", 1)[0])
        remove_temporaries(out_dir)
        log.info("%s: resuming after %d finished shards", name, len(listed))
    else:
        status = "done"
        _wipe(out_dir)
        state = {"fingerprint": fp, "position": [0, 0], "splits": {"train": _empty_split(), "val": _empty_split()},
                 "shard_info": {}, "rejects": {}, "reject_examples": []}
    start_tokens = state["splits"]["train"]["tokens"] + state["splits"]["val"]["tokens"]

    threshold = val_threshold(parts, settings.kind, settings.val_fraction)
    writer = CorpusWriter(out_dir, settings, state)
    encoder = Encoder(tok, tokenizer_dir, workers, mode, executor)
    bar = _progress_bar(name, progress)
    try:
        for batch, flat, lengths in encoder.encoded(parts, settings.kind, threshold, tuple(state["position"]),
                                                    settings.dtype, batch_chars):
            writer.add(batch, flat, lengths)
            if bar is not None:
                bar.update(int(lengths.sum()))
        writer.checkpoint((len(parts), 0))
    except BaseException:
        writer.abort()
        raise
    finally:
        encoder.close()
        if bar is not None:
            bar.close()

    manifest = {
        "corpus": name, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
        "dtype": settings.dtype, "eos_id": tok.eos_id, "splits": state["splits"],
        "sources": sources, "settings": asdict(settings), "fingerprint": fp, "val_hash_below": threshold,
        "shard_info": state["shard_info"], "rejects": state["rejects"],
        "reject_examples": state["reject_examples"],
    }
    upstream = _read_json(docs_root / name / MANIFEST) if settings.kind == "doc" else None
    if isinstance(upstream, dict):
        manifest["upstream"] = {k: v for k, v in upstream.items() if k not in ("sources", "files", "parts")}
    _write_json(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    totals = _totals(manifest)
    new_tokens = totals["tokens"] - start_tokens
    if state["rejects"]:
        log.warning("%s: %d records rejected: %s", name, sum(state["rejects"].values()), state["rejects"])
    log.info("%s: %s documents, %s tokens (%.2f M tokens/s)", name, f"{totals['documents']:,}",
             f"{totals['tokens']:,}", new_tokens / max(seconds, 1e-9) / 1e6)
    return {"corpus": name, "status": status, **totals, "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / max(seconds, 1e-9))}


def _totals(manifest: dict) -> dict:
    splits = manifest["splits"]
    return {"documents": splits["train"]["documents"] + splits["val"]["documents"],
            "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
            "val_documents": splits["val"]["documents"],
            "shards": len(splits["train"]["shards"]) + len(splits["val"]["shards"]),
            "rejects": sum(manifest.get("rejects", {}).values())}


def _progress_bar(name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(desc=f"tokenize {name}", unit="tok", unit_scale=True, leave=False, disable=None)  # None: tty only


# ---------------------------------------------------------------------------------------------------
# The pipeline step

def run(recipe, docs_root, tokenizer_dir, out_root, *, workers: int | None = None, mode: str = "threads",
        dtype: str = "uint16", progress: bool = True, executor=None) -> dict:
    """Tokenize every pretrain corpus, and the SFT stages in `recipe.tokenize.sft_as_pretrain` as
    `sft_<stage>`, into `out_root/<corpus>/`. Returns {"corpora": {name: report}, ...}. An `executor` on the
    Ray engine encodes the batches as Ray tasks (data_process/executor.py); otherwise `mode` decides."""
    from tokenizer import Tokenizer
    docs_root, out_root = Path(docs_root), Path(out_root)
    tok = Tokenizer.load(tokenizer_dir)
    check_vocab_fits(tok.vocab_size, np.dtype(dtype))
    workers = workers or recipe.run.workers or os.cpu_count() or 1
    cfg = recipe.tokenize
    jobs = []   # (name, parts, settings)
    for spec in recipe.corpora:
        if spec.role == "pretrain":
            jobs.append((spec.name, _parts_of(docs_root, [spec.name]),
                         Settings(cfg.val_fraction, cfg.shard_tokens, dtype, kind="doc")))
    for stage in cfg.sft_as_pretrain:
        names = [c.name for c in recipe.corpora if c.role == "sft" and c.stage == stage]
        if not names:
            log.warning("tokenize.sft_as_pretrain names stage %r but no sft corpus has that stage", stage)
        jobs.append((f"sft_{stage}", _parts_of(docs_root, names),
                     Settings(cfg.val_fraction, cfg.shard_tokens, dtype, kind="conv")))
    t0 = time.perf_counter()
    reports = {}
    for name, parts, settings in jobs:
        if parts is None:   # (an existing but empty corpus gets a manifest with no shards)
            log.warning("%s: no cleaned documents under %s; nothing to tokenize", name, docs_root)
            reports[name] = {"corpus": name, "status": "no input", "documents": 0, "tokens": 0}
            continue
        reports[name] = tokenize_corpus(name, parts, docs_root, tok, tokenizer_dir, out_root / name, settings,
                                        workers=workers, mode=mode, progress=progress, executor=executor)
    if progress:
        print_summary(reports)
    return {"corpora": reports, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "tokens": sum(r.get("tokens", 0) for r in reports.values()),
            "seconds": round(time.perf_counter() - t0, 3)}


def print_summary(reports: dict) -> None:
    print(f"{'corpus':22s} {'status':9s} {'documents':>10s} {'val docs':>9s} {'tokens':>13s} {'shards':>6s} "
          f"{'rejects':>7s} {'M tok/s':>7s}")
    for name, r in reports.items():
        rate = f"{r['tokens_per_s'] / 1e6:.2f}" if r.get("tokens_per_s") else "-"
        print(f"{name:22s} {r['status']:9s} {r['documents']:>10,} {r.get('val_documents', 0):>9,} {r['tokens']:>13,} "
              f"{r.get('shards', 0):>6} {r.get('rejects', 0):>7} {rate:>7s}", flush=True)


def _parts_of(docs_root: Path, corpus_names: list[str]) -> list[Path] | None:
    """The part files of these corpora in order, or None when none of their directories exists. Each directory's
    parts are the ones its manifest lists, all present with their recorded sizes (records.checked_parts raises
    MissingInputError otherwise: tokenizing what is left would silently drop the missing documents)."""
    dirs = [docs_root / name for name in corpus_names if (docs_root / name).is_dir()]
    return [part for d in dirs for part in checked_parts(d)] if dirs else None


def _check_source_digests(sources: list[dict], parts: list[Path]) -> None:
    """The sha256 describe_sources just computed against the one each part's manifest recorded (free: the
    fingerprint reads every input anyway). A part that changed since its step wrote it is damage, not input."""
    manifests = {}
    for source, part in zip(sources, parts):
        if part.parent not in manifests:
            manifests[part.parent] = _read_json(part.parent / MANIFEST) or {}
        want = (manifests[part.parent].get("part_info") or {}).get(part.name, {}).get("sha256")
        if want is not None and want != source["sha256"]:
            step = step_that_writes(part.parent)
            raise MissingInputError(f"{part}: content differs from the sha256 its manifest recorded (corrupted): "
                                    f"re-run `python data_process.py --steps {step}`")


# ---------------------------------------------------------------------------------------------------
# For every later step: are these shards finished, and made with my tokenizer?

def load_manifest(corpus_dir) -> dict:
    path = Path(corpus_dir) / MANIFEST
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise ManifestError(f"{path}: missing or unreadable; run `python data_process.py` (tokenize step)")
    return manifest


def check_manifest(corpus_dir, tokenizer_sha256: str | None = None, *, verify_shards: bool = True,
                   full: bool = False) -> dict:
    """The corpus's manifest, after checking that it is finished, that its shards open, agree with their .idx and
    with the sizes, counts and sample digest the manifest recorded (full=True: their whole sha256 too, which reads
    every byte), and (when given) that it was made with the tokenizer whose sha256 is `tokenizer_sha256`.
    Raises ManifestError otherwise."""
    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir)
    if tokenizer_sha256 is not None and manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise ManifestError(f"{corpus_dir}: shards were made with tokenizer {manifest.get('tokenizer_sha256')}, "
                            f"not {tokenizer_sha256}; re-run the tokenize step with this tokenizer")
    if verify_shards:
        problems = shard_problems(corpus_dir, manifest, full=full)
        if problems:
            raise ManifestError(f"{corpus_dir}: a shard listed in the manifest is missing, inconsistent or "
                                f"corrupted: {problems[0]}; re-run `python data_process.py --steps tokenize`")
    return manifest


def shard_prefixes(corpus_dir, split: str = "train", tokenizer_sha256: str | None = None) -> list[Path]:
    """The shard prefixes of one split of a finished corpus (checked with check_manifest)."""
    manifest = check_manifest(corpus_dir, tokenizer_sha256)
    return [Path(corpus_dir) / name for name in manifest["splits"][split]["shards"]]
