"""The stage step: conversations -> curriculum-staged SFT CSVs, preference pairs -> DPO JSONL.

    data/sft/<stage>.csv, <stage>.val.csv        one per stage of recipe.sft.stages, in that (curriculum) order
    data/dpo/<stage>.jsonl, <stage>.val.jsonl     one per stage named by the "dpo" corpora (corpus name if none)
    data/rl/<task>.jsonl, <task>.val.jsonl        one per task named by the "rl" corpora (GRPO prompt sets)

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
RL JSONL lines (grpo.py): {"id", "source", "prompt": [messages, ends with user], "answer": the reference answer}:
the conversations of "rl" corpora (e.g. qa_jsonl on MedicalGPT's {question, answer} GRPO data), last assistant
turn = the answer. They pass the same read, clean and dedup steps (eval-set decontamination included) as SFT.

Records come from `docs_root/<corpus>/part-*.jsonl.zst` (CONTRACTS.md record format). A conversation with an empty
(or zero-width-only) turn keeps the complete user/assistant pairs before it, and one that renders longer than
recipe.sft.max_tokens keeps the complete pairs that fit; what was cut is counted by reason ("truncated",
"turns_cut"). A record that is malformed, or keeps no pair, is dropped, counted by reason and logged to
`<stage>.rejects.jsonl` beside the outputs. A stage that ends up with no row writes no CSV/JSONL (a warning names
each corpus and why it gave nothing); a stage none of whose corpora exist in docs_root is an error (the read or
dedup step has not run), and a stage no corpus feeds is skipped. The validation split is by a hash of the id (deterministic, stable
when other records come or go; a small stage that drew no validation row gets its smallest-hash row moved there,
so every stage of two or more rows can report a validation loss). Every file is written under a temporary name and renamed; a `<stage>.manifest.json`
written last records the inputs and settings and the outputs' sizes and sha256, so a re-run with the same inputs
keeps the finished stage only while its files are as written (a truncated or altered output is redone).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd

from data_process.executor import on_ray
from data_process.readers import is_blank, valid_prefix
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
    if any(is_blank(m["content"]) for m in turns):
        return "empty_turn"
    return None


class StageInputError(ValueError):
    """A stage whose corpora are all missing from docs_root: the step that makes them has not run."""


def fit_prefix(tok: Tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """The longest prefix of complete user/assistant pairs (system kept) that renders in at most `max_tokens`, and
    its token count; ([], 0) when not even the first pair fits. The chat template renders every message on its
    own, so a prefix's length is the sum of its messages' lengths (checked by rendering the prefix itself)."""
    lengths = [len(t.ids) for t in tok.render_chat_batch([[m] for m in messages])]
    start = 1 if messages[0]["role"] == "system" else 0
    total, best = sum(lengths[:start]), 0
    for end in range(start + 2, len(messages) + 1, 2):
        total += lengths[end - 2] + lengths[end - 1]
        if total > max_tokens:
            break
        best = end
    while best > start:
        n_tokens = len(tok.render_chat(messages[:best]).ids)
        if n_tokens <= max_tokens:
            return messages[:best], n_tokens
        best -= 2
    return [], 0


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


def _write_all(outputs: list, logs: list, produce, counts: dict) -> None:
    """Run produce(); commit every writer if it succeeds, drop every temporary file if it fails. A stage that
    produced no row commits only its logs: no empty or header-only output."""
    try:
        produce()
    except BaseException:
        for w in outputs + logs:
            w.file.abort()
        raise
    empty = counts["train"] + counts["val"] == 0
    for w in outputs:
        w.file.abort() if empty else w.commit()
    for w in logs:
        w.commit()


# ------------------------------------------------------------------------------------------------------- stages

def _inputs_fingerprint(docs_root: Path, corpora: list[str]) -> dict:
    return {name: corpus_fingerprint(docs_root / name) for name in corpora}


def _up_to_date(manifest_path: Path, fingerprint: dict, outputs: list[Path]) -> dict | None:
    """The manifest's counts when the stage is finished with these inputs and its outputs are as it recorded them
    (sizes and sha256: a truncated, edited or corrupted CSV/JSONL is redone, not trusted); else None."""
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    counts = manifest.get("counts")
    if manifest.get("fingerprint") != fingerprint or not isinstance(counts, dict):
        return None
    if counts.get("empty"):   # an empty stage has no outputs, and must not have stale ones
        return None if any(p.exists() for p in outputs) else counts
    # the outputs must be the ones this manifest recorded: a truncated or edited CSV is staged again
    recorded = manifest.get("outputs")
    problems = check_files(manifest_path.parent, recorded) if isinstance(recorded, dict) else []
    if problems or not isinstance(recorded, dict) or set(recorded) != {p.name for p in outputs}:
        print(f"stage: {problems[0] if problems else 'an older manifest'}; staging again", flush=True)
        return None
    return counts


def _units(kind: str, docs_root: Path, corpora: list[str], max_tokens: int, missing: list[str]) -> list[tuple]:
    """The stage's work units, in output order: one per dedup part of each corpus (its manifest checked here)."""
    units = []
    for name in corpora:
        d = docs_root / name
        if not d.is_dir():
            missing.append(name)
            continue
        # the parts its manifest lists, all there (else an error naming the step to run)
        units += [(kind, name, str(part), max_tokens) for part in checked_parts(d)]
    return units


def _outcomes(run_units, kind: str, docs_root: Path, corpora: list[str], max_tokens: int, counts: dict):
    """(corpus, outcome) for every record of `corpora`, in order; `run_units` maps units to their outcome lists."""
    units = _units(kind, docs_root, corpora, max_tokens, counts["missing_corpora"])
    for (_, corpus, _, _), outcomes in zip(units, run_units(units)):
        for outcome in outcomes:
            counts["seen"][corpus] += 1
            yield corpus, outcome


def _chunks(items, size: int = RENDER_CHUNK):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------- what each record becomes
# A pure function of the record (and the tokenizer), so it runs wherever the engine puts it: in this process on
# the local engine (SentencePiece's threads render the conversations) or as one Ray task per dedup part; the
# driver then writes the rows in order, so the outputs are the same bytes either way.

def _sft_outcomes(tok: Tokenizer, records, max_tokens: int, num_threads: int = -1) -> Iterator[tuple]:
    """Yields (record id, reject reason or None, n_tokens, messages, turns cut at an empty turn, turns cut to fit)."""
    for chunk in _chunks(records):
        checked = []
        for record in chunk:
            messages = record.get("messages")
            reason = "not_a_conversation" if record.get("kind") != "conv" else check_conversation(messages)
            cut = 0
            if reason == "empty_turn":   # keep the complete pairs before the first empty turn
                kept, cut = valid_prefix(messages)
                if any(m["role"] == "assistant" for m in kept):
                    messages, reason = kept, None
            checked.append((record, messages, reason, cut))
        rendered = iter(tok.render_chat_batch([m for _, m, reason, _ in checked if reason is None],
                                              num_threads=num_threads))
        for record, messages, reason, cut in checked:
            n_tokens = len(next(rendered).ids) if reason is None else 0
            fit_cut = 0
            if reason is None and n_tokens > max_tokens:   # keep the complete pairs that fit
                kept, kept_tokens = fit_prefix(tok, messages, max_tokens)
                if kept:
                    fit_cut = len(messages) - len(kept)
                    messages, n_tokens = kept, kept_tokens
                else:
                    reason = "too_long"
            yield record.get("id"), reason, n_tokens, messages, cut, fit_cut


def _dpo_outcomes(tok: Tokenizer, records, max_tokens: int, num_threads: int = -1) -> Iterator[tuple]:
    """Yields (record id, reject reason or None, n_tokens, the record)."""
    for record in records:
        prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
        if record.get("kind") != "pref":
            reason = "not_a_preference_pair"
        elif not isinstance(chosen, str) or not isinstance(rejected, str):
            reason = "malformed"
        else:
            reason = check_prompt(prompt)
        if reason is None:
            if is_blank(chosen) or is_blank(rejected):
                reason = "empty_response"
            elif chosen == rejected:
                reason = "chosen_equals_rejected"
        n_tokens = 0
        if reason is None:   # the longer of the two full conversations must fit
            n_tokens = max(len(tok.render_chat(prompt + [{"role": "assistant", "content": r}]).ids)
                           for r in (chosen, rejected))
            if n_tokens > max_tokens:
                reason = "too_long"
        yield record.get("id"), reason, n_tokens, record


def _rl_outcomes(tok: Tokenizer, records, max_tokens: int, num_threads: int = -1) -> Iterator[tuple]:
    """Yields (record id, reject reason or None, n_tokens of the prompt, messages)."""
    for record in records:
        messages = record.get("messages")
        reason = "not_a_conversation" if record.get("kind") != "conv" else check_conversation(messages)
        n_tokens = 0
        if reason is None:
            n_tokens = len(tok.render_chat(messages[:-1], add_generation_prompt=True).ids)
            if n_tokens > max_tokens:
                reason = "too_long"
        yield record.get("id"), reason, n_tokens, messages


OUTCOMES = {"sft": _sft_outcomes, "dpo": _dpo_outcomes, "rl": _rl_outcomes}


def part_outcomes(tok: Tokenizer, unit: tuple, num_threads: int = -1) -> Iterator[tuple]:
    """The outcome of every record of one unit (kind, corpus, part file, max_tokens), in order, as they come."""
    kind, _, part, max_tokens = unit
    return OUTCOMES[kind](tok, iter_records([Path(part)]), max_tokens, num_threads)


_worker_tokenizer = None   # in an engine's worker process: the tokenizer, loaded once


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _part_task(unit: tuple) -> list[tuple]:
    return list(part_outcomes(_worker_tokenizer, unit, num_threads=1))   # one CPU per task: no thread pool of its own


def unit_runner(tok: Tokenizer, tokenizer_dir=None, executor=None):
    """units -> their outcomes in order: as tasks of a Ray `executor` (a list per part), else here, streamed."""
    if on_ray(executor):
        return lambda units: executor.map(_part_task, units, ordered=True, initializer=_init_worker,
                                          initargs=(str(tokenizer_dir),),
                                          describe=lambda u: f"stage {u[0]}: {u[1]} part {Path(u[2]).name}")
    return lambda units: (part_outcomes(tok, unit) for unit in units)


def _new_counts() -> dict:
    return {"train": 0, "val": 0, "rejected": Counter(), "sources": Counter(), "missing_corpora": [],
            "seen": Counter(), "rejected_by_corpus": {}}


def _plain(counts: dict) -> dict:
    """The counts as the summary and manifest keep them (Counters as dicts)."""
    out = {k: dict(v) if isinstance(v, Counter) else v for k, v in counts.items()}
    out["rejected_by_corpus"] = {c: dict(v) for c, v in counts["rejected_by_corpus"].items()}
    return out


def _reject(counts: dict, rejects, rid: str, corpus: str, reason: str, n_tokens: int, max_tokens: int,
            what) -> None:
    """Count a rejected record by reason and log it with its detail (the token count, or the record itself)."""
    counts["rejected"][reason] += 1
    counts["rejected_by_corpus"].setdefault(corpus, Counter())[reason] += 1
    rejects.add({"id": rid, "source": corpus, "reason": reason,
                 "detail": f"{n_tokens} tokens > {max_tokens}" if reason == "too_long" else str(what)[:200]})


def stage_sft(tok: Tokenizer, docs_root: Path, corpora: list[str], out_dir: Path, stage: str,
              max_tokens: int, val_fraction: float, run_units=None) -> dict:
    """Write out_dir/<stage>.csv and <stage>.val.csv from the conversations of `corpora`; returns counts.
    `run_units` (unit_runner's) says where the per-record work runs; default: here."""
    counts = {**_new_counts(), "train_tokens": 0, "val_tokens": 0, "truncated": Counter(), "turns_cut": Counter()}
    train, val = _CsvWriter(out_dir / f"{stage}.csv"), _CsvWriter(out_dir / f"{stage}.val.csv")
    rejects = _JsonlWriter(out_dir / f"{stage}.rejects.jsonl")

    def produce():
        for corpus, outcome in _outcomes(run_units or unit_runner(tok), "sft", docs_root, corpora, max_tokens,
                                         counts):
            add(corpus, *outcome)
        moved = _ensure_one_val(train, val, counts, val_fraction)
        if moved is not None:
            counts["train_tokens"] -= moved["n_tokens"]
            counts["val_tokens"] += moved["n_tokens"]

    def add(corpus, record_id, reason, n_tokens, messages, empty_cut, fit_cut):
        rid = f"{corpus}:{record_id}"
        if fit_cut:
            counts["truncated"]["too_long"] += 1
            counts["turns_cut"]["too_long"] += fit_cut
        if reason is not None:
            _reject(counts, rejects, rid, corpus, reason, n_tokens, max_tokens, messages)
            return
        if empty_cut:
            counts["truncated"]["empty_turn"] += 1
            counts["turns_cut"]["empty_turn"] += empty_cut
        has_system = messages[0]["role"] == "system"
        row = {"id": rid, "source": corpus, "system": messages[0]["content"] if has_system else "",
               "conversation": json.dumps(messages[1:] if has_system else messages, ensure_ascii=False),
               "answer": messages[-1]["content"], "n_tokens": n_tokens}
        split = "val" if is_val(rid, val_fraction) else "train"
        (val if split == "val" else train).add(row)
        counts[split] += 1
        counts[f"{split}_tokens"] += n_tokens
        counts["sources"][corpus] += 1

    _write_all([train, val], [rejects], produce, counts)
    return _plain(counts)


def stage_dpo(tok: Tokenizer, docs_root: Path, corpora: list[str], out_dir: Path, stage: str,
              max_tokens: int, val_fraction: float, run_units=None) -> dict:
    """Write out_dir/<stage>.jsonl and <stage>.val.jsonl from the preference pairs of `corpora`; returns counts."""
    counts = _new_counts()
    train, val = _JsonlWriter(out_dir / f"{stage}.jsonl"), _JsonlWriter(out_dir / f"{stage}.val.jsonl")
    rejects = _JsonlWriter(out_dir / f"{stage}.rejects.jsonl")

    def produce():
        for corpus, (record_id, reason, n_tokens, record) in _outcomes(run_units or unit_runner(tok), "dpo",
                                                                      docs_root, corpora, max_tokens, counts):
            rid = f"{corpus}:{record_id}"
            if reason is not None:
                _reject(counts, rejects, rid, corpus, reason, n_tokens, max_tokens, record)
                continue
            split = "val" if is_val(rid, val_fraction) else "train"
            (val if split == "val" else train).add({"id": rid, "source": corpus, "prompt": record["prompt"],
                                                    "chosen": record["chosen"], "rejected": record["rejected"]})
            counts[split] += 1
            counts["sources"][corpus] += 1
        _ensure_one_val(train, val, counts, val_fraction)

    _write_all([train, val], [rejects], produce, counts)
    return _plain(counts)


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


def _corpus_note(corpus: str, counts: dict, docs_root: Path, data_dir: Path) -> str:
    """Why `corpus` gave a stage no row: missing, no records (with what the read step said), or all rejected."""
    if corpus in counts["missing_corpora"]:
        return f"{corpus}: {docs_root / corpus} does not exist"
    seen = counts["seen"].get(corpus, 0)
    if seen:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts["rejected_by_corpus"].get(corpus, {}).items(),
                                                            key=lambda kv: -kv[1]))
        return f"{corpus}: all {seen} record(s) rejected here ({reasons})"
    note = f"{corpus}: no records in {docs_root / corpus}"
    try:
        read = json.loads((data_dir / "clean" / corpus / "manifest.json").read_text(encoding="utf-8"))["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return note
    if read.get("files") == 0:
        return note + " (read step: no input file matched the corpus paths)"
    if read.get("kept") == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in read.get("rejected_by_reason", {}).items())
        return note + (f" (read step: all {read.get('read')} rejected: {reasons}; see "
                       f"{data_dir / 'rejects' / (corpus + '.jsonl')})")
    return note + f" (the read step kept {read.get('kept')}: dedup removed them all)"


def _summary_line(kind: str, stage: str, corpora: list[str], counts: dict) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items())
    rejected = f"; rejected: {rejected}" if rejected else ("" if counts.get("empty") else "; rejected: none")
    missing = f"; missing corpora: {counts['missing_corpora']}" if counts["missing_corpora"] else ""
    truncated = ", ".join(f"{k} {v} ({counts['turns_cut'][k]} turns)" for k, v in counts.get("truncated", {}).items())
    truncated = f"; truncated: {truncated}" if truncated else ""
    return (f"stage: {kind}/{stage}: {counts['train']} train + {counts['val']} val from {corpora}"
            f"{rejected}{truncated}{missing} ({counts.get('seconds', 0)}s)")


def run(recipe, docs_root, tokenizer_dir, data_dir, executor=None) -> dict:
    """The pipeline's stage step. Returns {"sft": {stage: counts}, "dpo": {stage: counts}} for the run summary.
    On a Ray `executor` each dedup part's records are checked and rendered by a Ray task; the rows are written
    here, in the same order, so the files are the local engine's bytes."""
    docs_root, data_dir = Path(docs_root), Path(data_dir)
    sft_groups, dpo_groups = _stage_groups(recipe)
    rl_groups = _rl_groups(recipe)
    no_input = [f"{kind}/{stage} (corpora {corpora})"
                for kind, groups in (("sft", sft_groups), ("dpo", dpo_groups), ("rl", rl_groups))
                for stage, corpora in groups.items() if corpora and not any((docs_root / c).is_dir() for c in corpora)]
    if no_input:
        raise StageInputError(f"stage step: no input at all for {', '.join(no_input)}: none of their corpora is in "
                              f"{docs_root}; run the read and dedup steps first (python data_process.py --steps "
                              f"read,dedup)")
    tok = Tokenizer.load(tokenizer_dir)
    run_units = unit_runner(tok, tokenizer_dir, executor)
    settings = {"max_tokens": recipe.sft.max_tokens, "val_fraction": recipe.sft.val_fraction,
                "tokenizer_sha256": tok.sha256}
    summary: dict = {"sft": {}, "dpo": {}, "rl": {}}
    for kind, groups, stage_fn, ext in (("sft", sft_groups, stage_sft, ".csv"), ("dpo", dpo_groups, stage_dpo, ".jsonl"),
                                        ("rl", rl_groups, stage_rl, ".jsonl")):
        if kind == "rl" and not groups:
            continue
        out_dir = data_dir / kind
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp-*"):   # left by a killed run
            stale.unlink(missing_ok=True)
        for stage, corpora in groups.items():
            t0 = time.time()
            manifest_path = out_dir / f"{stage}.manifest.json"
            outputs = [out_dir / f"{stage}{ext}", out_dir / f"{stage}.val{ext}"]
            if not corpora:   # a curriculum stage this recipe does not use
                for stale in outputs + [manifest_path]:
                    stale.unlink(missing_ok=True)
                print(f"stage: {kind}/{stage}: no corpus in the recipe feeds it, skipped", flush=True)
                continue
            fingerprint = {**settings, "corpora": corpora, "inputs": _inputs_fingerprint(docs_root, corpora)}
            counts = _up_to_date(manifest_path, fingerprint, outputs)
            if counts is not None:
                print(f"stage: {kind}/{stage} is up to date, kept", flush=True)
            else:
                manifest_path.unlink(missing_ok=True)   # outputs are about to change
                counts = stage_fn(tok, docs_root, corpora, out_dir, stage, recipe.sft.max_tokens,
                                  recipe.sft.val_fraction, run_units)
                counts["seconds"] = round(time.time() - t0, 2)
                if counts["train"] + counts["val"] == 0:
                    for stale in outputs:
                        stale.unlink(missing_ok=True)
                    counts["empty"] = [_corpus_note(c, counts, docs_root, data_dir) for c in corpora]
                recorded = {} if counts.get("empty") else describe_files(out_dir, [p.name for p in outputs])
                atomic_write_json(manifest_path, {"fingerprint": fingerprint, "counts": counts, "outputs": recorded},
                                  indent=2)
                print(_summary_line(kind, stage, corpora, counts), flush=True)
            if counts.get("empty"):
                print(f"warning: stage {kind}/{stage} is empty, no {kind}/{stage}{ext} written: "
                      + "; ".join(counts["empty"]), flush=True)
            summary[kind][stage] = counts
    return summary


# ------------------------------------------------------------------------------------------------ RL prompt sets

def check_rl_item(record) -> str | None:
    """None if `record` is a usable RL prompt {prompt: [messages ending with user], answer: non-empty str}."""
    if not isinstance(record, dict):
        return "malformed"
    reason = check_prompt(record.get("prompt"))
    if reason is not None:
        return reason
    answer = record.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        return "no_answer"
    return None


def read_rl_jsonl(path) -> tuple[list[dict], dict]:
    """RL prompts of a JSONL file: staged lines {id, source, prompt, answer} (stage_rl), or MedicalGPT's GRPO
    layout {question, answer} as it is (the question becomes one user turn). -> (records, rejects by reason);
    a bad line is counted and logged (the first few), never fatal."""
    import logging
    log = logging.getLogger("stage")
    records, rejects = [], Counter()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                reason, r = "bad_json", None
                detail = str(e)
            else:
                if isinstance(r, dict) and "prompt" not in r and isinstance(r.get("question"), str):
                    r = {**r, "prompt": [{"role": "user", "content": r["question"]}]}
                if isinstance(r, dict) and isinstance(r.get("answer"), (int, float)) and not isinstance(r["answer"], bool):
                    r["answer"] = str(r["answer"])
                reason = check_rl_item(r)
                detail = str(r)[:120]
            if reason is not None:
                rejects[reason] += 1
                if rejects[reason] <= 3:
                    log.warning("%s:%d rejected (%s): %s", path, lineno, reason, detail)
                continue
            records.append({**r, "id": str(r.get("id", f"{Path(path).name}:{lineno}"))})
    return records, dict(rejects)


def _rl_groups(recipe) -> dict[str, list[str]]:
    """{task: [corpus names in recipe order]} of the "rl" corpora (task = their stage, or the corpus name)."""
    groups: dict[str, list[str]] = {}
    for c in recipe.corpora:
        if c.role == "rl":
            groups.setdefault(c.stage or c.name, []).append(c.name)
    return groups


def stage_rl(tok: Tokenizer, docs_root: Path, corpora: list[str], out_dir: Path, stage: str,
             max_tokens: int, val_fraction: float, run_units=None) -> dict:
    """Write out_dir/<stage>.jsonl and <stage>.val.jsonl (RL prompt sets) from the conversations of `corpora`:
    prompt = every turn before the last, answer = the last assistant turn. Rejects (counted, logged to
    <stage>.rejects.jsonl): not a conversation, malformed, empty turn, a prompt longer than max_tokens."""
    counts = _new_counts()
    train, val = _JsonlWriter(out_dir / f"{stage}.jsonl"), _JsonlWriter(out_dir / f"{stage}.val.jsonl")
    rejects = _JsonlWriter(out_dir / f"{stage}.rejects.jsonl")

    def produce():
        for corpus, (record_id, reason, n_tokens, messages) in _outcomes(run_units or unit_runner(tok), "rl",
                                                                        docs_root, corpora, max_tokens, counts):
            rid = f"{corpus}:{record_id}"
            if reason is not None:
                _reject(counts, rejects, rid, corpus, reason, n_tokens, max_tokens, messages)
                continue
            split = "val" if is_val(rid, val_fraction) else "train"
            (val if split == "val" else train).add(
                {"id": rid, "source": corpus, "prompt": messages[:-1], "answer": messages[-1]["content"]})
            counts[split] += 1
            counts["sources"][corpus] += 1
        _ensure_one_val(train, val, counts, val_fraction)

    _write_all([train, val], [rejects], produce, counts)
    return _plain(counts)
