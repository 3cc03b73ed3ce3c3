"""The pipeline runner: read -> dedup -> tokenizer -> tokenize -> stage, driven by a recipe.

`run(recipe, steps, workers, force)` runs the named steps in order and writes `data/summary.json` (one section per
step). This module implements the `read` step; the later steps are the contract functions of CONTRACTS.md
("Pipeline steps"), imported lazily so `--steps read` works on its own.

The read step, per corpus:
- plans work units: one per file, and big uncompressed line-based files cut into `chunk_bytes` byte ranges at
  line boundaries (so one 5 GB JSONL uses every worker). Units depend only on the inputs and `chunk_bytes`,
  never on the worker count, which makes the output identical whatever `--workers` is;
- runs the units in a process pool: each streams its records through the reader and the cleaner and writes
  `unit-NNNNN.jsonl.zst`, its rejects and its counts into a staging folder (each file atomically, counts last);
- when all units of a corpus are done, moves them into `data/clean/<corpus>/part-NNNNN.jsonl.zst`, writes
  `data/rejects/<corpus>.jsonl`, and writes `manifest.json` last, with a fingerprint of the inputs (name,
  size, mtime; or sha256 with `[run] fingerprint = "content"`), the settings and the reader/cleaner code, and
  each part's size and sha256. A manifest with a matching fingerprint whose parts are all there as recorded
  means the corpus is done and is skipped (a missing, truncated or corrupted part redoes it); a killed run
  resumes from the units it finished. Parts carry the zstd content checksum.
Accounting: every upstream record read becomes exactly one of kept or rejected (by reason), per corpus.

`run` holds the data dir's lock (fileio.DirLock) for the whole run, removes what killed runs left (`.*.tmp-*`),
and before each step checks that the step's input is there as its manifests recorded (MissingInputError naming
the step to run otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from data_process import clean as clean_mod
from data_process import pii as pii_mod
from data_process import quality as quality_mod
from data_process import quality_model as quality_model_mod
from data_process import readers as readers_mod
from data_process.executor import Executor, check_reachable, print_engine
from data_process.readers import READERS, Reject
from data_process.recipe import CleanConfig, CorpusSpec, Recipe, resolve_paths
from data_process.records import MissingInputError, checked_parts
from fileio import (TMP_MARK, DirLock, atomic_file, atomic_write_bytes, check_files, describe_files, describe_holder,
                    disk_full_as_error, file_sha256)

STEPS = ("read", "dedup", "tokenizer", "tokenize", "stage")
CHUNK_BYTES = 32 << 20        # byte range per work unit for big line-based files
PART_FORMAT = 2               # 2: parts carry the zstd content checksum and the manifest their sizes and sha256
REJECT_DETAIL_CHARS = 200


class NothingReadError(RuntimeError):
    """No record at all could be read from any corpus of the recipe."""


@dataclass
class Unit:
    corpus: str
    index: int                 # position of the unit in the corpus: part order
    path: str                  # absolute input path
    src: str                   # input path relative to the project root (record ids, rejects)
    span: tuple | None         # (start, end, first_line) or None for the whole file
    size: int                  # bytes of input this unit covers
    encoding: str = ""         # the corpus's `encoding` for text readers ("" = the reader's default)


# ---------------------------------------------------------------- planning


def source_name(recipe: Recipe, path: Path) -> str:
    try:
        return path.resolve().relative_to(recipe.root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def line_spans(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Cut a file into byte ranges of about chunk_bytes that end at a newline: (start, end, first line number)."""
    spans, start, first_line = [], 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            rest = f.readline() if len(block) == chunk_bytes and not block.endswith(b"\n") else b""
            end = start + len(block) + len(rest)
            spans.append((start, end, first_line))
            first_line += block.count(b"\n") + rest.count(b"\n")
            start = end
    return spans


def plan_units(recipe: Recipe, spec: CorpusSpec, files: list[Path], chunk_bytes: int) -> list[Unit]:
    units = []
    for path in files:
        size = path.stat().st_size
        src = source_name(recipe, path)
        if size > chunk_bytes and readers_mod.splittable(spec.reader, path):
            for span in line_spans(path, chunk_bytes):
                units.append(Unit(spec.name, len(units), str(path), src, span, span[1] - span[0], spec.encoding))
        else:
            units.append(Unit(spec.name, len(units), str(path), src, None, size, spec.encoding))
    return units


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the reader and cleaner source: changing either invalidates finished corpora."""
    h = hashlib.sha256()
    for mod in (readers_mod, clean_mod, quality_mod, pii_mod, quality_model_mod):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def quality_model_dir(recipe: Recipe, spec: CorpusSpec) -> Path | None:
    """The corpus's trained quality model folder (absolute), or None when it records no model scores."""
    if not spec.clean.quality_model:
        return None
    path = Path(spec.clean.quality_model)
    path = path if path.is_absolute() else recipe.root / path
    names = (quality_model_mod.CLASSIFIER, quality_model_mod.LM, quality_model_mod.CUTOFFS)
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        raise ValueError(f"corpus {spec.name}: quality_model {path} lacks {missing}; run "
                         "`python data_process.py train-quality` after a read step first")
    return path


def input_stamps(recipe: Recipe, files: list[Path], mode: str = "stat") -> list[dict]:
    """What the fingerprint knows of each input file. "stat" (the default): name, size and mtime, free, but an edited
    file copied back with its old mtime (`rsync -a`, `cp -p`) looks unchanged; "content": name, size and sha256, so
    any edit is seen, at the price of reading every input once more on every run (bench/bench_faults.py)."""
    stamps = []
    for p in files:
        st = p.stat()
        stamp = {"path": source_name(recipe, p), "bytes": st.st_size}
        stamp.update({"sha256": file_sha256(p)} if mode == "content" else {"mtime_ns": st.st_mtime_ns})
        stamps.append(stamp)
    return stamps


def fingerprint(recipe: Recipe, spec: CorpusSpec, files: list[Path], chunk_bytes: int,
                stamps: list[dict] | None = None) -> str:
    if stamps is None:
        stamps = input_stamps(recipe, files, recipe.run.fingerprint)
    inputs = [tuple(s.values()) for s in stamps]
    settings = {"reader": spec.reader, "lang": spec.lang, "clean": dataclasses.asdict(spec.clean),
                "chunk_bytes": chunk_bytes, "code": code_version(), "inputs": inputs, "format": PART_FORMAT}
    if spec.encoding:
        settings["encoding"] = spec.encoding
    model_dir = quality_model_dir(recipe, spec)
    if model_dir is not None:   # a retrained model re-scores the corpus
        settings["quality_model"] = quality_model_mod.model_digest(model_dir)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- one work unit (runs in a worker process)




def reject_entry(src: str, where: dict, reason: str, detail: str) -> dict:
    return {"file": src, **where, "reason": reason, "detail": detail[:REJECT_DETAIL_CHARS]}


def _record_preview(record: dict) -> str:
    if record["kind"] == "doc":
        return record["text"][:REJECT_DETAIL_CHARS]
    if record["kind"] == "conv":
        return " | ".join(m["content"][:80] for m in record["messages"])[:REJECT_DETAIL_CHARS]
    return (record["prompt"][-1]["content"][:100] if record["prompt"] else "") + " | " + record["chosen"][:90]


def run_unit(unit: Unit, reader: str, lang: str, settings: CleanConfig, staging: str) -> dict:
    """Read + clean one unit into staging/unit-NNNNN.{jsonl.zst, rejects.jsonl, json}; returns the counts."""
    t0 = time.time()
    staging = Path(staging)
    stem = f"unit-{unit.index:05d}"
    out_path, rej_path = staging / f"{stem}.jsonl.zst", staging / f"{stem}.rejects.jsonl"
    scorer = None
    if settings.quality_model:   # an absolute folder here (read_step resolved it)
        from data_process.quality_model import Scorer

        scorer = Scorer(Path(settings.quality_model), settings.ppl_reference or unit.corpus, settings.quality_keep,
                        settings.quality_threshold, settings.pareto_alpha, settings.ppl_keep)
    cleaner = clean_mod.Cleaner(settings, lang, scorer)
    audit_path = staging / f"{stem}.audit.jsonl"
    read_fn = READERS[reader]
    counts = {"read": 0, "kept": 0, "rejected": Counter(), "kinds": Counter(), "chars": 0}
    rejects = []
    span = tuple(unit.span) if unit.span else None
    options = {"encoding": unit.encoding} if unit.encoding else {}
    reader_rejects, first_reject = 0, None
    # need: the unit's input size bounds what its compressed records and rejects take on disk
    with disk_full_as_error(out_path, unit.size), atomic_file(out_path) as raw:
        # the frame checksum (xxh64 of the content) makes a flipped bit a read error, not a changed record
        writer = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(raw, closefd=False)
        buf = []
        for item in read_fn(Path(unit.path), unit.src, span, **options):
            counts["read"] += 1
            if isinstance(item, Reject):
                reader_rejects += 1
                first_reject = first_reject or item
                counts["rejected"][item.reason] += 1
                rejects.append(reject_entry(unit.src, item.where, item.reason, item.detail))
                continue
            reason = cleaner.clean(item)
            if reason is not None:
                counts["rejected"][reason] += 1
                rejects.append(reject_entry(unit.src, {"id": item["id"]}, reason, _record_preview(item)))
                continue
            item["corpus"] = unit.corpus
            counts["kept"] += 1
            counts["kinds"][item["kind"]] += 1
            if item["kind"] == "doc":
                counts["chars"] += len(item["text"])
            buf.append(orjson.dumps(item))
            if len(buf) >= 256:
                writer.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            writer.write(b"\n".join(buf) + b"\n")
        writer.flush(zstandard.FLUSH_FRAME)
        writer.close()
    atomic_write_bytes(rej_path, b"".join(orjson.dumps(r) + b"\n" for r in rejects))
    atomic_write_bytes(audit_path, b"".join(orjson.dumps({"file": unit.src, **a}) + b"\n" for a in cleaner.audit))
    result = {"corpus": unit.corpus, "index": unit.index, "src": unit.src, "size": unit.size, "read": counts["read"],
              "kept": counts["kept"], "rejected": dict(counts["rejected"]), "kinds": dict(counts["kinds"]),
              "chars": counts["chars"], "clean": dict(cleaner.stats), "seconds": round(time.time() - t0, 3)}
    if counts["read"] and reader_rejects == counts["read"]:   # the reader fits none of it: say what would
        result["all_rejected"] = readers_mod.explain_all_rejected(reader, Path(unit.path), unit.src,
                                                                  dict(counts["rejected"]), first_reject)
    # what a resumed run checks before it trusts the unit (load_done_unit)
    result["files"] = describe_files(staging, [out_path.name, rej_path.name, audit_path.name])
    atomic_write_bytes(staging / f"{stem}.json", orjson.dumps(result))  # written last: the unit is done
    return result


def _run_unit_task(task) -> dict:
    return run_unit(*task)


def _describe_task(task) -> str:
    unit = task[0]
    return f"{unit.corpus} {unit.src}" + (f" bytes {unit.span[0]}-{unit.span[1]}" if unit.span else "")


def load_done_unit(staging: Path, index: int) -> dict | None:
    """A unit a killed run finished: its counts, once its files have the sizes and sha256 the counts file records
    (else None, and the unit is redone: a damaged or half-replaced unit file is never carried into the parts)."""
    stem = f"unit-{index:05d}"
    counts = staging / f"{stem}.json"
    if not counts.exists():
        return None
    try:
        result = orjson.loads(counts.read_bytes())
    except orjson.JSONDecodeError:
        result = None
    files = result.get("files") if isinstance(result, dict) else None
    problems = check_files(staging, files) if isinstance(files, dict) and files else \
        [f"{counts}: not a finished unit's record"]
    if problems:
        print(f"note: redoing {stem} of {staging.parent.name}: {problems[0]}", file=sys.stderr, flush=True)
        return None
    return result


# ---------------------------------------------------------------- per corpus


@dataclass
class CorpusJob:
    spec: CorpusSpec
    files: list[Path]
    units: list[Unit]
    fingerprint: str
    stamps: list               # input_stamps of the files, recorded in the manifest
    out_dir: Path
    staging: Path
    results: dict              # unit index -> counts
    t0: float
    chunk_bytes: int


def manifest_path(out_dir: Path) -> Path:
    return out_dir / "manifest.json"


def finished_manifest(out_dir: Path, fp: str) -> dict | None:
    """The corpus's manifest when the corpus is done: same fingerprint, and every part it lists is there with the
    size and sha256 it recorded (and no other part beside them). A missing, truncated or corrupted part redoes
    the corpus, with a line saying why."""
    path = manifest_path(out_dir)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("fingerprint") != fp:
        return None
    problems = check_files(out_dir, manifest.get("part_info", {}), exact_glob="part-*.jsonl.zst")
    if problems:
        print(f"read: {out_dir.name}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
              + "; reading the corpus again", file=sys.stderr, flush=True)
        return None
    return manifest


def corpus_counts(spec: CorpusSpec, files: list[Path], results: list[dict]) -> dict:
    rejected = Counter()
    kinds, clean_stats = Counter(), Counter()
    for r in results:
        rejected.update(r["rejected"])
        kinds.update(r["kinds"])
        clean_stats.update(r["clean"])
    counts = {
        "files": len(files),
        "bytes": sum(r["size"] for r in results),
        "read": sum(r["read"] for r in results),
        "kept": sum(r["kept"] for r in results),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "kinds": dict(sorted(kinds.items())),
        "chars": sum(r["chars"] for r in results),
        "clean": dict(sorted(clean_stats.items())),
    }
    warnings = list(dict.fromkeys(r["all_rejected"] for r in results if r.get("all_rejected")))
    if warnings:
        counts["warnings"] = warnings
    assert counts["kept"] + counts["rejected"] == counts["read"], f"accounting broken for {spec.name}"
    return counts


def finalize_corpus(job: CorpusJob, rejects_dir: Path) -> dict:
    """Move the finished units into place as parts, write rejects, then the manifest (last)."""
    out_dir, staging = job.out_dir, job.staging
    results = [job.results[u.index] for u in job.units]
    manifest_path(out_dir).unlink(missing_ok=True)
    for old in out_dir.glob("part-*.jsonl.zst"):
        old.unlink()
    parts = []
    for r in results:
        src = staging / f"unit-{r['index']:05d}.jsonl.zst"
        if r["kept"] == 0:
            continue
        name = f"part-{len(parts):05d}.jsonl.zst"
        os.replace(src, out_dir / name)
        parts.append(name)
    rejects_dir.mkdir(parents=True, exist_ok=True)
    rej_path = rejects_dir / f"{job.spec.name}.jsonl"
    with atomic_file(rej_path) as out:
        for r in results:
            with open(staging / f"unit-{r['index']:05d}.rejects.jsonl", "rb") as f:
                shutil.copyfileobj(f, out)
    write_audit(job, rejects_dir.parent / "audit" / f"{job.spec.name}.jsonl")
    counts = corpus_counts(job.spec, job.files, results)
    spec = job.spec
    manifest = {
        "corpus": spec.name, "reader": spec.reader, "lang": spec.lang, "role": spec.role, "stage": spec.stage,
        "priority": spec.priority, "fingerprint": job.fingerprint, "parts": parts,
        "part_info": describe_files(out_dir, parts),
        "inputs": job.stamps,
        "settings": {"clean": dataclasses.asdict(spec.clean), "chunk_bytes": job.chunk_bytes, "code": code_version()},
        "counts": counts,
    }
    atomic_write_bytes(manifest_path(out_dir), json.dumps(manifest, ensure_ascii=False, indent=1).encode())
    shutil.rmtree(staging, ignore_errors=True)
    return counts


def write_audit(job: CorpusJob, path: Path) -> None:
    """data/audit/<corpus>.jsonl: the units' before/after samples, at most `audit_samples` per operator (units in
    order), so a user can see what t2s, PII, langid and the rules did. Always written, empty when nothing changed."""
    limit, taken, lines = job.spec.clean.audit_samples, Counter(), []
    for u in job.units:
        unit_audit = job.staging / f"unit-{u.index:05d}.audit.jsonl"
        if not unit_audit.exists():   # a unit finished by a run before audits existed
            continue
        for line in unit_audit.read_bytes().splitlines():
            op = orjson.loads(line)["op"]
            if taken[op] < limit:
                taken[op] += 1
                lines.append(line + b"\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, b"".join(lines))


# ---------------------------------------------------------------- the read step


def read_step(recipe: Recipe, workers: int | None = None, force: bool = False, chunk_bytes: int = CHUNK_BYTES,
              progress: bool = True, executor: Executor | None = None) -> dict:
    """Read and clean every corpus of the recipe into data/clean/<corpus>/; returns the per-corpus counts.
    `executor` runs the units (data_process/executor.py); None: this machine's pool of `workers` processes."""
    from tqdm import tqdm

    t0 = time.time()
    workers = max(1, workers or recipe.run.workers)
    clean_root, rejects_dir = recipe.data_dir / "clean", recipe.data_dir / "rejects"
    report: dict[str, dict] = {}
    jobs: list[CorpusJob] = []
    for spec in recipe.corpora:
        if spec.reader not in READERS:
            raise ValueError(f"corpus {spec.name}: unknown reader {spec.reader!r}; known: {sorted(READERS)}")
        files = resolve_paths(recipe, spec.paths)
        out_dir = clean_root / spec.name
        stamps = input_stamps(recipe, files, recipe.run.fingerprint)
        fp = fingerprint(recipe, spec, files, chunk_bytes, stamps)
        if force:
            manifest_path(out_dir).unlink(missing_ok=True)
        done = finished_manifest(out_dir, fp)
        if done is not None:
            report[spec.name] = {**done["counts"], "skipped": True}
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = out_dir / f".staging-{fp[:16]}"
        for stale in out_dir.glob(".staging-*"):
            if stale != staging or force:
                shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(exist_ok=True)
        for tmp in staging.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        units = plan_units(recipe, spec, files, chunk_bytes)
        results = {u.index: r for u in units if (r := load_done_unit(staging, u.index)) is not None}
        jobs.append(CorpusJob(spec, files, units, fp, stamps, out_dir, staging, results, time.time(), chunk_bytes))

    def unit_settings(spec: CorpusSpec) -> CleanConfig:
        model_dir = quality_model_dir(recipe, spec)
        return spec.clean if model_dir is None else dataclasses.replace(spec.clean, quality_model=str(model_dir))

    tasks = [(u, job.spec.reader, job.spec.lang, unit_settings(job.spec), str(job.staging))
             for job in jobs for u in job.units if u.index not in job.results]
    by_name = {job.spec.name: job for job in jobs}
    total_bytes = sum(t[0].size for t in tasks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="read+clean", disable=not progress or not tasks,
               file=sys.stderr)

    def finish_ready():
        for job in jobs:
            if job.spec.name not in report and len(job.results) == len(job.units):
                report[job.spec.name] = {**finalize_corpus(job, rejects_dir), "skipped": False}

    finish_ready()  # corpora whose units were all done by a killed run, and empty corpora
    if tasks:
        # Biggest units first so one large file does not start last and leave a core idle. Results come back
        # in any order (keyed by unit index); a failure stops the workers, finished units stay for the re-run.
        order = sorted(tasks, key=lambda t: -t[0].size)
        ex = executor or Executor("local", workers=min(workers, len(tasks)))
        for result in ex.map(_run_unit_task, order, ordered=False, describe=_describe_task):
            job = by_name[result["corpus"]]
            job.results[result["index"]] = result
            bar.update(result["size"])
            finish_ready()
    bar.close()
    ordered = {spec.name: report[spec.name] for spec in recipe.corpora}
    totals = {k: sum(c[k] for c in ordered.values()) for k in ("files", "bytes", "read", "kept", "rejected")}
    seconds = time.time() - t0
    return {"corpora": ordered, "totals": totals, "seconds": round(seconds, 3), "workers": workers}


# ---------------------------------------------------------------- summary


def format_read_table(read: dict) -> str:
    rows = [("corpus", "files", "MB", "read", "kept", "rejected", "rejected by reason")]
    for name, c in read["corpora"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(c["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
        rows.append((name + (" (done)" if c.get("skipped") else ""), str(c["files"]), f"{c['bytes'] / 1e6:.2f}",
                     str(c["read"]), str(c["kept"]), str(c["rejected"]), reasons or "-"))
    t = read["totals"]
    rows.append(("TOTAL", str(t["files"]), f"{t['bytes'] / 1e6:.2f}", str(t["read"]), str(t["kept"]),
                 str(t["rejected"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) if j == 0 else r[j].rjust(widths[j]) for j in range(6))
                     + "  " + r[6])
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * (sum(widths) + 2 * 6 + 18))
    for name, c in read["corpora"].items():
        lines += [f"warning: {name}: {w}" for w in c.get("warnings", [])]
    return "\n".join(lines)


def write_summary(data_dir: Path, section: str, value: dict) -> Path:
    """Merge one step's section into data/summary.json (atomic)."""
    path = data_dir / "summary.json"
    summary = {}
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            summary = {}
    summary[section] = value
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(summary, ensure_ascii=False, indent=1, default=str).encode())
    return path


# ---------------------------------------------------------------- all steps


def docs_root_for(recipe: Recipe, steps: list[str]) -> Path:
    """data/dedup when dedup runs now or ran before, else data/clean (CONTRACTS.md)."""
    dedup_dir = recipe.data_dir / "dedup"
    if "dedup" in steps or (dedup_dir / "report.json").exists():
        return dedup_dir
    return recipe.data_dir / "clean"


def remove_stale_temporaries(data_dir: Path) -> int:
    """Remove the `.<name>.tmp-<pid>` files and dirs that killed runs left anywhere under the data dir (summary,
    rejects, parts, shards, manifests, staged CSVs); -> how many. Only under the data dir's lock: a live
    writer's temporary file looks the same."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in [*filenames, *dirnames]:
            if TMP_MARK in name:
                path = Path(dirpath) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    path.unlink(missing_ok=True)
                n += 1
    return n


def step_input_dirs(recipe: Recipe, step: str, docs_root: Path) -> list[Path]:
    """The record directories a step reads: every corpus's data/clean/<c> for dedup; for the later steps the
    docs_root/<c> of the corpora they use."""
    if step == "dedup":
        return [recipe.data_dir / "clean" / c.name for c in recipe.corpora]
    if step == "tokenizer":
        return [] if recipe.tokenizer.model else [docs_root / c.name for c in recipe.corpora if c.role == "pretrain"]
    if step == "tokenize":
        return [docs_root / c.name for c in recipe.corpora if c.role == "pretrain" or
                (c.role == "sft" and c.stage in recipe.tokenize.sft_as_pretrain)]
    if step == "stage":
        return [docs_root / c.name for c in recipe.corpora if c.role in ("sft", "dpo")]
    return []


def check_step_inputs(recipe: Recipe, step: str, docs_root: Path, tokenizer_dir: Path) -> None:
    """Raise MissingInputError, naming the step to run, when an input of `step` is missing or not as its manifest
    recorded (sizes here; contents are checked by zstd checksums and sha256 as the step reads them)."""
    try:
        for d in step_input_dirs(recipe, step, docs_root):
            checked_parts(d, require_manifest=True)
    except MissingInputError as e:
        raise MissingInputError(f"the {step} step cannot run: {e}") from None
    dedup_dir = recipe.data_dir / "dedup"
    if step in ("tokenizer", "tokenize", "stage") and docs_root != dedup_dir and any(dedup_dir.glob("*/manifest.json")):
        # dedup started here and did not finish: the clean records would silently stand in for deduplicated ones
        raise MissingInputError(f"the {step} step cannot run: {dedup_dir} has no report.json (the dedup step did "
                                f"not finish): run `python data_process.py --steps dedup` first")
    if step in ("tokenize", "stage") and not (tokenizer_dir / "tokenizer.model").is_file():
        raise MissingInputError(f"the {step} step cannot run: {tokenizer_dir / 'tokenizer.model'} is missing: "
                                f"run `python data_process.py --steps tokenizer` first")


def run(recipe: Recipe, steps=STEPS, workers: int | None = None, force: bool = False, progress: bool = True,
        chunk_bytes: int = CHUNK_BYTES, engine: str = "local", ray_address: str | None = None) -> dict:
    """Run the named steps in pipeline order; returns the summary (also in data/summary.json).

    The data dir is locked for the run (fileio.DirLock: a second run on it raises fileio.LockedError naming the
    first; a dead run's lock is taken over), and the temporary files killed runs left in it are removed first.
    A step whose input is missing raises MissingInputError naming the step to run.
    engine "ray" runs the read, dedup and tokenize work units as Ray tasks (a local Ray instance for the run, or
    the cluster at `ray_address`; data_process/executor.py); the outputs are byte-identical to the local engine's."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps are {list(STEPS)}")
    steps = [s for s in STEPS if s in steps]
    if engine == "ray" and ray_address and ray_address != "auto":
        check_reachable(ray_address)   # a one-line error before the data dir is touched
    with DirLock(recipe.data_dir) as lock:
        if lock.took_over:
            print(f"note: took over the lock of a run that died: {describe_holder(lock.took_over)}",
                  file=sys.stderr, flush=True)
        stale = remove_stale_temporaries(recipe.data_dir)
        if stale:
            print(f"note: removed {stale} temporary file(s) left under {recipe.data_dir} by a killed run",
                  file=sys.stderr, flush=True)
        try:
            if engine == "local" and not ray_address:
                return _run_steps(recipe, steps, workers, force, progress, chunk_bytes, None)
            with Executor(engine, workers=workers or recipe.run.workers, ray_address=ray_address) as executor:
                print_engine(executor)
                return _run_steps(recipe, steps, workers, force, progress, chunk_bytes, executor)
        except BaseException:   # a full disk, Ctrl-C: workers stopped mid-write leave temporaries; still locked
            remove_stale_temporaries(recipe.data_dir)
            raise


def _run_steps(recipe: Recipe, steps: list[str], workers, force: bool, progress: bool, chunk_bytes: int,
               executor: Executor | None) -> dict:
    data_dir = recipe.data_dir
    tokenizer_dir = data_dir / "tokenizer"
    docs_root = docs_root_for(recipe, steps)
    summary = {}
    for step in steps:
        t0 = time.time()
        check_step_inputs(recipe, step, docs_root, tokenizer_dir)
        if step == "read":
            result = read_step(recipe, workers=workers, force=force, chunk_bytes=chunk_bytes, progress=progress,
                               executor=executor)
            print(format_read_table(result))
            if result["totals"]["kept"] == 0:
                write_summary(data_dir, "read", result)
                raise NothingReadError(_nothing_read_message(recipe, result))
        elif step == "dedup":
            from data_process import dedup
            result = dedup.run(recipe, data_dir / "clean", data_dir / "dedup",
                               mapper=executor.mapper if executor is not None else None)
        elif step == "tokenizer":
            from data_process.train_tokenizer import train_tokenizer
            result = {"tokenizer": str(train_tokenizer(recipe, docs_root, tokenizer_dir, executor=executor))}
        elif step == "tokenize":
            from data_process import tokenize_docs
            result = tokenize_docs.run(recipe, docs_root, tokenizer_dir, data_dir / "pretrain", executor=executor)
        else:
            from data_process import stage
            result = stage.run(recipe, docs_root, tokenizer_dir, data_dir, executor=executor)
        if not isinstance(result, dict):
            result = {"result": result}
        result.setdefault("seconds", round(time.time() - t0, 3))
        summary[step] = result
        write_summary(data_dir, step, result)
    return summary


def _nothing_read_message(recipe: Recipe, result: dict) -> str:
    lines = ["nothing at all could be read: no corpus yielded a single usable record."]
    for spec in recipe.corpora:
        c = result["corpora"][spec.name]
        if c["files"] == 0:
            lines.append(f"  {spec.name}: no file matches {spec.paths} under {recipe.root}")
        else:
            lines.append(f"  {spec.name}: {c['files']} file(s), {c['read']} read, all rejected "
                         f"({c['rejected_by_reason']}); see {recipe.data_dir / 'rejects' / (spec.name + '.jsonl')}")
            lines += [f"    {w}" for w in c.get("warnings", [])]
    return "\n".join(lines)
