"""The stage step: conversations -> curriculum-staged SFT CSVs, preference pairs -> DPO JSONL.

    data/sft/<stage>.csv, <stage>.val.csv        one per stage of recipe.sft.stages, in that (curriculum) order
    data/dpo/<stage>.jsonl, <stage>.val.jsonl     one per stage named by the "dpo" corpora (corpus name if none)

SFT CSV columns (pandas; read them back with `read_sft_csv`, which keeps empty strings and parses the turns, or
`read_sft_conversations`, the trainers' tolerant view; DPO files with `read_dpo_pairs`):
    id            "<corpus>:<record id>", unique across corpora
    source        corpus name
    system        system prompt ("" if none)
    conversation  JSON list of {"role", "content"} turns after the system prompt: user/assistant alternating,
                  ending with the final assistant turn (`row_messages(row)` rebuilds the full message list)
    answer        the final assistant content
    n_tokens      length of the conversation rendered with the chat template (tokenizer.render_chat)
DPO JSONL lines: {"id", "source", "prompt": [messages, optional system first, ends with user], "chosen": str,
"rejected": str}.

Records come from `docs_root/<corpus>/part-*.jsonl.zst` (CONTRACTS.md record format). A record that is malformed,
has an empty turn or renders longer than recipe.sft.max_tokens is dropped, counted by reason and logged to
`<stage>.rejects.jsonl` beside the outputs. The validation split is by a hash of the id (deterministic, stable
when other records come or go; a small stage that drew no validation row gets its smallest-hash row moved there,
so every stage of two or more rows can report a validation loss). Every file is written under a temporary name and renamed; a `<stage>.manifest.json`
written last records the inputs and settings, so a re-run with the same ones keeps the finished stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from data_process.records import checked_parts, corpus_fingerprint, iter_records
from fileio import AtomicWriter, atomic_write_json, check_files, describe_files
from tokenizer import Tokenizer

log = logging.getLogger("stage")

SFT_COLUMNS = ["id", "source", "system", "conversation", "answer", "n_tokens"]
CSV_CHUNK_ROWS = 10_000     # rows per pandas write: memory stays bounded whatever the corpus size
RENDER_CHUNK = 1024         # conversations rendered per render_chat_batch call (SentencePiece's threads)


def id_hash(record_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "big")


def is_val(record_id: str, val_fraction: float) -> bool:
    """Deterministic held-out split: the first 8 bytes of blake2b(id) as a fraction of 2**64."""
    return id_hash(record_id) < val_fraction * 2.0 ** 64


def check_conversation(messages) -> str | None:
    """None if `messages` is a well-formed SFT conversation, else the reject reason.

    Well-formed: optional system first, then user/assistant alternating from user, ending with assistant;
    user and assistant contents non-blank."""
    if not isinstance(messages, list) or not messages:
        return "malformed"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            return "malformed"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns or len(turns) % 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        return "malformed"
    if any(not m["content"].strip() for m in turns):
        return "empty_turn"
    return None


def check_prompt(prompt) -> str | None:
    """None if `prompt` is a well-formed DPO prompt (optional system, alternating turns, ends with user)."""
    if not isinstance(prompt, list) or not prompt:
        return "malformed"
    reason = check_conversation(prompt + [{"role": "assistant", "content": "x"}])
    return reason


def row_messages(row) -> list[dict]:
    """The full message list of a read_sft_csv row (system prompt, if any, first)."""
    turns = row["conversation"]
    turns = json.loads(turns) if isinstance(turns, str) else turns
    return ([{"role": "system", "content": row["system"]}] if row["system"] else []) + turns


def _sft_frame(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} not found (run `python data_process.py` to stage it)")
    df = pd.read_csv(path, dtype={c: str for c in SFT_COLUMNS if c != "n_tokens"}, keep_default_na=False,
                     encoding="utf-8")
    missing = [c for c in ("id", "system", "conversation") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (a staged SFT CSV has {SFT_COLUMNS})")
    return df


def read_sft_csv(path) -> pd.DataFrame:
    """Read a staged SFT CSV: text columns stay str (empty system prompts stay "", not NaN), `conversation`
    parsed. Strict: a row that is not JSON raises (read_sft_conversations is the trainer's tolerant view)."""
    df = _sft_frame(path)
    df["conversation"] = df["conversation"].map(json.loads)
    if "n_tokens" in df.columns:
        df["n_tokens"] = df["n_tokens"].astype("int64")
    return df


def read_sft_conversations(path) -> tuple[list[list[dict]], dict[str, int]]:
    """Every conversation of a staged SFT CSV as its full message list (system first), plus reject counts by
    reason: a row that is not a well-formed conversation (say, edited by hand) is counted and logged, never fatal."""
    conversations, rejects = [], Counter()
    for row in _sft_frame(path).to_dict("records"):
        try:
            messages = row_messages(row)
            reason = check_conversation(messages)
        except ValueError as e:   # json.JSONDecodeError
            reason, messages = "bad_json", e
        if reason is None:
            conversations.append(messages)
            continue
        rejects[reason] += 1
        if rejects[reason] <= 3:
            log.warning("%s: row id %s rejected (%s)%s", path, row.get("id"), reason,
                        f": {messages}" if reason == "bad_json" else "")
    return conversations, dict(rejects)


def read_dpo_pairs(paths) -> tuple[list[dict], dict[str, int]]:
    """Preference records from staged DPO JSONL files (ids default to `<file>:<line>`), plus reject counts by
    reason: a malformed line is counted and logged, never fatal."""
    records, rejects = [], Counter()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    reason = None if isinstance(r, dict) else "malformed"
                except ValueError:
                    r, reason = None, "bad_json"
                if reason is None:
                    reason = check_prompt(r.get("prompt"))
                if reason is None and not (isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str)):
                    reason = "malformed"
                if reason is None:
                    records.append({**r, "id": str(r.get("id", f"{Path(path).name}:{lineno}"))})
                    continue
                rejects[reason] += 1
                if rejects[reason] <= 3:
                    log.warning("%s:%d rejected (%s): needs prompt (messages ending with user), chosen (str), "
                                "rejected (str)", path, lineno, reason)
    return records, dict(rejects)


def read_dpo_jsonl(path) -> list[dict]:
    """Strict form of read_dpo_pairs for one staged file: any malformed line raises."""
    records, rejects = read_dpo_pairs([path])
    if rejects:
        raise ValueError(f"{path}: malformed lines {rejects}")
    return records


# ------------------------------------------------------------------------------------------------------- writers

class _CsvWriter:
    def __init__(self, path: Path):
        self.file = AtomicWriter(path, "w", encoding="utf-8", newline="")
        self.rows: list[dict] = []
        self.header = True

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= CSV_CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        pd.DataFrame(self.rows, columns=SFT_COLUMNS).to_csv(self.file.f, index=False, header=self.header,
                                                            lineterminator="\n")
        self.header = False
        self.rows = []

    def commit(self) -> None:
        if self.rows or self.header:
            self._flush()
        self.file.commit()


class _JsonlWriter:
    def __init__(self, path: Path):
        self.file = AtomicWriter(path, "w", encoding="utf-8", newline="")
        self.rows: list[dict] = []
        self.header = True   # nothing written yet (as _CsvWriter)

    def add(self, obj: dict) -> None:
        self.rows.append(obj)
        if len(self.rows) >= CSV_CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        self.file.f.writelines(json.dumps(obj, ensure_ascii=False) + "\n" for obj in self.rows)
        self.header = False
        self.rows = []

    def commit(self) -> None:
        self._flush()
        self.file.commit()


def _ensure_one_val(train, val, counts: dict, val_fraction: float):
    """A small stage (a few hundred rows or less) often draws no validation row at all, which leaves training
    without a validation loss; then the train row with the smallest id hash moves to validation. Returns it."""
    if val_fraction > 0 and counts["val"] == 0 and counts["train"] >= 2 and train.header:   # all rows still buffered
        row = min(train.rows, key=lambda r: id_hash(r["id"]))
        train.rows.remove(row)
        val.add(row)
        counts["train"] -= 1
        counts["val"] += 1
        return row
    return None


def _write_all(writers: list, produce) -> None:
    """Run produce(); commit every writer if it succeeds, drop every temporary file if it fails."""
    try:
        produce()
    except BaseException:
        for w in writers:
            w.file.abort()
        raise
    for w in writers:
        w.commit()


# ------------------------------------------------------------------------------------------------------- stages

def _inputs_fingerprint(docs_root: Path, corpora: list[str]) -> dict:
    return {name: corpus_fingerprint(docs_root / name) for name in corpora}


def _up_to_date(manifest_path: Path, fingerprint: dict, outputs: list[Path]) -> dict | None:
    if not manifest_path.is_file() or not all(p.is_file() for p in outputs):
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    # the outputs must be the ones this manifest recorded: a truncated or edited CSV is staged again
    problems = check_files(manifest_path.parent, manifest.get("outputs", {}))
    if problems or "outputs" not in manifest:
        print(f"stage: {problems[0] if problems else 'an older manifest'}; staging again", flush=True)
        return None
    return manifest.get("counts")


def _records(docs_root: Path, corpora: list[str], missing: list[str]):
    for name in corpora:
        d = docs_root / name
        if not d.is_dir():
            missing.append(name)
            continue
        for record in iter_records(checked_parts(d)):   # the parts its manifest lists, all there (else an error)
            yield name, record


def _chunks(items, size: int = RENDER_CHUNK):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _reject(counts: dict, rejects, rid: str, corpus: str, reason: str, n_tokens: int, max_tokens: int,
            what) -> None:
    """Count a rejected record by reason and log it with its detail (the token count, or the record itself)."""
    counts["rejected"][reason] += 1
    rejects.add({"id": rid, "source": corpus, "reason": reason,
                 "detail": f"{n_tokens} tokens > {max_tokens}" if reason == "too_long" else str(what)[:200]})


def stage_sft(tok: Tokenizer, docs_root: Path, corpora: list[str], out_dir: Path, stage: str,
              max_tokens: int, val_fraction: float) -> dict:
    """Write out_dir/<stage>.csv and <stage>.val.csv from the conversations of `corpora`; returns counts."""
    counts = {"train": 0, "val": 0, "train_tokens": 0, "val_tokens": 0, "rejected": Counter(),
              "sources": Counter(), "missing_corpora": []}
    train, val = _CsvWriter(out_dir / f"{stage}.csv"), _CsvWriter(out_dir / f"{stage}.val.csv")
    rejects = _JsonlWriter(out_dir / f"{stage}.rejects.jsonl")

    def produce():
        for chunk in _chunks(_records(docs_root, corpora, counts["missing_corpora"])):
            checked = []
            for corpus, record in chunk:
                messages = record.get("messages")
                reason = "not_a_conversation" if record.get("kind") != "conv" else check_conversation(messages)
                checked.append((corpus, record, messages, reason))
            rendered = iter(tok.render_chat_batch([m for _, _, m, reason in checked if reason is None]))
            for corpus, record, messages, reason in checked:
                handle(corpus, record, messages, reason, len(next(rendered).ids) if reason is None else 0)
        moved = _ensure_one_val(train, val, counts, val_fraction)
        if moved is not None:
            counts["train_tokens"] -= moved["n_tokens"]
            counts["val_tokens"] += moved["n_tokens"]

    def handle(corpus, record, messages, reason, n_tokens):
        rid = f"{corpus}:{record.get('id')}"
        if reason is None and n_tokens > max_tokens:
            reason = "too_long"
        if reason is not None:
            _reject(counts, rejects, rid, corpus, reason, n_tokens, max_tokens, messages)
            return
        has_system = messages[0]["role"] == "system"
        row = {"id": rid, "source": corpus, "system": messages[0]["content"] if has_system else "",
               "conversation": json.dumps(messages[1:] if has_system else messages, ensure_ascii=False),
               "answer": messages[-1]["content"], "n_tokens": n_tokens}
        split = "val" if is_val(rid, val_fraction) else "train"
        (val if split == "val" else train).add(row)
        counts[split] += 1
        counts[f"{split}_tokens"] += n_tokens
        counts["sources"][corpus] += 1

    _write_all([train, val, rejects], produce)
    return {**counts, "rejected": dict(counts["rejected"]), "sources": dict(counts["sources"])}


def stage_dpo(tok: Tokenizer, docs_root: Path, corpora: list[str], out_dir: Path, stage: str,
              max_tokens: int, val_fraction: float) -> dict:
    """Write out_dir/<stage>.jsonl and <stage>.val.jsonl from the preference pairs of `corpora`; returns counts."""
    counts = {"train": 0, "val": 0, "rejected": Counter(), "sources": Counter(), "missing_corpora": []}
    train, val = _JsonlWriter(out_dir / f"{stage}.jsonl"), _JsonlWriter(out_dir / f"{stage}.val.jsonl")
    rejects = _JsonlWriter(out_dir / f"{stage}.rejects.jsonl")

    def produce():
        for corpus, record in _records(docs_root, corpora, counts["missing_corpora"]):
            rid = f"{corpus}:{record.get('id')}"
            prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
            if record.get("kind") != "pref":
                reason = "not_a_preference_pair"
            elif not isinstance(chosen, str) or not isinstance(rejected, str):
                reason = "malformed"
            else:
                reason = check_prompt(prompt)
            if reason is None:
                if not chosen.strip() or not rejected.strip():
                    reason = "empty_response"
                elif chosen == rejected:
                    reason = "chosen_equals_rejected"
            n_tokens = 0
            if reason is None:   # the longer of the two full conversations must fit
                n_tokens = max(len(tok.render_chat(prompt + [{"role": "assistant", "content": r}]).ids)
                               for r in (chosen, rejected))
                if n_tokens > max_tokens:
                    reason = "too_long"
            if reason is not None:
                _reject(counts, rejects, rid, corpus, reason, n_tokens, max_tokens, record)
                continue
            split = "val" if is_val(rid, val_fraction) else "train"
            (val if split == "val" else train).add(
                {"id": rid, "source": corpus, "prompt": prompt, "chosen": chosen, "rejected": rejected})
            counts[split] += 1
            counts["sources"][corpus] += 1
        _ensure_one_val(train, val, counts, val_fraction)

    _write_all([train, val, rejects], produce)
    return {**counts, "rejected": dict(counts["rejected"]), "sources": dict(counts["sources"])}


def _stage_groups(recipe) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """{stage: [corpus names in recipe order]} for SFT (in recipe.sft.stages order) and DPO."""
    sft = {stage: [] for stage in recipe.sft.stages}
    dpo: dict[str, list[str]] = {}
    for c in recipe.corpora:
        if c.role == "sft":
            if c.stage not in sft:
                raise ValueError(f"corpus {c.name!r}: SFT stage {c.stage!r} is not one of [sft] stages "
                                 f"{recipe.sft.stages}")
            sft[c.stage].append(c.name)
        elif c.role == "dpo":
            dpo.setdefault(c.stage or c.name, []).append(c.name)
    return sft, dpo


def run(recipe, docs_root, tokenizer_dir, data_dir) -> dict:
    """The pipeline's stage step. Returns {"sft": {stage: counts}, "dpo": {stage: counts}} for the run summary."""
    docs_root, data_dir = Path(docs_root), Path(data_dir)
    tok = Tokenizer.load(tokenizer_dir)
    sft_groups, dpo_groups = _stage_groups(recipe)
    settings = {"max_tokens": recipe.sft.max_tokens, "val_fraction": recipe.sft.val_fraction,
                "tokenizer_sha256": tok.sha256}
    summary: dict = {"sft": {}, "dpo": {}}
    for kind, groups, stage_fn, ext in (("sft", sft_groups, stage_sft, ".csv"), ("dpo", dpo_groups, stage_dpo, ".jsonl")):
        out_dir = data_dir / kind
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp-*"):   # left by a killed run
            stale.unlink(missing_ok=True)
        for stage, corpora in groups.items():
            t0 = time.time()
            fingerprint = {**settings, "corpora": corpora, "inputs": _inputs_fingerprint(docs_root, corpora)}
            manifest_path = out_dir / f"{stage}.manifest.json"
            outputs = [out_dir / f"{stage}{ext}", out_dir / f"{stage}.val{ext}"]
            counts = _up_to_date(manifest_path, fingerprint, outputs)
            if counts is not None:
                print(f"stage: {kind}/{stage} is up to date, kept", flush=True)
            else:
                manifest_path.unlink(missing_ok=True)   # outputs are about to change
                counts = stage_fn(tok, docs_root, corpora, out_dir, stage, recipe.sft.max_tokens,
                                  recipe.sft.val_fraction)
                counts["seconds"] = round(time.time() - t0, 2)
                atomic_write_json(manifest_path, {"fingerprint": fingerprint, "counts": counts,
                                                  "outputs": describe_files(out_dir, [p.name for p in outputs])}, indent=2)
                rejected = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items()) or "none"
                missing = f"; missing corpora: {counts['missing_corpora']}" if counts["missing_corpora"] else ""
                print(f"stage: {kind}/{stage}: {counts['train']} train + {counts['val']} val from {corpora}; "
                      f"rejected: {rejected}{missing} ({counts['seconds']}s)", flush=True)
            summary[kind][stage] = counts
    return summary
