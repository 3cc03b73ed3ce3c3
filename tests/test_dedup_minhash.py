"""MinHash signatures, LSH band index and normalization (data_process/minhash.py), checked against datasketch."""
import json
import random

import numpy as np
import pytest
from datasketch import MinHash

from conftest import SAMPLES, edit
from data_process import minhash


def real_texts(k=40):
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:k]



def test_signatures_are_bit_identical_to_datasketch_minhash_with_the_same_shingle_hash():
    texts = [minhash.normalize(t) for t in real_texts(15)] + ["abc", "a", "", "你好世界啊!"]
    sigs = minhash.MinHasher(num_perm=128, ngram=5).signatures(texts)
    for text, sig in zip(texts, sigs):
        ref = MinHash(num_perm=128, seed=1, hashfunc=minhash.shingle_hash32)
        ref.update_batch(minhash.shingles(text, 5))
        assert np.array_equal(ref.hashvalues, sig)


def test_permutations_are_datasketchs_own_for_every_seed_and_size():
    for num_perm, seed in [(128, 1), (128, 0), (64, 7), (256, 12345), (1, 2**31)]:
        a, b = minhash.affine32_permutations(num_perm, seed)
        ref_a, ref_b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        assert a.dtype == b.dtype == np.uint32
        assert np.array_equal(a, ref_a) and np.array_equal(b, ref_b), (num_perm, seed)


def test_jaccard_estimates_agree_with_datasketch_sha1_minhash_on_the_same_shingles():
    rng = random.Random(0)
    hasher = minhash.MinHasher(num_perm=128, ngram=5)
    errs_mine, errs_ref, diffs = [], [], []
    for text in real_texts(30):
        a = minhash.normalize(text)
        b = minhash.normalize(edit(text, rng.choice([0.005, 0.01, 0.03, 0.08]), rng))
        sa, sb = set(minhash.shingles(a, 5)), set(minhash.shingles(b, 5))
        true = minhash.jaccard(sa, sb)
        sig = hasher.signatures([a, b])
        mine = float((sig[0] == sig[1]).mean())
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)     # datasketch defaults: sha1, affine32
        ma.update_batch([s.encode() for s in sa])
        mb.update_batch([s.encode() for s in sb])
        ref = ma.jaccard(mb)
        errs_mine.append(abs(mine - true))
        errs_ref.append(abs(ref - true))
        diffs.append(abs(mine - ref))
    # both are unbiased estimators with std <= sqrt(J(1-J)/128) <= 0.044
    assert np.mean(errs_mine) < 0.035 and np.mean(errs_ref) < 0.035
    assert np.mean(diffs) < 0.05
    assert abs(np.mean(errs_mine) - np.mean(errs_ref)) < 0.015


def test_rolling_ngram_hashes_match_the_python_reference():
    text = minhash.normalize(real_texts(1)[0])[:200]
    h = minhash.ngram_hashes64(minhash.codepoints(text), 7)
    assert len(h) == len(text) - 6
    assert [int(x) for x in h[:50]] == [minhash.string_hash64(text[i:i + 7]) for i in range(50)]


def test_normalize_folds_width_punctuation_whitespace_case_and_invisible_characters():
    assert minhash.normalize("Ｈｅｌｌｏ，  World！\n 你好。") == minhash.normalize("hello,world!你好.")
    assert minhash.normalize("发热\u200b咳嗽\u3000三天") == "发热咳嗽三天"
    assert minhash.normalize("“引号”《书名》") == minhash.normalize('"引号"<书名>')
    assert minhash.normalize_alnum("不属于第二信使的物质是____（ ）A. cAMP") == "不属于第二信使的物质是acamp"
    assert minhash.normalize("𠀀ABC") == "𠀀abc"      # above the BMP: kept as is


def test_batch_normalization_matches_per_text_normalization():
    texts = real_texts(10) + ["", " \t ", "Ａ，Ｂ"]
    cps, lengths = minhash.fold_batch(*minhash.encode_batch(texts))
    starts = np.cumsum(lengths) - lengths
    for t, s, k in zip(texts, starts, lengths):
        assert minhash._decode(cps[s:s + k]) == minhash.normalize(t)


def test_sketch_jaccard_tracks_the_signature_jaccard():
    rng = random.Random(1)
    hasher = minhash.MinHasher()
    for text in real_texts(20):
        a, b = minhash.normalize(text), minhash.normalize(edit(text, 0.02, rng))
        sig = hasher.signatures([a, b])
        sk = minhash.sketch(sig)
        assert abs(minhash.sketch_jaccard(sk[0], sk[1]) - (sig[0] == sig[1]).mean()) < 0.03


def test_sketch_jaccard_equals_datasketch_b_bit_minhash_estimate():
    from datasketch.b_bit_minhash import bBitMinHash
    rng = random.Random(2)
    hasher = minhash.MinHasher()
    for text in real_texts(10):
        a, b = minhash.normalize(text), minhash.normalize(edit(text, rng.choice([0.01, 0.05]), rng))
        sig = hasher.signatures([a, b])
        ref = [bBitMinHash(MinHash(seed=1, hashvalues=s, scheme="affine32"), b=8) for s in sig]
        sk = minhash.sketch(sig)
        expected = min(max(ref[0].jaccard(ref[1]), 0.0), 1.0)
        assert minhash.sketch_jaccard(sk[0], sk[1]) == pytest.approx(expected, abs=1e-9)


def test_lsh_bands_make_pairs_at_the_threshold_almost_surely_candidates_and_fit_num_perm():
    for threshold in (0.6, 0.7, 0.8, 0.85, 0.9):
        bands, rows = minhash.lsh_params(threshold, 128)
        assert bands * rows <= 128
        p = 1 - (1 - threshold ** rows) ** bands
        assert p > 0.98


def test_candidate_pairs_find_documents_sharing_a_band():
    from data_process.dedup import verified_edges
    bands = np.array([[1, 2], [3, 2], [5, 6], [1, 7], [8, 9], [8, 6]], dtype=np.uint64)
    sk = np.zeros((6, 16), np.uint8)            # identical sketches: every candidate verifies
    e, n = verified_edges(bands, sk, np.ones(6, bool), 0.8)
    assert set(zip(e["u"].tolist(), e["v"].tolist())) == {(0, 1), (0, 3), (2, 5), (4, 5)} and n == 4
    e, _ = verified_edges(bands, sk, np.array([1, 1, 0, 1, 1, 1], bool), 0.8)
    assert set(zip(e["u"].tolist(), e["v"].tolist())) == {(0, 1), (0, 3), (4, 5)}


@pytest.mark.parametrize("seed", range(4))
def test_bucket_pairs_are_every_pair_of_small_buckets_and_first_members_plus_predecessor_of_big_ones(seed):
    from data_process.dedup import bucket_pairs
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 40, 600).astype(np.uint64)       # buckets of ~15 members, some above the cap
    d = rng.permutation(600).astype(np.int64)
    got = set()
    for u, v in bucket_pairs(h, d, cap=8):
        assert (u < v).all()
        got |= set(zip(u.tolist(), v.tolist()))
    expected = set()
    for bucket in np.unique(h):
        members = sorted(d[h == bucket].tolist())
        for r, m in enumerate(members):
            partners = members[:min(r, 8)] + ([members[r - 1]] if r >= 1 else [])
            expected |= {(p, m) for p in partners}
    assert got == expected
