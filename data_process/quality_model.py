"""Model-based quality scores: a fastText quality classifier and a KenLM character n-gram perplexity, both trained
on this project's own cleaned text by `python data_process.py train-quality`, and the Scorer the cleaner uses.

    python data_process.py --steps read                  # data/clean/<corpus>/ (no scores yet)
    python data_process.py train-quality                 # -> data/quality/{classifier.bin, lm.arpa, cutoffs.json}
    python data_process.py --steps read --force --set 'clean.quality_model="data/quality"'   # scores on records

- Classifier (as in the GPT-3 and FineWeb-Edu filters, datatrove's FastTextClassifierFilter, data-juicer's
  quality classifiers): positives are documents of the curated corpora (Wikipedia, BaiduBaike, medical books,
  guidelines, the medical encyclopedia), negatives documents of the web corpora (C4_zh, WuDao, SkyPile,
  MiniMind pretrain); features are characters with word n-grams 1..3 over them (character n-grams: Chinese has no
  spaces). One thread and a fixed seed: the same data gives the same model, bit for bit (with the fasttext-wheel
  0.9.2 build; PyPI's `fasttext` 0.9.3 gives a different model on every run, and sometimes "Encountered NaN").
- Perplexity (CCNet, arXiv 1911.00359): an interpolated Kneser-Ney character n-gram model of the curated text,
  estimated here and written as an ARPA file, which KenLM loads and scores. KenLM's Python package has no
  estimator (lmplz is a C++ tool it does not ship), so estimation is the one piece written by hand; KenLM's
  scores of it are checked against the formula in tests/test_quality_model.py. The scorer the cleaner uses is a
  small compiled one (CharLM, below) that reads the same file and gives KenLM's scores at ~4x its speed through
  Python; KenLM scores where there is no C compiler. Per-corpus percentile cutoffs
  (CCNet's head / middle / tail at the 30th and 60th percentiles) are measured on each pretraining corpus.
Every kept document gets `record["scores"] = {"quality": p_hq, "ppl": perplexity, "ppl_bucket": "head"|...}`.
Keeping by score (the recipe's `quality_keep`): "all" (record only), "threshold" (p_hq >= quality_threshold),
"pareto" (GPT-3: keep when a Pareto(alpha) draw > 1 - p_hq; the draw is seeded by the document id, so a re-run
and any worker count keep the same documents); `ppl_keep` keeps only the named buckets.
"""
from __future__ import annotations

import argparse
import codecs
import ctypes
import functools
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

import native
from data_process.quality import space_bitmap
from fileio import atomic_write_bytes

CLASSIFIER = "classifier.bin"
LM = "lm.arpa"
CUTOFFS = "cutoffs.json"
POSITIVE = ("wiki_zh", "baidubaike", "medical_books", "medical_pretrain", "guidelines")
NEGATIVE = ("c4_zh", "wudao", "skypile", "minimind_pretrain")
BUCKETS = ("head", "middle", "tail")
BUCKET_PERCENTILES = (30, 60)        # CCNet's split of each corpus by perplexity
LM_ORDER = 3
KN_DISCOUNT = 0.75
FT_CHARS = 2000                      # characters of a document the classifier reads (its head)


def chars_of(text: str, limit: int | None = None) -> str:
    """The token sequence both models read: characters, whitespace dropped, separated by spaces."""
    text = "".join(text.split())
    return " ".join(text[:limit] if limit else text)


# ---------------------------------------------------------------- fastText classifier


def train_classifier(pos_docs: list[str], neg_docs: list[str], path: Path, seed: int = 0, epoch: int = 10):
    """Train the fastText quality classifier (balanced by down-sampling the larger side); returns the model."""
    import fasttext

    rng = random.Random(seed)
    n = min(len(pos_docs), len(neg_docs))
    if n == 0:
        raise ValueError(f"train-quality needs documents on both sides: {len(pos_docs)} positive, "
                         f"{len(neg_docs)} negative")
    pos, neg = rng.sample(pos_docs, n), rng.sample(neg_docs, n)
    lines = [f"__label__hq {chars_of(d, FT_CHARS)}" for d in pos] + [f"__label__lq {chars_of(d, FT_CHARS)}" for d in neg]
    rng.shuffle(lines)
    train_txt = path.with_suffix(".train.txt")
    train_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        model = fasttext.train_supervised(str(train_txt), epoch=epoch, lr=0.5, wordNgrams=3, dim=32, minCount=1,
                                          bucket=200_000, thread=1, seed=seed, verbose=0)
    finally:
        train_txt.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model.save_model(str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return model


def p_high_quality(model, text: str) -> float:
    # model.f.predict: the binding's own call; fasttext 0.9.3's Python predict() wraps it in np.array(copy=False),
    # which numpy 2 refuses
    predictions = model.f.predict(chars_of(text, FT_CHARS) + "\n", 2, 0.0, "strict")
    return float(dict((label, prob) for prob, label in predictions).get("__label__hq", 0.0))


# ---------------------------------------------------------------- Kneser-Ney character LM -> ARPA -> KenLM


def kn_counts(docs: list[str], order: int) -> list[Counter]:
    """Kneser-Ney counts per order over every line as <s> c1 c2 ... </s>: the highest order and the n-grams that
    start with <s> (they have no left context) keep their real counts; every other lower-order n-gram gets its
    continuation count (how many distinct characters precede it), as lmplz and SRILM's -kndiscount do."""
    counts = [Counter() for _ in range(order)]
    for doc in docs:
        for line in doc.split("\n"):
            toks = chars_of(line).split()
            if not toks:
                continue
            seq = ("<s>", *toks, "</s>")
            for i in range(len(seq) - order + 1):
                counts[order - 1][seq[i:i + order]] += 1
            for k in range(1, min(order, len(seq) + 1)):
                counts[k - 1][seq[:k]] += 1
    for k in range(order - 1, 0, -1):           # continuation counts of order k from the n-grams of order k+1
        for gram in counts[k]:
            counts[k - 1][gram[1:]] += 1
    return counts


def kn_model(counts: list[Counter], discount: float = KN_DISCOUNT):
    """Interpolated Kneser-Ney: prob[k][gram] for every seen gram of order k+1, and the backoff weight of every
    context, such that p(w|h) = prob(hw) for a seen hw and bow(h) * p(w|h[1:]) otherwise (which is how ARPA reads)."""
    order = len(counts)
    vocab = sorted(g for g in counts[0] if g != ("<s>",))
    prob: list[dict] = [dict() for _ in range(order)]
    bow: list[dict] = [dict() for _ in range(order)]
    total = sum(counts[0][g] for g in vocab)
    n_types = len(vocab)
    # unigrams: discounted continuation counts, the mass taken interpolated with the uniform distribution
    gamma0 = discount * n_types / total
    for g in vocab:
        prob[0][g] = max(counts[0][g] - discount, 0) / total + gamma0 / n_types
    for k in range(1, order):
        ctx_total, ctx_types = defaultdict(int), defaultdict(int)
        for gram, c in counts[k].items():
            ctx_total[gram[:-1]] += c
            ctx_types[gram[:-1]] += 1
        gamma = {h: discount * ctx_types[h] / ctx_total[h] for h in ctx_total}
        for gram, c in counts[k].items():
            lower = lower_prob(prob, bow, gram[1:])
            prob[k][gram] = max(c - discount, 0) / ctx_total[gram[:-1]] + gamma[gram[:-1]] * lower
        bow[k - 1] = gamma
    return prob, bow


def lower_prob(prob, bow, gram: tuple) -> float:
    """p(gram[-1] | gram[:-1]) in the backoff form (what KenLM computes from the ARPA file)."""
    k = len(gram) - 1
    if gram in prob[k]:
        return prob[k][gram]
    if k == 0:
        return 0.0  # an unknown character: ARPA's <unk> (never asked of training n-grams)
    return bow[k - 1].get(gram[:-1], 1.0) * lower_prob(prob, bow, gram[1:])


def write_arpa(prob, bow, path: Path, unk_prob: float = 1e-7) -> None:
    """The model as an ARPA file (the text format KenLM, SRILM and every n-gram toolkit read)."""
    order = len(prob)
    grams = [sorted(p.items()) for p in prob]
    grams[0] = [(("<unk>",), unk_prob), (("<s>",), None)] + grams[0]
    lines = ["\\data\\"] + [f"ngram {k + 1}={len(g)}" for k, g in enumerate(grams)] + [""]
    for k, items in enumerate(grams):
        lines.append(f"\\{k + 1}-grams:")
        for gram, p in items:
            line = f"{-99.0 if p is None else math.log10(p):.7f}\t{' '.join(gram)}"
            if k < order - 1 and gram in bow[k]:
                line += f"\t{math.log10(bow[k][gram]):.7f}"
            lines.append(line)
        lines.append("")
    lines.append("\\end\\")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def load_kenlm(path: Path):
    import kenlm

    config = kenlm.Config()
    config.show_progress = False      # one progress bar per work unit would bury the pipeline's own
    return kenlm.Model(str(path), config)


def load_lm(path: Path):
    """The model doc_perplexity scores with: the compiled scorer (CharLM) where it builds and reads the file, else
    KenLM's model of the same file (the same numbers, tests/test_quality_model.py)."""
    if _lm_kernels() is not None:
        try:
            return CharLM(path)
        except ValueError:     # an ARPA file with words the compiled table does not hold (not one we write)
            pass
    return load_kenlm(path)


def kenlm_log10(lm, text: str) -> tuple[float, int]:
    """(log10 probability, tokens scored) of a document by KenLM: its lines, each with <s> and </s>."""
    log10, n = 0.0, 0
    for line in text.split("\n"):
        toks = chars_of(line)
        if not toks:
            continue
        log10 += lm.score(toks, bos=True, eos=True)
        n += toks.count(" ") + 2          # characters + </s>
    return log10, n


def doc_perplexity(lm, text: str) -> float:
    """Perplexity of a document: log10 probabilities summed over its lines (each with <s> and </s>)."""
    log10, n = lm.log10(text) if isinstance(lm, CharLM) else kenlm_log10(lm, text)
    return 10.0 ** (-log10 / n) if n else float("inf")


# The compiled scorer. Per character KenLM's Python call costs more than its scoring: the space-joined string
# built for it, its split into words and a vocabulary hash of each; both sides of the bench's comparison spent
# most of their time there. This one reads the document's code points as they are and looks n-grams up by code
# point in one open-addressing table, with KenLM's backoff arithmetic, so its scores are KenLM's (float sums in
# its order: equal to the last bit on the samples, tests/test_quality_model.py).
LM_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Tokens are code points; the three ARPA words that are not one character sit above Unicode. A key packs up to
   three tokens (21 bits each), NONE filling the fields a unigram or bigram leaves empty. */
#define BOS 0x110000u
#define EOS 0x110001u
#define UNK 0x110002u
#define NONE 0x1FFFFFu
#define EMPTY UINT64_MAX            /* a free slot: no key sets the top bit */

typedef struct { uint64_t key; float prob, bow; } slot_t;

static inline uint64_t key_of(uint32_t a, uint32_t b, uint32_t c) {
    return (uint64_t)a << 42 | (uint64_t)b << 21 | c;
}

static inline uint64_t home(uint64_t key, uint64_t mask) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (h ^ h >> 29) & mask;
}

static inline const slot_t *find(const slot_t *t, uint64_t mask, uint64_t key) {
    for (uint64_t i = home(key, mask);; i = (i + 1) & mask) {
        if (t[i].key == key) return &t[i];
        if (t[i].key == EMPTY) return 0;
    }
}

/* One ARPA word -> token: <s>, </s>, <unk>, or exactly one UTF-8 character; -1 for anything else. */
static int64_t word_token(const unsigned char *p, int64_t n) {
    if (n == 3 && !memcmp(p, "<s>", 3)) return BOS;
    if (n == 4 && !memcmp(p, "</s>", 4)) return EOS;
    if (n == 5 && !memcmp(p, "<unk>", 5)) return UNK;
    if (n == 1 && p[0] < 0x80) return p[0];
    int len = (p[0] & 0xE0) == 0xC0 ? 2 : (p[0] & 0xF0) == 0xE0 ? 3 : (p[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (!len || n != len) return -1;
    uint32_t cp = p[0] & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((p[i] & 0xC0) != 0x80) return -1;
        cp = cp << 6 | (p[i] & 0x3F);
    }
    return cp;
}

static inline int is_blank(unsigned char c) { return c == ' ' || c == '\t'; }

/* Read the n-gram sections of an ARPA file (buf, NUL-terminated) into the table (mask + 1 slots, a power of two,
   all EMPTY). Returns the number of n-grams read, or -1 a word that is not a token above, -2 a malformed line or
   an order above 3, -3 a full table, -4 no <s> or no <unk> unigram. */
int64_t lm_load(const char *buf, int64_t len, slot_t *t, uint64_t mask) {
    const char *p = buf, *end = buf + len;
    int order = 0;
    int64_t n_read = 0;
    while (p < end) {
        const char *eol = memchr(p, '\n', end - p);
        if (!eol) eol = end;
        if (*p == '\\') {
            if (eol - p >= 5 && !memcmp(p, "\\end\\", 5)) break;
            order = (eol - p >= 9 && p[1] >= '1' && p[1] <= '9' && !memcmp(p + 2, "-grams:", 7)) ? p[1] - '0' : 0;
            if (order > 3) return -2;
        } else if (order && p < eol && *p != '\r') {
            char *q;
            float prob = strtof(p, &q);
            if (q == p) return -2;
            uint32_t tok[3] = {NONE, NONE, NONE};
            for (int k = 0; k < order; k++) {
                while (q < eol && is_blank(*q)) q++;
                const char *w = q;
                while (q < eol && !is_blank(*q) && *q != '\r') q++;
                int64_t token = word_token((const unsigned char *)w, q - w);
                if (token < 0) return -1;
                tok[3 - order + k] = (uint32_t)token;
            }
            while (q < eol && is_blank(*q)) q++;
            float bow = 0.0f;
            if (q < eol && *q != '\r') {
                char *r;
                bow = strtof(q, &r);
                if (r == q) return -2;
            }
            uint64_t key = key_of(tok[0], tok[1], tok[2]);
            uint64_t i = home(key, mask), probes = 0;
            while (t[i].key != EMPTY && t[i].key != key) {
                i = (i + 1) & mask;
                if (++probes > mask) return -3;
            }
            t[i].key = key;
            t[i].prob = prob;
            t[i].bow = bow;
            n_read++;
        }
        p = eol + 1;
    }
    if (!find(t, mask, key_of(NONE, NONE, BOS)) || !find(t, mask, key_of(NONE, NONE, UNK))) return -4;
    return n_read;
}

/* The log10 probability of token w after the context (h2, h1), as KenLM's Model::FullScore computes it from an
   ARPA model (float arithmetic, in its order): the probability of the longest n-gram ending in w that the model
   has, plus the backoff weights of the contexts longer than that n-gram's, shortest first. b1, b2: the backoffs
   of (h1) and (h2 h1), 0 where the model has no such n-gram (KenLM's state, which carries them from the previous
   word). Advances the context to (h1, w). A character the model does not have is <unk>, as in KenLM. */
static inline float score_word(const slot_t *t, uint64_t mask, const slot_t *unk, uint32_t *h2, uint32_t *h1,
                               float *b2, float *b1, uint32_t w) {
    const slot_t *s = find(t, mask, key_of(NONE, NONE, w));
    if (!s) {
        s = unk;
        w = UNK;
    }
    float prob = s->prob, bow1 = s->bow, bow2 = 0.0f;
    int length = 1;
    const slot_t *bigram = find(t, mask, key_of(NONE, *h1, w));
    if (bigram) {
        prob = bigram->prob;
        bow2 = bigram->bow;
        length = 2;
        if (*h2 != NONE) {
            const slot_t *trigram = find(t, mask, key_of(*h2, *h1, w));
            if (trigram) {
                prob = trigram->prob;
                length = 3;
            }
        }
    }
    if (length == 1) prob += *b1;
    if (length <= 2) prob += *b2;
    *h2 = *h1;
    *h1 = w;
    *b1 = bow1;
    *b2 = bow2;
    return prob;
}

/* A document's log10 probability as quality_model.kenlm_log10 sums it: per line (split at '\n'), its characters
   other than whitespace (space_bits: a bitmap of the BMP, Python's str.isspace; none lies above it) between <s>
   and </s>, each line's sum in float (as kenlm's Model.score returns it), the lines' sums in double; lines with
   no character skipped. *n_scored: characters + one </s> per line scored. The table holds <s> and <unk>
   (lm_load says so). */
double lm_score(const slot_t *t, uint64_t mask, const uint32_t *cps, int64_t n, const uint8_t *space_bits,
                int64_t *n_scored) {
    const slot_t *bos = find(t, mask, key_of(NONE, NONE, BOS)), *unk = find(t, mask, key_of(NONE, NONE, UNK));
    double total = 0.0;
    int64_t count = 0;
    for (int64_t i = 0; i <= n; i++) {        /* one line per pass: i ends on its '\n' (or n) */
        uint32_t h2 = NONE, h1 = BOS;
        float b2 = 0.0f, b1 = bos->bow, line = 0.0f;
        int64_t chars = 0;
        for (; i < n && cps[i] != '\n'; i++) {
            uint32_t c = cps[i];
            if (c < 0x10000 && (space_bits[c >> 3] >> (c & 7) & 1)) continue;
            line += score_word(t, mask, unk, &h2, &h1, &b2, &b1, c);
            chars++;
        }
        if (chars) {
            line += score_word(t, mask, unk, &h2, &h1, &b2, &b1, EOS);
            total += (double)line;
            count += chars + 1;
        }
    }
    *n_scored = count;
    return total;
}
"""


@functools.lru_cache(maxsize=1)
def _lm_kernels():
    lib = native.load("char_lm", LM_SOURCE, ["-O2"], keep_gil=True)
    if lib is None:
        return None
    lib.lm_load.restype = ctypes.c_int64
    lib.lm_load.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64]
    lib.lm_score.restype = ctypes.c_double
    lib.lm_score.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int64, ctypes.c_char_p,
                             ctypes.c_void_p]
    return lib


class CharLM:
    """An ARPA character model (up to order 3, every word one character or <s>, </s>, <unk>) in the compiled
    scorer's table: 16 bytes per n-gram, at most half full. One per thread (as a Scorer is per work unit): the
    character count comes back through one slot of the object."""

    SLOT = np.dtype([("key", "<u8"), ("prob", "<f4"), ("bow", "<f4")])

    def __init__(self, path: Path):
        lib = _lm_kernels()
        data = Path(path).read_bytes()
        head = data[:data.find(b"-grams:")].decode("utf-8", "replace")
        n_grams = sum(int(line.split("=")[1]) for line in head.splitlines() if line.startswith("ngram "))
        self.table = np.full(1 << max(4, (2 * n_grams).bit_length()), np.iinfo(np.uint64).max, dtype=self.SLOT)
        self.mask = len(self.table) - 1
        read = lib.lm_load(data, len(data), self.table.ctypes.data, self.mask)
        if read != n_grams:
            raise ValueError(f"{path}: not a character ARPA model the compiled scorer reads ({read}, "
                             f"{n_grams} n-grams in the header)")
        self._score, self._spaces = lib.lm_score, space_bitmap()   # (bytes: its buffer is passed as it is)
        self._n = ctypes.c_int64()
        self._args = (self.table.ctypes.data, self.mask)
        self._tail = (self._spaces, ctypes.addressof(self._n))

    def log10(self, text: str) -> tuple[float, int]:
        """kenlm_log10 of the same model: a lone surrogate raises UnicodeEncodeError, as KenLM's encode does."""
        cps = codecs.utf_32_le_encode(text)[0]
        log10 = self._score(*self._args, cps, len(cps) // 4, *self._tail)
        return log10, self._n.value


# ---------------------------------------------------------------- the scorer the cleaner uses


def bucket_of(ppl: float, cutoffs: list[float]) -> str:
    return BUCKETS[int(np.searchsorted(np.asarray(cutoffs), ppl, side="right"))]


class Scorer:
    """Loads data/quality/ once per work unit; `score(text) -> dict`, `keep_or_reason(scores, doc_id)`."""

    def __init__(self, model_dir: Path, corpus: str, keep: str = "all", threshold: float = 0.5,
                 pareto_alpha: float = 9.0, ppl_keep: list[str] | None = None):
        import fasttext

        model_dir = Path(model_dir)
        missing = [n for n in (CLASSIFIER, LM, CUTOFFS) if not (model_dir / n).exists()]
        if missing:
            raise FileNotFoundError(f"quality model {model_dir}: missing {missing}; run `python data_process.py "
                                    "train-quality` first")
        self.classifier = fasttext.load_model(str(model_dir / CLASSIFIER))
        self.lm = load_lm(model_dir / LM)
        self.cutoffs = json.loads((model_dir / CUTOFFS).read_text()).get(corpus)
        self.keep, self.threshold, self.alpha = keep, threshold, pareto_alpha
        self.ppl_keep = list(ppl_keep or [])
        if self.ppl_keep and self.cutoffs is None:
            raise ValueError(f"ppl_keep {self.ppl_keep} for corpus {corpus!r}, but {model_dir / CUTOFFS} has no "
                             "cutoffs for it (train-quality measures every pretraining corpus in data/clean)")

    def score(self, text: str) -> dict:
        scores = {"quality": round(p_high_quality(self.classifier, text), 4),
                  "ppl": round(doc_perplexity(self.lm, text), 2)}
        if self.cutoffs is not None:
            scores["ppl_bucket"] = bucket_of(scores["ppl"], self.cutoffs)
        return scores

    def keep_or_reason(self, scores: dict, doc_id: str) -> str | None:
        if self.keep == "threshold" and scores["quality"] < self.threshold:
            return "quality_below_threshold"
        if self.keep == "pareto":
            seed = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
            if np.random.default_rng(seed).pareto(self.alpha) <= 1 - scores["quality"]:
                return "quality_pareto"
        if self.ppl_keep and scores.get("ppl_bucket") not in self.ppl_keep:
            return "ppl_bucket"
        return None


def model_digest(model_dir: Path) -> str:
    """For the read step's fingerprint: a retrained model re-scores the corpora."""
    h = hashlib.sha256()
    for name in (CLASSIFIER, LM, CUTOFFS):
        p = Path(model_dir) / name
        h.update(p.read_bytes() if p.exists() else b"missing")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- train-quality


def corpus_docs(clean_root: Path, name: str, limit: int) -> list[str]:
    from data_process.records import checked_parts, iter_records

    out_dir = clean_root / name
    if not (out_dir / "manifest.json").exists():   # a corpus the read step has not written (not in this run)
        return []
    docs = []
    for r in iter_records(checked_parts(out_dir, require_manifest=True)):   # damaged parts: an error naming the step
        if r.get("kind") == "doc" and r["text"].strip():
            docs.append(r["text"])
            if len(docs) >= limit:
                break
    return docs


def train(recipe, out_dir: Path, positive=POSITIVE, negative=NEGATIVE, max_docs: int = 50_000,
          lm_chars: int = 5_000_000, seed: int = 0) -> dict:
    """Train the classifier and the LM on data/clean/, measure per-corpus perplexity cutoffs; returns a report."""
    t0 = time.time()
    clean_root = recipe.data_dir / "clean"
    pos_by = {n: corpus_docs(clean_root, n, max_docs) for n in positive}
    neg_by = {n: corpus_docs(clean_root, n, max_docs) for n in negative}
    pos = [d for n in positive for d in pos_by[n]]
    neg = [d for n in negative for d in neg_by[n]]
    out_dir.mkdir(parents=True, exist_ok=True)
    train_classifier(pos, neg, out_dir / CLASSIFIER, seed=seed)
    lm_docs, n_chars = [], 0
    for d in pos:                       # the curated text, up to lm_chars characters
        lm_docs.append(d)
        n_chars += len(d)
        if n_chars >= lm_chars:
            break
    write_arpa(*kn_model(kn_counts(lm_docs, LM_ORDER)), out_dir / LM)
    lm = load_lm(out_dir / LM)
    cutoffs = {}
    for spec in recipe.corpora:
        if spec.role != "pretrain":
            continue
        docs = corpus_docs(clean_root, spec.name, max_docs)
        if docs:
            ppl = [doc_perplexity(lm, d) for d in docs]
            cutoffs[spec.name] = [round(float(np.percentile(ppl, q)), 2) for q in BUCKET_PERCENTILES]
    atomic_write_bytes(out_dir / CUTOFFS, json.dumps(cutoffs, indent=1, sort_keys=True).encode())
    return {"positive_docs": {n: len(v) for n, v in pos_by.items()},
            "negative_docs": {n: len(v) for n, v in neg_by.items()},
            "lm_chars": n_chars, "lm_order": LM_ORDER, "cutoffs": cutoffs, "out_dir": str(out_dir),
            "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> int:
    import settings
    from data_process.recipe import RecipeError, load_recipe

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python data_process.py train-quality",
                                description="Train the fastText quality classifier (curated vs web documents of "
                                            "data/clean/) and the KenLM character perplexity model (curated text), "
                                            "and measure per-corpus perplexity buckets. Run the read step first. "
                                            "Exit status: 0 done; 1 no documents on one side; 2 a bad recipe; "
                                            "3 the data dir is in use by another run; 5 a corpus in data/clean/ is damaged.")
    p.add_argument("--recipe", type=Path, default=None, help="recipe TOML (default: config/recipe.toml)")
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (default: the recipe's)")
    p.add_argument("--out", type=Path, default=None, help="model folder (default: <data-dir>/quality)")
    p.add_argument("--positive", default=",".join(POSITIVE), help="curated corpora (comma-separated)")
    p.add_argument("--negative", default=",".join(NEGATIVE), help="web corpora (comma-separated)")
    p.add_argument("--max-docs", type=int, default=50_000, help="documents read per corpus")
    p.add_argument("--lm-chars", type=int, default=5_000_000, help="characters of curated text for the LM")
    p.add_argument("--seed", type=int, default=0)
    settings.add_set_flag(p, "run.data_dir=/big/data")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe or root / "config" / "recipe.toml",
                             root=root if args.recipe is None else Path.cwd(), sets=args.sets)
    except (RecipeError, OSError) as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        recipe.data_dir = args.data_dir.resolve()
    out = args.out or recipe.data_dir / "quality"
    from data_process.exits import EXIT_NOTHING_READ, run_command
    from fileio import DirLock

    def job():
        # the data dir's lock, as the pipeline takes it: no read step may rewrite data/clean/ while it is read here
        with DirLock(recipe.data_dir, "data_process.py train-quality"):
            return train(recipe, out, [s for s in args.positive.split(",") if s],
                         [s for s in args.negative.split(",") if s], args.max_docs, args.lm_chars, args.seed)
    report = run_command(job, recipe.data_dir, value_error_exit=EXIT_NOTHING_READ)   # ValueError: no documents
    if isinstance(report, int):
        return report
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0
