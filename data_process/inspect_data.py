"""Inspect token shards: counts, document lengths, top tokens, decoded samples, and a consistency check.

    python -m data_process.inspect_data data/pretrain/wiki_zh/train-00000   # one shard (prefix, .bin or .idx)
    python -m data_process.inspect_data data/pretrain/wiki_zh               # a corpus (its manifest's shards)
    python -m data_process.inspect_data data/pretrain                       # every corpus under it
    python data_process.py inspect <path>                              # the same, from the pipeline CLI

The check (exit code 1 when it fails): each `.bin` has exactly the bytes its `.idx` describes, the
pointers follow from the lengths (both via shards.IndexedDataset), every document ends with eos and
holds no other eos, no id is outside the vocabulary, the manifest's counts match the shards, and each shard's
sizes and sample digest are the ones the manifest recorded; `--verify` also checks the sha256 of every `.bin`
and `.idx` against the manifest (a flipped bit anywhere).
`notebooks/inspect_shards.ipynb` draws the same figures; it uses the functions here.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_process.shards import IndexedDataset, ShardError, verify_shard

CHUNK_TOKENS = 1 << 24   # scan .bin files in 32 MB pieces: memory stays flat whatever the shard size


@dataclass
class ShardStats:
    prefix: Path
    documents: int = 0
    tokens: int = 0
    dtype: str = ""
    doc_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # bincount of ids
    problems: list = field(default_factory=list)


@dataclass
class CorpusStats:
    name: str
    prefixes: list
    shards: list                      # ShardStats
    manifest: dict | None = None
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)      # what could not be checked, and why
    checked: list = field(default_factory=list)    # what was checked

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.concatenate([s.doc_lengths for s in self.shards] or [np.zeros(0, np.int64)])

    @property
    def token_counts(self) -> np.ndarray:
        size = max((len(s.token_counts) for s in self.shards), default=0)
        total = np.zeros(size, np.int64)
        for s in self.shards:
            total[:len(s.token_counts)] += s.token_counts
        return total

    @property
    def all_problems(self) -> list:
        return self.problems + [f"{s.prefix.name}: {p}" for s in self.shards for p in s.problems]


def shard_stats(prefix, eos_id: int | None = None, vocab_size: int | None = None) -> ShardStats:
    """Open one shard and check it; a broken shard comes back with its problems, not an exception."""
    stats = ShardStats(Path(prefix))
    try:
        ds = IndexedDataset(prefix)
    except (ShardError, OSError) as e:
        stats.problems.append(str(e))
        return stats
    stats.documents, stats.tokens, stats.dtype = len(ds), ds.num_tokens, ds.dtype.name
    stats.doc_lengths = ds.doc_lengths.astype(np.int64)
    counts = np.zeros(vocab_size or 0, np.int64)
    for start in range(0, ds.num_tokens, CHUNK_TOKENS):
        chunk = np.asarray(ds.tokens[start:start + CHUNK_TOKENS]).astype(np.int64)
        if chunk.size and chunk.min() < 0:
            stats.problems.append("negative token ids")
            chunk = chunk[chunk >= 0]
        part = np.bincount(chunk)
        if len(part) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(part) - len(counts), np.int64)])
        counts[:len(part)] += part
    stats.token_counts = counts
    if vocab_size is not None and len(counts) > vocab_size and counts[vocab_size:].any():
        stats.problems.append(f"token ids >= vocab size {vocab_size} (max id {len(counts) - 1})")
    if (stats.doc_lengths == 0).any():
        stats.problems.append(f"{int((stats.doc_lengths == 0).sum())} empty documents (no eos)")
    if eos_id is not None and len(ds):
        nonempty = stats.doc_lengths > 0
        last = ds.tokens[(ds.doc_starts + stats.doc_lengths - 1)[nonempty]]
        missing = int((last != eos_id).sum())
        if missing:
            stats.problems.append(f"{missing} documents do not end with eos {eos_id}")
        eos_total = int(counts[eos_id]) if eos_id < len(counts) else 0
        if eos_total != int(nonempty.sum()) - missing:
            stats.problems.append(f"{eos_total - (int(nonempty.sum()) - missing)} eos tokens inside documents")
    return stats


def _prefix_of(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def find_corpora(path) -> list[tuple[str, list[Path], dict | None]]:
    """(name, shard prefixes, manifest or None) for a shard, a corpus directory, or a root of corpora."""
    path = Path(path)
    prefix = _prefix_of(path)
    if Path(f"{prefix}.idx").exists() or Path(f"{prefix}.bin").exists():
        manifest_path = prefix.parent / "manifest.json"   # a lone shard still gets its corpus's eos and vocab
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else None
        if manifest is not None:
            manifest = {k: v for k, v in manifest.items() if k != "splits"}
        return [(prefix.name, [prefix], manifest)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no shard (.bin/.idx), corpus directory or directory of corpora")
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = [n for split in ("train", "val") for n in manifest.get("splits", {}).get(split, {}).get("shards", [])]
        return [(path.name, [path / n for n in names], manifest)]
    shards = sorted({_prefix_of(p) for p in path.glob("*.idx")} | {_prefix_of(p) for p in path.glob("*.bin")})
    if shards:
        return [(path.name, shards, None)]
    corpora = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        corpora.extend(find_corpora(sub) if (sub / "manifest.json").is_file() or any(sub.glob("*.idx")) else [])
    if not corpora:
        raise FileNotFoundError(f"{path}: no shards found")
    return corpora


def corpus_stats(name, prefixes, manifest=None, eos_id=None, vocab_size=None, verify: bool = False) -> CorpusStats:
    if manifest is not None:
        eos_id = manifest.get("eos_id", eos_id) if eos_id is None else eos_id
        vocab_size = vocab_size or manifest.get("vocab_size")
    stats = CorpusStats(name, list(prefixes), [shard_stats(p, eos_id, vocab_size) for p in prefixes], manifest)
    stats.checked.append(".bin sizes match .idx, pointers consistent")
    if eos_id is not None:
        stats.checked.append(f"eos {eos_id} ends every document and only there")
    if vocab_size is not None:
        stats.checked.append(f"ids < vocab size {vocab_size}")
    if manifest is not None and "splits" in manifest:
        stats.checked.append("manifest counts match the shards")
    if manifest is not None and "splits" in manifest:
        for split in ("train", "val"):
            info = manifest["splits"][split]
            shards = [s for s in stats.shards if s.prefix.name in info["shards"]]
            docs, tokens = sum(s.documents for s in shards), sum(s.tokens for s in shards)
            if (docs, tokens) != (info["documents"], info["tokens"]):
                stats.problems.append(f"manifest says {split} has {info['documents']} documents / {info['tokens']} "
                                      f"tokens, the shards hold {docs} / {tokens}")
    shard_info = (manifest or {}).get("shard_info")
    if shard_info:
        stats.checked.append("sizes and sample digests as the manifest recorded" +
                             ("; sha256 of every .bin and .idx" if verify else ""))
        for shard in stats.shards:
            if shard.problems:   # it did not even open
                continue
            if shard.prefix.name not in shard_info:
                shard.problems.append("not listed in the manifest's shard_info")
                continue
            shard.problems.extend(verify_shard(shard.prefix, shard_info[shard.prefix.name], full=verify))
        if not verify:
            stats.notes.append("full sha256 not checked (--verify reads every byte)")
    elif manifest is not None:
        stats.notes.append("the manifest records no shard digests: sha256 check skipped")
    if eos_id is None:
        stats.notes.append("eos id unknown (no manifest, no tokenizer): eos check skipped")
    return stats


def sample_documents(stats: CorpusStats, n: int = 3, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    """`n` random documents (seeded): (shard name, index in shard, token ids)."""
    rng = np.random.default_rng(seed)
    good = [s for s in stats.shards if s.documents and not any("bytes" in p or "missing" in p for p in s.problems)]
    if not good:
        return []
    weights = np.array([s.documents for s in good], dtype=float)
    out = []
    for _ in range(n):
        shard = good[rng.choice(len(good), p=weights / weights.sum())]
        i = int(rng.integers(shard.documents))
        out.append((shard.prefix.name, i, np.array(IndexedDataset(shard.prefix)[i])))
    return out


def length_histogram(doc_lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram of tokens per document over power-of-two bins."""
    if not len(doc_lengths):
        return ["(no documents)"]
    top = int(np.ceil(np.log2(max(int(doc_lengths.max()), 1) + 1)))
    edges = [0] + [2 ** k for k in range(top + 1)]
    counts, _ = np.histogram(doc_lengths, bins=edges)
    peak = max(int(counts.max()), 1)
    lines = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        if c or lines:
            lines.append(f"{lo:>8,}-{hi - 1:<8,} {'#' * max(int(c) * width // peak, 1 if c else 0):<{width}} {int(c):,}")
    return lines


def describe_token(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    if not 0 <= token_id < tokenizer.vocab_size:
        return "(outside the vocabulary)"
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:   # a byte-fallback piece: part of a character; show the piece (<0xE7>) instead
        return tokenizer.id_to_piece(token_id)
    return repr(text)


def format_report(stats: CorpusStats, tokenizer=None, top: int = 15, samples: int = 3, seed: int = 0,
                  sample_chars: int = 300) -> str:
    lines = [f"== {stats.name}: {len(stats.shards)} shard(s) =="]
    dtypes = sorted({s.dtype for s in stats.shards if s.dtype})
    lines.append(f"documents {stats.documents:,}   tokens {stats.tokens:,}   dtype {','.join(dtypes) or '?'}")
    m = stats.manifest
    if m:
        for split in ("train", "val") if "splits" in m else ():
            info = m["splits"][split]
            cpt = info["chars"] / info["tokens"] if info["tokens"] else 0
            lines.append(f"  {split:5s} {len(info['shards'])} shard(s), {info['documents']:,} documents, "
                         f"{info['tokens']:,} tokens, {info['chars']:,} chars ({cpt:.2f} chars/token)")
        lines.append(f"  tokenizer sha256 {m.get('tokenizer_sha256', '?')[:16]}…  vocab {m.get('vocab_size')}  "
                     f"eos {m.get('eos_id')}  rejects {sum(m.get('rejects', {}).values())}")
    lengths = stats.doc_lengths
    if len(lengths):
        q = np.percentile(lengths, [50, 90, 99])
        lines.append(f"tokens per document: mean {lengths.mean():,.1f}  median {q[0]:,.0f}  p90 {q[1]:,.0f}  "
                     f"p99 {q[2]:,.0f}  min {lengths.min():,}  max {lengths.max():,}")
        lines.append("length histogram (tokens per document):")
        lines += ["  " + line for line in length_histogram(lengths)]
    counts = stats.token_counts
    if counts.sum():
        lines.append(f"top {top} tokens:")
        for token_id in np.argsort(-counts, kind="stable")[:top]:
            lines.append(f"  {int(token_id):>6}  {100 * counts[token_id] / counts.sum():5.2f}%  "
                         f"{describe_token(tokenizer, int(token_id))}")
    problems = stats.all_problems
    lines.append("check: " + (f"OK ({'; '.join(stats.checked)})" if not problems
                              else "FAILED\n" + "\n".join(f"  - {p}" for p in problems)))
    lines += [f"  note: {n}" for n in stats.notes]
    for shard, i, ids in sample_documents(stats, samples, seed):
        try:
            text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids[:80].tolist()))
        except ValueError as e:   # ids outside the vocabulary (already reported by the check)
            text = f"(cannot decode: {e})"
        cut = text[:sample_chars] + (f"… [{len(text) - sample_chars:,} more chars]" if len(text) > sample_chars else "")
        lines.append(f"--- sample {shard}[{i}] ({len(ids):,} tokens) ---")
        lines.append(cut)
    return "\n".join(lines)


def load_tokenizer(path, required: bool):
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        if required:
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return None
    from tokenizer import Tokenizer
    return Tokenizer.load(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_process.inspect_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="shard prefix (or its .bin/.idx), corpus directory, or directory of corpora")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir or .model to decode with (default: data/tokenizer if present)")
    parser.add_argument("--samples", type=int, default=3, help="random documents to decode (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sampled documents")
    parser.add_argument("--top", type=int, default=15, help="most frequent tokens to list")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per sampled document")
    parser.add_argument("--verify", action="store_true",
                        help="also check the sha256 of every .bin and .idx against the manifest (reads every byte)")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer or "data/tokenizer", required=args.tokenizer is not None)
        corpora = find_corpora(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = False
    for name, prefixes, manifest in corpora:
        if tokenizer is not None and manifest and manifest.get("tokenizer_sha256") != tokenizer.sha256:
            print(f"warning: {name} was tokenized with tokenizer {manifest.get('tokenizer_sha256', '?')[:16]}…, "
                  f"decoding with {tokenizer.sha256[:16]}…: pass --tokenizer with the right one", file=sys.stderr)
            decode_with = None
        else:
            decode_with = tokenizer
        eos = tokenizer.eos_id if tokenizer is not None and manifest is None else None
        vocab = tokenizer.vocab_size if tokenizer is not None and manifest is None else None
        stats = corpus_stats(name, prefixes, manifest, eos_id=eos, vocab_size=vocab, verify=args.verify)
        print(format_report(stats, decode_with, args.top, args.samples, args.seed, args.chars))
        print()
        failed |= bool(stats.all_problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
