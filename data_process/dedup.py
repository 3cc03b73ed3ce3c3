"""The `dedup` pipeline step: decontamination, exact and near-duplicate removal across all corpora of a run.

    data/clean/<corpus>/part-*.jsonl.zst  ->  data/dedup/<corpus>/part-*.jsonl.zst + manifest.json
                                              data/dedup/report.json, examples.jsonl, removed.parquet

Out of core, in the manner of datatrove's and NeMo Curator's MinHash pipelines: explicit stages over work units,
each a plain function of one small picklable unit, run through `mapper(fn, units)` (a process pool by default;
Ray tasks under `--engine ray`), with everything between stages in files under `data/dedup/.work/`:

  1. sign      one unit per clean part file (<= 100k records): per record the exact hash of the normalized
               text, the 8-bit MinHash sketch (minhash.py), decontamination against the eval sets; its band
               rows (band hash, record) and exact rows (hash, record) each written as one file sorted by hash.
  2. exact     one unit per hash range: the rows of that range from every unit's file (a binary search into a
               memory map, never the whole file), sorted; in each group of equal hashes the first record in
               keep order stays, the others are exact duplicates of it.
  3. buckets   one unit per band-hash range, the same way: records sharing a band hash are candidates; each
               candidate pair is verified on the sketches (estimated Jaccard >= threshold) and kept as an edge.
  4. decide    over ranges of records in keep order, with one status byte per record: a record is removed
               only when a KEPT record earlier in keep order is within the threshold of it (a verified edge,
               not connectivity: with A~B and B~C, C stays when A and C differ, because B is gone). Keep order:
               corpora by `priority` (higher first), ties by recipe order, then the order records were read,
               so a group keeps its highest-priority, earliest (original) copy.
  5. write     one unit per clean part file: its survivors into the output part of the same name; and
               `removed.parquet` (every removed record: corpus, id, reason
               exact/near/contamination, the kept record or eval question it matched, the similarity),
               examples, the report (the done-marker, written last).

Memory: `[dedup] memory_gb` (all workers together) sets how many ranges stages 2-4 cut the work into; the
driver holds one status byte per record, a signature worker about 200 MB whatever the corpus size. The
partitioning never changes a decision (a bucket lies in one range; edges are the same set), so any
memory_gb and any worker count give the same output.

Bucket pairs: in a bucket (records sharing one band hash, in keep order) every member is paired with the
bucket's first BUCKET_PAIR_CAP members and its predecessor: every pair for buckets of up to CAP + 1 records
(nearly all of them), linear work for a bucket of 10k templated pages.

Shingling: character 5-grams of the normalized text, chosen by bench/bench_dedup.py on near-duplicates built
from the real samples (web pages, Toyhom dialogues, the fever textbook, Firefly text; 3-50% character and
sentence edits; negatives: >= 30% edits and other documents of the same source). Best-F1 per shingling
(full run): char 3/4/5/6-gram 0.958/0.963/0.971/0.976, jieba word 1/2/3-gram 0.943/0.965/0.972. Character
5-grams match the best jieba setting and need no segmenter: jieba alone runs at ~0.2 M chars/s.

Decontamination: a text is contamination when it holds at least `decontam_min_share` of the
`decontam_ngram`-character windows of one printed form of a question (the question; its blank filled by the
answer; with its options, lettered or bare). One shared window is not enough: stock phrases of politics and
law questions ("全面建设社会主义现代化国家") fill ordinary news text. Defaults (10-grams, share 0.3) from
bench/bench_dedup.py [5] (1,277 real-sample + project questions planted in real clean text, 5 styles; negatives:
3,672 clean real documents and 290 clean texts sharing one 13-20 character phrase with a question): the
highest catch rate with no false removal in either negative set. Any-window matching removes 98% of the
shared-phrase texts at n=10 (71% at 13); share 0.3 removes none, at the same catch rate on pasted, dumped and
answer-filled questions, and catches 59% of questions with a character changed (13-grams at share 0.5: 40%).
8-grams catch more (72%) but begin to remove shared-phrase texts (0.3%).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xxhash

from data_process import evalsets, minhash
from data_process.executor import Executor
from data_process.records import ZSTD_LEVEL, iter_record_lines, iter_records, list_parts
from fileio import AtomicWriter, DirLock, atomic_file, atomic_write_bytes, check_files, file_sha256

log = logging.getLogger(__name__)

BATCH_CHARS = 2_000_000      # characters hashed at once inside a signature unit
EXAMPLES_PER_KIND = 30       # example pairs written to examples.jsonl per kind (exact, near, decontam)
BUCKET_PAIR_CAP = 16         # a bucket member is paired with this many first members + its predecessor
VERIFY_PAIRS = 200_000       # candidate pairs verified at once (their sketches gathered from disk)
AUDIT_CHUNK = 500_000        # removed records per chunk of removed.parquet
ROW_BYTES = 96               # working memory of one band/exact row in stages 2-3 (load, sort, pair blocks)
EDGE_BYTES = 80              # working memory of one verified edge in stage 4
MAX_PARTITIONS = 1 << 14
# fork: workers start in milliseconds and need no `if __name__ == "__main__"` guard in the caller; the
# parent holds no locks worth worrying about here (no torch, no threads of ours). spawn elsewhere.
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
VERSION = 2                  # bump when the algorithm changes, so finished outputs are recomputed
WORK = ".work"               # data/dedup/.work: the stages' files, removed when the step is done

KEPT, CONTAMINATED, EXACT, NEAR = 0, 1, 2, 3      # status byte of a record
REASONS = {CONTAMINATED: "contamination", EXACT: "exact", NEAR: "near"}
ROW = np.dtype([("h", "<u8"), ("i", "<u4")])       # a band or exact row of a signature unit: hash, record
EDGE = np.dtype([("v", "<i8"), ("u", "<i8"), ("s", "<f4")])   # v within threshold of u (u < v), similarity s


# ---------------------------------------------------------------------------------------------------------
# What text of a record is compared
def dedup_text(record: dict) -> str:
    """The text two records must share to be duplicates.

    doc: its text. conv: user and assistant turns concatenated; the system prompt is left out because a few
    stock system prompts are shared by thousands of unrelated conversations and would make short ones look
    alike. pref: prompt + chosen answer; the rejected answer is left out because it is what varies between
    otherwise identical pairs (several sampled rejects for one prompt), and training on the same prompt and
    chosen answer twice is the duplication that matters.
    """
    kind = record.get("kind")
    if kind == "doc":
        return record.get("text") or ""
    if kind == "conv":
        return "\n".join(m.get("content") or "" for m in record.get("messages") or []
                         if m.get("role") in ("user", "assistant"))
    if kind == "pref":
        prompt = "\n".join(m.get("content") or "" for m in record.get("prompt") or [] if m.get("role") == "user")
        return prompt + "\n" + (record.get("chosen") or "")
    raise ValueError(f"record {record.get('id')!r}: unknown kind {kind!r}")


def decontam_text(record: dict, text: str | None = None) -> str:
    """The text checked against the eval sets: whole documents and conversations, only the prompt of a
    preference pair (its answers are the model's own style, the prompt is what could be an exam question)."""
    if record.get("kind") == "pref":
        return "\n".join(m.get("content") or "" for m in record.get("prompt") or [] if m.get("role") == "user")
    return text if text is not None else dedup_text(record)


# ---------------------------------------------------------------------------------------------------------
# Eval sets: parsed by data_process/evalsets.py, the parser eval.py uses too
BLANK = re.compile(r"_{2,}|（\s*）|\(\s*\)")


def read_eval_questions(path: Path, fmt: str) -> tuple[list[evalsets.Question], int]:
    """Every question of one C-Eval/CMMLU CSV, answered or not (C-Eval's test split has no answers: its
    question and options are what can leak), plus the number of rows dropped as malformed."""
    result = evalsets.read_questions(path, fmt, need_answer=False)
    return result.questions, sum(result.dropped.values())


def _variant_pieces(q: evalsets.Question) -> list[str]:
    """The raw texts question_variants normalizes: stem, lettered options, bare options, filled form (if any).
    Normalization is character by character, so normalizing the pieces and joining them equals normalizing the
    joined text: all questions' pieces are normalized in one batch."""
    options = q.option_list
    pieces = [BLANK.sub("", q.question), *(letter + opt for letter, opt in zip("ABCD", options)), *options]
    answer = q.answer_text
    if answer is not None:
        # a function, not a template: an answer such as "$\\mathrm{e}$" holds backslashes that re.sub would
        # read as escapes ("bad escape \\m")
        question = q.question
        pieces.append(BLANK.sub(lambda _: answer, question, count=1) if BLANK.search(question) else question + answer)
    return pieces


def _variants_of(norm: list[str], n: int) -> list[tuple[str, int | None]]:
    stem, labeled, bare = norm[0], norm[0] + "".join(norm[1:5]), norm[0] + "".join(norm[5:9])
    windows = len(stem) - min(len(stem), (n + 1) // 2) + 1 if stem else 0
    variants = [(stem, None), (labeled, windows), (bare, windows)]
    if len(norm) > 9:
        variants.insert(1, (norm[9], None))
    return variants


def question_variants(q: evalsets.Question, n: int) -> list[tuple[str, int | None]]:
    """Alnum-normalized forms in which a question shows up in training text, each with how many of its
    n-character windows count (None: all): the question; the question with its blank filled by (or followed
    by) the right answer, when the answer is known; the question followed by its options, with and without
    their letters (how exam dumps on the web print them). In the options forms a window must hold at least
    half a window (or the whole stem, if shorter) of question text, so a run of options such as 'a是b否c...'
    never matches alone."""
    return _variants_of([minhash.normalize_alnum(p) for p in _variant_pieces(q)], n)


def _all_variants(questions: list, n: int) -> list[list[tuple[str, int | None]]]:
    """question_variants of many questions, normalized in one batch."""
    pieces = [_variant_pieces(q) for q in questions]
    flat = [p for ps in pieces for p in ps]
    if not flat:
        return []
    cps, lengths = minhash.fold_batch(*minhash.encode_batch(flat), alnum=True)
    ends = np.cumsum(lengths)
    text = minhash._decode(cps)
    norm = [text[e - k:e] for e, k in zip(ends.tolist(), lengths.tolist())]
    out, at = [], 0
    for ps in pieces:
        out.append(_variants_of(norm[at:at + len(ps)], n))
        at += len(ps)
    return out


def eval_index(question_sets: list[list], n: int) -> dict:
    """The decontamination index: every distinct n-gram hash of every printed form ("entry") of every question,
    sorted (a hash shared by several entries appears once per entry); per entry its question and how many
    windows it has; per question (numbered across the sets in order) its set. Plus how many questions have no
    n-gram at all (too short in every form)."""
    hashes, entries, entry_q, entry_windows, q_set, too_short = [], [], [], [], [], 0
    for s, questions in enumerate(question_sets):
        for variants in _all_variants(questions, n):
            qi = len(q_set)
            q_set.append(s)
            got = 0
            for text, windows in variants:
                h = np.unique(minhash.ngram_hashes64(minhash.codepoints(text), n)[:windows])
                if not len(h):
                    continue
                got += len(h)
                hashes.append(h)
                entries.append(np.full(len(h), len(entry_q), np.int32))
                entry_q.append(qi)
                entry_windows.append(len(h))
            too_short += got == 0
    h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    e = np.concatenate(entries) if entries else np.empty(0, np.int32)
    order = np.lexsort((e, h))
    return {"hashes": h[order], "entry": e[order], "entry_question": np.array(entry_q, np.int32),
            "entry_windows": np.array(entry_windows, np.int32), "question_set": np.array(q_set, np.int32),
            "too_short": too_short}


def find_contamination(cps: np.ndarray, lengths: np.ndarray, index: dict, n: int,
                       min_share: float) -> tuple[np.ndarray, np.ndarray]:
    """For every text of a batch (alnum-normalized code points, per-text lengths): the question it is
    contaminated by (-1: none) and the share of that question form's windows the text holds (the best form of
    the best question; 0 if none). One vectorized pass over the whole batch."""
    question = np.full(len(lengths), -1, np.int64)
    share = np.zeros(len(lengths), np.float32)
    index_h = index["hashes"]
    h = minhash.ngram_hashes64(cps, n)
    if len(index_h) == 0 or len(h) == 0:
        return question, share
    doc_of_char = np.repeat(np.arange(len(lengths)), lengths)
    inside = doc_of_char[:len(h)] == doc_of_char[n - 1:n - 1 + len(h)]
    h, doc = h[inside], doc_of_char[:len(h)][inside]
    lo = np.searchsorted(index_h, h, "left")
    hi = np.searchsorted(index_h, h, "right")
    hit = hi > lo
    if not hit.any():
        return question, share
    # each (text, window hash) once: a window repeated in the text counts once, as in the entry's count
    doc, h = doc[hit], h[hit]
    order = np.lexsort((h, doc))
    doc, h = doc[order], h[order]
    once = np.r_[True, (doc[1:] != doc[:-1]) | (h[1:] != h[:-1])]
    doc, h = doc[once], h[once]
    lo, hi = np.searchsorted(index_h, h, "left"), np.searchsorted(index_h, h, "right")
    count = hi - lo
    pos = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())   # lo..hi-1 of each hit
    entry = index["entry"][pos].astype(np.int64)
    doc = np.repeat(doc, count)
    keys, matched = np.unique(doc * len(index["entry_windows"]) + entry, return_counts=True)
    kdoc, kentry = keys // len(index["entry_windows"]), keys % len(index["entry_windows"])
    kshare = matched / index["entry_windows"][kentry]
    # best per text: highest share, then the first question
    order = np.lexsort((index["entry_question"][kentry], -kshare, kdoc))
    first = np.r_[True, kdoc[order][1:] != kdoc[order][:-1]]
    best = order[first]
    ok = kshare[best] >= min_share - 1e-9
    question[kdoc[best][ok]] = index["entry_question"][kentry[best][ok]]
    share[kdoc[best]] = kshare[best]
    return question, share


# ---------------------------------------------------------------------------------------------------------
# Files between the stages: .npy written atomically, read back through memory maps
def _save(path: Path, arr: np.ndarray) -> None:
    """A stage file: atomic (a killed run never leaves half of one under its name), not fsynced (scratch that
    the next stage checks by size, and that a re-run after a power cut recomputes: data/dedup/.work goes when
    the step is done; the step's outputs are fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, durable=False) as f:
        np.save(f, arr)


def _load(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _bounds(j: int, parts: int) -> tuple[int, int | None]:
    """Hash range [lo, hi) of partition j of `parts` (hi None: to the end of the 64-bit space)."""
    step = (1 << 64) // parts
    return j * step, (None if j == parts - 1 else (j + 1) * step)


def _slice_sorted(arr: np.ndarray, field: str, lo, hi) -> np.ndarray:
    """Rows of a sorted (memory-mapped) array whose `field` lies in [lo, hi): two binary searches, so only
    the pages of that range are read."""
    col = arr[field]
    a = int(np.searchsorted(col, col.dtype.type(lo), "left"))
    b = len(col) if hi is None else int(np.searchsorted(col, col.dtype.type(hi), "left"))
    return np.array(arr[a:b])


def _unit_file(work: Path, unit: int, what: str) -> Path:
    return work / "sig" / f"u{unit:06d}.{what}"


# ---------------------------------------------------------------------------------------------------------
# Stage 1: signatures, one unit per clean part file
@functools.lru_cache(maxsize=2)
def _hasher(num_perm: int, ngram: int) -> minhash.MinHasher:
    return minhash.MinHasher(num_perm=num_perm, ngram=ngram)


@functools.lru_cache(maxsize=2)
def _index(path: str, mtime_ns: int) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def hash_batch(texts: list[str], dtexts: list[str], cfg: dict, index: dict) -> dict:
    """Exact hashes, sketches, band hashes and eval hits of one batch of (dedup texts, decontam texts)."""
    raw_cps, raw_lengths = minhash.encode_batch(texts)
    cps, lengths = minhash.fold_batch(raw_cps, raw_lengths)
    starts = np.cumsum(lengths) - lengths
    buf = cps.tobytes()
    exact = np.fromiter((xxhash.xxh3_64_intdigest(buf[4 * s:4 * (s + k)]) for s, k in zip(starts, lengths)),
                        np.uint64, len(texts))
    sigs = _hasher(cfg["num_perm"], cfg["ngram"]).signatures_cps(cps, lengths)
    n, share = cfg["decontam_ngram"], cfg["decontam_min_share"]
    if len(index["hashes"]):
        contam, score = find_contamination(*minhash.alnum_only(cps, lengths), index, n, share)
    else:                                        # no eval set: nothing to look for
        contam, score = np.full(len(texts), -1, np.int64), np.zeros(len(texts), np.float32)
    own = [i for i, (t, d) in enumerate(zip(texts, dtexts)) if d is not t]   # preference pairs: prompt only
    if own and len(index["hashes"]):
        dcps, dlengths = minhash.fold_batch(*minhash.encode_batch([dtexts[i] for i in own]), alnum=True)
        contam[own], score[own] = find_contamination(dcps, dlengths, index, n, share)
    return {"exact": exact, "bands": minhash.band_hashes(sigs, cfg["bands"], cfg["rows"]),
            "sketch": minhash.sketch(sigs), "contam": contam, "score": score, "has_shingles": lengths > 0,
            "chars": int(raw_lengths.sum())}


def _unit_batches(part: Path, ids: list):
    texts, dtexts, chars = [], [], 0
    for record in iter_records(part):
        if record.get("kind") == "doc":              # nearly every record: its text is checked whole
            text = dtext = record.get("text") or ""
        else:
            text = dedup_text(record)
            dtext = decontam_text(record, text)      # the same object unless a preference pair
        texts.append(text)
        dtexts.append(dtext)
        ids.append(str(record.get("id")))
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield texts, dtexts
            texts, dtexts, chars = [], [], 0
    if texts:
        yield texts, dtexts


def _sign_done(unit: dict) -> dict | None:
    work, k = Path(unit["work"]), unit["index"]
    try:
        with np.load(_unit_file(work, k, "meta.npz"), allow_pickle=False) as z:
            meta = {key: z[key] for key in ("n", "chars", "band_rows", "exact_rows")}
        import pyarrow.parquet as pq
        ok = (len(_load(_unit_file(work, k, "bands.npy"), True)) == meta["band_rows"]
              and len(_load(_unit_file(work, k, "exact.npy"), True)) == meta["exact_rows"]
              and _load(_unit_file(work, k, "sketch.npy"), True).shape[0] == meta["n"]
              and pq.ParquetFile(_unit_file(work, k, "ids.parquet")).metadata.num_rows == meta["n"])
        return {"index": k, **{key: int(v) for key, v in meta.items()}} if ok else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _preload_pyarrow() -> None:
    """Import pyarrow in the driver before a pool forks, with the pandas module it loads on its first table
    (its pandas shim): every signature unit writes a parquet file, and each forked worker would otherwise
    pay ~0.5 s of CPU for these imports (measured), which the driver pays anyway for the audit file."""
    import pyarrow as pa
    pa.table({"id": pa.array([""], pa.string())})


def sign_unit(unit: dict) -> dict:
    """Stage 1 for one clean part file: its records' sketches, ids, exact hashes, eval hits (meta.npz, written
    last: the unit's done-marker) and its band and exact rows sorted by hash. Skipped when already done."""
    done = _sign_done(unit)
    if done is not None:
        return done
    import pyarrow as pa
    import pyarrow.parquet as pq
    work, k, cfg = Path(unit["work"]), unit["index"], unit["cfg"]
    index_path = work / "eval_index.npz"
    index = _index(str(index_path), index_path.stat().st_mtime_ns)
    ids: list[str] = []
    got = {key: [] for key in ("exact", "bands", "sketch", "contam", "score", "has_shingles")}
    chars = 0
    for texts, dtexts in _unit_batches(Path(unit["part"]), ids):
        r = hash_batch(texts, dtexts, cfg, index)
        for key in got:
            got[key].append(r[key])
        chars += r["chars"]
    empty = {"exact": np.empty(0, np.uint64), "bands": np.empty((0, cfg["bands"]), np.uint64),
             "sketch": np.empty((0, cfg["num_perm"]), np.uint8), "contam": np.empty(0, np.int64),
             "score": np.empty(0, np.float32), "has_shingles": np.empty(0, bool)}
    a = {key: np.concatenate(v) if v else empty[key] for key, v in got.items()}
    n = len(ids)
    local = np.arange(n, dtype=np.uint32)
    clean = a["contam"] < 0                      # a contaminated record never stays, nor keeps another
    exact_rows = np.empty(int(clean.sum()), ROW)
    exact_rows["h"], exact_rows["i"] = a["exact"][clean], local[clean]
    exact_rows = exact_rows[np.lexsort((exact_rows["i"], exact_rows["h"]))]
    valid = clean & a["has_shingles"]
    band_rows = np.empty(int(valid.sum()) * cfg["bands"], ROW)
    band_rows["h"] = a["bands"][valid].ravel()
    band_rows["i"] = np.repeat(local[valid], cfg["bands"])
    band_rows = band_rows[np.argsort(band_rows["h"], kind="stable")]   # i is ascending already: (h, i) order
    _save(_unit_file(work, k, "sketch.npy"), a["sketch"])
    _save(_unit_file(work, k, "bands.npy"), band_rows)
    _save(_unit_file(work, k, "exact.npy"), exact_rows)
    with atomic_file(_unit_file(work, k, "ids.parquet"), durable=False) as f:
        pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), f)
    with atomic_file(_unit_file(work, k, "meta.npz"), durable=False) as f:
        np.savez(f, n=n, chars=chars, band_rows=len(band_rows), exact_rows=len(exact_rows),
                 contam=a["contam"].astype(np.int32), score=a["score"], has_shingles=a["has_shingles"])
    return {"index": k, "n": n, "chars": chars, "band_rows": len(band_rows), "exact_rows": len(exact_rows)}


def _rows(task: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(hash, record number in keep order) of every unit's `what` rows in the task's hash range."""
    work, lo, hi = Path(task["work"]), *_bounds(task["j"], task["parts"])
    hs, ds = [], []
    for k, offset in task["units"]:
        rows = _slice_sorted(_load(_unit_file(work, k, what), True), "h", lo, hi)
        hs.append(rows["h"])
        ds.append(rows["i"].astype(np.int64) + offset)
    if not hs:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hs), np.concatenate(ds)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: exact duplicates, one unit per hash range
def exact_partition(task: dict) -> dict:
    """Of records with equal normalized text (in this hash range) the first in keep order stays; writes the
    (duplicate v, kept u) pairs sorted by v. Skipped when already done."""
    out = Path(task["work"]) / "exact" / f"{task['parts']}-p{task['j']:05d}.npy"
    try:
        return {"j": task["j"], "pairs": len(_load(out, True))}
    except (OSError, ValueError):
        pass
    h, d = _rows(task, "exact.npy")
    order = _order_by_hash(h, d, runs=True)
    h, d = h[order], d[order]
    start = np.r_[True, h[1:] != h[:-1]] if len(h) else np.empty(0, bool)
    first = d[np.maximum.accumulate(np.where(start, np.arange(len(h)), 0))] if len(h) else d
    pairs = np.empty(int((~start).sum()), EDGE)
    pairs["v"], pairs["u"], pairs["s"] = d[~start], first[~start], 1.0
    pairs.sort(order=["v"])
    _save(out, pairs)
    return {"j": task["j"], "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------------------
# Stage 3: LSH buckets -> verified edges, one unit per band-hash range
def _order_by_hash(h: np.ndarray, d: np.ndarray, runs: bool) -> np.ndarray:
    """The order that sorts rows by (h, d). `runs`: the rows are runs, each sorted by (h, d) and each with
    all its d below the next run's (what _rows returns: one run per signature unit); a stable sort on h alone
    then gives the same order, ~15x faster than lexsort (timsort merges the runs; measured)."""
    return np.argsort(h, kind="stable") if runs else np.lexsort((d, h))


def bucket_pairs(h: np.ndarray, d: np.ndarray, cap: int = BUCKET_PAIR_CAP, runs: bool = False):
    """Candidate pairs (u, v), u < v, of records sharing a band hash, in blocks (one per pairing rank, so
    memory stays linear in the rows): each bucket member with the bucket's first `cap` members and with its
    predecessor. Pairs may repeat across blocks (and across bands); the caller makes them unique. `runs`: as
    in _order_by_hash."""
    order = _order_by_hash(h, d, runs)
    h, d = h[order], d[order]
    if len(h) < 2:
        return
    pos = np.arange(len(h))
    start = np.r_[True, h[1:] != h[:-1]]
    first = np.maximum.accumulate(np.where(start, pos, 0))
    rank = pos - first
    for k in range(cap):
        sel = rank > k
        if not sel.any():
            return
        yield d[first[sel] + k], d[sel]
    sel = rank > cap
    if sel.any():
        yield d[pos[sel] - 1], d[sel]


def _excluded(bits: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Look up records in a np.packbits bitmap (big-endian bit order)."""
    return ((bits[d >> 3] >> (7 - (d & 7)).astype(np.uint8)) & 1).astype(bool)


def gather_sketches(work: Path, offsets: np.ndarray, docs: np.ndarray, num_perm: int) -> np.ndarray:
    """Sketches of records (keep-order numbers, sorted unique) read from their units' memory-mapped files,
    one unit at a time (each map is closed before the next is opened, so resident memory stays at one unit)."""
    out = np.empty((len(docs), num_perm), np.uint8)
    unit = np.searchsorted(offsets, docs, "right") - 1
    cut = np.flatnonzero(np.r_[True, unit[1:] != unit[:-1], True])
    for a, b in zip(cut[:-1], cut[1:]):
        k = int(unit[a])
        mm = _load(_unit_file(work, k, "sketch.npy"), True)
        out[a:b] = mm[docs[a:b] - offsets[k]]
        del mm
    return out


def verify_pairs(work: Path, offsets: np.ndarray, u: np.ndarray, v: np.ndarray, num_perm: int) -> np.ndarray:
    """Estimated Jaccard of candidate pairs from their 8-bit sketches."""
    docs, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    sk = gather_sketches(work, offsets, docs, num_perm)
    return minhash.sketch_jaccard(sk[inv[:len(u)]], sk[inv[len(u):]]).astype(np.float32)


def _unique_edges(e: np.ndarray) -> np.ndarray:
    if not len(e):
        return e
    e = e[np.lexsort((e["u"], e["v"]))]
    keep = np.r_[True, (e["v"][1:] != e["v"][:-1]) | (e["u"][1:] != e["u"][:-1])]
    return e[keep]


def bucket_partition(task: dict) -> dict:
    """Stage 3 for one band-hash range: candidate pairs from the buckets, verified on the sketches; the edges
    at or above the threshold written sorted by (v, u), with the number of candidates in a sidecar."""
    work = Path(task["work"])
    out = work / "edges" / f"{task['parts']}-p{task['j']:05d}.npy"
    side = out.with_suffix(".json")
    try:
        got = json.loads(side.read_text())
        if len(_load(out, True)) == got["edges"]:
            return got
    except (OSError, ValueError, KeyError):
        pass
    offsets = np.asarray(task["offsets"], np.int64)
    h, d = _rows(task, "bands.npy")
    bits = _load(work / "exact_dups.npy")
    keep = ~_excluded(bits, d) if len(d) else np.empty(0, bool)
    h, d = h[keep], d[keep]
    edges, candidates = [], 0
    for u, v in bucket_pairs(h, d, task.get("cap", BUCKET_PAIR_CAP), runs=True):
        for s in range(0, len(u), VERIFY_PAIRS):
            uu, vv = u[s:s + VERIFY_PAIRS], v[s:s + VERIFY_PAIRS]
            key = np.unique(np.stack([uu, vv], axis=1), axis=0)
            uu, vv = key[:, 0], key[:, 1]
            candidates += len(uu)
            est = verify_pairs(work, offsets, uu, vv, task["num_perm"])
            ok = est >= task["threshold"]
            e = np.empty(int(ok.sum()), EDGE)
            e["v"], e["u"], e["s"] = vv[ok], uu[ok], est[ok]
            edges.append(e)
    e = _unique_edges(np.concatenate(edges) if edges else np.empty(0, EDGE))
    _save(out, e)
    got = {"j": task["j"], "candidates": candidates, "edges": len(e)}
    side.write_text(json.dumps(got))
    return got


# ---------------------------------------------------------------------------------------------------------
# Stage 4: the decisions, over ranges of records in keep order
def resolve(lo: int, hi: int, edges: np.ndarray, status: np.ndarray, rounds: int = 64) -> np.ndarray:
    """Decide records lo..hi-1 (status KEPT so far) from the edges (v in [lo, hi), u < v) given the status of
    every earlier record: v is removed (NEAR) when some u of an edge is kept. Processing in keep order makes
    this the greedy rule "removed only if a kept record is within the threshold". Vectorized in rounds (each
    decides at least the first undecided record; a round costs one pass over the edges), then a plain loop for
    what long chains leave. Returns, per record removed here, its best kept match as an EDGE row."""
    if not len(edges):
        return np.empty(0, EDGE)
    UNDECIDED = 255
    v, u = edges["v"], edges["u"]
    loc = v - lo
    n = hi - lo
    state = status[lo:hi].copy()
    incoming = np.bincount(loc, minlength=n) > 0
    state[incoming & (state == KEPT)] = UNDECIDED
    earlier = u < lo
    for _ in range(rounds):
        open_ = state == UNDECIDED
        if not open_.any():
            break
        us = np.where(earlier, status[np.where(earlier, u, 0)], state[np.where(earlier, 0, u - lo)])
        kept_u = np.bincount(loc, weights=us == KEPT, minlength=n) > 0
        blocked = np.bincount(loc, weights=(us == KEPT) | (us == UNDECIDED), minlength=n) > 0
        state[open_ & kept_u] = NEAR
        state[open_ & ~blocked] = KEPT
    if (state == UNDECIDED).any():    # a long chain: finish in keep order
        order = np.argsort(v, kind="stable")
        cuts = np.searchsorted(v[order], np.arange(lo, hi + 1))
        for x in np.flatnonzero(state == UNDECIDED):
            us = u[order[cuts[x]:cuts[x + 1]]]
            st = np.where(us < lo, status[np.maximum(us, 0)], state[np.clip(us - lo, 0, n - 1)])
            state[x] = NEAR if (st == KEPT).any() else KEPT
    status[lo:hi] = state
    # the best kept match of each removed record: highest similarity, then the earliest
    removed_here = (state[loc] == NEAR) & (status[u] == KEPT)
    m = edges[removed_here]
    m = m[np.lexsort((m["u"], -m["s"], m["v"]))]
    return m[np.r_[True, m["v"][1:] != m["v"][:-1]]] if len(m) else m


def verified_edges(bands: np.ndarray, sketches: np.ndarray, valid: np.ndarray, threshold: float,
                   cap: int = BUCKET_PAIR_CAP) -> tuple[np.ndarray, int]:
    """In-memory form of stage 3 (tests, benchmarks): the verified EDGE rows among the `valid` records of a
    (N, bands) band-hash matrix and their sketches, and the number of candidate pairs."""
    idx = np.flatnonzero(valid)
    h, d = bands[idx].ravel(), np.repeat(idx, bands.shape[1])
    edges, candidates = [], 0
    for u, v in bucket_pairs(h, d, cap):
        key = np.unique(np.stack([u, v], axis=1), axis=0)
        u, v = key[:, 0], key[:, 1]
        candidates += len(u)
        est = minhash.sketch_jaccard(sketches[u], sketches[v]).astype(np.float32)
        ok = est >= threshold
        e = np.empty(int(ok.sum()), EDGE)
        e["v"], e["u"], e["s"] = v[ok], u[ok], est[ok]
        edges.append(e)
    e = _unique_edges(np.concatenate(edges) if edges else np.empty(0, EDGE))
    return e, candidates


def keep_greedy(n: int, edges: np.ndarray, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """In-memory form of stage 4 (tests, benchmarks): the status of n records and the matches, one range."""
    status = np.zeros(n, np.uint8)
    if excluded is not None:
        status[excluded] = EXACT
    return status, resolve(0, n, _unique_edges(edges), status)


# ---------------------------------------------------------------------------------------------------------
# The map every stage runs through
def pool_mapper(workers: int):
    """`mapper(fn, units)` over a process pool of `workers` (data_process/executor.py; results in input order,
    so the outcome never depends on the worker count); a plain map for one worker. Ray's engine passes its own
    mapper (`Executor.mapper`)."""
    def mapper(fn, units):
        units = list(units)
        ex = Executor("local", workers=min(workers, len(units)))
        yield from ex.map(fn, units, ordered=True, start_method=_START_METHOD)
    return mapper


def partitions_for(rows: int, bytes_per_row: int, memory_gb: float, fixed_bytes: int, workers: int) -> int:
    """How many ranges a stage cuts `rows` into so that `workers` ranges at once fit in memory_gb beside the
    driver's `fixed_bytes`."""
    budget = max(memory_gb * 2**30 - fixed_bytes, 2**12) / max(1, workers)
    return int(min(MAX_PARTITIONS, max(1, math.ceil(rows * bytes_per_row / budget))))


# ---------------------------------------------------------------------------------------------------------
def _fingerprint(recipe, corpora, clean_root: Path, eval_files: list[list[Path]]) -> str:
    h = hashlib.sha256()
    cfg = {k: v for k, v in asdict(recipe.dedup).items() if k != "memory_gb"}   # memory never changes decisions
    settings = {"version": VERSION, "dedup": cfg, "corpora": [(c.name, c.priority) for c in corpora],
                "eval_sets": [(e.name, e.format) for e in recipe.eval_sets]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for c in corpora:
        manifest = clean_root / c.name / "manifest.json"
        h.update(c.name.encode() + b"\0" + (manifest.read_bytes() if manifest.exists() else b"-"))
    for files in eval_files:
        for f in files:
            h.update(str(f).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _done(out_root: Path, fingerprint: str, corpora) -> dict | None:
    """The saved report when every output it vouches for is there: report, manifests, listed parts, audit."""
    try:
        report = json.loads((out_root / "report.json").read_text())
        if report.get("fingerprint") != fingerprint or not (out_root / "removed.parquet").is_file():
            return None
        for c in corpora:
            m = json.loads((out_root / c.name / "manifest.json").read_text())
            if m.get("fingerprint") != fingerprint:
                return None
            # the parts it lists must be there as written: a deleted or damaged part redoes dedup (issue 14 #12)
            problems = check_files(out_root / c.name, m.get("part_info", {}), exact_glob="part-*.jsonl.zst")
            if problems or "part_info" not in m:
                log.warning("dedup: %s; running dedup again", problems[0] if problems else "an older manifest")
                return None
        return report
    except (OSError, ValueError):
        return None


def _corpora_in_keep_order(recipe, clean_root: Path) -> tuple[list, dict]:
    """Corpora that were read, highest priority first, ties in recipe order (sorted() is stable)."""
    corpora, skipped = [], {}
    for c in sorted(recipe.corpora, key=lambda c: -c.priority):
        d = clean_root / c.name
        if not d.is_dir():
            skipped[c.name] = "no cleaned records (corpus not read)"
            log.warning("dedup: %s has no directory under %s, skipped", c.name, clean_root)
        elif not (d / "manifest.json").exists():
            raise RuntimeError(f"dedup: {d} has no manifest.json: the read step did not finish for {c.name}")
        else:
            corpora.append(c)
    return corpora, skipped


def _load_eval_sets(recipe, eval_files: list[list[Path]]) -> tuple[list[list], dict]:
    question_sets, eval_report = [], {}
    for spec, files in zip(recipe.eval_sets, eval_files):
        if not files:
            log.warning("dedup: eval set %s: no file matches %s", spec.name, spec.paths)
        questions, bad = [], 0
        for f in files:
            q, b = read_eval_questions(f, spec.format)
            questions += q
            bad += b
        question_sets.append(questions)
        eval_report[spec.name] = {"files": len(files), "questions": len(questions), "malformed_rows": bad,
                                  "removed": 0, "removed_by_subject": {}}
    return question_sets, eval_report


def _progress(desc: str, total: int, unit: str = " units"):
    from tqdm import tqdm
    return tqdm(desc=desc, total=total, unit=unit, disable=None)


def _edges_in(files: list[Path], lo: int, hi: int) -> np.ndarray:
    got = [_slice_sorted(_load(f, True), "v", lo, hi) for f in files]
    return np.concatenate(got) if got else np.empty(0, EDGE)


# ---------------------------------------------------------------------------------------------------------
# Stage 5: the audit file, the report, the survivors
def _ids_of(work: Path, offsets: np.ndarray, docs: np.ndarray):
    """Record ids of records (keep-order numbers) as a pyarrow string array, read unit by unit from the
    signature stage's id files (no Python string per record: the audit file takes the array as it is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    order = np.argsort(docs, kind="stable")
    sd = docs[order]
    unit = np.searchsorted(offsets, sd, "right") - 1
    cut = np.flatnonzero(np.r_[True, unit[1:] != unit[:-1], True]) if len(sd) else []
    chunks = []
    for a, b in zip(cut[:-1], cut[1:]):
        k = int(unit[a])
        col = pq.read_table(_unit_file(work, k, "ids.parquet"), columns=["id"]).column("id")
        chunks += col.take(pa.array(sd[a:b] - offsets[k])).chunks
    if not chunks:
        return pa.array([], pa.string())
    back = np.empty(len(order), np.int64)
    back[order] = np.arange(len(order))
    return pa.chunked_array(chunks, pa.string()).take(pa.array(back))


def _audit_schema():
    import pyarrow as pa
    return pa.schema([("corpus", pa.string()), ("id", pa.string()), ("reason", pa.string()),
                      ("similarity", pa.float32()), ("kept_corpus", pa.string()), ("kept_id", pa.string()),
                      ("eval_set", pa.string()), ("eval_subject", pa.string()), ("eval_split", pa.string()),
                      ("eval_question_id", pa.string()), ("eval_question", pa.string())])


def _removed_rows(work: Path, units: list, offsets: np.ndarray, exact_files: list, near_files: list):
    """The removed records as (reason code, EDGE rows) chunks: contamination (u = -1 - question, s = share),
    exact duplicates (u = the kept record: the first copy, or the record that copy was removed for), near."""
    for k, offset in units:
        with np.load(_unit_file(work, k, "meta.npz"), allow_pickle=False) as z:
            contam, score = z["contam"], z["score"]
        hit = np.flatnonzero(contam >= 0)
        if len(hit):
            e = np.empty(len(hit), EDGE)
            e["v"], e["u"], e["s"] = hit + offset, -1 - contam[hit].astype(np.int64), score[hit]
            yield CONTAMINATED, e
    for f in exact_files:
        pairs = _load(f, True)
        for s in range(0, len(pairs), AUDIT_CHUNK):
            e = np.array(pairs[s:s + AUDIT_CHUNK])
            yield EXACT, e
    for f in near_files:
        e = _load(f)
        for s in range(0, len(e), AUDIT_CHUNK):
            yield NEAR, e[s:s + AUDIT_CHUNK]


def _near_match(near_files: list, starts: list, docs: np.ndarray) -> np.ndarray:
    """The kept match (EDGE rows) of records removed as near duplicates, looked up in the range files."""
    out = np.empty(len(docs), EDGE)
    r = np.searchsorted(starts, docs, "right") - 1
    for ri in np.unique(r):
        sel = r == ri
        e = _load(near_files[ri], True)
        pos = np.searchsorted(e["v"], docs[sel])
        out[sel] = e[pos]
        del e
    return out


def _write_audit(path: Path, work: Path, units, offsets, corpus_of_unit: list[str], status, exact_files,
                 near_files, near_starts, questions: list, set_names: list[str], eval_report: dict,
                 counts: dict, picks_at: dict) -> list[tuple]:
    """removed.parquet, chunk by chunk; fills the per-corpus "dups_of" counts and the per-subject removals;
    returns the example picks (kind, kept or -1, removed, similarity, question or None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    seen = {CONTAMINATED: 0, EXACT: 0, NEAR: 0}
    picks = []
    unit_of = lambda docs: np.searchsorted(offsets, docs, "right") - 1
    corpus_names = pa.array(corpus_of_unit, pa.string())
    with atomic_file(path) as f, pq.ParquetWriter(f, _audit_schema()) as writer:
        for reason, e in _removed_rows(work, units, offsets, exact_files, near_files):
            v, u, s = e["v"], e["u"].copy(), e["s"].copy()
            if reason == EXACT:       # the first copy itself removed as a near duplicate: its kept match
                gone = status[u] == NEAR
                if gone.any():
                    m = _near_match(near_files, near_starts, u[gone])
                    u[gone], s[gone] = m["u"], m["s"]
            uv = unit_of(v)
            n = len(v)
            cols = {"corpus": corpus_names.take(pa.array(uv)), "id": _ids_of(work, offsets, v),
                    "reason": pa.array([REASONS[reason]], pa.string()).take(pa.array(np.zeros(n, np.int64))),
                    "similarity": s,
                    **{k: pa.nulls(n, pa.string()) for k in ("kept_corpus", "kept_id", "eval_set", "eval_subject",
                                                              "eval_split", "eval_question_id", "eval_question")}}
            if reason == CONTAMINATED:
                qs = [questions[int(-1 - x)] for x in u]
                cols["eval_set"] = [set_names[q_set] for q_set, _ in qs]
                cols["eval_subject"] = [q.subject for _, q in qs]
                cols["eval_split"] = [q.split for _, q in qs]
                cols["eval_question_id"] = [str(q.id) for _, q in qs]
                cols["eval_question"] = [q.question for _, q in qs]
                for (q_set, q) in qs:
                    r = eval_report[set_names[q_set]]
                    r["removed"] += 1
                    r["removed_by_subject"][q.subject] = r["removed_by_subject"].get(q.subject, 0) + 1
            else:
                uu = unit_of(u)
                cols["kept_corpus"], cols["kept_id"] = corpus_names.take(pa.array(uu)), _ids_of(work, offsets, u)
                key = "exact_dups_of" if reason == EXACT else "near_dups_of"
                # per (removed unit, kept unit) pair at once, added in the order the pairs first occur (the
                # report's dict order is the rows' order, whatever the engine)
                pairs, first, times = np.unique(uv * len(units) + uu, return_index=True, return_counts=True)
                for j in np.argsort(first, kind="stable").tolist():
                    a, b = corpus_of_unit[pairs[j] // len(units)], corpus_of_unit[pairs[j] % len(units)]
                    counts[a][key][b] = counts[a][key].get(b, 0) + int(times[j])
            writer.write_table(pa.table(cols, schema=_audit_schema()))
            wanted = picks_at[reason]
            at = wanted[(wanted >= seen[reason]) & (wanted < seen[reason] + n)] - seen[reason]
            for i in at:
                q = questions[int(-1 - u[i])] if reason == CONTAMINATED else None
                picks.append((reason, int(u[i]) if q is None else -1, int(v[i]), float(s[i]), q))
            seen[reason] += n
    return picks


def _spaced(total: int) -> np.ndarray:
    return np.unique(np.linspace(0, total - 1, min(total, EXAMPLES_PER_KIND)).astype(np.int64)) if total else \
        np.empty(0, np.int64)


def _example(kind, kept, dropped, est, ngram, question=None, eval_set=None) -> dict:
    ex = {"kind": kind, "dropped": {"id": dropped.get("id"), "corpus": dropped.get("corpus"),
                                    "text": dedup_text(dropped)}}
    if kind == "decontam":
        ex["eval_set"] = eval_set
        ex["share"] = round(est, 4)
        ex["question"] = {"subject": question.subject, "split": question.split, "id": question.id,
                          "question": question.question, "options": question.options, "answer": question.answer,
                          "file": question.file, "line": question.line}
        return ex
    a, b = (set(minhash.shingles(minhash.normalize(dedup_text(r)), ngram)) for r in (kept, dropped))
    ex["kept"] = {"id": kept.get("id"), "corpus": kept.get("corpus"), "text": dedup_text(kept)}
    ex["estimated_jaccard"] = round(est, 4)
    ex["true_jaccard"] = round(minhash.jaccard(a, b), 4)
    return ex


def write_unit(task: dict) -> dict:
    """Stage 5 for one clean part file: its kept records into the corpus's output part of the same name (zstd
    JSONL with the content checksum, written atomically; no part when nothing is kept), and the records the
    examples need. The record count is checked against the signature stage's."""
    import orjson
    import zstandard
    work, offset, n = Path(task["work"]), task["offset"], task["n"]
    keep = np.array(_load(work / "status.npy", True)[offset:offset + n]) == KEPT
    wanted, seen = set(task["wanted"]), {}
    out = Path(task["out_dir"]) / Path(task["part"]).name
    writer = compressor = None
    j, kept = -1, 0
    try:
        # lines are copied as stored: the clean parts are orjson's output (records.write_parts), and
        # orjson.dumps(orjson.loads(line)) is that same line, so this writes the bytes a parse and re-serialize
        # would, at a fraction of the cost
        for j, line in enumerate(iter_record_lines(Path(task["part"]))):
            if j >= n:
                raise RuntimeError(f"dedup: {task['part']} changed between stages (more records than counted)")
            if offset + j in wanted:
                seen[offset + j] = orjson.loads(line)
            if keep[j]:
                if writer is None:
                    writer = AtomicWriter(out)
                    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
                        writer.f, closefd=False)
                compressor.write(line if line.endswith(b"\n") else line + b"\n")
                kept += 1
        if j + 1 != n:
            raise RuntimeError(f"dedup: {task['part']} changed between stages (fewer records than counted)")
        if writer is not None:
            compressor.close()
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        out.unlink(missing_ok=True)
    return {"index": task["index"], "part": out.name if writer else None, "kept": kept,
            "size": out.stat().st_size if writer else 0, "sha256": file_sha256(out) if writer else None,
            "seen": seen}


# ---------------------------------------------------------------------------------------------------------
def run(recipe, clean_root: Path, out_root: Path, workers: int | None = None, mapper=None) -> dict:
    """Run the dedup step; returns the report (also written to out_root/report.json). Re-running with the
    same inputs and settings returns the saved report without recomputing; a killed run resumes from the
    stage units it finished. `mapper(fn, units)` runs each stage's units (default: a process pool)."""
    with DirLock(out_root, "dedup step"):
        return _run(recipe, Path(clean_root), Path(out_root), workers, mapper)


def _run(recipe, clean_root: Path, out_root: Path, workers, mapper) -> dict:
    from data_process.recipe import resolve_paths

    t0 = time.time()
    cfg = recipe.dedup
    workers = max(1, workers if workers is not None else recipe.run.workers)
    mapper = mapper or pool_mapper(workers)
    corpora, skipped = _corpora_in_keep_order(recipe, clean_root)
    eval_files = [resolve_paths(recipe, e.paths) for e in recipe.eval_sets]
    fingerprint = _fingerprint(recipe, corpora, clean_root, eval_files)
    done = _done(out_root, fingerprint, corpora)
    if done is not None:
        log.info("dedup: outputs up to date (%s), skipped", out_root)
        return done
    work = out_root / WORK
    try:
        same_run = (work / "fingerprint").read_text() == fingerprint
    except OSError:
        same_run = False
    if not same_run:        # another run's (or no) stage files: start afresh
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "fingerprint").write_text(fingerprint)

    # stage 1: signatures
    question_sets, eval_report = _load_eval_sets(recipe, eval_files)
    index = eval_index(question_sets, cfg.decontam_ngram)
    too_short = index.pop("too_short")
    with atomic_file(work / "eval_index.npz", durable=False) as f:
        np.savez(f, **index)
    questions = [(s, q) for s, qs in enumerate(question_sets) for q in qs]
    set_names = [e.name for e in recipe.eval_sets]
    minhash._tables()   # built once here, inherited by forked workers
    _preload_pyarrow()
    bands_n, rows_n = minhash.lsh_params(cfg.threshold, cfg.num_perm)
    sign_cfg = {"num_perm": cfg.num_perm, "ngram": cfg.ngram, "bands": bands_n, "rows": rows_n,
                "decontam_ngram": cfg.decontam_ngram, "decontam_min_share": cfg.decontam_min_share}
    units, corpus_of_unit, units_of_corpus = [], [], []
    for c in corpora:
        first = len(units)
        for part in list_parts(clean_root / c.name):
            units.append({"index": len(units), "corpus": c.name, "part": str(part), "work": str(work),
                          "cfg": sign_cfg})
            corpus_of_unit.append(c.name)
        units_of_corpus.append(range(first, len(units)))
    progress = _progress("dedup: signatures", len(units))
    metas = []
    for m in mapper(sign_unit, units):
        metas.append(m)
        progress.update(1)
    progress.close()
    sizes = np.array([m["n"] for m in metas], np.int64)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)     # unit k holds records offsets[k]..offsets[k+1]-1
    n_docs, chars = int(offsets[-1]), sum(m["chars"] for m in metas)
    hash_seconds = time.time() - t0
    unit_offsets = [(k, int(offsets[k])) for k in range(len(units))]
    fixed = 2 * n_docs + 64 * len(units)      # status bytes, bitmaps, offsets
    status = np.zeros(n_docs, np.uint8)
    for k, offset in unit_offsets:
        with np.load(_unit_file(work, k, "meta.npz"), allow_pickle=False) as z:
            status[offset:offset + int(sizes[k])][z["contam"] >= 0] = CONTAMINATED

    # stage 2: exact duplicates
    exact_files, layout = [], {"exact_partitions": 0, "bucket_partitions": 0, "decide_ranges": 0}
    if cfg.exact and n_docs:
        parts = partitions_for(sum(m["exact_rows"] for m in metas), ROW_BYTES, cfg.memory_gb, fixed, workers)
        tasks = [{"work": str(work), "j": j, "parts": parts, "units": unit_offsets} for j in range(parts)]
        for _ in mapper(exact_partition, tasks):
            pass
        exact_files = [work / "exact" / f"{parts}-p{j:05d}.npy" for j in range(parts)]
        layout["exact_partitions"] = parts
        for f in exact_files:
            status[np.array(_load(f, True)["v"])] = EXACT
    _save(work / "exact_dups.npy", np.packbits(status == EXACT))

    # stage 3: buckets -> verified edges
    near_files, near_starts, candidates, n_edges = [], [0], 0, 0
    if cfg.near and n_docs:
        parts = partitions_for(sum(m["band_rows"] for m in metas), ROW_BYTES, cfg.memory_gb, fixed, workers)
        tasks = [{"work": str(work), "j": j, "parts": parts, "units": unit_offsets, "offsets": offsets.tolist(),
                  "threshold": cfg.threshold, "num_perm": cfg.num_perm} for j in range(parts)]
        progress = _progress("dedup: buckets", parts)
        for got in mapper(bucket_partition, tasks):
            candidates += got["candidates"]
            n_edges += got["edges"]
            progress.update(1)
        progress.close()
        edge_files = [work / "edges" / f"{parts}-p{j:05d}.npy" for j in range(parts)]
        layout["bucket_partitions"] = parts
        # stage 4: decisions, range by range in keep order (each range needs the ones before it)
        ranges = partitions_for(n_edges, EDGE_BYTES, cfg.memory_gb, fixed, 1)
        step = -(-n_docs // ranges)
        near_starts = list(range(0, n_docs, step))
        layout["decide_ranges"] = len(near_starts)
        for r, lo in enumerate(near_starts):
            hi = min(n_docs, lo + step)
            matches = resolve(lo, hi, _unique_edges(_edges_in(edge_files, lo, hi)), status)
            near_files.append(work / "near" / f"r{r:05d}.npy")
            _save(near_files[-1], matches)

    # stage 5: audit, survivors, examples, report (the done-marker) last
    (out_root / "report.json").unlink(missing_ok=True)
    counts = {c.name: {"exact_dups_of": {}, "near_dups_of": {}} for c in corpora}
    totals = {code: int((status == code).sum()) for code in REASONS}
    picks_at = {code: _spaced(totals[code]) for code in REASONS}
    picks = _write_audit(out_root / "removed.parquet", work, unit_offsets, offsets, corpus_of_unit, status,
                         exact_files, near_files, near_starts, questions, set_names, eval_report, counts, picks_at)
    report_corpora = {}
    for ci, c in enumerate(corpora):
        lo, hi = int(offsets[units_of_corpus[ci].start]), int(offsets[units_of_corpus[ci].stop])
        st = status[lo:hi]
        report_corpora[c.name] = {
            "priority": c.priority, "role": c.role, "in": hi - lo,
            "decontaminated": int((st == CONTAMINATED).sum()),
            "exact_dups": int((st == EXACT).sum()), "exact_dups_of": counts[c.name]["exact_dups_of"],
            "near_dups": int((st == NEAR).sum()), "near_dups_of": counts[c.name]["near_dups_of"],
            "kept": int((st == KEPT).sum())}
    wanted = np.array(sorted({i for p in picks for i in p[1:3] if i >= 0}), np.int64)
    _save(work / "status.npy", status)
    seen = {}
    for c in corpora:
        (out_root / c.name).mkdir(parents=True, exist_ok=True)
        (out_root / c.name / "manifest.json").unlink(missing_ok=True)
    tasks = [{"work": str(work), "index": k, "part": u["part"], "out_dir": str(out_root / u["corpus"]),
              "offset": int(offsets[k]), "n": int(sizes[k]),
              "wanted": wanted[(wanted >= offsets[k]) & (wanted < offsets[k + 1])].tolist()}
             for k, u in enumerate(units)]
    written = [None] * len(units)
    progress = _progress("dedup: writing", len(units))
    for got in mapper(write_unit, tasks):
        seen.update(got.pop("seen"))
        written[got["index"]] = got
        progress.update(1)
    progress.close()
    for ci, c in enumerate(corpora):
        mine = [written[k] for k in units_of_corpus[ci] if written[k]["part"]]
        names = {w["part"] for w in mine}
        for old in (out_root / c.name).glob("part-*.jsonl.zst"):   # an earlier run's parts that are not ours
            if old.name not in names:
                old.unlink()
        if sum(w["kept"] for w in mine) != report_corpora[c.name]["kept"]:
            raise RuntimeError(f"dedup: {c.name}: written records do not match the decisions")
        manifest = {"fingerprint": fingerprint, "corpus": c.name, "kind": "dedup",
                    "records": report_corpora[c.name]["kept"], "parts": [w["part"] for w in mine],
                    # what fileio.describe_files records, computed by the write units
                    "part_info": {w["part"]: {"bytes": w["size"], "sha256": w["sha256"]} for w in mine},
                    "dedup": report_corpora[c.name]}
        atomic_write_bytes(out_root / c.name / "manifest.json",
                           json.dumps(manifest, ensure_ascii=False, indent=1).encode())
    lines = []
    kinds = {CONTAMINATED: "decontam", EXACT: "exact", NEAR: "near"}
    for reason in (EXACT, NEAR, CONTAMINATED):       # the order examples.jsonl always had
        for code, u, v, est, q in picks:
            if code != reason:
                continue
            if code == CONTAMINATED:
                ex = _example("decontam", None, seen[v], est, cfg.ngram, question=q[1], eval_set=set_names[q[0]])
            else:
                ex = _example(kinds[code], seen[u], seen[v], est, cfg.ngram)
            lines.append(json.dumps(ex, ensure_ascii=False))
    atomic_write_bytes(out_root / "examples.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())

    seconds = time.time() - t0
    report = {
        "fingerprint": fingerprint,
        "settings": {**asdict(cfg), "bands": bands_n, "rows": rows_n, "workers": workers,
                     "bucket_pair_cap": BUCKET_PAIR_CAP, "keep_order": [c.name for c in corpora]},
        "corpora": report_corpora, "skipped": skipped, "eval_sets": eval_report,
        "eval_questions_without_ngram": too_short,
        "totals": {"in": n_docs, "kept": int((status == KEPT).sum()), "decontaminated": totals[CONTAMINATED],
                   "exact_dups": totals[EXACT], "near_dups": totals[NEAR],
                   "lsh_candidate_pairs": candidates, "verified_pairs": n_edges,
                   "units": len(units), **layout, "chars": int(chars), "hash_seconds": round(hash_seconds, 2),
                   "seconds": round(seconds, 2), "mchars_per_s": round(chars / max(hash_seconds, 1e-9) / 1e6, 2)},
    }
    atomic_write_bytes(out_root / "report.json", json.dumps(report, ensure_ascii=False, indent=1).encode())
    shutil.rmtree(work, ignore_errors=True)
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The compact table printed at the end of the step."""
    rows = [f"{'corpus':<20} {'in':>9} {'decont':>7} {'exact':>8} {'near':>8} {'kept':>9}  dups of"]
    for name, r in report["corpora"].items():
        of = {**r["exact_dups_of"]}
        for k, v in r["near_dups_of"].items():
            of[k] = of.get(k, 0) + v
        of_s = ", ".join(f"{k}:{v}" for k, v in sorted(of.items(), key=lambda kv: -kv[1])[:3])
        rows.append(f"{name:<20} {r['in']:>9} {r['decontaminated']:>7} {r['exact_dups']:>8} {r['near_dups']:>8} "
                    f"{r['kept']:>9}  {of_s}")
    t = report["totals"]
    rows.append(f"{'total':<20} {t['in']:>9} {t['decontaminated']:>7} {t['exact_dups']:>8} {t['near_dups']:>8} "
                f"{t['kept']:>9}  ({t['mchars_per_s']} M chars/s, {t['seconds']} s)")
    rows.append("decontamination: " + ", ".join(f"{k}: {v['removed']} removed ({v['questions']} questions)"
                                                for k, v in report["eval_sets"].items()))
    rows.append("every removed record: removed.parquet (python data_process.py inspect dedup)")
    return "\n".join(rows)
