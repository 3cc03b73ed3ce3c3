"""Vectorized MinHash signatures, LSH band index and text normalization for deduplication.

Pure functions over lists of texts and numpy arrays; `dedup.py` wires them into the pipeline step.

Why hand-written signatures: datasketch's `MinHash.update_batch` hashes every shingle with sha1 in a Python
loop (~1 M characters/s per core). Here a whole batch of documents becomes one array of code points, every
character n-gram gets a polynomial rolling hash in a few numpy passes, and all permutations are applied at
once as one (shingles x num_perm) uint32 matrix reduced per document with `np.minimum.reduceat`.
The permutations are datasketch's own default scheme ("affine32", datasketch >= 2.0: fmix32 premix, then
a_k * h + b_k mod 2^32 with odd a_k, a bijection; see datasketch issue #212 for why it replaced the older
(a*h+b) mod (2^61-1) scheme) with datasketch's own parameters for the same seed, so a signature here is
bit-identical to `datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32).update_batch(shingles)`
(tests/test_dedup_minhash.py checks that).

Why the step keeps no full signatures: a 128-permutation uint32 signature is 512 bytes; 10M of them are
5 GB. dedup.py writes one uint64 hash per LSH band (`band_hashes`) and a 1-byte-per-permutation b-bit sketch
(Li & Koenig, "b-Bit Minwise Hashing", WWW 2010) that is enough to verify a candidate pair's Jaccard
(`sketch_jaccard`), both to disk. See `disk_bytes_per_doc`.
"""
from __future__ import annotations

import functools
import unicodedata

import numpy as np

U64 = np.uint64
MASK64 = (1 << 64) - 1
POLY = 0x100000001B3          # FNV-64 prime as the rolling-hash base (odd, spreads code points)
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a permutation that saw no shingle (datasketch's "max hash")

# ---------------------------------------------------------------------------------------------------------
# Normalization
# Full-width and CJK punctuation folded to one ASCII form, so "，" vs "," or "“" vs '"' cannot hide a copy.
# NFKC already folds the full-width ASCII block (U+FF01..U+FF5E); these are the marks NFKC leaves alone.
_PUNCT_FOLD = str.maketrans({
    "。": ".", "、": ",", "，": ",", "；": ";", "：": ":", "？": "?", "！": "!",
    "“": '"', "”": '"', "‘": "'", "’": "'", "「": '"', "」": '"', "『": '"', "』": '"',
    "《": "<", "》": ">", "〈": "<", "〉": ">", "【": "[", "】": "]", "〔": "[", "〕": "]",
    "（": "(", "）": ")", "—": "-", "–": "-", "～": "~", "…": ".", "·": ".", "・": ".",
})


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Per-character fold table over the BMP (NFKC, punctuation folded, case folded; 0 = delete: whitespace,
    control and format characters such as zero-width spaces) and an is-letter-or-digit table. Folding is
    character by character so that a whole batch normalizes with one numpy gather; a character whose NFKC form
    is several characters (rare after the clean step's NFKC) folds to the first of them."""
    fold = np.arange(0x10000, dtype=np.uint32)
    alnum = np.zeros(0x10000, dtype=bool)
    for c in range(0x10000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        ch = chr(c)
        t = unicodedata.normalize("NFKC", ch).translate(_PUNCT_FOLD).casefold()
        if not t or t.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            fold[c] = 0
        else:
            fold[c] = ord(t[0])
        alnum[c] = fold[c] != 0 and chr(fold[c]).isalnum()
    return fold, alnum


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All code points of a batch of texts (uint32, concatenated) and each text's length."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32), lengths


def fold_batch(cps: np.ndarray, lengths: np.ndarray, alnum: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Normalize a batch of code point runs: fold every character, drop deleted ones (and, with `alnum`,
    every character that is not a letter or digit); returns the new code points and per-text lengths."""
    fold, _ = _tables()
    if len(cps) and cps.max() <= 0xFFFF:          # the usual batch, all in the BMP: one gather
        out = fold[cps]
    else:
        out = np.where(cps < 0x10000, fold[np.minimum(cps, 0xFFFF)], cps)   # above the BMP (CJK ext. B...): kept
    cps, lengths = _keep(out, lengths, out != 0)
    return alnum_only(cps, lengths) if alnum else (cps, lengths)


def alnum_only(cps: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only letters and digits of already folded code point runs."""
    _, is_alnum = _tables()
    return _keep(cps, lengths, is_alnum[np.minimum(cps, 0xFFFF)] | (cps > 0xFFFF))


def _keep(cps: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum(lengths)
    kept = np.r_[0, np.cumsum(keep, dtype=np.int64)]    # kept characters before each position
    return cps[keep], kept[ends] - kept[ends - lengths]


def _decode(cps: np.ndarray) -> str:
    return cps.astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass")


def normalize(text: str) -> str:
    """Form compared by exact dedup and shingled by near dedup: NFKC, full/half-width punctuation folded,
    no whitespace or invisible characters, case folded (see `_tables`)."""
    cps, lengths = fold_batch(*encode_batch([text]))
    return _decode(cps)


def normalize_alnum(text: str) -> str:
    """Form compared by decontamination: `normalize` keeping only letters and digits (CJK included), because
    an exam question copied into a web page keeps its words but rarely its blanks, brackets and commas."""
    cps, lengths = fold_batch(*encode_batch([text]), alnum=True)
    return _decode(cps)


# ---------------------------------------------------------------------------------------------------------
# Hashing
def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection) so that the polynomial hash's bits are well mixed.
    Returns a new array; `_fmix64_inplace` overwrites its argument (no temporaries per step on large arrays)."""
    return _fmix64_inplace(np.array(h, dtype=np.uint64))


def _fmix64_inplace(h: np.ndarray) -> np.ndarray:
    t = np.empty_like(h)
    for c in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, None):
        np.right_shift(h, U64(33), out=t)
        np.bitwise_xor(h, t, out=h)
        if c is not None:
            np.multiply(h, U64(c), out=h)
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, exactly as datasketch's affine32 scheme premixes its input."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def ngram_hashes64(cps: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every length-n window of a code point array (len(cps) - n + 1 values): the polynomial
    sum(cp[i+k] * POLY^(n-1-k)) mod 2^64, then fmix64. n numpy passes, no Python loop over characters."""
    m = len(cps) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    cps = cps.astype(np.uint64)
    h = cps[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h *= U64(POLY)
            h += cps[k:k + m]
        return _fmix64_inplace(h)


def string_hash64(s: str) -> int:
    """Python reference of one window of `ngram_hashes64` (also the hash of a text shorter than n)."""
    h = 0
    for ch in s:
        h = (h * POLY + ord(ch)) & MASK64
    return int(_fmix64(np.array([h], dtype=np.uint64))[0])


def shingle_hash32(shingle: str | bytes) -> int:
    """The per-shingle hash this module uses, as a datasketch `hashfunc` (high 32 bits of the 64-bit hash)."""
    if isinstance(shingle, bytes):
        shingle = shingle.decode("utf-8")
    return string_hash64(shingle) >> 32


def shingles(text: str, n: int) -> list[str]:
    """Character n-grams of a normalized text; a text shorter than n is one shingle (itself)."""
    if len(text) < n:
        return [text] if text else []
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------------------------------------------------
# Signatures
def affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's "affine32" permutation parameters for `seed`, drawn as it draws them (odd a, any b, from
    RandomState(seed)); tests/test_dedup_minhash.py pins them to datasketch's own. Not imported from datasketch:
    it pulls in scipy, ~0.3 s in every worker process."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


class MinHasher:
    """Batch MinHash over character n-grams of normalized texts; permutations taken from datasketch."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1, block_shingles: int = 8192):
        a, b = affine32_permutations(num_perm, seed)
        self.a = np.ascontiguousarray(a, dtype=np.uint32)
        self.b = np.ascontiguousarray(b, dtype=np.uint32)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self.block_shingles = block_shingles   # shingles per (perms x shingles) block: 4 MB, fastest measured

    def shingle_hashes(self, cps: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All shingle hashes of a batch (uint32, already fmix32-premixed) and the owning document of each,
        in document order. `cps`, `lengths`: normalized code points of the batch, as from `fold_batch`."""
        n = self.ngram
        h64 = ngram_hashes64(cps, n)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # a window is a shingle of one document unless it starts in the last n - 1 characters of one: marking
        # those n - 1 positions per document costs a few small scatters, not a pass over every character
        inside = np.ones(len(h64), dtype=bool)
        for k in range(1, n):
            at = ends - k
            inside[at[(at >= starts) & (at < len(h64))]] = False
        hashes = (h64 >> U64(32)).astype(np.uint32)[inside]
        docs = np.repeat(np.arange(len(lengths), dtype=np.int64), np.maximum(lengths - n + 1, 0))
        short = np.flatnonzero((lengths > 0) & (lengths < n))
        if len(short):  # a text shorter than n is one shingle: itself
            extra = np.array([string_hash64(_decode(cps[starts[i]:starts[i] + lengths[i]])) >> 32 for i in short],
                             dtype=np.uint32)
            order = np.argsort(np.concatenate([docs, short]), kind="stable")
            hashes = np.concatenate([hashes, extra])[order]
            docs = np.concatenate([docs, short])[order]
        with np.errstate(over="ignore"):
            return _fmix32(hashes), docs

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures of already normalized texts. An empty text gets all EMPTY."""
        return self.signatures_cps(*encode_batch(texts))

    def signatures_cps(self, cps: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Signatures of a batch given as concatenated normalized code points and per-text lengths."""
        hashes, docs = self.shingle_hashes(cps, lengths)
        sigs = np.full((len(lengths), self.num_perm), EMPTY, dtype=np.uint32)
        # (num_perm x shingles) layout: the per-document min then runs over contiguous memory, where
        # np.minimum.reduceat is ~10x faster than along axis 0 (measured: 0.07 vs 1.0 ns per element)
        buf = np.empty((self.num_perm, self.block_shingles), dtype=np.uint32)
        a, b = self.a[:, None], self.b[:, None]
        first = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]]) if len(docs) else docs   # each doc's start
        for start in range(0, len(hashes), self.block_shingles):
            stop = min(start + self.block_shingles, len(hashes))
            h = hashes[start:stop]
            phv = buf[:, :len(h)]
            np.multiply(a, h[None, :], out=phv)   # wraps mod 2^32, as datasketch's affine32
            np.add(phv, b, out=phv)
            lo, hi = np.searchsorted(first, (start, stop))
            seg_starts = first[lo:hi] - start
            if lo == hi or seg_starts[0] != 0:    # the block begins inside a document
                seg_starts = np.r_[0, seg_starts]
            seg_docs = docs[start + seg_starts]
            seg_min = np.minimum.reduceat(phv, seg_starts, axis=1).T
            sigs[seg_docs] = np.minimum(sigs[seg_docs], seg_min)  # a document may span two blocks
        return sigs


# ---------------------------------------------------------------------------------------------------------
# LSH index: band hashes + b-bit sketches
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for candidate generation. The LSH net is cast at threshold - 0.2 (datasketch's optimal
    banding for that threshold: 18 bands x 7 rows for 0.8 with 128 permutations) so that a pair at the real
    threshold is a candidate with probability >= 0.98; the verification step (`sketch_jaccard >= threshold`)
    then removes the extra candidates."""
    from datasketch.lsh import _optimal_param
    return _optimal_param(max(threshold - 0.2, 0.3), num_perm, 0.5, 0.5)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: one hash per band of `rows` signature values. Two documents are LSH candidates
    when any band hash is equal."""
    n = sigs.shape[0]
    banded = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            h = _fmix64(h * U64(POLY) + banded[:, :, r] + U64(r + 1))
        h += np.arange(bands, dtype=np.uint64)[None, :] * U64(0x9E3779B97F4A7C15)  # band k's own hash space
    return h


def sketch(sigs: np.ndarray) -> np.ndarray:
    """b-bit (b=8) sketch: the low byte of every signature value."""
    return (sigs & np.uint32(0xFF)).astype(np.uint8)


def sketch_jaccard(sk_u: np.ndarray, sk_v: np.ndarray) -> np.ndarray:
    """Jaccard estimate from two rows (or row arrays) of 8-bit sketches: a matching byte happens with
    probability J + (1 - J) / 256, so J = (match - 1/256) / (1 - 1/256)."""
    match = (sk_u == sk_v).mean(axis=-1)
    return np.clip((match - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


def disk_bytes_per_doc(bands: int, num_perm: int) -> int:
    """Bytes the dedup step's stage files hold per document (on disk, not in memory): band rows (12 per band),
    the 8-bit sketch (1 per permutation), the exact row (12), the meta row (exact hash, eval hit, share, flag:
    17) and the record id (~30 in parquet)."""
    return bands * 12 + num_perm + 12 + 17 + 30
