"""`python data_process.py inspect dedup`: what the dedup step removed, and why.

    python data_process.py inspect dedup                      # data/dedup: summary + example pairs
    python data_process.py inspect dedup --dir /big/data/dedup --reason near --examples 5
    python data_process.py inspect dedup --corpus skypile --width 60

Reads `data/dedup/removed.parquet` (one row per removed record: corpus, id, reason exact/near/contamination,
similarity, the kept record or the eval question it matched; written by dedup.py) with pyarrow, a million rows
at a time (bounded memory for an audit of any size), and the example
pairs of `data/dedup/examples.jsonl` (texts included), and prints: removals by corpus and reason, which corpus
kept the copies, similarity histograms, contamination by eval set and subject, and example pairs side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np

REASONS = ("exact", "near", "contamination")
KIND_OF_REASON = {"exact": "exact", "near": "near", "contamination": "decontam"}


COLUMNS = ["corpus", "reason", "similarity", "kept_corpus", "eval_set", "eval_subject"]
BINS = np.array([0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0 + 1e-9])


def audit_batches(dedup_dir: Path, corpus: str | None = None, batch_rows: int = 1 << 20):
    """removed.parquet as pandas DataFrames of at most batch_rows rows (the summary columns only), so a
    audit of any size is summarized in bounded memory."""
    import pyarrow.parquet as pq
    path = Path(dedup_dir) / "removed.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python data_process.py --steps dedup` first")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=COLUMNS):
        df = batch.to_pandas()
        yield df if corpus is None else df[df["corpus"] == corpus]


def tally(batches) -> dict:
    """Counts of the audit: by (corpus, reason), by (corpus, kept corpus), by (eval set, subject), similarity
    histograms by reason."""
    t = {"rows": 0, "by_reason": {}, "kept_in": {}, "by_subject": {}, "hist": {}}

    def add(d, counts):
        for k, v in counts.items():
            d[k] = d.get(k, 0) + int(v)
    for df in batches:
        t["rows"] += len(df)
        add(t["by_reason"], df.groupby(["corpus", "reason"]).size().to_dict())
        dups = df[df["reason"] != "contamination"]
        add(t["kept_in"], dups.groupby(["corpus", "kept_corpus"]).size().to_dict())
        hits = df[df["reason"] == "contamination"]
        add(t["by_subject"], hits.groupby(["eval_set", "eval_subject"]).size().to_dict())
        for reason in ("near", "contamination"):
            counts, _ = np.histogram(df.loc[df["reason"] == reason, "similarity"].to_numpy(), BINS)
            t["hist"][reason] = t["hist"].get(reason, 0) + counts
    return t


def summarize(t: dict, report: dict | None = None, top: int = 10) -> list[str]:
    """The summary tables, as lines."""
    lines = [f"removed records: {t['rows']:,}" + (f" of {report['totals']['in']:,} read" if report else "")]
    if not t["rows"]:
        return lines
    corpora = sorted({c for c, _ in t["by_reason"]})
    cols = [r for r in REASONS if any(reason == r for _, reason in t["by_reason"])]
    lines.append(f"{'corpus':<22}" + "".join(f"{c:>15}" for c in cols))
    for corpus in corpora:
        lines.append(f"{corpus:<22}" + "".join(f"{t['by_reason'].get((corpus, c), 0):>15,}" for c in cols))
    if t["kept_in"]:
        lines.append("\nkept copy lives in (removed corpus -> kept corpus: records)")
        for (a, b), n in sorted(t["kept_in"].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {a} -> {b}: {n:,}")
    for reason in ("near", "contamination"):
        counts = t["hist"].get(reason)
        if counts is None or not counts.sum():
            continue
        what = "estimated Jaccard to the kept record" if reason == "near" else "share of the question's n-grams held"
        lines.append(f"\n{reason}: {what}")
        for lo, hi, n in zip(BINS[:-1], BINS[1:], counts):
            if n:
                bar = "#" * max(1, int(40 * n / counts.max()))
                lines.append(f"  [{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'} {n:>9,} {bar}")
    if t["by_subject"]:
        lines.append("\ncontamination by eval set and subject")
        for (es, subject), n in sorted(t["by_subject"].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {es} / {subject}: {n:,}")
    return lines


def _width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def wrap(text: str, width: int, max_lines: int) -> list[str]:
    """Lines of at most `width` terminal columns (CJK characters take two), newlines kept as breaks."""
    out, line, w = [], "", 0
    for ch in text.replace("\r", ""):
        if ch == "\n" or w + _width(ch) > width:
            out.append(line)
            line, w = "", 0
            if len(out) >= max_lines:
                return out[:-1] + [out[-1][:max(0, len(out[-1]) - 1)] + "…"]
            if ch == "\n":
                continue
        line += ch
        w += _width(ch)
    if line:
        out.append(line)
    return out


def _pad(s: str, width: int) -> str:
    return s + " " * (width - sum(_width(c) for c in s))


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int, max_lines: int) -> list[str]:
    """Two texts in two columns under their titles (a title longer than a column wraps, never cut)."""
    ta, tb = wrap(left_title, width, 3), wrap(right_title, width, 3)
    rows = [_pad(ta[i] if i < len(ta) else "", width) + " | " + (tb[i] if i < len(tb) else "")
            for i in range(max(len(ta), len(tb)))]
    a, b = wrap(left, width, max_lines), wrap(right, width, max_lines)
    rows.append("-" * width + "-+-" + "-" * width)
    for i in range(max(len(a), len(b))):
        rows.append(_pad(a[i] if i < len(a) else "", width) + " | " + (b[i] if i < len(b) else ""))
    return rows


def example_lines(examples: list[dict], reason: str | None, corpus: str | None, n: int, width: int,
                  max_lines: int) -> list[str]:
    lines = []
    for reason_name in REASONS:
        if reason and reason != reason_name:
            continue
        kind = KIND_OF_REASON[reason_name]
        picked = [e for e in examples if e["kind"] == kind and (corpus is None or e["dropped"]["corpus"] == corpus)]
        for e in picked[:n]:
            d = e["dropped"]
            if kind == "decontam":
                q = e["question"]
                right = q["question"] + "\n" + "  ".join(f"{k}. {v}" for k, v in q["options"].items())
                head = f"{reason_name}: share {e.get('share', 0):.2f}"
                rows = side_by_side(f"removed {d['corpus']} {d['id']}", d["text"],
                                    f"{e['eval_set']} {q['split']}/{q['subject']} #{q['id']}", right, width, max_lines)
            else:
                k = e["kept"]
                head = (f"{reason_name}: estimated Jaccard {e['estimated_jaccard']:.3f}, "
                        f"true character-5-gram Jaccard {e['true_jaccard']:.3f}")
                rows = side_by_side(f"removed {d['corpus']} {d['id']}", d["text"],
                                    f"kept {k['corpus']} {k['id']}", k["text"], width, max_lines)
            lines += ["", head, *rows]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python data_process.py inspect dedup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("data/dedup"), help="the dedup step's output (default: data/dedup)")
    p.add_argument("--reason", choices=REASONS, default=None, help="only example pairs removed for this reason")
    p.add_argument("--corpus", default=None, help="only this corpus's removals")
    p.add_argument("--examples", type=int, default=3, help="example pairs per reason (default 3)")
    p.add_argument("--width", type=int, default=50, help="columns per side of an example pair (default 50)")
    p.add_argument("--lines", type=int, default=8, help="lines of text per side (default 8)")
    args = p.parse_args(argv)
    try:
        counts = tally(audit_batches(args.dir, args.corpus))
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = None
    try:
        report = json.loads((args.dir / "report.json").read_text())
    except (OSError, ValueError):
        pass
    examples = []
    try:
        examples = [json.loads(line) for line in (args.dir / "examples.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        pass
    print("\n".join(summarize(counts, report if args.corpus is None else None)))
    print("\n".join(example_lines(examples, args.reason, args.corpus, args.examples, args.width, args.lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
