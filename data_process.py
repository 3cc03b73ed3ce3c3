"""Run the data pipeline from a recipe: corpora/ -> data/clean -> data/dedup -> data/tokenizer -> data/pretrain, data/sft, data/dpo.

    python data_process.py                      # the default recipe on the embedded sample corpora, offline
    python data_process.py --steps read         # only read + clean
    python data_process.py --recipe my.toml --workers 8 --data-dir /big/data
    python data_process.py inspect --help       # look inside token shards (data_process/inspect_data.py)
    python data_process.py inspect dedup        # what dedup removed and why (data_process/dedup_audit.py)
    python data_process.py download --list      # where every real corpus comes from (data_process/download.py)
    python data_process.py train-quality        # quality classifier + perplexity LM (data_process/quality_model.py)
    python data_process.py --steps read --corpus wiki_zh --corpus wudao   # one machine's share of a split run
    python data_process.py --engine ray --ray-address auto    # every step's work units as Ray tasks on a cluster

The code lives in the package data_process/ beside this script (Python imports the package, not this file);
this script only parses arguments. See README.md ("Data pipeline") and config/recipe.toml.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import settings
from data_process.exits import EXIT_DISK_FULL, EXIT_LOCKED, EXIT_MISSING_INPUT, run_command

ROOT = Path(__file__).resolve().parent
DEFAULT_RECIPE = ROOT / "config" / "recipe.toml"
EPILOG = "\n\n".join(textwrap.fill(paragraph, 100) for paragraph in (
    "Sub-commands: `python data_process.py inspect ...` looks inside token shards (see `python data_process.py "
    "inspect --help`); `python data_process.py inspect dedup` shows what dedup removed and why; "
    "`python data_process.py download ...` fetches the real corpora (see `python data_process.py "
    "download --help`); `python data_process.py train-quality` trains the quality classifier and perplexity model "
    "on data/clean/ (docs/cleaning.md).",
    "A run locks its data dir (<data dir>/.lock): a second run on the same dir is refused, naming the first (pid, "
    "host, command, start time); the lock of a run that died is taken over. Temporary files (.*.tmp-*) that killed "
    "runs left are removed at the start. Every step checks the files its \"done\" marker relies on (sizes and "
    "sha256 as its manifest recorded) and redoes what is missing or damaged; a step whose input is missing stops "
    "and names the step to run. Inputs are fingerprinted by name, size and mtime; `--set run.fingerprint=content` "
    "hashes them instead (sees an edit copied back with its old mtime, costs a read of every input per run).",
    f"Exit status: 0 success; 1 nothing at all could be read; 2 a bad recipe or arguments; {EXIT_LOCKED} the data "
    f"dir is in use by another run; {EXIT_DISK_FULL} the disk is full (the message names the path, the free space "
    f"and the space needed); {EXIT_MISSING_INPUT} a step's input is missing or damaged (the message names the "
    "step to run).",
))


def build_parser() -> argparse.ArgumentParser:
    from data_process.pipeline import STEPS

    p = argparse.ArgumentParser(
        prog="python data_process.py",
        description="Turn raw corpora into cleaned, deduplicated, tokenized training data, as a recipe says. "
                    "Steps: read (stream every corpus through its reader and the cleaner into "
                    "data/clean/<corpus>/, rejects into data/rejects/<corpus>.jsonl), dedup (exact + MinHash "
                    "near-duplicates across corpora, eval-set decontamination -> data/dedup/), tokenizer "
                    "(train or load SentencePiece -> data/tokenizer/), tokenize (uint16 .bin + .idx shards -> "
                    "data/pretrain/<corpus>/), stage (SFT CSVs -> data/sft/, DPO JSONL -> data/dpo/). "
                    "Finished work is kept: re-running skips it. A summary goes to data/summary.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", type=Path, default=None,
                   help=f"recipe TOML (default: {DEFAULT_RECIPE.relative_to(ROOT)}, whose globs point at the "
                        "embedded samples under corpora/). Paths in a recipe are relative to the current directory; "
                        "the default recipe's are relative to the project root.")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run, in pipeline order (default: all: {','.join(STEPS)})")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the read step (default: the recipe's [run] workers)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="output folder (default: the recipe's [run] data_dir, normally data/)")
    p.add_argument("--force", action="store_true",
                   help="redo the read step even for corpora whose manifest says they are done")
    p.add_argument("--corpus", action="append", default=None, metavar="NAME",
                   help="only these corpora of the recipe (repeatable), for the read and tokenize steps: split a "
                        "large run across machines by corpus, then gather data/clean/ on one machine for dedup")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="what runs the work units of the read, dedup and tokenize steps: local (default) this "
                        "machine's process pool; ray: Ray tasks, with byte-identical outputs (docs/scaling.md)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT|auto",
                   help="with --engine ray: join the running cluster there (`ray start --head` prints it; auto: "
                        "the one on this node); without it a local Ray instance runs for this command only. "
                        "--data-dir and the corpora must be on a filesystem every node sees")
    settings.add_set_flag(p, "dedup.threshold=0.7")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-readers", action="store_true", help="list the corpus readers a recipe can name, and exit")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["inspect", "dedup"]:
        from data_process import dedup_audit
        return dedup_audit.main(argv[2:])
    if argv and argv[0] == "inspect":
        from data_process import inspect_data
        return inspect_data.main(argv[1:])
    if argv and argv[0] == "download":
        from data_process import download
        return download.main(argv[1:])
    if argv and argv[0] == "train-quality":
        from data_process import quality_model
        return quality_model.main(argv[1:])

    args = build_parser().parse_args(argv)
    from data_process.pipeline import run
    from data_process.readers import READERS
    from data_process.recipe import RecipeError, load_recipe

    if args.list_readers:
        for name, fn in READERS.items():
            print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    try:
        if args.recipe is None:
            recipe = load_recipe(DEFAULT_RECIPE, root=ROOT, sets=args.sets)
        else:
            recipe = load_recipe(args.recipe, root=Path.cwd(), sets=args.sets)
    except (RecipeError, OSError) as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        recipe.data_dir = args.data_dir.resolve()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.corpus:
        unknown = sorted(set(args.corpus) - {c.name for c in recipe.corpora})
        whole_run = sorted(set(steps) - {"read", "tokenize"})
        if unknown:
            print(f"error: --corpus {', '.join(unknown)} not in the recipe", file=sys.stderr)
            return 2
        if whole_run:  # dedup is cross-corpus; one tokenizer and one SFT staging serve every corpus
            print(f"error: --corpus applies to the read and tokenize steps only, not {', '.join(whole_run)}: "
                  "run those once over all corpora", file=sys.stderr)
            return 2
        recipe.corpora = [c for c in recipe.corpora if c.name in args.corpus]
    if args.ray_address and args.engine != "ray":
        print("error: --ray-address needs --engine ray", file=sys.stderr)
        return 2
    summary = run_command(lambda: run(recipe, steps=steps, workers=args.workers, force=args.force,
                                      progress=not args.no_progress, engine=args.engine, ray_address=args.ray_address),
                          recipe.data_dir)
    if isinstance(summary, int):
        return summary
    timings = ", ".join(f"{step} {result.get('seconds', 0):.1f}s" for step, result in summary.items())
    print(f"summary: {recipe.data_dir / 'summary.json'} ({timings})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
