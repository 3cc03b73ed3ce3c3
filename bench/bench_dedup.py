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
  5. decontamination: catch rate on questions planted in real clean text (5 styles) vs false removals (clean
     documents; texts sharing one phrase with a question), over n-gram length x required share
  6. the whole step on a generated corpus (real sentences, planted exact/near/heavy copies and chains; default
     1M documents, --docs): peak RSS of its process tree vs [dedup] memory_gb, documents per CPU-second,
     stage files on disk, recall/FP, removed documents without a kept one within true J 0.7; projections
  7. (--sections 7) datatrove's MinHash pipeline on the same generated corpus: its default for Chinese (jieba
     words) and character 5-grams, against our whole step (needs /work/bench-venvs/datatrove: see
     bench/datatrove_minhash.py)
The corpora of [6] and [7] are generated once per size and seed into /tmp/medllm-bench-dedup (or
$BENCH_DEDUP_CACHE): texts, planted pairs and clean parts; 10M documents take ~17 GB there and ~17 minutes of CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import random
import re
import shutil
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
    # the in-memory stage-3 function on every document: candidates, verification
    t0 = time.perf_counter()
    edges, n_cand = dedup.verified_edges(bands, sketches, np.ones(len(texts), bool), threshold)
    index_s = time.perf_counter() - t0
    origin = np.arange(len(texts))
    origin[v] = u
    cross = int((origin[edges["u"]] != origin[edges["v"]]).sum())
    print(f"\n[2] LSH accuracy (threshold {threshold}, {bands_n} bands x {rows_n} rows, 8-bit sketch verification): "
          f"{len(texts)} documents, {len(pairs)} planted pairs")
    print(f"    recall at J >= 0.85: {recall:.4f} over {high.sum()} pairs (target >= 0.95)")
    print(f"    false positives at J <= 0.5: {fp_rate:.4%} over {low.sum()} pairs (target <= 1%)")
    for lo, hi in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.95), (0.95, 1.01)):
        m = (true_j >= lo) & (true_j < hi)
        if m.any():
            print(f"      J in [{lo:.2f}, {min(hi, 1):.2f}): {m.sum():5d} pairs, flagged {flagged[m].mean():.4f}")
    print(f"    all pairs: {n_cand} candidate pairs, {len(edges)} verified, {cross} between different originals "
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
    # the whole signature-stage work of the step (normalize, exact hash, signature, bands, sketch, decontam)
    index = dedup.eval_index([[]], 10)
    cfg = {"num_perm": 128, "ngram": 5, "bands": bands_n, "rows": rows_n, "decontam_ngram": 10,
           "decontam_min_share": 0.3}
    global _BATCH_ARGS
    _BATCH_ARGS = (cfg, index)
    batches = [(texts[i:i + 1000], texts[i:i + 1000]) for i in range(0, len(texts), 1000)]
    raw_chars = sum(len(t) for t in texts)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_hash_batch, batches[:2])               # warm up (tables, imports)
        t0 = time.perf_counter()
        pool.map(_hash_batch, batches)
        step_2 = raw_chars / (time.perf_counter() - t0) / 1e6
    print(f"\n[3] throughput, M chars/s (char 5-grams, 128 permutations; {n_chars / 1e6:.1f} M chars, "
          f"datasketch on {ds_chars / 1e6:.2f} M of them)")
    print(f"    datasketch MinHash.update_batch per document: 1 core {ds_1:.2f}, both cores {ds_2:.2f}")
    print(f"    ours (minhash.MinHasher):                       1 core {sig_1:.2f}, both cores {sig_2:.2f}")
    print(f"    ratio: {sig_1 / ds_1:.1f}x on 1 core, {sig_2 / ds_2:.1f}x on both cores (target >= 10x)")
    print(f"    whole signature stage of the dedup step (normalize + exact hash + signature + bands + decontam), "
          f"2 workers: {step_2:.2f}")

    return {"recall_at_j085": round(recall, 4), "fp_rate_at_j050": round(fp_rate, 5),
            "bands": bands_n, "rows": rows_n,
            "datasketch_mchars_per_s_1core": round(ds_1, 3), "datasketch_mchars_per_s_2cores": round(ds_2, 3),
            "minhash_mchars_per_s_1core": round(sig_1, 2), "minhash_mchars_per_s_2cores": round(sig_2, 2),
            "speedup_vs_datasketch_1core": round(sig_1 / ds_1, 1),
            "speedup_vs_datasketch_2cores": round(sig_2 / ds_2, 1),
            "dedup_sign_stage_mchars_per_s_2workers": round(step_2, 2)}


_BATCH_ARGS = None


def _hash_batch(batch):
    return dedup.hash_batch(*batch, *_BATCH_ARGS)


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
    for n in ((10, 13) if quick else (8, 10, 13)):
        index = dedup.eval_index(list(sets.values()), n)
        for share in ((1e-9, 0.3) if quick else (1e-9, 0.2, 0.3, 0.5, 0.7, 0.9)):
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


# ---------------------------------------------------------------------------------------------------------
# 6. the whole step at scale: a generated corpus with planted duplicates, peak RSS against memory_gb
def sentence_pool() -> list[str]:
    """Every sentence (>= 8 characters) of the real samples: the material generated documents are made of."""
    texts = [t for ts in load_texts(False).values() for t in ts] + clean_corpus_texts(False)
    pool = {s.strip() for t in texts for s in SENTENCE.split(t) if len(s.strip()) >= 8}
    return sorted(pool)


def iter_corpus(n_docs: int, seed: int, planted: list):
    """n_docs documents in stream order: 70% new documents (8-14 random real sentences: two of them share
    almost no 5-gram), 5% exact copies with punctuation and spacing changed, 15% near copies (0.5-3% edits),
    5% heavy edits (30-50%: distinct documents), 5% links of chains (1.5% edits on the chain's last document).
    Copies come after their originals. Yields the texts; appends the planted (original, copy, kind) triples.

    Holds new documents as their sentence numbers and only the last text of each chain, not every text: 10M
    documents are ~9 GB as Python strings, ~0.5 GB this way."""
    import array
    rng = random.Random(seed)
    pool = sentence_pool()
    base_doc = array.array("q")              # document number of each new document
    base_at = array.array("q", [0])          # its sentence numbers: base_sent[base_at[k]:base_at[k + 1]]
    base_sent = array.array("I")
    chain_last, chain_text = [], []          # per chain: its last document and that document's text

    def base_text(k: int) -> str:
        return "".join(pool[j] for j in base_sent[base_at[k]:base_at[k + 1]])

    def random_base() -> tuple[int, str]:
        k = rng.randrange(len(base_doc))
        return base_doc[k], base_text(k)

    # every draw below is the one the in-memory version made (rng.choice(seq) is seq[rng.randrange(len(seq))]),
    # so a seed gives the same corpus as before
    for i in range(n_docs):
        r = rng.random()
        if r < 0.70 or len(base_doc) < 10:
            sents = [rng.randrange(len(pool)) for _ in range(rng.randint(8, 14))]
            base_sent.extend(sents)
            base_at.append(len(base_sent))
            base_doc.append(i)
            t = "".join(pool[j] for j in sents)
            if rng.random() < 0.05:
                chain_last.append(i)
                chain_text.append(t)
            yield t
            continue
        src, src_text = random_base()
        if r < 0.75:
            t = src_text.replace("，", ",").replace("。", ". ")
            kind = "exact"
        elif r < 0.90:
            rate = rng.choice((0.005, 0.01, 0.02, 0.03))
            t = edit(src_text, rate, rng, random_base()[1])
            kind = "near"
        elif r < 0.95:
            rate = rng.choice((0.3, 0.4, 0.5))
            t = edit(src_text, rate, rng, random_base()[1])
            kind = "far"
        elif chain_last:
            c = rng.randrange(len(chain_last))
            src = chain_last[c]
            t = edit(chain_text[c], 0.015, rng, chain_text[c])
            chain_last[c], chain_text[c] = i, t
            kind = "chain"
        else:
            t, kind = src_text, "exact"
        planted.append((src, i, kind))
        yield t


def generate_corpus(n_docs: int, seed: int = 0):
    """The texts of iter_corpus in a list, and the planted triples."""
    planted: list = []
    texts = list(iter_corpus(n_docs, seed, planted))
    return texts, planted


CORPUS_CACHE = Path(os.environ.get("BENCH_DEDUP_CACHE", "/tmp/medllm-bench-dedup"))
KINDS = ("exact", "near", "far", "chain")


class CorpusTexts:
    """The texts of a cached corpus, read on demand from one UTF-8 file through a memory map (a text per
    index, as a list would give them), so a 10M-document corpus never sits in the benchmark's memory."""

    def __init__(self, d: Path):
        import mmap
        self.offsets = np.load(d / "offsets.npy")
        self._f = open(d / "texts.bin", "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.offsets[-1] else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._mm[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def cached_corpus(n_docs: int, seed: int):
    """The corpus of iter_corpus(n_docs, seed) with its clean parts, generated once into CORPUS_CACHE and
    reused by later runs (generation is single-threaded Python: minutes per million documents). Returns
    (directory, texts, planted, info); the clean parts are under directory / "clean"."""
    d = CORPUS_CACHE / f"gen-n{n_docs}-s{seed}"
    info_path = d / "info.json"
    if not info_path.exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        planted: list = []
        offsets = np.empty(n_docs + 1, np.int64)
        offsets[0] = chars = 0
        with open(d / "texts.bin", "wb") as f:
            def texts():
                nonlocal chars
                for i, t in enumerate(iter_corpus(n_docs, seed, planted)):
                    b = t.encode("utf-8")
                    f.write(b)
                    offsets[i + 1] = offsets[i] + len(b)
                    chars += len(t)
                    yield t
            write_clean(texts(), d / "clean", n_docs)
        np.save(d / "offsets.npy", offsets)
        rows = np.array([(a, b, KINDS.index(k)) for a, b, k in planted],
                        dtype=[("a", "<i8"), ("b", "<i8"), ("k", "u1")]).reshape(-1)
        np.save(d / "planted.npy", rows)
        info = {"docs": n_docs, "chars": chars, "bytes": int(offsets[-1]),
                "generated_seconds": round(time.perf_counter() - t0, 1)}
        info_path.write_text(json.dumps(info))     # written last: the cache's done-marker
    info = json.loads(info_path.read_text())
    rows = np.load(d / "planted.npy")
    planted = list(zip(rows["a"].tolist(), rows["b"].tolist(), [KINDS[k] for k in rows["k"].tolist()]))
    return d, CorpusTexts(d), planted, info


class TreeRSS:
    """Peak summed RSS of a process and its descendants, sampled every 0.1 s (pool workers included), their CPU
    seconds (utime + stime of every process seen, as last sampled: a pool that never waits for its workers, as
    datatrove's executor, would hide them from getrusage), and the peak size of a directory tree (the stage
    files), sampled every 2 s."""

    def __init__(self, pid: int, watch: Path):
        import threading
        self.pid, self.watch, self.peak, self.peak_disk, self._stop = pid, watch, 0, 0, False
        self.cpu_of: dict[int, float] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _children(pid):
        out = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
        return out

    def _rss(self):
        total, todo = 0, [self.pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                self.cpu_of[p] = (int(fields[11]) + int(fields[12])) / self.tick   # utime, stime
            except (OSError, ValueError, IndexError):
                continue
            todo += self._children(p)
        return total

    def _disk(self):
        total = 0
        for root, _, files in os.walk(self.watch):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def _run(self):
        k = 0
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            if k % 20 == 0:
                self.peak_disk = max(self.peak_disk, self._disk())
            k += 1
            time.sleep(0.1)

    def stop(self):
        self._stop = True
        self.thread.join()

    @property
    def cpu(self) -> float:
        return sum(self.cpu_of.values())


DEDUP_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from data_process import dedup
from data_process.recipe import parse_recipe
from pathlib import Path
raw = {{"corpus": [{{"name": "gen", "reader": "jsonl", "paths": [], "priority": 50}}], "eval_set": [],
       "dedup": {{"memory_gb": {memory_gb}}}}}
recipe = parse_recipe(raw, Path({tmp!r}))
t0 = time.perf_counter()
report = dedup.run(recipe, Path({clean!r}), Path({out!r}), workers={workers})
import resource
me = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps({{"wall": time.perf_counter() - t0, "totals": report["totals"],
                              "driver_cpu": me.ru_utime + me.ru_stime}}))
"""


def write_clean(texts, clean: Path, n_docs: int | None = None) -> None:
    """Texts (any iterable; n_docs: how many, when it is not a list) as the clean parts of corpus "gen"."""
    from data_process.records import write_parts
    n_docs = len(texts) if n_docs is None else n_docs
    # at least 4 clean parts (signature units), so a small run uses the pool as a large one does
    write_parts(({"id": f"gen:{i}", "corpus": "gen", "kind": "doc", "text": t} for i, t in enumerate(texts)),
                clean / "gen", part_records=min(100_000, max(1_000, -(-n_docs // 4))))
    (clean / "gen" / "manifest.json").write_text(json.dumps({"records": n_docs}))


def run_dedup_child(tmp: Path, clean: Path, memory_gb: float, workers: int = 2) -> dict:
    """The dedup step in a child process, its process tree's peak RSS and its stage files' peak size measured."""
    import subprocess
    out = tmp / f"dedup-{memory_gb}"
    shutil.rmtree(out, ignore_errors=True)
    code = DEDUP_CHILD.format(root=str(ROOT), memory_gb=memory_gb, tmp=str(tmp), clean=str(clean), out=str(out),
                              workers=workers)
    import resource
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    watch = TreeRSS(proc.pid, out / ".work")
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    watch.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # the child and its pool workers, all reaped
    cpu = max((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), watch.cpu)
    if proc.returncode != 0:
        raise RuntimeError(f"dedup child failed ({proc.returncode}): {stdout[-2000:]}")
    result = json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    return {**result, "process_wall": wall, "cpu_seconds": cpu, "peak_rss": watch.peak, "peak_disk": watch.peak_disk,
            "out": out}


def true_j(a: str, b: str) -> float:
    return minhash.jaccard(set(minhash.shingles(minhash.normalize(a), 5)), set(minhash.shingles(minhash.normalize(b), 5)))


def accuracy(texts, planted, removed: set, group: dict, rng: random.Random, kept_of: dict | None = None,
             sample: int = 20_000) -> dict:
    """recall at true J >= 0.85 and false positives at J <= 0.5 over (a sample of) the planted pairs: a pair
    counts as judged duplicate when both documents end in one group (`group`: document -> the kept document it
    was removed for (ours) or its cluster (datatrove); a document not in it is its own group), so a pipeline
    that keeps the copy and removes the original is judged the same as one that keeps the original. Plus the
    share of removed documents (a sample) whose named kept document is not within true J 0.7."""
    # copies of original documents (chain links are copies of copies: a link whose predecessor is removed
    # rightly stays when no kept document is within the threshold, so chains are judged by the last figure)
    pairs = [p for p in planted if p[2] in ("near", "far")]
    pairs = rng.sample(pairs, min(sample, len(pairs)))
    js = np.array([true_j(texts[a], texts[b]) for a, b, _ in pairs])
    g = lambda x: group.get(x, ("doc", x))
    gone = np.array([g(a) == g(b) for a, b, _ in pairs])
    base_removed = None
    out = {"recall_at_j085": float(gone[js >= 0.85].mean()), "fp_at_j050": float(gone[js <= 0.5].mean()),
           "pairs_high": int((js >= 0.85).sum()), "pairs_low": int((js <= 0.5).sum())}
    exact = [b for _, b, k in planted if k == "exact"]
    out["exact_recall"] = float(np.mean([g(a) == g(b) for a, b, k in planted if k == "exact"])) if exact else 1.0
    copies = {b for _, b, _ in planted}
    base_removed = sum(1 for i in removed if i not in copies)
    out["originals_removed"] = base_removed
    if kept_of is not None:
        rem = rng.sample(sorted(kept_of), min(5000, len(kept_of)))
        out["removed_without_kept_within_07"] = float(np.mean([true_j(texts[i], texts[kept_of[i]]) < 0.7 for i in rem]))
    return out


def removed_without_kept_near(texts, removed: set, cluster: dict, rng: random.Random, sample: int = 3000) -> float:
    """For a clustering pipeline: the share of removed documents (a sample) with no kept document of their
    cluster within true J 0.7 (chain collapse)."""
    members: dict = {}
    for d, c in cluster.items():
        members.setdefault(c, []).append(d)
    rem = [d for d in removed if d in cluster]
    rem = rng.sample(rem, min(sample, len(rem)))
    far = 0
    for d in rem:
        kept = [k for k in members[cluster[d]] if k not in removed]
        far += not any(true_j(texts[d], texts[k]) >= 0.7 for k in kept)
    return far / max(1, len(rem))


def ours_groups(kept_of: dict) -> dict:
    """Our groups: a kept document that something was removed for, and the documents removed for it."""
    group = {k: ("doc", k) for k in kept_of.values()}
    group.update({v: ("doc", k) for v, k in kept_of.items()})
    return group


def bench_scale(n_docs: int, memory_gbs=(0.25, 1.0)) -> dict:
    """The whole dedup step (read clean parts, all stages, write survivors and audit) on n_docs generated
    documents with 2 workers, at each memory_gb: wall, documents/s per core, peak RSS of the process tree
    against memory_gb, stage files on disk, accuracy on the planted duplicates."""
    import tempfile
    import pandas as pd
    t0 = time.perf_counter()
    corpus_dir, texts, planted, info = cached_corpus(n_docs, seed=7)
    chars = info["chars"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    out_figures = {}
    try:
        gen_s = time.perf_counter() - t0
        mb = info["bytes"] / 1e6
        print(f"\n[6] the whole step on {n_docs:,} generated documents ({mb:,.0f} MB of UTF-8 text, {chars / 1e6:.0f} M "
              f"chars; {len(planted):,} planted copies; generated and written in {info['generated_seconds']:.0f} s, "
              f"cached in {corpus_dir}; loaded in {gen_s:.0f} s), 2 workers")
        for memory_gb in memory_gbs:
            r = run_dedup_child(tmp, corpus_dir / "clean", memory_gb)
            t = r["totals"]
            audit = pd.read_parquet(r["out"] / "removed.parquet", columns=["id", "kept_id"])
            idx = lambda s: int(s.split(":")[1])
            kept_of = {idx(a): idx(b) for a, b in zip(audit["id"], audit["kept_id"])}
            acc = accuracy(texts, planted, set(kept_of), ours_groups(kept_of), random.Random(1), kept_of)
            per_core = n_docs / r["cpu_seconds"]
            rss_gb = r["peak_rss"] / 2**30
            print(f"    memory_gb {memory_gb}: {r['wall']:.0f} s wall, {r['cpu_seconds']:.0f} CPU-s ({per_core:,.0f} "
                  f"docs per CPU-second = per core, {chars / r['cpu_seconds'] / 1e6:.2f} M chars per CPU-s), peak RSS "
                  f"{rss_gb:.2f} GiB (limit memory_gb + 1 = {memory_gb + 1:.2f}), stage files "
                  f"{r['peak_disk'] / 2**30:.2f} GiB "
                  f"({r['peak_disk'] / n_docs:.0f} B/doc); partitions: exact {t['exact_partitions']}, buckets "
                  f"{t['bucket_partitions']}, decide ranges {t['decide_ranges']}")
            print(f"      removed {t['in'] - t['kept']:,} (exact {t['exact_dups']:,}, near {t['near_dups']:,}); "
                  f"recall at J >= 0.85 {acc['recall_at_j085']:.4f} ({acc['pairs_high']:,} pairs), FP at J <= 0.5 "
                  f"{acc['fp_at_j050']:.4%} ({acc['pairs_low']:,} pairs), exact copies found {acc['exact_recall']:.4f}, "
                  f"originals removed {acc['originals_removed']}, removed without a kept doc within true J 0.7: "
                  f"{acc['removed_without_kept_within_07']:.2%} (target < 2%)")
            key = f"scale_{n_docs // 1000}k_mem{memory_gb}"
            out_figures.update({f"{key}_seconds": round(r["wall"], 1), f"{key}_cpu_seconds": round(r["cpu_seconds"], 1),
                                f"{key}_docs_per_s_per_core": round(per_core),
                                f"{key}_peak_rss_gib": round(rss_gb, 2), f"{key}_stage_disk_bytes_per_doc":
                                    round(r["peak_disk"] / n_docs), f"{key}_recall_at_j085": round(acc["recall_at_j085"], 4),
                                f"{key}_fp_at_j050": round(acc["fp_at_j050"], 5),
                                f"{key}_removed_without_kept_within_07": round(acc["removed_without_kept_within_07"], 4),
                                f"{key}_bucket_partitions": t["bucket_partitions"]})
        disk = r["peak_disk"] / n_docs
        # the driver's own CPU (decisions, audit file, bookkeeping) does not spread over workers; the rest does
        serial, parallel = r["driver_cpu"] / n_docs, (r["cpu_seconds"] - r["driver_cpu"]) / n_docs
        t10 = 1e7 * (serial + parallel / 2)
        t233 = 233e6 * (serial + parallel / 512)
        print(f"    projection, CPU-seconds per document: driver (serial) {serial * 1e6:.1f} us, work units (parallel) "
              f"{parallel * 1e6:.1f} us; on free cores: 10M documents on 2 cores {t10 / 60:.0f} min, stage files "
              f"{disk * 1e7 / 2**30:.0f} GiB; SkyPile's 233M on 16 nodes x 32 cores {t233 / 60:.0f} min (the driver "
              f"{233e6 * serial / 60:.0f} of them), stage files {disk * 233e6 / 2**40:.2f} TiB on the shared "
              f"filesystem, the driver {233e6 * 2 / 2**30:.1f} GiB of status bytes")
        out_figures["scale_docs"] = n_docs
        out_figures["driver_cpu_us_per_doc"] = round(serial * 1e6, 2)
        out_figures["units_cpu_us_per_doc"] = round(parallel * 1e6, 2)
        out_figures["projected_10m_minutes_2cores"] = round(t10 / 60, 1)
        out_figures["projected_233m_minutes_512cores"] = round(t233 / 60, 1)
        return out_figures, (tmp, texts, planted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------
# 7. datatrove's MinHash pipeline side by side, same corpus, same machine, same run
DATATROVE_PY = Path("/work/bench-venvs/datatrove/bin/python")


def bench_datatrove(n_docs: int) -> dict:
    import subprocess
    import tempfile
    if not DATATROVE_PY.exists():
        print(f"\n[7] datatrove: {DATATROVE_PY} missing; create it as bench/datatrove_minhash.py says. Skipped.")
        return {}
    corpus_dir, texts, planted, info = cached_corpus(n_docs, seed=8)
    mb = info["bytes"] / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_dt_"))
    try:
        (tmp / "jsonl").mkdir()
        for k in range(2):     # two input files: one signature task per worker
            with open(tmp / "jsonl" / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
                for i in range(k, len(texts), 2):
                    f.write(json.dumps({"id": f"gen:{i}", "text": texts[i]}, ensure_ascii=False) + "\n")
        print(f"\n[7] datatrove {_datatrove_version()} MinHash (LocalPipelineExecutor, 2 workers: signature -> buckets -> "
              f"cluster -> filter) vs ours (the whole dedup step, 2 workers) on the same {n_docs:,} documents "
              f"({mb:.0f} MB), same machine, this run")
        ours = run_dedup_child(tmp, corpus_dir / "clean", 1.0)
        import pandas as pd
        audit = pd.read_parquet(ours["out"] / "removed.parquet", columns=["id", "kept_id"])
        kept_of = {int(a.split(":")[1]): int(b.split(":")[1]) for a, b in zip(audit["id"], audit["kept_id"])}
        ours_acc = accuracy(texts, planted, set(kept_of), ours_groups(kept_of), random.Random(1), kept_of)
        rows = [("ours (char 5-gram)", ours["wall"], ours["cpu_seconds"], ours_acc)]
        out = {"datatrove_docs": n_docs, "datatrove_mb": round(mb), "ours_seconds": round(ours["wall"], 1),
               "ours_cpu_seconds": round(ours["cpu_seconds"], 1)}
        import resource
        for shingles in ("word", "char"):
            t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.Popen([str(DATATROVE_PY), str(ROOT / "bench" / "datatrove_minhash.py"),
                                     str(tmp / "jsonl"), str(tmp / f"dt-{shingles}"), "--shingles", shingles,
                                     "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            watch = TreeRSS(proc.pid, tmp / f"dt-{shingles}")
            stdout, stderr = proc.communicate()
            wall = time.perf_counter() - t0
            watch.stop()
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = max((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), watch.cpu)
            p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            if p.returncode != 0:
                print(f"    datatrove {shingles}: failed: {p.stderr[-1500:]}")
                continue
            got = json.loads(p.stdout.strip().splitlines()[-1])
            cluster = {int(d.split(":")[1]): c for d, c in got["cluster"].items()}
            removed = {int(s.split(":")[1]) for s in got["removed"]}
            acc = accuracy(texts, planted, removed, {d: ("cluster", c) for d, c in cluster.items()}, random.Random(1))
            acc["removed_without_kept_within_07"] = removed_without_kept_near(texts, removed, cluster, random.Random(2))
            out[f"datatrove_{shingles}_removed_without_kept_within_07"] = round(acc["removed_without_kept_within_07"], 4)
            name = "datatrove default zh (jieba word 5-gram)" if shingles == "word" else "datatrove char 5-gram"
            rows.append((name, wall, cpu, acc))
            out[f"datatrove_{shingles}_seconds"] = round(wall, 1)
            out[f"datatrove_{shingles}_cpu_seconds"] = round(cpu, 1)
            out.update({f"datatrove_{shingles}_{k}_seconds": round(v, 1) for k, v in got["seconds"].items()})
            out[f"datatrove_{shingles}_recall_at_j085"] = round(acc["recall_at_j085"], 4)
            out[f"datatrove_{shingles}_fp_at_j050"] = round(acc["fp_at_j050"], 5)
            out[f"speedup_per_core_vs_datatrove_{shingles}"] = round(cpu / ours["cpu_seconds"], 1)
            out[f"speedup_wall_vs_datatrove_{shingles}"] = round(wall / ours["wall"], 1)
        print("    per core = per CPU-second of the whole process tree (the machine is shared: wall time says little)")
        print("    a planted pair counts as found when both documents end in one group (ours: the kept document and "
              "those removed for it; datatrove: a cluster)")
        print(f"    {'pipeline':<42} {'wall s':>7} {'CPU s':>7} {'docs/CPU-s':>11} {'ours x':>7} {'recall J>=.85':>14} "
              f"{'FP J<=.5':>9} {'exact found':>11} {'removed, no kept within J .7':>29}")
        for name, wall, cpu, acc in rows:
            print(f"    {name:<42} {wall:7.1f} {cpu:7.1f} {n_docs / cpu:11,.0f} {cpu / ours['cpu_seconds']:6.1f}x "
                  f"{acc['recall_at_j085']:14.4f} {acc['fp_at_j050']:9.4%} {acc['exact_recall']:11.4f} "
                  f"{acc['removed_without_kept_within_07']:29.2%}")
        out["ours_recall_at_j085"] = round(ours_acc["recall_at_j085"], 4)
        out["ours_removed_without_kept_within_07"] = round(ours_acc["removed_without_kept_within_07"], 4)
        out["ours_fp_at_j050"] = round(ours_acc["fp_at_j050"], 5)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _datatrove_version() -> str:
    import subprocess
    p = subprocess.run([str(DATATROVE_PY), "-c", "import datatrove, importlib.metadata as m; print(m.version('datatrove'))"],
                       capture_output=True, text=True)
    return p.stdout.strip()


def run(quick: bool = False, docs: int | None = None, datatrove_docs: int | None = None,
        sections: str = "12356", memory_gbs=(0.25, 1.0)) -> dict:
    """`sections`: which of [1]-[7] to run (7: datatrove, which needs its own venv and minutes)."""
    t0 = time.time()
    sources = load_texts(quick)
    results = {}
    if "1" in sections:
        results.update(bench_shingling(sources, quick))
    if "2" in sections or "3" in sections:
        results.update(bench_index(sources, quick))
    if "5" in sections:
        results.update(bench_decontam(quick))
    if "6" in sections:
        figures, (tmp, _, _) = bench_scale(docs or (20_000 if quick else 1_000_000), memory_gbs)
        shutil.rmtree(tmp, ignore_errors=True)
        results.update(figures)
    if "7" in sections:
        results.update(bench_datatrove(datatrove_docs or 40_000))
    results["seconds"] = round(time.time() - t0, 1)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller benchmark (< 60 s)")
    ap.add_argument("--sections", default="12356", help="which sections to run (default 12356; 7 = datatrove)")
    ap.add_argument("--docs", type=int, default=None, help="documents for [6] (default 1,000,000; --quick 20,000)")
    ap.add_argument("--datatrove-docs", type=int, default=None,
                    help="documents for [7] (default 40,000; the issue's >= 500 MB is 420,000: ~15 CPU-minutes)")
    ap.add_argument("--memory-gb", type=float, action="append", default=None,
                    help="[dedup] memory_gb values for [6] (repeatable; default 0.25 and 1.0)")
    args = ap.parse_args(argv)
    results = run(quick=args.quick, docs=args.docs, datatrove_docs=args.datatrove_docs, sections=args.sections,
                  memory_gbs=tuple(args.memory_gb or (0.25, 1.0)))
    print("\n" + json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
