"""data_process/records.py: zstd JSONL parts round-trip, and damage is an error naming the file, never fewer
records without a word (zstandard's stream_reader returns a truncated frame's data silently)."""
import zstandard
import pytest

from data_process import tokenize_docs
from data_process.records import RecordsError, iter_record_lines, iter_records, write_parts

RECORDS = [{"id": f"x.jsonl:{i}", "corpus": "web", "kind": "doc", "text": f"第{i}篇：发热、咳嗽。\n" * 20}
           for i in range(3000)]


def test_parts_round_trip_in_order(tmp_path):
    paths = write_parts(RECORDS, tmp_path, part_records=1000)
    assert [p.name for p in paths] == ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"]
    assert list(iter_records(tmp_path)) == RECORDS


def test_record_lines_are_the_stored_bytes_that_reserializing_would_give(tmp_path):
    # dedup copies survivors' lines as stored instead of parse + orjson.dumps: the bytes must be the same
    import orjson
    records = RECORDS[:500] + [{"id": "f", "kind": "doc", "x": 1e16, "y": -0.1, "z": None, "t": "\u2028\"\\\x01"}]
    (path,) = write_parts(records, tmp_path, part_records=1000)
    lines = list(iter_record_lines(path))
    assert lines == [orjson.dumps(orjson.loads(line)) + b"\n" for line in lines]
    assert [orjson.loads(line) for line in lines] == records
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(RecordsError, match="part-00000.jsonl.zst"):
        list(iter_record_lines(path))


def test_concatenated_frames_are_all_read(tmp_path):
    c = zstandard.ZstdCompressor(write_checksum=True)
    lines = [b'{"id": "%d"}\n' % i for i in range(10)]
    (tmp_path / "part-00000.jsonl.zst").write_bytes(c.compress(b"".join(lines[:4])) + c.compress(b"".join(lines[4:])))
    assert [r["id"] for r in iter_records(tmp_path)] == [str(i) for i in range(10)]


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not json"])
def test_damaged_part_is_an_error_naming_the_file(tmp_path, damage):
    (path,) = write_parts(RECORDS[:1000], tmp_path, part_records=1000)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    else:
        data = bytearray(zstandard.ZstdCompressor().compress(b'{"id": "a"}\n{"id": \n'))
    path.write_bytes(bytes(data))
    with pytest.raises(RecordsError, match="part-00000.jsonl.zst"):
        list(iter_records(tmp_path))
    if damage == "not json":
        with pytest.raises(RecordsError, match="line 2"):
            list(iter_records(tmp_path))


def test_tokenize_stops_on_a_truncated_part_without_writing_a_manifest(tmp_path, samples):
    from test_tokenize import MODEL, make_recipe
    write_parts(RECORDS, tmp_path / "docs" / "web", part_records=1000)
    part = tmp_path / "docs" / "web" / "part-00001.jsonl.zst"
    part.write_bytes(part.read_bytes()[:-20])
    with pytest.raises(RecordsError, match="part-00001"):
        tokenize_docs.run(make_recipe(tmp_path / "docs"), tmp_path / "docs", MODEL, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "web" / "manifest.json").exists()
