"""Benchmark the dedup step (data_process/dedup.py, data_process/minhash.py) on real Chinese text.

    python bench/bench_dedup.py [--quick]

Builds a near-duplicate benchmark from the real samples in ../shared/corpora-samples (SkyPile-style web pages,
Toyhom medical dialogues, the MedicalGPT fever textbook, Firefly pretrain text): every document gets planted
variants at controlled edit rates, whose true character-5-gram Jaccard to the original is computed exactly.
Prints:
  1. shingling choice: char n-grams vs jieba word n-grams, best-F1 precision/recall on light vs heavy edits
  2. LSH accuracy: recall at J >= 0.85 (target >= 0.95), false-positive rate at J <= 0.5 (target <= 1%)
  3. throughput in M chars/s: our signatures vs datasketch's per-document MinHash.update_batch (sha1) on the
     same shingles, measured in this run (target >= 10x), on one core and on both
  4. index bytes per document and what 10M documents need
  5. decontamination n-gram length: false hits on clean real text vs recall of planted exam questions
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "corpora-samples"
sys.path.insert(0, str(ROOT))

from data_process import dedup, minhash  # noqa: E402

THRESHOLD = 0.8   # the default recipe's [dedup] threshold


# ---------------------------------------------------------------------------------------------------------
# Real text
def load_texts(quick: bool) -> dict[str, list[str]]:
    k = 0.25 if quick else 1.0
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        web = [json.loads(line)["text"] for line in f]
    with open(SAMPLES / "toyhom-medical-dialogue" / "样例_内科5000-6000.csv", encoding="gb18030", newline="") as f:
        dialogues = [r["title"] + "\n" + r["ask"] + "\n" + r["answer"] for r in csv.DictReader(f)]
    fever = [line for line in (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").splitlines()
             if len(line) >= 150]
    with open(SAMPLES / "firefly" / "dummy_pretrain.jsonl", encoding="utf-8") as f:
        firefly = [json.loads(line)["text"] for line in f]
    pick = lambda xs, n: [x for x in xs if len(x) >= 150][:max(10, int(n * k))]
    return {"web": pick(web, 240), "dialogue": pick(dialogues, 1000), "fever": pick(fever, 300),
            "firefly": pick(firefly, 45)}


SENTENCE = re.compile(r"(?<=[。！？；\n])")


def edit(text: str, rate: float, rng: random.Random, donor: str) -> str:
    """A variant with about `rate` of its characters changed: half by character edits (substitutions,
    insertions, deletions: typos, OCR, templating), half by whole sentences deleted or taken from `donor`
    (web pages that differ in a paragraph), so both local and block edits are represented."""
    sentences = [s for s in SENTENCE.split(text) if s]
    donor_sentences = [s for s in SENTENCE.split(donor) if s] or [donor]
    budget = rate * len(text) / 2
    while budget > 0 and len(sentences) > 1:
        i = rng.randrange(len(sentences))
        budget -= len(sentences[i])
        if rng.random() < 0.5:
            del sentences[i]
        else:
            sentences[i] = rng.choice(donor_sentences)
    chars = list("".join(sentences))
    for _ in range(int(rate * len(text) / 2)):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.6:
            chars[i] = rng.choice(text)
        elif op < 0.8:
            chars.insert(i, rng.choice(text))
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


def planted_pairs(sources: dict[str, list[str]], rates, seed=0):
    """All texts (originals then variants) and the planted (original, variant, source, rate) index pairs."""
    rng = random.Random(seed)
    texts = [t for ts in sources.values() for t in ts]
    names = [name for name, ts in sources.items() for _ in ts]
    n = len(texts)
    pairs = []
    for i in range(n):
        for rate in rates:
            donor = texts[rng.randrange(n)]
            pairs.append((i, len(texts), names[i], rate))
            texts.append(edit(texts[i], rate, rng, donor))
    return texts, pairs


# ---------------------------------------------------------------------------------------------------------
# 1. shingling
def char_shingles(text: str, n: int) -> set:
    return set(minhash.shingles(minhash.normalize(text), n))


def word_shingles(words: list[str], n: int) -> set:
    if len(words) < n:
        return {"\x00".join(words)} if words else set()
    return {"\x00".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, precision, recall, F1) at the threshold with the best F1."""
    best = (0.0, 0.0, 0.0, 0.0)
    for t in np.unique(scores):
        pred = scores >= t
        tp = int((pred & labels).sum())
        if tp == 0:
            continue
        p, r = tp / pred.sum(), tp / labels.sum()
        f1 = 2 * p * r / (p + r)
        if f1 > best[3]:
            best = (float(t), float(p), float(r), float(f1))
    return best


def bench_shingling(sources, quick: bool) -> dict:
    """Positives: variants with <= 10% edits; negatives: variants with >= 30% edits and pairs of different
    documents from the same source (templated dialogues make hard negatives). The threshold is the best-F1
    one for each shingling, so the comparison is of the shingling, not of one threshold."""
    import jieba
    jieba.setLogLevel(60)
    jieba.initialize()
    small = {k: v[: (20 if quick else 80)] for k, v in sources.items()}
    texts, pairs = planted_pairs(small, rates=(0.03, 0.06, 0.1, 0.3, 0.5), seed=1)
    labeled = [(a, b, rate <= 0.1) for a, b, _, rate in pairs]
    rng = random.Random(2)
    by_source: dict[str, list[int]] = {}
    for a, _, name, rate in pairs:
        by_source.setdefault(name, []).append(a)
    for name, idx in by_source.items():
        idx = sorted(set(idx))
        for _ in range(len(idx) * 3):
            a, b = rng.sample(idx, 2)
            labeled.append((a, b, False))
    labels = np.array([lab for _, _, lab in labeled])
    chars = sum(len(t) for t in texts)
    t0 = time.perf_counter()
    words = [[w for w in jieba.lcut(minhash.normalize(t))] for t in texts]
    jieba_mcps = chars / (time.perf_counter() - t0) / 1e6
    methods = {f"char {n}-gram": (lambda n: [char_shingles(t, n) for t in texts])(n) for n in (3, 4, 5, 6)}
    for n in (1, 2, 3):
        methods[f"jieba word {n}-gram"] = [word_shingles(w, n) for w in words]
    results = {}
    print(f"\n[1] shingling: {len(labeled)} labelled pairs ({labels.sum()} near-duplicates: <= 10% edits; "
          f"negatives: >= 30% edits and other documents of the same source)")
    print(f"    {'shingling':<20} {'best t':>7} {'precision':>9} {'recall':>7} {'F1':>6}")
    for name, sets in methods.items():
        scores = np.array([minhash.jaccard(sets[a], sets[b]) for a, b, _ in labeled])
        t, p, r, f1 = best_f1(scores, labels)
        results[name] = f1
        print(f"    {name:<20} {t:7.3f} {p:9.4f} {r:7.4f} {f1:6.4f}")
    best_char = max((k for k in results if k.startswith("char")), key=lambda k: results[k])
    best_word = max((k for k in results if k.startswith("jieba")), key=lambda k: results[k])
    print(f"    -> best char: {best_char} F1 {results[best_char]:.4f}; best jieba: {best_word} F1 "
          f"{results[best_word]:.4f} (difference {results[best_char] - results[best_word]:+.4f}); "
          f"jieba segmentation alone runs at {jieba_mcps:.2f} M chars/s")
    return {"shingling_char5_f1": round(results["char 5-gram"], 4),
            "shingling_best_char": best_char, "shingling_best_char_f1": round(results[best_char], 4),
            "shingling_best_jieba": best_word, "shingling_best_jieba_f1": round(results[best_word], 4),
            "jieba_mchars_per_s": round(jieba_mcps, 3)}


# ---------------------------------------------------------------------------------------------------------
# 2-4. LSH accuracy, throughput, index size
def _ds_worker(texts: list[str]) -> tuple[int, float]:
    """datasketch baseline on one core: per-document MinHash.update_batch (sha1 hash, its default) over the
    same character 5-gram shingles; only update_batch is timed."""
    from datasketch import MinHash
    shingle_lists = [[s.encode("utf-8") for s in minhash.shingles(t, 5)] for t in texts]
    sketches = [MinHash(num_perm=128) for _ in texts]      # construction (permutation setup) not timed
    t0 = time.perf_counter()
    for m, sh in zip(sketches, shingle_lists):
        m.update_batch(sh)
    return sum(len(t) for t in texts), time.perf_counter() - t0


def _sig_worker(texts: list[str]) -> tuple[int, float]:
    """Our signatures on one core, same shingles (normalized texts, char 5-grams); only hashing is timed."""
    hasher = minhash.MinHasher(num_perm=128, ngram=5)
    cps, lengths = minhash.encode_batch(texts)
    t0 = time.perf_counter()
    for s in range(0, len(texts), 500):
        e = min(s + 500, len(texts))
        a, b = (np.cumsum(lengths)[[s - 1, e - 1]] if s else (0, np.cumsum(lengths)[e - 1]))
        hasher.signatures_cps(cps[a:b], lengths[s:e])
    return int(lengths.sum()), time.perf_counter() - t0


def _two_cores(fn, texts: list[str]) -> float:
    """M chars/s with both cores busy at once: each process times its own half, the slower one counts."""
    halves = [texts[0::2], texts[1::2]]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(fn, halves)
    return sum(c for c, _ in results) / max(s for _, s in results) / 1e6


def bench_index(sources, quick: bool, threshold: float = THRESHOLD) -> dict:
    rates = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35)
    texts, pairs = planted_pairs(sources, rates, seed=3)
    norm = [minhash.normalize(t) for t in texts]
    true_j = np.array([minhash.jaccard(set(minhash.shingles(norm[a], 5)), set(minhash.shingles(norm[b], 5)))
                       for a, b, _, _ in pairs])
    bands_n, rows_n = minhash.lsh_params(threshold, 128)
    hasher = minhash.MinHasher(num_perm=128, ngram=5)
    sigs = hasher.signatures(norm)
    bands, sketches = minhash.band_hashes(sigs, bands_n, rows_n), minhash.sketch(sigs)
    u = np.array([a for a, _, _, _ in pairs])
    v = np.array([b for _, b, _, _ in pairs])
    share_band = (bands[u] == bands[v]).any(axis=1)
    flagged = share_band & (minhash.sketch_jaccard(sketches[u], sketches[v]) >= threshold)
    high, low = true_j >= 0.85, true_j <= 0.5
    recall, fp_rate = float(flagged[high].mean()), float(flagged[low].mean())
    # the whole index on every document: candidates, verification, clusters
    t0 = time.perf_counter()
    root, (eu, ev, _), n_cand = dedup.near_duplicates(bands, sketches, np.ones(len(texts), bool), threshold)
    index_s = time.perf_counter() - t0
    origin = np.arange(len(texts))
    origin[v] = u
    cross = int((origin[eu] != origin[ev]).sum())
    print(f"\n[2] LSH accuracy (threshold {threshold}, {bands_n} bands x {rows_n} rows, 8-bit sketch verification): "
          f"{len(texts)} documents, {len(pairs)} planted pairs")
    print(f"    recall at J >= 0.85: {recall:.4f} over {high.sum()} pairs (target >= 0.95)")
    print(f"    false positives at J <= 0.5: {fp_rate:.4%} over {low.sum()} pairs (target <= 1%)")
    for lo, hi in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.95), (0.95, 1.01)):
        m = (true_j >= lo) & (true_j < hi)
        if m.any():
            print(f"      J in [{lo:.2f}, {min(hi, 1):.2f}): {m.sum():5d} pairs, flagged {flagged[m].mean():.4f}")
    print(f"    whole index: {n_cand} candidate pairs, {len(eu)} verified, {cross} between different originals "
          f"(real repeats in the samples), {index_s:.2f} s")

    # 3. throughput on the same shingles
    n_chars = sum(len(t) for t in norm)
    ds_texts = norm[: max(200, len(norm) // (12 if quick else 6))]
    ds_chars, ds_s = _ds_worker(ds_texts)
    ds_1 = ds_chars / ds_s / 1e6
    sig_chars, sig_s = _sig_worker(norm)
    sig_1 = sig_chars / sig_s / 1e6
    ds_2 = _two_cores(_ds_worker, ds_texts)
    sig_2 = _two_cores(_sig_worker, norm)
    # the whole pass-1 work of the step (normalize, exact hash, signature, bands, sketch, decontam) on 2 workers
    h, _, _, _ = dedup.eval_index([[]], 13)
    init = (128, 5, bands_n, rows_n, 13, h)
    batches = [(texts[i:i + 1000], texts[i:i + 1000]) for i in range(0, len(texts), 1000)]
    raw_chars = sum(len(t) for t in texts)
    with multiprocessing.get_context("fork").Pool(2, initializer=dedup._init_worker, initargs=init) as pool:
        pool.map(dedup.process_batch, batches[:2])               # warm up (tables, imports)
        t0 = time.perf_counter()
        pool.map(dedup.process_batch, batches)
        step_2 = raw_chars / (time.perf_counter() - t0) / 1e6
    print(f"\n[3] throughput, M chars/s (char 5-grams, 128 permutations; {n_chars / 1e6:.1f} M chars, "
          f"datasketch on {ds_chars / 1e6:.2f} M of them)")
    print(f"    datasketch MinHash.update_batch per document: 1 core {ds_1:.2f}, both cores {ds_2:.2f}")
    print(f"    ours (minhash.MinHasher):                       1 core {sig_1:.2f}, both cores {sig_2:.2f}")
    print(f"    ratio: {sig_1 / ds_1:.1f}x on 1 core, {sig_2 / ds_2:.1f}x on both cores (target >= 10x)")
    print(f"    whole pass-1 of the dedup step (normalize + exact hash + signature + bands + decontam), "
          f"2 workers: {step_2:.2f}")

    # 4. index size
    per_doc = minhash.index_bytes_per_doc(bands_n, 128)
    measured = (bands.nbytes + sketches.nbytes + 8 * len(texts) + 2 * len(texts)) / len(texts)
    print(f"\n[4] index: {bands_n} band hashes x 8 B + 128 B sketch + 8 B exact hash + 2 B flags = {per_doc} B/doc "
          f"(measured {measured:.0f}); full uint32 signatures would be 512 B/doc")
    print(f"    10M documents: {per_doc * 1e7 / 2**30:.2f} GiB held through pass 1")
    scale = bench_decide_scale(200_000 if quick else 2_000_000, bands_n)
    return {**scale, "recall_at_j085": round(recall, 4), "fp_rate_at_j050": round(fp_rate, 5),
            "bands": bands_n, "rows": rows_n,
            "datasketch_mchars_per_s_1core": round(ds_1, 3), "datasketch_mchars_per_s_2cores": round(ds_2, 3),
            "minhash_mchars_per_s_1core": round(sig_1, 2), "minhash_mchars_per_s_2cores": round(sig_2, 2),
            "speedup_vs_datasketch_1core": round(sig_1 / ds_1, 1),
            "speedup_vs_datasketch_2cores": round(sig_2 / ds_2, 1),
            "dedup_pass1_mchars_per_s_2workers": round(step_2, 2),
            "index_bytes_per_doc": per_doc, "index_gib_10m_docs": round(per_doc * 1e7 / 2**30, 2)}


def bench_decide_scale(n: int, bands_n: int, num_perm: int = 128) -> dict:
    """The decisions (exact dedup, LSH candidates, verification, clusters) on n synthetic documents with the
    real array layout and 2% planted near-duplicates: time and peak memory held by numpy (tracemalloc)."""
    import tracemalloc
    rng = np.random.default_rng(0)
    arrays = {"exact": rng.integers(0, 2**63, n, dtype=np.uint64),
              "bands": rng.integers(0, 2**63, (n, bands_n), dtype=np.uint64),
              "sketch": rng.integers(0, 256, (n, num_perm), dtype=np.uint8),
              "contam": np.full(n, -1, np.int64), "has_shingles": np.ones(n, bool)}
    src = rng.choice(n // 2, n // 50, replace=False)
    dst = src + n // 2
    arrays["bands"][dst, : bands_n // 2] = arrays["bands"][src, : bands_n // 2]
    arrays["sketch"][dst] = arrays["sketch"][src]
    held = sum(a.nbytes for a in arrays.values())
    tracemalloc.start()
    t0 = time.perf_counter()
    d = dedup.decide(arrays, exact=True, near=True, threshold=THRESHOLD)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    found = int(d["near_dup"].sum())
    print(f"    decisions on {n:,} synthetic documents ({len(dst):,} planted near-duplicates, {found:,} found): "
          f"{seconds:.1f} s; arrays held {held / n:.0f} B/doc, decision temporaries peak {peak / n:.0f} B/doc "
          f"-> 10M documents: {(held + peak) * 1e7 / n / 2**30:.1f} GiB at the peak")
    return {"decide_seconds_per_m_docs": round(seconds / n * 1e6, 2),
            "decide_peak_gib_10m_docs": round((held + peak) * 1e7 / n / 2**30, 2)}


# ---------------------------------------------------------------------------------------------------------
# 5. decontamination n-gram length
def clean_corpus_texts(quick: bool) -> list[str]:
    """Real training-style text with no exam dumps in it (checked by eye from the printed hits)."""
    texts = [t for ts in load_texts(quick).values() for t in ts]
    with open(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        texts += ["\n".join(m["value"] for m in json.loads(line)["conversations"]) for line in f]
    with open(SAMPLES / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl", encoding="utf-8") as f:
        texts += [" ".join(json.loads(line).values()) for line in f]
    with open(SAMPLES / "medicalgpt/rag/medical_corpus.txt", encoding="utf-8") as f:
        texts += [" ".join(json.loads(line).values()) for line in f]
    return texts


def eval_questions() -> dict[str, list[dict]]:
    sets = {"ceval": [], "cmmlu": []}
    for f in sorted((SAMPLES / "ceval-medical").glob("*/*.csv")) + sorted((ROOT / "corpora/eval/ceval").glob("*/*.csv")):
        sets["ceval"] += dedup.read_eval_questions(f, "ceval")[0]
    for f in sorted((SAMPLES / "cmmlu-medical").glob("*/*.csv")) + sorted((ROOT / "corpora/eval/cmmlu").glob("*/*.csv")):
        sets["cmmlu"] += dedup.read_eval_questions(f, "cmmlu")[0]
    return sets


PLANT_STYLES = ("pasted", "exam dump", "answer filled", "1 char changed", "5% chars changed")


def plant(q, style: int, filler: str, rng: random.Random) -> str:
    """A training text holding eval question q in one of PLANT_STYLES."""
    question, options = q.question, q.option_list
    if style == 0:    # the question alone inside other text
        return filler[:200] + question + filler[200:300]
    if style == 1:    # exam-dump layout with lettered options
        opts = "  ".join(f"{letter}.{o}" for letter, o in zip("ABCD", options))
        return f"{filler[:100]}\n1. {question}（  ）\n{opts}\n答案：{q.answer or ''}\n{filler[100:200]}"
    if style == 2:    # the question turned into a statement with its answer
        answer = q.answer_text or options[0]
        stated = dedup.BLANK.sub(lambda _: answer, question, count=1) if dedup.BLANK.search(question) else question + answer
        return filler[:150] + stated + "。" + filler[150:250]
    chars = list(question)
    for _ in range(1 if style == 3 else max(1, round(0.05 * len(chars)))):
        chars[rng.randrange(len(chars))] = rng.choice(filler[:300] or "的")
    return filler[:200] + "".join(chars) + filler[200:300]


def shared_phrase(q, filler: str, rng: random.Random) -> str | None:
    """Clean text that shares one phrase (13-20 characters, at most 40% of the question) with a question: what
    a stock phrase of a politics or law question does to news text. Not a leak."""
    stem = q.question
    span = rng.randint(13, 20)
    if len(stem) < span / 0.4:
        return None
    start = rng.randrange(len(stem) - span + 1)
    return filler[:200] + stem[start:start + span] + filler[200:400]


def bench_decontam(quick: bool) -> dict:
    """Catch rate vs false removals for decontamination settings: n-gram length x the share of a question
    form's n-grams a text must hold (1e-9: any single shared n-gram, the old rule)."""
    sets = eval_questions()
    clean = clean_corpus_texts(quick)
    rng = random.Random(4)
    questions = [q for qs in sets.values() for q in qs]
    planted = {s: [plant(q, i, rng.choice(clean), rng) for q in questions] for i, s in enumerate(PLANT_STYLES)}
    phrases = [t for t in (shared_phrase(q, rng.choice(clean), rng) for q in questions) if t]

    def batch(texts):
        return minhash.fold_batch(*minhash.encode_batch(texts), alnum=True)
    clean_b, phrase_b = batch(clean), batch(phrases)
    planted_b = {s: batch(t) for s, t in planted.items()}
    print(f"\n[5] decontamination: {len(questions)} C-Eval/CMMLU questions (real samples + ours); catch rate on "
          f"{len(questions)} planted texts per style; false removals on {len(clean)} clean real documents and on "
          f"{len(phrases)} clean texts sharing one 13-20 character phrase with a question")
    print(f"    {'n':>3} {'share':>6} " + " ".join(f"{s:>17}" for s in PLANT_STYLES) + f" {'clean FP':>9} {'phrase FP':>9}")
    out = {}
    for n in (8, 10, 13):
        index = dedup.eval_index(list(sets.values()), n)
        for share in (1e-9, 0.2, 0.3, 0.5, 0.7, 0.9):
            catch = {s: float((dedup.find_contamination(*b, index, n, share)[0] >= 0).mean())
                     for s, b in planted_b.items()}
            fp_clean = int((dedup.find_contamination(*clean_b, index, n, share)[0] >= 0).sum())
            fp_phrase = float((dedup.find_contamination(*phrase_b, index, n, share)[0] >= 0).mean())
            label = "any" if share < 0.01 else f"{share:.1f}"
            print(f"    {n:>3} {label:>6} " + " ".join(f"{catch[s]:>17.3f}" for s in PLANT_STYLES)
                  + f" {fp_clean:>9} {fp_phrase:>9.3f}")
            key = f"decontam_n{n}_share_{label}"
            out[f"{key}_catch_pasted"] = round(catch["pasted"], 4)
            out[f"{key}_catch_5pct_changed"] = round(catch["5% chars changed"], 4)
            out[f"{key}_catch_all_styles"] = round(float(np.mean(list(catch.values()))), 4)
            out[f"{key}_fp_clean_docs"] = fp_clean
            out[f"{key}_fp_shared_phrase"] = round(fp_phrase, 4)
    return out


def run(quick: bool = False) -> dict:
    t0 = time.time()
    sources = load_texts(quick)
    results = {}
    results.update(bench_shingling(sources, quick))
    results.update(bench_index(sources, quick))
    results.update(bench_decontam(quick))
    results["seconds"] = round(time.time() - t0, 1)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller benchmark (< 60 s)")
    args = ap.parse_args(argv)
    results = run(quick=args.quick)
    print("\n" + json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
