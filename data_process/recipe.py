"""The recipe: one TOML file that says which corpora to read, how, and how to process them.

`load_recipe(path)` parses `config/recipe.toml` (or any recipe) into plain dataclasses. Unknown keys
are an error, so a typo such as `min_char = 5` fails loudly instead of being silently ignored.
The tables and their meaning are documented in CONTRACTS.md ("Recipe") and in config/recipe.toml.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import settings


@dataclass
class RunConfig:
    data_dir: str = "data"
    workers: int = 2
    fingerprint: str = "stat"       # how the read step tells changed inputs: "stat" (name, size, mtime) | "content" (sha256)


PPL_BUCKETS = ("head", "middle", "tail")   # CCNet's perplexity split (data_process/quality_model.py)


@dataclass
class RulesConfig:
    """Thresholds of the repetition and quality rules (data_process/quality.py); the measured figures behind
    each default are in config/recipe.toml and docs/cleaning.md. A document fails at the first rule it breaks."""
    min_lines: int = field(default=3, metadata=settings.limits(ge=1))           # line rules need this many lines
    min_ngram_chars: int = field(default=200, metadata=settings.limits(ge=1))   # n-gram rules need this many chars
    short_line_chars: int = field(default=10, metadata=settings.limits(ge=1))   # a "short line" has <= this many
    max_dup_line_frac: float = field(default=0.30, metadata=settings.limits(ge=0, le=1))
    max_dup_line_chars: float = field(default=0.20, metadata=settings.limits(ge=0, le=1))
    max_dup_para_frac: float = field(default=0.30, metadata=settings.limits(ge=0, le=1))
    max_dup_para_chars: float = field(default=0.20, metadata=settings.limits(ge=0, le=1))
    max_top_ngram: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16],   # n = 2, 3, 4
                                       metadata=settings.limits(ge=0, le=1))
    max_dup_ngram: list[float] = field(default_factory=lambda: [0.80, 0.78, 0.76, 0.74, 0.72, 0.70],  # n = 5..10
                                       metadata=settings.limits(ge=0, le=1))
    min_punct_end_lines: float = field(default=0.12, metadata=settings.limits(ge=0, le=1))
    max_short_lines: float = field(default=0.67, metadata=settings.limits(ge=0, le=1))
    max_bullet_lines: float = field(default=0.90, metadata=settings.limits(ge=0, le=1))
    max_ellipsis_lines: float = field(default=0.30, metadata=settings.limits(ge=0, le=1))
    max_symbol_ratio: float = field(default=0.05, metadata=settings.limits(ge=0, le=1))
    max_flagged_per_kchar: float = field(default=3.0, metadata=settings.limits(ge=0))

    def __post_init__(self):
        if len(self.max_top_ngram) != 3 or len(self.max_dup_ngram) != 6:
            raise ValueError("max_top_ngram takes 3 values (n = 2, 3, 4) and max_dup_ngram 6 (n = 5..10)")


@dataclass
class CleanConfig:
    min_chars: int = 10
    max_chars: int = 1_000_000
    min_zh_ratio: float = 0.3       # only applied when the corpus lang is "zh"
    max_punct_repeat: int = 3       # runs of the same punctuation mark longer than this are shortened
    nfkc: bool = True               # NFKC-normalize, keeping Chinese full-width punctuation (see clean.py)
    boilerplate: bool = True        # drop lines that are obvious web boilerplate (pretrain docs only)
    # Quality operators (data_process/quality.py, pii.py, quality_model.py; order and reasons: docs/cleaning.md)
    t2s: bool = False               # OpenCC traditional -> simplified (documents and messages)
    t2s_min_share: float = field(default=0.05, metadata=settings.limits(ge=0, le=1))  # share of traditional Han chars
    langid: bool = False            # drop documents whose language (py3langid) the corpus lang does not take
    langid_min_chars: int = field(default=20, metadata=settings.limits(ge=0))   # shorter documents are not judged
    rules: bool = False             # the repetition and quality rules ([clean.quality_rules] thresholds)
    quality_rules: RulesConfig = field(default_factory=RulesConfig)
    pii: bool = False               # typed PII placeholders (<PHONE>, <ID>, ...) in documents and messages
    audit_samples: int = field(default=20, metadata=settings.limits(ge=0))   # before/after samples kept per operator
    # Model scores (data_process/quality_model.py): the folder `python data_process.py train-quality` wrote
    quality_model: str = ""         # "" = no scores; e.g. "data/quality" (relative to the project root)
    quality_keep: str = field(default="all", metadata=settings.limits(choices=("all", "threshold", "pareto")))
    quality_threshold: float = field(default=0.5, metadata=settings.limits(ge=0, le=1))   # for keep = "threshold"
    pareto_alpha: float = field(default=9.0, metadata=settings.limits(gt=0))   # GPT-3's alpha, for keep = "pareto"
    ppl_keep: list[str] = field(default_factory=list)   # perplexity buckets to keep (head/middle/tail); [] = all
    ppl_reference: str = ""         # the corpus whose perplexity cutoffs define the buckets ("" = this corpus)

    def __post_init__(self):
        bad = [b for b in self.ppl_keep if b not in PPL_BUCKETS]
        if bad:
            raise ValueError(f"ppl_keep: {bad} are not buckets; the buckets are {list(PPL_BUCKETS)}")


@dataclass
class CorpusSpec:
    name: str
    reader: str
    paths: list[str]
    lang: str = "zh"                # "zh" | "en" | "mixed"
    role: str = "pretrain"          # "pretrain" | "sft" | "dpo" | "rl" (GRPO prompt sets: data/rl/<stage>.jsonl)
    stage: str = ""
    priority: int = 50
    encoding: str = ""              # text readers (plain_text, medical_dialogue_csv/_txt): "" = the reader's default
    clean: CleanConfig = field(default_factory=CleanConfig)   # [clean] defaults merged with [corpus.clean]


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    decontam_ngram: int = 10
    # share of a question's n-grams (in one of its printed forms) a text must hold to be contamination
    # (dedup.py's docstring says how the default was chosen)
    decontam_min_share: float = field(default=0.3, metadata=settings.limits(gt=0, le=1))
    # memory the dedup step may use, all its workers together; signatures and band partitions live on disk
    memory_gb: float = field(default=2.0, metadata=settings.limits(gt=0))


@dataclass
class EvalSetSpec:
    name: str
    format: str                     # "ceval" | "cmmlu"
    paths: list[str]


@dataclass
class TokenizerConfig:
    model: str = ""
    vocab_size: int = 12288
    sample_chars: int = 20_000_000


@dataclass
class TokenizeConfig:
    val_fraction: float = 0.01
    shard_tokens: int = 100_000_000
    sft_as_pretrain: list[str] = field(default_factory=lambda: ["medical"])


@dataclass
class SftConfig:
    max_tokens: int = 1024
    val_fraction: float = 0.02
    stages: list[str] = field(default_factory=lambda: ["general", "medical", "medical_dialogue", "reasoning"])


@dataclass
class Recipe:
    run: RunConfig
    clean: CleanConfig
    corpora: list[CorpusSpec]
    dedup: DedupConfig
    eval_sets: list[EvalSetSpec]
    tokenizer: TokenizerConfig
    tokenize: TokenizeConfig
    sft: SftConfig
    root: Path                      # project root: corpus globs and data_dir are relative to it
    data_dir: Path                  # absolute
    raw: dict                       # the parsed TOML, as is
    path: Path | None = None        # the recipe file

    def corpus(self, name: str) -> CorpusSpec:
        for c in self.corpora:
            if c.name == name:
                return c
        raise KeyError(f"no corpus named {name!r} in the recipe")


ROLES = ("pretrain", "sft", "dpo", "rl")
FINGERPRINTS = ("stat", "content")
LANGS = ("zh", "en", "mixed")
EVAL_FORMATS = ("ceval", "cmmlu")


class RecipeError(settings.ConfigError):
    pass


def _build(cls, table, where: str, base=None):
    """Instantiate dataclass `cls` from a TOML table; unknown keys and wrong types are errors (settings.build)."""
    try:
        return settings.build(cls, table, where, base=base)
    except settings.ConfigError as e:
        raise RecipeError(str(e)) from None


def _string_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where}: expected a list of strings, got {value!r}")
    return value


def _check_encoding(spec: CorpusSpec, where: str) -> None:
    from data_process.readers import ENCODING_READERS, check_encoding

    if spec.reader not in ENCODING_READERS:
        raise RecipeError(f"{where}.encoding: reader {spec.reader!r} reads JSON or parquet, which has no encoding "
                          f"setting (JSON is UTF-8); readers that take one: {sorted(ENCODING_READERS)}")
    try:
        check_encoding(spec.encoding)
    except ValueError as e:
        raise RecipeError(f"{where}.encoding: {e}") from None


TOP_LEVEL = ("run", "clean", "corpus", "dedup", "eval_set", "tokenizer", "tokenize", "sft")


def parse_recipe(raw: dict, root: Path, path: Path | None = None) -> Recipe:
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(f"recipe: unknown table(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    run = _build(RunConfig, raw.get("run", {}), "[run]")
    if run.fingerprint not in FINGERPRINTS:
        raise RecipeError(f"[run].fingerprint: {run.fingerprint!r} is not one of {FINGERPRINTS}")
    clean = _build(CleanConfig, raw.get("clean", {}), "[clean]")
    corpora = []
    for i, table in enumerate(raw.get("corpus", [])):
        where = f"[[corpus]] #{i + 1} ({table.get('name', '?') if isinstance(table, dict) else '?'})"
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: expected a table")
        table = dict(table)
        corpus_clean = _build(CleanConfig, table.pop("clean", {}), f"{where}.clean", base=clean)
        if "paths" in table:
            table["paths"] = _string_list(table["paths"], f"{where}.paths")
        spec = _build(CorpusSpec, {**table, "clean": corpus_clean}, where)
        if spec.role not in ROLES:
            raise RecipeError(f"{where}.role: {spec.role!r} is not one of {ROLES}")
        if spec.lang not in LANGS:
            raise RecipeError(f"{where}.lang: {spec.lang!r} is not one of {LANGS}")
        if not spec.name or "/" in spec.name:
            raise RecipeError(f"{where}.name: must be a non-empty name without '/'")
        if spec.encoding:
            _check_encoding(spec, where)
        corpora.append(spec)
    names = [c.name for c in corpora]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"recipe: corpus names must be unique, repeated: {dupes}")
    eval_sets = []
    for i, table in enumerate(raw.get("eval_set", [])):
        where = f"[[eval_set]] #{i + 1}"
        table = dict(table)
        if "paths" in table:
            table["paths"] = _string_list(table["paths"], f"{where}.paths")
        spec = _build(EvalSetSpec, table, where)
        if spec.format not in EVAL_FORMATS:
            raise RecipeError(f"{where}.format: {spec.format!r} is not one of {EVAL_FORMATS}")
        eval_sets.append(spec)
    data_dir = Path(run.data_dir)
    return Recipe(
        run=run, clean=clean, corpora=corpora,
        dedup=_build(DedupConfig, raw.get("dedup", {}), "[dedup]"),
        eval_sets=eval_sets,
        tokenizer=_build(TokenizerConfig, raw.get("tokenizer", {}), "[tokenizer]"),
        tokenize=_build(TokenizeConfig, raw.get("tokenize", {}), "[tokenize]"),
        sft=_build(SftConfig, raw.get("sft", {}), "[sft]"),
        root=root, data_dir=data_dir if data_dir.is_absolute() else root / data_dir,
        raw=raw, path=path,
    )


def load_recipe(path, root=None, sets=()) -> Recipe:
    """Parse a recipe TOML file, `--set` overrides (`dedup.threshold=0.7`) applied. `root` (default: the current
    directory) anchors relative paths."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: {e}") from None
    try:
        raw = settings.apply_sets(raw, sets, f"{path}: --set")
    except settings.ConfigError as e:
        raise RecipeError(str(e)) from None
    return parse_recipe(raw, Path(root).resolve() if root is not None else Path.cwd(), path)


def resolve_paths(recipe: Recipe, patterns: list[str]) -> list[Path]:
    """Expand globs (relative to recipe.root) into a sorted, de-duplicated list of files."""
    files = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_absolute():
            anchor, rel = Path(p.anchor), str(p.relative_to(p.anchor))
        else:
            anchor, rel = recipe.root, pattern
        files.update(f for f in anchor.glob(rel) if f.is_file())
    return sorted(files)
