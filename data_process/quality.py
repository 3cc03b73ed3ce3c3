"""Chinese quality operators for pretraining documents: traditional -> simplified, language id, and the
repetition and quality rules of Gopher / C4 / FineWeb adapted to Chinese, plus a flagged-words list.

Used by data_process/clean.py (the Cleaner calls them per record, in the order docs/cleaning.md explains);
each function is pure and cheap to call on its own:
- `to_simplified(text, min_share) -> (text, changed)`: OpenCC t2s, only for documents where at least
  `min_share` of the Han characters are traditional-only, so a simplified page that quotes a name (梁靖崑,
  华为昇腾) keeps it: t2s on simplified text would rewrite 昇腾 -> 升腾 and 乾和 -> 干和 (seen on the
  skywork-zh-web sample).
- `detect_language(text) -> (lang, prob)`: py3langid (langid.py's model, shipped in the wheel: works offline),
  normalized probabilities, on the first `LANGID_CHARS` characters; `language_matches(text, corpus_lang, ...)`
  decides by script first (Han, no kana or hangul: Chinese) and asks py3langid only otherwise.
- `rule_stats(text) -> dict` and `check_rules(stats, rules) -> reason | None`: the numbers and the decision,
  separately, so the bench and the threshold measurement (bench/bench_quality.py --measure) print the same
  numbers the filter uses.
Character n-grams, not words: Chinese has no spaces, and the Gopher thresholds were set on English words, so
ours were re-measured on the real samples (config/recipe.toml says the figures beside each default).
"""
from __future__ import annotations

import codecs
import functools
import re
import sys

import numpy as np

import native
from data_process.recipe import RulesConfig

# ---------------------------------------------------------------- compiled scans

# The scans each document pays for whatever it holds (the bench's mean document is ~350 characters): the t2s gate
# (one read of every character to know there is no traditional one), the n-gram statistics (a dozen numpy calls
# per document), the symbol count and the flagged-word count (regex scans). In C they read the str's own buffer,
# with the same results as the Python, regex and numpy code below, which runs where there is no compiler or no
# Python headers (tests/test_quality.py pins the two equal).
TEXT_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The (bitmap, str) arguments of any_marked and count_marked: the bitmap's bits and its last bit's code point;
   0 (a TypeError set) when they are not a non-empty bytes and a str. */
static int bitmap_args(PyObject *const *args, Py_ssize_t nargs, const char *name, const uint8_t **bits,
                       uint32_t *last) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) == 0 || !PyUnicode_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s(bitmap: non-empty bytes, str)", name);
        return 0;
    }
    *bits = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    *last = (uint32_t)(PyBytes_GET_SIZE(args[0]) * 8 - 1);
    return 1;
}

/* any_marked(bitmap, str): whether a code point of the str has its bit set in the bitmap (bytes, little-endian
   bits; code points at or above its last bit count as that bit, which is 0). Reads the str's own buffer (1, 2 or 4
   bytes a character): nothing is encoded or copied. The bits of each block of 64 characters are or-ed, then
   tested: no branch per character. */
static PyObject *any_marked(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const uint8_t *bits;
    uint32_t last;
    if (!bitmap_args(args, nargs, "any_marked", &bits, &last)) return NULL;
    PyObject *s = args[1];
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
#define SCAN(T) { const T *p = (const T *)data;                                                \
        for (Py_ssize_t i = 0; i < n; i += 64) {                                              \
            Py_ssize_t stop = i + 64 < n ? i + 64 : n;                                        \
            unsigned hit = 0;                                                                 \
            for (Py_ssize_t j = i; j < stop; j++) {                                           \
                uint32_t c = p[j] < last ? p[j] : last;                                       \
                hit |= bits[c >> 3] >> (c & 7);                                               \
            }                                                                                 \
            if (hit & 1) Py_RETURN_TRUE;                                                      \
        } }
    if (kind == PyUnicode_1BYTE_KIND) SCAN(uint8_t)
    else if (kind == PyUnicode_2BYTE_KIND) SCAN(uint16_t)
    else SCAN(uint32_t)
#undef SCAN
    Py_RETURN_FALSE;
}

/* count_marked(bitmap, str): how many code points of the str have their bit set (as any_marked reads them). */
static PyObject *count_marked(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const uint8_t *bits;
    uint32_t last;
    if (!bitmap_args(args, nargs, "count_marked", &bits, &last)) return NULL;
    PyObject *s = args[1];
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), count = 0;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
#define COUNT(T) { const T *p = (const T *)data;                                               \
        for (Py_ssize_t i = 0; i < n; i++) {                                                  \
            uint32_t c = p[i] < last ? p[i] : last;                                           \
            count += bits[c >> 3] >> (c & 7) & 1;                                             \
        } }
    if (kind == PyUnicode_1BYTE_KIND) COUNT(uint8_t)
    else if (kind == PyUnicode_2BYTE_KIND) COUNT(uint16_t)
    else COUNT(uint32_t)
#undef COUNT
    return PyLong_FromSsize_t(count);
}

/* count_words(first_bits, program, space_bits, str): what len(quality.FLAGGED.findall(str)) counts, the same
   way: leftmost matches, not overlapping; at a position, the words of the group of its character (its first
   character as written: quality._flagged_program) tried in the regex's order, the first that matches taken; a
   word's later characters each after any whitespace (space_bits, the regex's \s), each one of its variants.
   program (int32): G, then G (first code point, offset) pairs in ascending code point order, and at each offset:
   the number of words, then per word the number of its later characters, and per character the number of its
   variants and the variants. */
static PyObject *count_words(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) || !PyBytes_Check(args[2])
        || PyBytes_GET_SIZE(args[0]) == 0 || PyBytes_GET_SIZE(args[1]) < 4 || PyBytes_GET_SIZE(args[2]) < 8192
        || !PyUnicode_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "count_words(first_bits, program, space_bits: bytes, str)");
        return NULL;
    }
    const uint8_t *first = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    uint32_t last = (uint32_t)(PyBytes_GET_SIZE(args[0]) * 8 - 1);
    const int32_t *prog = (const int32_t *)PyBytes_AS_STRING(args[1]);
    const uint8_t *space = (const uint8_t *)PyBytes_AS_STRING(args[2]);
    PyObject *s = args[3];
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), hits = 0;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    const int32_t n_groups = prog[0], *groups = prog + 1;
    for (Py_ssize_t i = 0; i < n;) {
        uint32_t c = PyUnicode_READ(kind, data, i), b = c < last ? c : last;
        if (!(first[b >> 3] >> (b & 7) & 1)) {
            i++;
            continue;
        }
        int32_t lo = 0, hi = n_groups - 1, at = -1;   /* the group of c */
        while (lo <= hi) {
            int32_t mid = (lo + hi) / 2;
            if ((uint32_t)groups[2 * mid] == c) {
                at = groups[2 * mid + 1];
                break;
            }
            if ((uint32_t)groups[2 * mid] < c) lo = mid + 1;
            else hi = mid - 1;
        }
        Py_ssize_t end = -1;
        if (at >= 0) {
            const int32_t *w = prog + at + 1;
            for (int32_t k = 0; k < prog[at] && end < 0; k++) {
                int32_t n_chars = *w++;
                Py_ssize_t j = i + 1;
                int ok = 1;
                for (int32_t ch = 0; ch < n_chars; ch++) {
                    int32_t n_var = *w++;
                    const int32_t *var = w;
                    w += n_var;
                    if (!ok) continue;   /* (walk past the rest of this word) */
                    uint32_t x = 0;
                    while (j < n) {
                        x = PyUnicode_READ(kind, data, j);
                        if (x < 0x10000 && (space[x >> 3] >> (x & 7) & 1)) j++;
                        else break;
                    }
                    ok = 0;
                    if (j < n)
                        for (int32_t v = 0; v < n_var; v++)
                            if ((uint32_t)var[v] == x) ok = 1;
                    j++;
                }
                if (ok) end = j;
            }
        }
        if (end > 0) {
            hits++;
            i = end;
        } else {
            i++;
        }
    }
    return PyLong_FromSsize_t(hits);
}

#define HASH_BASE 1000003ull   /* quality.HASH_BASE: the n-gram hashes are quality._window_hashes' */

typedef struct { uint64_t hash; uint32_t count, first; } entry_t;

/* Count the hashes h[pos[k]] (k < m) in the table (a power of two >= 2 m, cleared here); returns the largest
   count, and with rep != NULL sets rep[pos[k]] to whether h[pos[k]] occurs more than once among them. One pass:
   a hash seen a second time marks its first position too. */
static uint32_t count_hashes(const uint64_t *h, const uint32_t *pos, int64_t m, entry_t *table, uint64_t size,
                             uint8_t *rep) {
    memset(table, 0, size * sizeof(entry_t));
    uint64_t mask = size - 1;
    uint32_t top = 0;
    for (int64_t k = 0; k < m; k++) {
        uint64_t x = h[pos[k]], i = (x * 0x9E3779B97F4A7C15ull) >> 20 & mask;
        while (table[i].count && table[i].hash != x) i = (i + 1) & mask;
        entry_t *e = &table[i];
        if (!e->count) {
            e->hash = x;
            e->first = pos[k];
        }
        uint32_t count = ++e->count;
        top = count > top ? count : top;
        if (rep) {
            rep[pos[k]] = count > 1;
            if (count == 2) rep[e->first] = 1;
        }
    }
    return top;
}

static uint64_t table_size(int64_t m) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)m) size <<= 1;
    return size;
}

/* The work memory of the n-gram scans of the str s (n characters, a hash table of `size` slots): code points
   (cps, n x 4 bytes), window positions (pos, n x 4), window hashes (h, n x 8), the table, a repeat flag per
   window (rep, n x 1). cps and h hold the code points, pos 0..n-1. NULL when out of memory; the caller frees it. */
static char *work_of(PyObject *s, int64_t n, uint64_t size) {
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    char *mem = malloc(n * (4 + 8 + 4 + 1) + size * sizeof(entry_t));
    if (!mem) return NULL;
    uint32_t *cps = (uint32_t *)mem, *pos = (uint32_t *)(mem + n * 4);
    uint64_t *h = (uint64_t *)(mem + n * 8);
    for (int64_t i = 0; i < n; i++) {
        cps[i] = PyUnicode_READ(kind, data, i);
        h[i] = cps[i];
        pos[i] = (uint32_t)i;
    }
    return mem;
}

/* quality._ngram_stats of the str s (its characters, whitespace already out), the same numbers: out[0..2] the
   top 2..4-gram fractions, out[3..8] the duplicated 5..10-gram fractions; returns how many of the nine it set (a
   text shorter than n has none from order n on), or -1 when out of memory. The hash of each window is the
   polynomial one of _window_hashes (uint64, wrapping); orders from 6 look only at the windows whose window of
   the order below repeats, as _ngram_stats does. */
static int ngram_stats_of(PyObject *s, double *out) {
    int64_t n = PyUnicode_GET_LENGTH(s);
    if (n < 2) return 0;
    uint64_t size = table_size(n);
    char *mem = work_of(s, n, size);
    if (!mem) return -1;
    uint32_t *cps = (uint32_t *)mem, *pos = (uint32_t *)(mem + n * 4);
    uint64_t *h = (uint64_t *)(mem + n * 8);
    entry_t *table = (entry_t *)(mem + n * 16);
    uint8_t *rep = (uint8_t *)(table + size);
    int filled = 0;
    for (int order = 2; order <= 5; order++) {
        if (n < order) goto done;
        int64_t m = n - order + 1;
        for (int64_t i = 0; i < m; i++) h[i] = h[i] * HASH_BASE + cps[i + order - 1];
        uint32_t top = count_hashes(h, pos, m, table, table_size(m), order == 5 ? rep : NULL);
        if (order <= 4) out[filled++] = (double)top * order / n;
    }
    int64_t m = 0;   /* pos[0..m): the windows of the last order that repeat, ascending */
    for (int64_t i = 0; i < n - 4; i++)
        if (rep[i]) pos[m++] = (uint32_t)i;
    for (int order = 5; order <= 10; order++) {
        if (n < order) goto done;
        if (order > 5) {
            int64_t kept = 0;   /* grow each repeated window by one character, where it fits */
            for (int64_t k = 0; k < m; k++)
                if (pos[k] + order <= n) {
                    h[pos[k]] = h[pos[k]] * HASH_BASE + cps[pos[k] + order - 1];
                    pos[kept++] = pos[k];
                }
            m = kept;
            if (m) count_hashes(h, pos, m, table, table_size(m), rep);
            kept = 0;
            for (int64_t k = 0; k < m; k++)
                if (rep[pos[k]]) pos[kept++] = pos[k];
            m = kept;
        }
        int64_t covered = 0;   /* the union of the windows at pos: their gaps, each at most order */
        for (int64_t k = 1; k < m; k++) {
            int64_t gap = (int64_t)pos[k] - pos[k - 1];
            covered += gap < order ? gap : order;
        }
        out[filled++] = m ? (double)(covered + order) / n : 0.0;
    }
done:
    free(mem);
    return filled;
}

/* quality.dup_ngram_share of the str s for one order: the share of characters inside the windows of `order`
   characters whose hash occurs more than once; -1.0 when out of memory. */
static double dup_share_of(PyObject *s, int64_t order) {
    int64_t n = PyUnicode_GET_LENGTH(s);
    if (n < order) return 0.0;
    int64_t m = n - order + 1;
    uint64_t size = table_size(m);
    char *mem = work_of(s, n, size);
    if (!mem) return -1.0;
    uint32_t *cps = (uint32_t *)mem, *pos = (uint32_t *)(mem + n * 4);
    uint64_t *h = (uint64_t *)(mem + n * 8);
    entry_t *table = (entry_t *)(mem + n * 16);
    uint8_t *rep = (uint8_t *)(table + size);
    for (int64_t k = 1; k < order; k++)   /* one pass per character of the window: no chain between windows */
        for (int64_t i = 0; i < m; i++) h[i] = h[i] * HASH_BASE + cps[i + k];
    count_hashes(h, pos, m, table, size, rep);
    int64_t covered = 0, last = -1;
    for (int64_t i = 0; i < m; i++)
        if (rep[i]) {
            if (last >= 0) covered += i - last < order ? i - last : order;
            last = i;
        }
    free(mem);
    return last >= 0 ? (double)(covered + order) / n : 0.0;
}

static PyObject *ngram_stats(PyObject *self, PyObject *s) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "ngram_stats(str)");
        return NULL;
    }
    double out[9];
    int filled = ngram_stats_of(s, out);
    if (filled < 0) return PyErr_NoMemory();
    PyObject *t = PyTuple_New(filled);
    for (int i = 0; t && i < filled; i++) {
        PyObject *x = PyFloat_FromDouble(out[i]);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static PyObject *dup_share(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "dup_share(str, order: int)");
        return NULL;
    }
    long order = PyLong_AsLong(args[1]);
    if (order < 1 || order > 64) {
        PyErr_SetString(PyExc_ValueError, "dup_share: order from 1 to 64");
        return NULL;
    }
    double share = dup_share_of(args[0], order);
    return share < 0 ? PyErr_NoMemory() : PyFloat_FromDouble(share);
}

static PyMethodDef methods[] = {
    {"any_marked", (PyCFunction)(void (*)(void))any_marked, METH_FASTCALL, "any code point marked in a bitmap"},
    {"count_marked", (PyCFunction)(void (*)(void))count_marked, METH_FASTCALL, "code points marked in a bitmap"},
    {"count_words", (PyCFunction)(void (*)(void))count_words, METH_FASTCALL, "len(quality.FLAGGED.findall(s))"},
    {"ngram_stats", ngram_stats, METH_O, "quality._ngram_stats's nine numbers"},
    {"dup_share", (PyCFunction)(void (*)(void))dup_share, METH_FASTCALL, "quality.dup_ngram_share"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "quality_text", NULL, -1, methods};

PyMODINIT_FUNC PyInit_quality_text(void) { return PyModule_Create(&module); }
"""
NGRAM_C_MAX_CHARS = 1 << 20   # longer texts: numpy's n-gram path (the C one's table grows with the text)


@functools.lru_cache(maxsize=1)
def _text_kernels():
    """The compiled module (any_marked, count_marked, count_words, ngram_stats, dup_share), or None."""
    return native.load_module("quality_text", TEXT_SOURCE, ["-O2"])


def bitmap(code_points, n_bits: int = 0) -> bytes:
    """The code points as the compiled scans' bitmap: little-endian bits, at least n_bits of them, and a last bit
    that is 0 (the scans read every code point above it as that bit)."""
    code_points = list(code_points)
    bits = np.zeros(max(max(code_points, default=0) + 2, n_bits), dtype=bool)
    bits[code_points] = True
    return np.packbits(bits, bitorder="little").tobytes()


@functools.lru_cache(maxsize=1)
def space_bitmap() -> bytes:
    """Python's whitespace (what str.split() and the regex \\s drop: str.isspace), all of it in the BMP: a bit for
    every BMP code point (quality_model's scorer reads it so)."""
    return bitmap((c for c in range(0x10000) if chr(c).isspace()), 0x10001)

# ---------------------------------------------------------------- traditional -> simplified (OpenCC)

HAN_RANGES = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00), (0x20000, 0x2A6E0))   # [lo, hi)
NOT_HAN, HAN_KEPT, HAN_TRADITIONAL, SURROGATE = 0, 1, 2, 3
# From this length the gate looks characters up in a numpy table, a few times cheaper a character than the
# regex scan, which is cheaper below it (numpy's fixed cost per call)
NUMPY_GATE_CHARS = 500


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc

    converter = opencc.OpenCC("t2s")
    # The characters t2s changes on their own: converted one per line, so no phrase rule spans two of them.
    chars = [chr(cp) for lo, hi in HAN_RANGES for cp in range(lo, hi)]
    out = converter.convert("\n".join(chars)).split("\n")
    trad = [a for a, b in zip(chars, out) if a != b]
    # The gate before OpenCC: the traditional BMP characters, and lone surrogates (OpenCC refuses one: the
    # Cleaner counts that document as invalid_unicode). BMP only, which sre tests with a bitmap; a class with
    # astral characters it tests an order of magnitude slower.
    gate = re.compile("[" + re.escape("".join(c for c in trad if ord(c) < 0x10000)) + "\ud800-\udfff]")
    # Each code point's kind, for the share and for what the gate cannot see (astral characters), and each
    # UTF-16 unit's, for the gate of long documents: numpy looks them up, where findall would build a
    # one-character string per Han character.
    kind = np.full(HAN_RANGES[-1][1] + 1, NOT_HAN, dtype=np.uint8)    # the last entry: every code point above
    for lo, hi in HAN_RANGES:
        kind[lo:hi] = HAN_KEPT
    kind[[ord(c) for c in trad]] = HAN_TRADITIONAL
    kind[0xD800:0xE000] = SURROGATE
    unit_passes = (kind[:0x10000] >= HAN_TRADITIONAL).astype(np.uint8)   # astral characters: surrogate pairs
    # The compiled gate's bitmap: a bit per code point of the table (its last entry, NOT_HAN, stands for every
    # code point above), as bytes
    passes = np.packbits(kind >= HAN_TRADITIONAL, bitorder="little").tobytes()
    lib = _text_kernels()
    compiled = functools.partial(lib.any_marked, passes) if lib is not None else None
    return converter, gate, kind, unit_passes, compiled


# sys.getsizeof of a compact str is a fixed header plus (length + 1) * bytes per character, and CPython stores
# a str with 4 bytes a character exactly when it holds one above U+FFFF (more only adds cached copies).
_STR_HEADER = sys.getsizeof("\U00010000") - 8


def _kinds(text: str) -> np.ndarray:
    """The kind (NOT_HAN, HAN_KEPT, HAN_TRADITIONAL, SURROGATE) of each code point of the text."""
    kind = _t2s()[2]
    cps = np.frombuffer(codecs.utf_32_le_encode(text, "surrogatepass")[0], dtype=np.uint32)
    return kind[np.minimum(cps, len(kind) - 1)]


def _has_traditional(text: str) -> bool:
    """Whether the text holds a character t2s converts on its own (or a lone surrogate): the compiled scan where
    it builds, else _has_traditional_py."""
    compiled = _t2s()[4]
    return compiled(text) if compiled is not None else _has_traditional_py(text)


def _has_traditional_py(text: str) -> bool:
    """_has_traditional without a compiler. A long text's UTF-16 units through a numpy table, a short one through
    the regex; what those cannot settle (a surrogate unit, an astral character: the O(1) test of _STR_HEADER) by
    code point."""
    _, gate, _, unit_passes, _ = _t2s()
    if len(text) >= NUMPY_GATE_CHARS:
        units = np.frombuffer(codecs.utf_16_le_encode(text, "surrogatepass")[0], dtype=np.uint16)
        if not np.count_nonzero(unit_passes.take(units)):
            return False
    elif gate.search(text) is not None:
        return True
    elif sys.getsizeof(text) < _STR_HEADER + 4 * (len(text) + 1):
        return False
    return bool(np.count_nonzero(_kinds(text) >= HAN_TRADITIONAL))


def _traditional_counts(text: str) -> tuple[float, bool]:
    """(share of Han characters that t2s converts, whether the text holds a lone surrogate)."""
    counts = np.bincount(_kinds(text), minlength=4)
    n_han = int(counts[HAN_KEPT] + counts[HAN_TRADITIONAL])
    return int(counts[HAN_TRADITIONAL]) / max(1, n_han), bool(counts[SURROGATE])


def traditional_share(text: str) -> float:
    """Share of Han characters that OpenCC t2s converts (0 when there is no Han character)."""
    return _traditional_counts(text)[0] if _has_traditional(text) else 0.0


def to_simplified(text: str, min_share: float) -> tuple[str, bool]:
    """OpenCC t2s when at least `min_share` of the Han characters are traditional-only; (text, changed).
    Most documents hold no character t2s converts: one scan says so and they skip OpenCC (data-juicer runs
    OpenCC on everything); of the others, only those at the share go to OpenCC."""
    if text.isascii() or (min_share > 0 and not _has_traditional(text)):
        return text, False     # no traditional character: the share is 0, below any threshold
    share, lone_surrogate = _traditional_counts(text)
    if share < min_share and not lone_surrogate:
        return text, False
    out = _t2s()[0].convert(text)    # raises on a lone surrogate, as it always did
    if out == text or share < min_share:
        return text, False
    return out, True


# ---------------------------------------------------------------- language identification (py3langid)

LANGID_CHARS = 1000      # langid.py walks a DFA per byte in Python (~3 MB/s): judge the head of long documents
# py3langid's model also has wuu (Wu) and yue (Cantonese), which it gives to some Mandarin medical texts.
ZH_CODES = {"zh", "wuu", "yue"}
ACCEPT = {"zh": ZH_CODES, "en": {"en"}, "mixed": ZH_CODES | {"en"}}


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


KANA_HANGUL = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
FAST_ZH_MIN_HAN = 0.8   # Han share among letters above which a kana- and hangul-free text is Chinese


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's head; py3langid's 97-language model."""
    lang, prob = _identifier().classify(text[:LANGID_CHARS])
    return lang, prob


def language_matches(text: str, corpus_lang: str, min_chars: int) -> tuple[bool, str, float]:
    """Whether the document's language is one the corpus takes (mixed: zh or en). Documents shorter than
    `min_chars` (after whitespace) are not judged: langid is unreliable on a few characters."""
    if len(text) < min_chars:
        return True, "", 0.0
    head = text[:LANGID_CHARS]
    if corpus_lang != "en" and KANA_HANGUL.search(head) is None:
        from data_process.clean import zh_ratio   # (clean imports this module)

        if zh_ratio(head) >= FAST_ZH_MIN_HAN:
            # Script decides it: Han letters and no kana or hangul is Chinese (py3langid agrees on every such
            # document of the samples, tests/test_quality.py); langid.py's Python DFA walk is the slowest step
            return True, "zh", 1.0
    lang, prob = detect_language(head)
    return lang in ACCEPT[corpus_lang], lang, prob


# ---------------------------------------------------------------- repetition and quality rules

# Lines "end in punctuation" (C4 / FineWeb line_punct) when their last character is one of these.
END_PUNCT = set("。！？；：…”’」』）)》.!?;:\"'")
BULLETS = ("•", "●", "○", "■", "□", "◆", "◇", "▪", "►", "▶", "-", "*", "·", "★", "☆", "√", "→")
# Gopher counts "#" and "..." per word; here the share of characters that are such symbols or decoration.
# Not | = or arrows: a markdown table or a formula in a medical text is content.
SYMBOL_CHARS = "#\u2026★☆■□◆◇●○▲△▼▽►◄※❤♥♡"       # and "...", counted as one
# Flagged words written for this project: gambling, pornography and the spam adverts of Chinese web pages.
# Two characters or more each, chosen so a medical text does not hit them (性 alone, 乳房, 阴道 are not here).
FLAGGED_WORDS = (
    # gambling
    "博彩", "赌场", "赌博网", "网上赌", "百家乐", "时时彩", "六合彩", "彩票平台", "北京赛车", "北京pk10", "快三",
    "老虎机", "真人娱乐", "棋牌游戏", "赌球", "足彩", "体育投注", "澳门威尼斯人", "葡京", "太阳城", "金沙娱乐",
    "线上娱乐城", "娱乐城", "开户送", "首存", "彩金", "返水", "提款秒到",
    # pornography
    "色情", "黄色网站", "成人网站", "成人影片", "av女优", "女优", "无码", "有码", "一夜情", "约炮", "裸聊", "援交",
    "楼凤", "小姐服务", "上门服务", "同城交友", "激情视频", "黄片", "毛片", "三级片", "偷拍", "自拍偷拍", "乱伦",
    # advert and spam
    "代开发票", "发票代开", "办证", "刷单", "刷信誉", "网赚", "日赚", "躺赚", "兼职日结", "贷款秒批", "无抵押贷款",
    "网贷秒下", "私服", "外挂", "加微信", "加qq", "代孕", "香港六合", "壮阳", "增大增粗", "延时喷剂",
)
FLAGGED_LOWER = tuple(w.lower() for w in FLAGGED_WORDS)


def _lowercasing_to(c: str) -> list[str]:
    """The characters whose lowercase is c: c, its uppercase for an ASCII letter, and U+212A KELVIN SIGN for k
    (the one non-ASCII character that lowercases to an ASCII letter)."""
    if not (c.isascii() and c.isalpha()):
        return [c]
    return [c, c.upper()] + (["\u212a"] if c == "k" else [])


def _flagged_regex() -> re.Pattern:
    """One pass over the text as written that finds what a longest-first alternation of the words finds in the
    lowercased text without whitespace: whitespace allowed between a word's characters, letters in any case that
    lowercases to the word's. One group per first character, starting with that plain character: sre then scans
    for the set of first characters and, where one stands, skips the other groups on it (a class or a case-blind
    first character would have it try every word at every position). Within a group the words keep the
    longest-first order, which is what decides between overlapping words."""
    def char(c: str) -> str:
        cases = _lowercasing_to(c)
        return re.escape(c) if len(cases) == 1 else "[" + "".join(cases) + "]"

    groups: dict[str, list[str]] = {}
    for word in sorted(FLAGGED_LOWER, key=len, reverse=True):
        for first in _lowercasing_to(word[0]):
            groups.setdefault(first, []).append("".join(r"\s*" + char(c) for c in word[1:]))
    return re.compile("|".join(re.escape(f) + "(?:" + "|".join(rests) + ")" for f, rests in groups.items()))


FLAGGED = _flagged_regex()


def _flagged_program() -> tuple[bytes, bytes]:
    """FLAGGED as the compiled count_words reads it: the bitmap of first characters, and the groups of
    _flagged_regex (one per first character as written, its words longest first) with each later character's
    variants (_lowercasing_to)."""
    groups: dict[str, list[str]] = {}
    for word in sorted(FLAGGED_LOWER, key=len, reverse=True):
        for first in _lowercasing_to(word[0]):
            groups.setdefault(first, []).append(word[1:])
    firsts = sorted(groups)
    body, offsets = [], []
    for first in firsts:
        offsets.append(1 + 2 * len(firsts) + len(body))
        body.append(len(groups[first]))
        for rest in groups[first]:
            body.append(len(rest))
            for c in rest:
                variants = _lowercasing_to(c)
                body += [len(variants), *map(ord, variants)]
    head = [len(firsts)] + [x for first, at in zip(firsts, offsets) for x in (ord(first), at)]
    return bitmap(map(ord, firsts)), np.array(head + body, dtype=np.int32).tobytes()


FLAGGED_FIRST_BITMAP, FLAGGED_PROGRAM = _flagged_program()
SPACE = re.compile(r"\s+")
HASH_BASE = 1_000_003
# HASH_BASE ** k as uint64 and uint32 arithmetic wraps: the uint32 hash is the low half of the uint64 one
_POW = {dtype: [dtype(pow(HASH_BASE, k, 2 ** (8 * np.dtype(dtype).itemsize))) for k in range(11)]
        for dtype in (np.uint64, np.uint32)}
_POWERS = {(dtype, n): np.array([pows[n - 1 - k] for k in range(n)], dtype=dtype)
           for dtype, pows in _POW.items() for n in range(1, 11)}
_NO_POSITIONS = np.zeros(0, dtype=np.intp)
WINDOW_DOT_CHARS = 500    # below this length one matrix product costs less than the doubling's array passes


def _window_hashes(cps: np.ndarray, n: int, dtype=np.uint64) -> np.ndarray:
    """The polynomial hash of every n-character window (uint64; the arithmetic wraps, collisions ~2^-64; or
    its low 32 bits, computed in uint32): a short text as one product of its windows (a strided view of the
    code points, overlapping, not copied) with the powers of the base, a long one by doubling,
    H_2a(i) = H_a(i) * B^a + H_a(i + a), which costs log2(n) array passes instead of n."""
    pows = _POW[dtype]
    if len(cps) < WINDOW_DOT_CHARS:
        wide = cps.astype(dtype, copy=False)
        size = wide.itemsize
        windows = np.ndarray((len(cps) - n + 1, n), dtype=dtype, buffer=wide, strides=(size, size))
        return windows @ _POWERS[dtype, n]
    if n == 1:
        return cps.astype(dtype, copy=False)
    half = n // 2
    h = _window_hashes(cps, half, dtype)
    h = h[:-half] * pows[half] + h[half:]
    if n % 2:
        h = h[:-1] * pows[1] + cps[n - 1:]
    return h


def _top_fraction(h: np.ndarray, n: int, n_chars: int) -> float:
    """Gopher's top n-gram fraction: characters covered by the most frequent n-gram / all characters."""
    s = np.sort(h)
    edges = np.concatenate(([-1], (s[1:] != s[:-1]).nonzero()[0], [len(s) - 1]))   # the last index of each run
    return float((edges[1:] - edges[:-1]).max()) * n / n_chars


def _candidates(low: np.ndarray) -> np.ndarray:
    """Ascending positions whose hash may occur twice, from the hashes' low 32 bits: none when those are all
    distinct (most documents; numpy sorts uint32 several times faster than uint64), else those whose low 14
    bits are those of a repeated low half: a superset of the repeats, few but on repetitive pages."""
    s = np.sort(low)
    eq = s[1:] == s[:-1]
    if not np.count_nonzero(eq):
        return _NO_POSITIONS
    table = np.zeros(1 << 14, dtype=bool)
    table[s[1:][eq] & 0x3FFF] = True
    return table.take(low & 0x3FFF).nonzero()[0]


def _repeated(h: np.ndarray) -> np.ndarray:
    """Mask of the hashes that occur more than once."""
    order = np.argsort(h)
    at = (h[order[1:]] == h[order[:-1]]).nonzero()[0]
    mask = np.zeros(len(h), dtype=bool)
    mask[order[at]] = True
    mask[order[at + 1]] = True
    return mask


def _covered(starts: np.ndarray, n: int, n_chars: int) -> float:
    """Share of characters inside the windows of length n at `starts` (ascending, distinct): their union,
    counted from the gaps between starts."""
    if len(starts) == 0:
        return 0.0
    return float(np.minimum(starts[1:] - starts[:-1], n).sum() + n) / n_chars


NGRAM_STATS = ("top_2gram", "top_3gram", "top_4gram") + tuple(f"dup_{n}gram" for n in range(5, 11))


def _ngram_stats_compiled(chars: str, stats: dict) -> bool:
    """_ngram_stats in C over the str itself; False where it does not run (no compiler, a very long text)."""
    lib = _text_kernels()
    if lib is None or len(chars) > NGRAM_C_MAX_CHARS:
        return False
    stats.update(zip(NGRAM_STATS, lib.ngram_stats(chars)))
    return True


def _ngram_stats(cps: np.ndarray, stats: dict) -> None:
    """top_2gram..top_4gram over every window, and dup_5gram..dup_10gram. A repeated n-gram's two (n-1)-gram
    prefixes repeat too, so each order from 6 looks only at the windows that start where a repeated window of
    the order below starts, its hash grown by one character (a document repeats few of its windows), and once
    none repeats the longer orders are 0."""
    n_chars = len(cps)
    h = cps
    for n in range(2, 6):
        if n_chars < n:
            return
        h = h[:-1] * _POW[np.uint64][1] + cps[n - 1:]
        if n <= 4:
            stats[f"top_{n}gram"] = _top_fraction(h, n, n_chars)
    starts = _candidates(h.astype(np.uint32))
    starts = starts[_repeated(h[starts])]
    h = h[starts]
    stats["dup_5gram"] = _covered(starts, 5, n_chars)
    for n in range(6, 11):
        if n_chars < n:
            return
        if len(starts) == 0:
            stats[f"dup_{n}gram"] = 0.0
            continue
        fits = starts + n <= n_chars
        starts, h = starts[fits], h[fits] * _POW[np.uint64][1] + cps[starts[fits] + n - 1]
        repeated = _repeated(h)
        starts, h = starts[repeated], h[repeated]
        stats[f"dup_{n}gram"] = _covered(starts, n, n_chars)


SYMBOLS = re.compile("[" + re.escape(SYMBOL_CHARS) + "]")
DOTS = re.compile(r"\.\s*\.\s*\.")   # "..." in the text without whitespace


SYMBOL_BITMAP = bitmap(map(ord, SYMBOL_CHARS))


def symbol_ratio(text: str) -> float:
    """Share of non-whitespace characters that are #, …, ★, ■... ("..." counts as one). One scan (compiled, else
    the regex); the dots only where there are three (str.count is a C loop, and most Chinese text has none)."""
    lib = _text_kernels()
    n = lib.count_marked(SYMBOL_BITMAP, text) if lib is not None else len(SYMBOLS.findall(text))
    if text.count(".") >= 3:
        n += len(DOTS.findall(text))
    if not n:
        return 0.0
    non_space = len(text) - lib.count_marked(space_bitmap(), text) if lib is not None else len(SPACE.sub("", text))
    return n / max(1, non_space)


def flagged_per_kchar(text: str) -> float:
    """Flagged words per 1000 non-whitespace characters (lowercased, whitespace inside a word ignored), a text
    under 1000 counting as 1000 (one news story about a 赌场 case is not spam)."""
    lib = _text_kernels()
    if lib is not None:
        hits = lib.count_words(FLAGGED_FIRST_BITMAP, FLAGGED_PROGRAM, space_bitmap(), text)
    else:
        hits = len(FLAGGED.findall(text))
    return hits * 1000 / max(len(SPACE.sub("", text)), 1000) if hits else 0.0


def dup_ngram_share(chars: str, n: int) -> float:
    """The duplicated n-gram fraction of one order alone (what rule_stats computes for n = 5..10)."""
    lib = _text_kernels()
    if lib is not None and len(chars) <= NGRAM_C_MAX_CHARS:
        return lib.dup_share(chars, n)
    return dup_ngram_share_numpy(chars, n)


def dup_ngram_share_numpy(chars: str, n: int) -> float:
    """dup_ngram_share without a compiler, or for a very long text."""
    cps = np.frombuffer(codecs.utf_32_le_encode(chars, "surrogatepass")[0], dtype=np.uint32)
    if len(cps) < n:
        return 0.0
    starts = _candidates(_window_hashes(cps, n, np.uint32))
    if len(starts) == 0:
        return 0.0
    wide = cps.astype(np.uint64)    # the 64-bit hashes of the candidate windows only
    windows = np.ndarray((len(cps) - n + 1, n), dtype=np.uint64, buffer=wide, strides=(8, 8))
    return _covered(starts[_repeated(windows[starts] @ _POWERS[np.uint64, n])], n, len(cps))


def _dup_share(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in them), as Gopher counts."""
    seen, dup_items, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup_items += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    total_chars = sum(len(it) for it in items) or 1
    return dup_items / len(items), dup_chars / total_chars


def rule_stats(text: str, rules: RulesConfig) -> dict:
    """Every number the rules decide on, for one document."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chars = SPACE.sub("", text)
    n = len(chars)
    stats = {"chars": n, "lines": len(lines)}
    if not lines or n == 0:
        return stats
    stats["dup_line_frac"], stats["dup_line_chars"] = _dup_share(lines)
    stats["dup_para_frac"], stats["dup_para_chars"] = _dup_share(paras)
    stats["punct_end_lines"] = sum(ln[-1] in END_PUNCT for ln in lines) / len(lines)
    stats["short_lines"] = sum(len(ln) <= rules.short_line_chars for ln in lines) / len(lines)
    stats["bullet_lines"] = sum(ln.startswith(BULLETS) for ln in lines) / len(lines)
    stats["ellipsis_lines"] = sum(ln.endswith(("…", "...")) for ln in lines) / len(lines)
    stats["symbol_ratio"] = symbol_ratio(chars)
    stats["flagged_per_kchar"] = flagged_per_kchar(chars)
    if n >= rules.min_ngram_chars and not _ngram_stats_compiled(chars, stats):   # n-gram rules: long documents
        _ngram_stats(np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32), stats)
    return stats


RULE_STAT = {"flagged_words": "flagged_per_kchar"}   # the rule names whose statistic is named otherwise


def rule_value(stats: dict, rule: str) -> float:
    """The statistic a failed rule judged (for audit samples)."""
    return stats[RULE_STAT.get(rule, rule)]


def check_rules(stats: dict, rules: RulesConfig) -> str | None:
    """The first rule the document fails (its drop reason), or None. Line rules need `min_lines` lines (a
    one-paragraph document has no line structure to judge); n-gram rules need `min_ngram_chars` characters."""
    if stats.get("lines", 0) == 0:
        return None
    if stats["lines"] >= rules.min_lines:
        for key, limit in (("dup_line_frac", rules.max_dup_line_frac), ("dup_line_chars", rules.max_dup_line_chars),
                           ("dup_para_frac", rules.max_dup_para_frac), ("dup_para_chars", rules.max_dup_para_chars),
                           ("short_lines", rules.max_short_lines), ("bullet_lines", rules.max_bullet_lines),
                           ("ellipsis_lines", rules.max_ellipsis_lines)):
            if stats[key] > limit:
                return key
        if stats["punct_end_lines"] < rules.min_punct_end_lines:
            return "punct_end_lines"
    if stats["symbol_ratio"] > rules.max_symbol_ratio:
        return "symbol_ratio"
    if stats["flagged_per_kchar"] > rules.max_flagged_per_kchar:
        return "flagged_words"
    if stats["chars"] >= rules.min_ngram_chars:
        for k, limit in zip((2, 3, 4), rules.max_top_ngram):
            if stats[f"top_{k}gram"] > limit:
                return f"top_{k}gram"
        for k, limit in zip(range(5, 11), rules.max_dup_ngram):
            if stats[f"dup_{k}gram"] > limit:
                return f"dup_{k}gram"
    return None
