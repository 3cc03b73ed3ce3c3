"""Token shards: Megatron MMIDIDX v1 layout checked against an independent reader/writer written from
Megatron-LM's `megatron/core/datasets/indexed_dataset.py` (its _IndexWriter / _IndexReader parsing,
mirrored here step by step), round trips, atomic writes, bad input."""
import os
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from data_process.shards import (IndexedDataset, ShardError, ShardWriter, check_vocab_fits, is_complete,
                                 remove_temporaries, write_shard)

MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                   7: np.float32, 8: np.uint16}


def megatron_read_index(idx_path):
    """Megatron-LM _IndexReader.__init__, without the Megatron imports."""
    with open(idx_path, "rb") as stream:
        header = stream.read(9)
        assert header == b"MMIDIDX\x00\x00"
        version = struct.unpack("<Q", stream.read(8))[0]
        assert version == 1
        code = struct.unpack("<B", stream.read(1))[0]
        dtype = MEGATRON_DTYPES[code]
        sequence_count = struct.unpack("<Q", stream.read(8))[0]
        document_count = struct.unpack("<Q", stream.read(8))[0]
        offset = stream.tell()
    buf = memoryview(np.memmap(idx_path, mode="r", order="C"))
    lengths = np.frombuffer(buf, dtype=np.int32, count=sequence_count, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=sequence_count, offset=offset + lengths.nbytes)
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=document_count,
                            offset=offset + lengths.nbytes + pointers.nbytes)
    return code, dtype, lengths, pointers, doc_idx


def megatron_get(prefix, i):
    """Megatron-LM IndexedDataset.__getitem__(int) with the mmap bin reader."""
    _, dtype, lengths, pointers, _ = megatron_read_index(f"{prefix}.idx")
    buf = memoryview(np.memmap(f"{prefix}.bin", mode="r", order="C"))
    return np.frombuffer(buf, dtype=dtype, count=lengths[i], offset=pointers[i])


def megatron_write(prefix, sequences_per_doc, dtype=np.uint16):
    """Megatron-LM IndexedDatasetBuilder.add_item/end_document/finalize + _IndexWriter."""
    code = {np.uint16: 8, np.int32: 4}[dtype]
    lengths, doc_idx = [], [0]
    with open(f"{prefix}.bin", "wb") as data:
        for doc in sequences_per_doc:
            for seq in doc:
                arr = np.array(seq, dtype=dtype)
                data.write(arr.tobytes(order="C"))
                lengths.append(arr.size)
            doc_idx.append(len(lengths))
    itemsize = np.dtype(dtype).itemsize
    pointers, cur = [], 0
    for n in lengths:
        pointers.append(cur)
        cur += n * itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(lengths, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))


def random_docs(n=50, seed=0, vocab=64789, eos=2):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = rng.integers(3, vocab, size=int(rng.integers(0, 300)))
        docs.append(np.append(body, eos))
    return docs


def test_round_trip_reads_back_every_document(tmp_path):
    docs = random_docs()
    info = write_shard(tmp_path / "s", docs)
    assert info["documents"] == 50 and info["tokens"] == sum(len(d) for d in docs)
    ds = IndexedDataset(tmp_path / "s")
    assert len(ds) == 50 and ds.num_tokens == info["tokens"]
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.doc_lengths, [len(d) for d in docs])
    assert ds.doc_lengths.dtype == np.int32 and ds.doc_starts.dtype == np.int64
    np.testing.assert_array_equal(ds.doc_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
    with pytest.raises(IndexError):
        ds[50]


def test_bin_is_plain_concatenated_uint16_for_nanogpt_readers(tmp_path):
    docs = random_docs(10)
    write_shard(tmp_path / "s", docs)
    raw = np.fromfile(tmp_path / "s.bin", dtype=np.uint16)
    np.testing.assert_array_equal(raw, np.concatenate(docs))


def test_idx_is_byte_identical_to_megatron_builder_output(tmp_path):
    docs = random_docs(30, seed=1)
    write_shard(tmp_path / "ours", docs)
    megatron_write(tmp_path / "ref", [[d] for d in docs])
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_megatron_reader_parses_our_shard(tmp_path):
    docs = random_docs(20, seed=2)
    write_shard(tmp_path / "s", docs)
    code, dtype, lengths, pointers, doc_idx = megatron_read_index(tmp_path / "s.idx")
    assert code == 8 and dtype == np.uint16
    assert len(lengths) == 20 and len(doc_idx) == 21 and doc_idx[0] == 0 and doc_idx[-1] == 20
    assert pointers[1] == 2 * lengths[0]
    for i in (0, 7, 19):
        np.testing.assert_array_equal(megatron_get(tmp_path / "s", i), docs[i])


def test_int32_shards_use_megatron_code_4(tmp_path):
    docs = [np.array([70000, 5, 2]), np.array([2])]
    write_shard(tmp_path / "s", docs, dtype=np.int32)
    code, dtype, *_ = megatron_read_index(tmp_path / "s.idx")
    assert code == 4 and dtype == np.int32
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "s")[0], [70000, 5, 2])


def test_reads_foreign_shards_with_several_sequences_per_document(tmp_path):
    megatron_write(tmp_path / "m", [[[5, 6], [7, 2]], [[8, 2]], [[9], [10], [2]]])
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[0], [5, 6, 7, 2])
    np.testing.assert_array_equal(ds[2], [9, 10, 2])


def test_empty_shard_and_empty_document(tmp_path):
    write_shard(tmp_path / "e", [])
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
    write_shard(tmp_path / "z", [[], [4, 2]])
    ds = IndexedDataset(tmp_path / "z")
    assert list(ds.doc_lengths) == [0, 2] and ds[0].size == 0


def test_add_batch_equals_add(tmp_path):
    docs = random_docs(40, seed=3)
    write_shard(tmp_path / "a", docs)
    with ShardWriter(tmp_path / "b") as w:
        w.add_batch(np.concatenate(docs[:25]), [len(d) for d in docs[:25]])
        w.add_batch(np.concatenate(docs[25:]).tolist(), [len(d) for d in docs[25:]])
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    with pytest.raises(ValueError, match="lengths sum"):
        ShardWriter(tmp_path / "c").add_batch([1, 2, 3], [2])


def test_vocab_that_does_not_fit_is_a_clear_error(tmp_path):
    check_vocab_fits(64789, np.uint16)   # ChatGLM2
    check_vocab_fits(65500, np.uint16)
    check_vocab_fits(151_643, np.int32)
    with pytest.raises(ValueError, match="does not fit"):
        check_vocab_fits(65501, np.uint16)
    with pytest.raises(ValueError, match="does not fit"):
        check_vocab_fits(151_643, np.uint16)
    with pytest.raises(ValueError, match="not supported"):
        check_vocab_fits(100, np.float32)


@pytest.mark.parametrize("bad", [[70000], [-1], np.array([65536], dtype=np.int64), np.array([-3], dtype=np.int32)])
def test_ids_that_do_not_fit_are_refused_never_wrapped(tmp_path, bad):
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "s", [[5, 2], bad])
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    assert remove_temporaries(tmp_path) == 0   # the failed writer cleaned up after itself


def test_unfinished_writer_leaves_nothing_under_final_names(tmp_path):
    w = ShardWriter(tmp_path / "s")
    w.add([5, 6, 2])
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    assert not is_complete(tmp_path / "s")
    with pytest.raises(ShardError, match="missing"):
        IndexedDataset(tmp_path / "s")
    w.close()
    assert is_complete(tmp_path / "s")


def test_writer_killed_mid_shard_leaves_no_acceptable_shard(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from data_process.shards import ShardWriter
        w = ShardWriter({str(tmp_path / "s")!r})
        for _ in range(1000):
            w.add(np.arange(3, 1000) % 60000)
        print("written", flush=True)
        time.sleep(60)
        w.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "s.idx").exists() and not (tmp_path / "s.bin").exists()
    assert not is_complete(tmp_path / "s")
    assert remove_temporaries(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_a_finished_shard(tmp_path):
    write_shard(tmp_path / "s", [[5, 2]])
    w = ShardWriter(tmp_path / "s")
    w.add([7, 8, 9, 2])
    info = w.close()
    assert info["tokens"] == 4
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "s")[0], [7, 8, 9, 2])


def test_truncated_bin_is_rejected(tmp_path):
    write_shard(tmp_path / "s", random_docs(5))
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-2])
    with pytest.raises(ShardError, match="bytes, but the .idx says"):
        IndexedDataset(tmp_path / "s")
    (tmp_path / "s.bin").write_bytes(data + b"\0\0")
    with pytest.raises(ShardError):
        IndexedDataset(tmp_path / "s")


def test_truncated_or_corrupt_idx_is_rejected(tmp_path):
    write_shard(tmp_path / "s", random_docs(5))
    idx = (tmp_path / "s.idx").read_bytes()
    (tmp_path / "s.idx").write_bytes(idx[:-8])
    with pytest.raises(ShardError, match="truncated"):
        IndexedDataset(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(b"NOTANIDX\0" + idx[9:])
    with pytest.raises(ShardError, match="bad header"):
        IndexedDataset(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(idx[:9] + struct.pack("<Q", 2) + idx[17:])
    with pytest.raises(ShardError, match="version"):
        IndexedDataset(tmp_path / "s")
    bad_ptr = bytearray(idx)
    bad_ptr[34 + 5 * 4 + 8:34 + 5 * 4 + 16] = struct.pack("<q", 1)   # second pointer
    (tmp_path / "s.idx").write_bytes(bytes(bad_ptr))
    with pytest.raises(ShardError, match="pointers"):
        IndexedDataset(tmp_path / "s")


def test_pickles_as_its_path_not_its_tokens(tmp_path):
    import pickle
    write_shard(tmp_path / "s", random_docs(200))
    ds = IndexedDataset(tmp_path / "s")
    blob = pickle.dumps(ds)
    assert len(blob) < 500 < ds.num_tokens
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[17], ds[17])
    assert isinstance(again.tokens, np.memmap)
