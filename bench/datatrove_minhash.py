"""datatrove's own MinHash pipeline on a JSONL folder, for bench/bench_dedup.py's side-by-side ([7]).

Runs in its own virtualenv (datatrove is a comparison tool, not a dependency of this project):

    python3 -m venv /work/bench-venvs/datatrove
    /work/bench-venvs/datatrove/bin/pip install "datatrove[processing]==0.10.1" jieba spacy
    /work/bench-venvs/datatrove/bin/python bench/datatrove_minhash.py IN_DIR WORK_DIR --shingles word|char --workers 2

LocalPipelineExecutor runs datatrove's four stages (MinhashDedupSignature -> MinhashDedupBuckets ->
MinhashDedupCluster -> MinhashDedupFilter). `word`: its default for Chinese (language "zh": spaCy's Chinese
tokenizer with the jieba segmenter, word 5-grams, 14 buckets x 8 hashes). `char`: the same pipeline and
config with a word tokenizer that returns characters, so shingles are character 5-grams. Prints one JSON
line: seconds per stage, the ids of the removed documents and the cluster of every clustered one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer


class CharTokenizer(WordTokenizer):
    """Characters as words: datatrove's n-gram shingles become character n-grams."""

    def __init__(self):
        super().__init__("zh")

    def word_tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(len(text))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--shingles", choices=("word", "char"), default="word")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    files = sorted(args.input.glob("*.jsonl"))
    config = MinhashConfig()
    language = "zh" if args.shingles == "word" else CharTokenizer()
    w = args.work
    stages = [
        ("signature", [JsonlReader(str(args.input)), MinhashDedupSignature(str(w / "sigs"), config=config,
                                                                           language=language)], len(files)),
        ("buckets", [MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=config)], config.num_buckets),
        ("cluster", [MinhashDedupCluster(str(w / "buckets"), str(w / "remove_ids"), config=config,
                                         save_cluster_id=True)], 1),
        ("filter", [JsonlReader(str(args.input)), MinhashDedupFilter(
            str(w / "remove_ids"), exclusion_writer=JsonlWriter(str(w / "removed")), load_cluster_ids=True),
            JsonlWriter(str(w / "kept"))], len(files)),
    ]
    seconds = {}
    for name, pipeline, tasks in stages:
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=args.workers,
                              logging_dir=str(w / "logs" / name)).run()
        seconds[name] = time.perf_counter() - t0
    import gzip
    removed, cluster = [], {}
    for what in ("removed", "kept"):
        for f in sorted((w / what).glob("*")):
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        doc = json.loads(line)
                        if what == "removed":
                            removed.append(doc["id"])
                        c = (doc.get("metadata") or {}).get("minhash_cluster_id", -1)
                        if c != -1:
                            cluster[doc["id"]] = c
    print(json.dumps({"seconds": seconds, "removed": removed, "cluster": cluster}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
