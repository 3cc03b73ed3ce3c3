"""Our token shards read by Megatron-LM's own code (the `megatron-core` package): its IndexedDataset parses our
.idx/.bin, and its IndexedDatasetBuilder writes byte-identical files from the same documents."""
import warnings

import numpy as np
import pytest
import torch

from data_process.shards import IndexedDataset, write_shard

with warnings.catch_warnings():   # "Transformer Engine and Apex are not installed": irrelevant to the dataset code
    warnings.simplefilter("ignore")
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [np.array(d, dtype=np.int64) for d in ([5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2], [2], [65_000, 3, 2])]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_indexed_dataset_reads_our_shard(tmp_path, dtype):
    write_shard(tmp_path / "ours", DOCS, dtype=dtype)
    theirs = indexed_dataset.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(DOCS)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(DOCS) + 1))
    for i, doc in enumerate(DOCS):
        got = theirs[i]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, doc)
    np.testing.assert_array_equal(theirs.sequence_lengths, [len(d) for d in DOCS])
    ours = IndexedDataset(tmp_path / "ours")
    np.testing.assert_array_equal(ours.doc_lengths, theirs.sequence_lengths)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_writes_the_same_bytes(tmp_path, dtype):
    write_shard(tmp_path / "ours", DOCS, dtype=dtype)
    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in DOCS:   # one sequence per document, as our writer does
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes(), ext
