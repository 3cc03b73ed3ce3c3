"""The `dedup` pipeline step: decontamination, exact and near-duplicate removal across all corpora of a run.

    data/clean/<corpus>/part-*.jsonl.zst  ->  data/dedup/<corpus>/part-*.jsonl.zst + manifest.json
                                              data/dedup/report.json, data/dedup/examples.jsonl

`run(recipe, clean_root, out_root)` makes two passes over the cleaned records. Pass 1 (parallel over
`recipe.run.workers` processes, results consumed in order, so the outcome never depends on the worker count)
computes per record: an exact-dedup hash of the normalized text, the LSH band hashes and b-bit sketch of its
MinHash signature (minhash.py), and whether it shares a long character n-gram with an eval question.
Then, on those compact arrays only, in this order:
  1. decontamination: a record that overlaps an eval set is dropped (and never acts as the kept copy);
  2. exact duplicates: of records with equal normalized text the first in keep order survives;
  3. near duplicates: LSH candidate pairs whose sketch Jaccard >= recipe.dedup.threshold are joined into
     clusters (connected components, as in the BigCode/text-dedup pipelines) and each cluster keeps its
     first record in keep order. As in those pipelines a chain A~B~C drops C even when C is less similar
     to A than the threshold: the price of clustering in linear time.
Keep order: corpora sorted by `priority` (higher first), ties by recipe order; within a corpus, the order
records were read. Pass 2 rereads the records and writes the survivors, then examples and the report.

Shingling: character 5-grams of the normalized text, chosen by bench/bench_dedup.py on near-duplicates built
from the real samples (web pages, Toyhom dialogues, the fever textbook, Firefly text; 3-50% character and
sentence edits; negatives: >= 30% edits and other documents of the same source). Best-F1 per shingling
(full run): char 3/4/5/6-gram 0.958/0.963/0.971/0.976, jieba word 1/2/3-gram 0.943/0.965/0.972. Character
5-grams match the best jieba setting (-0.1 F1 points; char 6-grams +0.3, within the noise of 2,280 pairs)
and need no segmenter: jieba alone runs at ~0.4 M chars/s, a tenth of our whole signature computation.
Decontamination uses 13-character windows: on 3,672 clean real documents 10-grams gave 3 false hits (shared
textbook phrases), 12- and 13-grams none; 13-grams still catch every question of >= 13 characters in any
layout and every question printed with its options (the misses are short stems standing alone).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xxhash

from data_process import evalsets, minhash
from data_process.executor import Executor
from data_process.records import iter_records, write_parts
from fileio import atomic_write_bytes

log = logging.getLogger(__name__)

BATCH_CHARS = 2_000_000      # characters per work item sent to a worker
EXAMPLES_PER_KIND = 30       # example pairs written to examples.jsonl per kind (exact, near, decontam)
# fork: workers start in milliseconds and need no `if __name__ == "__main__"` guard in the caller; the
# parent holds no locks worth worrying about here (no torch, no threads of ours). spawn elsewhere.
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
VERSION = 1                  # bump when the algorithm changes, so finished outputs are recomputed


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


def question_variants(q: evalsets.Question, n: int) -> list[tuple[str, int | None]]:
    """Alnum-normalized forms in which a question shows up in training text, each with how many of its
    n-character windows count (None: all): the question; the question with its blank filled by (or followed
    by) the right answer, when the answer is known; the question followed by its options, with and without
    their letters (how exam dumps on the web print them). In the options forms a window must hold at least
    half a window (or the whole stem, if shorter) of question text, so a run of options such as 'a是b否c...'
    never matches alone."""
    question, options = q.question, q.option_list
    stem = minhash.normalize_alnum(BLANK.sub("", question))
    labeled = stem + "".join(minhash.normalize_alnum(letter + opt) for letter, opt in zip("ABCD", options))
    bare = stem + "".join(minhash.normalize_alnum(opt) for opt in options)
    windows = len(stem) - min(len(stem), (n + 1) // 2) + 1 if stem else 0
    variants = [(stem, None), (labeled, windows), (bare, windows)]
    answer = q.answer_text
    if answer is not None:
        # a function, not a template: an answer such as "$\\mathrm{e}$" holds backslashes that re.sub would
        # read as escapes ("bad escape \\m")
        filled = BLANK.sub(lambda _: answer, question, count=1) if BLANK.search(question) else question + answer
        variants.insert(1, (minhash.normalize_alnum(filled), None))
    return variants


def eval_index(question_sets: list[list[dict]], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sorted 64-bit hashes of every n-gram of every question variant, with the eval-set and question each
    came from (first set in recipe order wins a shared n-gram); plus how many questions have no n-gram."""
    hashes, set_ids, q_ids, too_short = [], [], [], 0
    for s, questions in enumerate(question_sets):
        for qi, q in enumerate(questions):
            got = 0
            for text, windows in question_variants(q, n):
                h = minhash.ngram_hashes64(minhash.codepoints(text), n)[:windows]
                got += len(h)
                hashes.append(h)
                set_ids.append(np.full(len(h), s, np.int32))
                q_ids.append(np.full(len(h), qi, np.int32))
            too_short += got == 0
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.int32), too_short
    h, s, q = np.concatenate(hashes), np.concatenate(set_ids), np.concatenate(q_ids)
    order = np.lexsort((q, s, h))
    h, s, q = h[order], s[order], q[order]
    first = np.concatenate(([True], h[1:] != h[:-1]))
    return h[first], s[first], q[first], too_short


def find_contamination(cps: np.ndarray, lengths: np.ndarray, index_hashes: np.ndarray, n: int) -> np.ndarray:
    """For every text of a batch (alnum-normalized code points, per-text lengths) the position in the eval
    index of its first n-gram found there, or -1. One vectorized pass over the whole batch."""
    found = np.full(len(lengths), -1, np.int64)
    h = minhash.ngram_hashes64(cps, n)
    if len(index_hashes) == 0 or len(h) == 0:
        return found
    doc_of_char = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.searchsorted(index_hashes, h)
    pos[pos == len(index_hashes)] = 0
    hit = np.flatnonzero((index_hashes[pos] == h) & (doc_of_char[:len(h)] == doc_of_char[n - 1:n - 1 + len(h)]))
    docs, first = np.unique(doc_of_char[hit], return_index=True)
    found[docs] = pos[hit[first]]
    return found


# ---------------------------------------------------------------------------------------------------------
# Pass 1 worker: one batch of texts -> compact per-record arrays
_W: dict = {}


def _init_worker(num_perm, ngram, bands, rows, decontam_ngram, index_hashes):
    _W.update(hasher=minhash.MinHasher(num_perm=num_perm, ngram=ngram), bands=bands, rows=rows,
              decontam_ngram=decontam_ngram, index_hashes=index_hashes)


def process_batch(batch: tuple[list[str], list[str]]) -> dict:
    """Exact hashes, band hashes, sketches and eval hits of one batch of (dedup texts, decontam texts)."""
    texts, dtexts = batch
    cps, lengths = minhash.fold_batch(*minhash.encode_batch(texts))
    starts = np.cumsum(lengths) - lengths
    buf = cps.tobytes()
    exact = np.fromiter((xxhash.xxh3_64_intdigest(buf[4 * s:4 * (s + k)]) for s, k in zip(starts, lengths)),
                        np.uint64, len(texts))
    sigs = _W["hasher"].signatures_cps(cps, lengths)
    index, n = _W["index_hashes"], _W["decontam_ngram"]
    contam = find_contamination(*minhash.alnum_only(cps, lengths), index, n)
    own = [i for i, (t, d) in enumerate(zip(texts, dtexts)) if d is not t]   # preference pairs: prompt only
    if own:
        dcps, dlengths = minhash.fold_batch(*minhash.encode_batch([dtexts[i] for i in own]), alnum=True)
        contam[own] = find_contamination(dcps, dlengths, index, n)
    return {"exact": exact, "bands": minhash.band_hashes(sigs, _W["bands"], _W["rows"]),
            "sketch": minhash.sketch(sigs), "contam": contam, "has_shingles": lengths > 0,
            "chars": sum(len(t) for t in texts)}


def _batches(corpora_dirs: list[Path], stats: list[dict]):
    """(dedup texts, decontam texts) batches over all corpora in keep order; counts records per corpus."""
    texts, dtexts, chars = [], [], 0
    for ci, d in enumerate(corpora_dirs):
        for record in iter_records(d):
            text = dedup_text(record)
            texts.append(text)
            dtexts.append(decontam_text(record, text))   # the same object unless a preference pair
            stats[ci]["in"] += 1
            chars += len(text)
            if chars >= BATCH_CHARS:
                yield texts, dtexts
                texts, dtexts, chars = [], [], 0
    if texts:
        yield texts, dtexts


# ---------------------------------------------------------------------------------------------------------
# Decisions over the compact arrays (pure functions, tested directly)
def exact_duplicates(exact: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """For every record the index of the first alive record with the same hash (itself if it is the first);
    -1 for records that are not alive."""
    first_of = np.full(len(exact), -1, np.int64)
    idx = np.flatnonzero(alive)
    if len(idx):
        _, first, inverse = np.unique(exact[idx], return_index=True, return_inverse=True)
        first_of[idx] = idx[first[inverse]]
    return first_of


def near_duplicates(bands: np.ndarray, sketches: np.ndarray, valid: np.ndarray, threshold: float):
    """Cluster root (smallest index, i.e. first in keep order) of every record over verified LSH pairs;
    also the verified pairs (u, v, estimated Jaccard) for examples."""
    u, v = minhash.candidate_pairs(bands, valid)
    est = minhash.sketch_jaccard(sketches[u], sketches[v]) if len(u) else np.empty(0)
    ok = est >= threshold
    root = minhash.components_min(len(bands), u[ok], v[ok])
    return root, (u[ok], v[ok], est[ok]), int(len(u))


# ---------------------------------------------------------------------------------------------------------
def _fingerprint(recipe, corpora, clean_root: Path, eval_files: list[list[Path]]) -> str:
    h = hashlib.sha256()
    settings = {"version": VERSION, "dedup": asdict(recipe.dedup),
                "corpora": [(c.name, c.priority) for c in corpora],
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
    try:
        report = json.loads((out_root / "report.json").read_text())
        if report.get("fingerprint") != fingerprint:
            return None
        for c in corpora:
            if json.loads((out_root / c.name / "manifest.json").read_text()).get("fingerprint") != fingerprint:
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


def _load_eval_sets(recipe, eval_files: list[list[Path]]) -> tuple[list[list[dict]], dict]:
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
                                  "removed": 0}
    return question_sets, eval_report


def _hash_pass(corpus_dirs: list[Path], init: tuple, workers: int, executor=None) -> tuple[dict, list[int], int]:
    """Pass 1: the compact per-record arrays of all corpora (in keep order), records per corpus, characters.
    Batches run on `executor` (data_process/executor.py; None: a local pool of `workers`), results in order."""
    from tqdm import tqdm
    stats = [{"in": 0} for _ in corpus_dirs]
    parts = {k: [] for k in ("exact", "bands", "sketch", "contam", "has_shingles")}
    chars = 0
    batches = _batches(corpus_dirs, stats)
    progress = tqdm(desc="dedup: hashing", unit=" chars", unit_scale=True, disable=None)
    ex = executor or Executor("local", workers=workers)
    results = ex.map(process_batch, batches, ordered=True, initializer=_init_worker, initargs=init,
                     describe=lambda b: f"dedup batch of {len(b[0])} records starting {b[0][0][:40]!r}",
                     start_method=_START_METHOD)
    try:
        for r in results:
            for k in parts:
                parts[k].append(r[k])
            chars += r["chars"]
            progress.update(r["chars"])
    finally:
        progress.close()
    num_perm, bands_n = init[0], init[2]
    empty = {"exact": np.empty(0, np.uint64), "bands": np.empty((0, bands_n), np.uint64),
             "sketch": np.empty((0, num_perm), np.uint8), "contam": np.empty(0, np.int64),
             "has_shingles": np.empty(0, bool)}
    arrays = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
    return arrays, [s["in"] for s in stats], chars


def decide(arrays: dict, exact: bool, near: bool, threshold: float) -> dict:
    """Which records go, and why, from the pass-1 arrays (index order = keep order)."""
    n = len(arrays["exact"])
    contaminated = arrays["contam"] >= 0
    alive = ~contaminated
    first_of = exact_duplicates(arrays["exact"], alive) if exact else np.where(alive, np.arange(n), -1)
    exact_dup = alive & (first_of != np.arange(n))
    valid = alive & ~exact_dup & arrays["has_shingles"]
    if near and n:
        root, pairs, n_candidates = near_duplicates(arrays["bands"], arrays["sketch"], valid, threshold)
    else:
        root, pairs, n_candidates = np.arange(n), (np.empty(0, np.int64),) * 3, 0
    near_dup = valid & (root != np.arange(n))
    return {"contaminated": contaminated, "exact_dup": exact_dup, "first_of": first_of, "near_dup": near_dup,
            "root": root, "pairs": pairs, "candidates": n_candidates,
            "keep": alive & ~exact_dup & ~near_dup}


def _corpus_report(corpora, counts: list[int], d: dict) -> dict:
    corpus_of = np.repeat(np.arange(len(corpora), dtype=np.int32), counts)
    names = [c.name for c in corpora]
    report = {}
    for ci, c in enumerate(corpora):
        mine = corpus_of == ci

        def against(mask, target):
            got = np.bincount(corpus_of[target[mask & mine]], minlength=len(corpora))
            return {names[j]: int(k) for j, k in enumerate(got) if k}
        report[c.name] = {
            "priority": c.priority, "role": c.role, "in": int(mine.sum()),
            "decontaminated": int((d["contaminated"] & mine).sum()),
            "exact_dups": int((d["exact_dup"] & mine).sum()), "exact_dups_of": against(d["exact_dup"], d["first_of"]),
            "near_dups": int((d["near_dup"] & mine).sum()), "near_dups_of": against(d["near_dup"], d["root"]),
            "kept": int((d["keep"] & mine).sum()),
        }
    return report


def _example_picks(d: dict) -> list[tuple]:
    """(kind, kept index or -1, dropped index, estimated Jaccard): evenly spaced, so deterministic."""
    def spaced(m):
        return np.unique(np.linspace(0, m - 1, min(m, EXAMPLES_PER_KIND)).astype(np.int64)) if m else []
    eu, ev, eest = d["pairs"]
    ex_exact = np.flatnonzero(d["exact_dup"])
    picks = [("exact", int(d["first_of"][i]), int(i), 1.0) for i in ex_exact[spaced(len(ex_exact))]]
    picks += [("near", int(eu[k]), int(ev[k]), float(eest[k])) for k in spaced(len(eu))]
    ex_contam = np.flatnonzero(d["contaminated"])
    picks += [("decontam", -1, int(i), None) for i in ex_contam[spaced(len(ex_contam))]]
    return picks


def _example(kind, kept, dropped, est, ngram, contam_pos=None, question=None, eval_set=None) -> dict:
    ex = {"kind": kind, "dropped": {"id": dropped.get("id"), "corpus": dropped.get("corpus"),
                                    "text": dedup_text(dropped)}}
    if kind == "decontam":
        ex["eval_set"] = eval_set
        ex["question"] = {"subject": question.subject, "split": question.split, "id": question.id,
                          "question": question.question, "options": question.options, "answer": question.answer,
                          "file": question.file, "line": question.line}
        return ex
    a, b = (set(minhash.shingles(minhash.normalize(dedup_text(r)), ngram)) for r in (kept, dropped))
    ex["kept"] = {"id": kept.get("id"), "corpus": kept.get("corpus"), "text": dedup_text(kept)}
    ex["estimated_jaccard"] = round(est, 4)
    ex["true_jaccard"] = round(minhash.jaccard(a, b), 4)
    return ex


def _write_survivors(corpus, corpus_dir: Path, out_dir: Path, keep_c: np.ndarray, base: int, wanted: set,
                     seen: dict) -> list[Path]:
    """Pass 2 for one corpus: reread its records, write the kept ones, remember the example records."""
    def survivors():
        j = -1
        for j, record in enumerate(iter_records(corpus_dir)):
            if j >= len(keep_c):
                raise RuntimeError(f"dedup: {corpus.name} changed between passes (more records than counted)")
            if base + j in wanted:
                seen[base + j] = record
            if keep_c[j]:
                yield record
        if j + 1 != len(keep_c):
            raise RuntimeError(f"dedup: {corpus.name} changed between passes (fewer records than counted)")
    return write_parts(survivors(), out_dir)


def run(recipe, clean_root: Path, out_root: Path, workers: int | None = None, executor=None) -> dict:
    """Run the dedup step; returns the report (also written to out_root/report.json). Re-running with the
    same inputs and settings returns the saved report without recomputing. `executor` runs the hashing
    batches (data_process/executor.py: the local pool or Ray); None: a local pool of `workers`."""
    from data_process.recipe import resolve_paths

    t0 = time.time()
    clean_root, out_root = Path(clean_root), Path(out_root)
    cfg = recipe.dedup
    workers = max(1, workers if workers is not None else recipe.run.workers)
    corpora, skipped = _corpora_in_keep_order(recipe, clean_root)
    eval_files = [resolve_paths(recipe, e.paths) for e in recipe.eval_sets]
    fingerprint = _fingerprint(recipe, corpora, clean_root, eval_files)
    done = _done(out_root, fingerprint, corpora)
    if done is not None:
        log.info("dedup: outputs up to date (%s), skipped", out_root)
        return done

    question_sets, eval_report = _load_eval_sets(recipe, eval_files)
    index_hashes, index_sets, index_qs, too_short = eval_index(question_sets, cfg.decontam_ngram)
    minhash._tables()   # built once here, inherited by forked workers
    bands_n, rows_n = minhash.lsh_params(cfg.threshold, cfg.num_perm)
    init = (cfg.num_perm, cfg.ngram, bands_n, rows_n, cfg.decontam_ngram, index_hashes)
    arrays, counts, chars = _hash_pass([clean_root / c.name for c in corpora], init, workers, executor)
    hash_seconds = time.time() - t0
    d = decide(arrays, cfg.exact, cfg.near, cfg.threshold)
    contam = arrays["contam"]
    del arrays
    report_corpora = _corpus_report(corpora, counts, d)
    for s, spec in enumerate(recipe.eval_sets):
        eval_report[spec.name]["removed"] = int((index_sets[contam[d["contaminated"]]] == s).sum())

    # pass 2: survivors, then examples, then the report (the done-marker) last
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "report.json").unlink(missing_ok=True)
    picks = _example_picks(d)
    wanted = {i for p in picks for i in p[1:3] if i >= 0}
    seen, offset = {}, 0
    for c, count in zip(corpora, counts):
        paths = _write_survivors(c, clean_root / c.name, out_root / c.name, d["keep"][offset:offset + count],
                                 offset, wanted, seen)
        manifest = {"fingerprint": fingerprint, "corpus": c.name, "kind": "dedup",
                    "records": report_corpora[c.name]["kept"], "parts": [p.name for p in paths],
                    "dedup": report_corpora[c.name]}
        atomic_write_bytes(out_root / c.name / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode())
        offset += count
    lines = []
    for kind, u, v, est in picks:
        if kind == "decontam":
            pos = contam[v]
            ex = _example(kind, None, seen[v], None, cfg.ngram, question=question_sets[index_sets[pos]][index_qs[pos]],
                          eval_set=recipe.eval_sets[index_sets[pos]].name)
        else:
            ex = _example(kind, seen[u], seen[v], est, cfg.ngram)
        lines.append(json.dumps(ex, ensure_ascii=False))
    atomic_write_bytes(out_root / "examples.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())

    seconds = time.time() - t0
    n = len(d["keep"])
    report = {
        "fingerprint": fingerprint,
        "settings": {**asdict(cfg), "bands": bands_n, "rows": rows_n, "workers": workers,
                     "index_bytes_per_doc": minhash.index_bytes_per_doc(bands_n, cfg.num_perm),
                     "keep_order": [c.name for c in corpora]},
        "corpora": report_corpora, "skipped": skipped, "eval_sets": eval_report,
        "eval_questions_without_ngram": too_short,
        "totals": {"in": n, "kept": int(d["keep"].sum()), "decontaminated": int(d["contaminated"].sum()),
                   "exact_dups": int(d["exact_dup"].sum()), "near_dups": int(d["near_dup"].sum()),
                   "lsh_candidate_pairs": d["candidates"], "verified_pairs": int(len(d["pairs"][0])),
                   "chars": int(chars), "hash_seconds": round(hash_seconds, 2), "seconds": round(seconds, 2),
                   "mchars_per_s": round(chars / max(hash_seconds, 1e-9) / 1e6, 2)},
    }
    atomic_write_bytes(out_root / "report.json", json.dumps(report, ensure_ascii=False, indent=1).encode())
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
    return "\n".join(rows)
