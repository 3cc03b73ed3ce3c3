"""Model-based quality scores: a fastText quality classifier and a KenLM character n-gram perplexity, both trained
on this project's own cleaned text by `python data_process.py train-quality`, and the Scorer the cleaner uses.

    python data_process.py --steps read                  # data/clean/<corpus>/ (no scores yet)
    python data_process.py train-quality                 # -> data/quality/{classifier.bin, lm.arpa, cutoffs.json}
    python data_process.py --steps read --force --set 'clean.quality_model="data/quality"'   # scores on records

- Classifier (as in the GPT-3 and FineWeb-Edu filters, datatrove's FastTextClassifierFilter, data-juicer's
  quality classifiers): positives are documents of the curated corpora (Wikipedia, BaiduBaike, medical books,
  guidelines, the medical encyclopedia), negatives documents of the web corpora (C4_zh, WuDao, SkyPile,
  MiniMind pretrain); features are characters with word n-grams 1..3 over them (character n-grams: Chinese has no
  spaces). One thread and a fixed seed: the same data gives the same model, bit for bit (with the fasttext-wheel
  0.9.2 build; PyPI's `fasttext` 0.9.3 gives a different model on every run, and sometimes "Encountered NaN").
- Perplexity (CCNet, arXiv 1911.00359): an interpolated Kneser-Ney character n-gram model of the curated text,
  estimated here and written as an ARPA file, which KenLM loads and scores. KenLM's Python package has no
  estimator (lmplz is a C++ tool it does not ship), so estimation is the one piece written by hand; KenLM's
  scores of it are checked against the formula in tests/test_quality_model.py. Per-corpus percentile cutoffs
  (CCNet's head / middle / tail at the 30th and 60th percentiles) are measured on each pretraining corpus.
Every kept document gets `record["scores"] = {"quality": p_hq, "ppl": perplexity, "ppl_bucket": "head"|...}`.
Keeping by score (the recipe's `quality_keep`): "all" (record only), "threshold" (p_hq >= quality_threshold),
"pareto" (GPT-3: keep when a Pareto(alpha) draw > 1 - p_hq; the draw is seeded by the document id, so a re-run
and any worker count keep the same documents); `ppl_keep` keeps only the named buckets.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fileio import atomic_write_bytes

CLASSIFIER = "classifier.bin"
LM = "lm.arpa"
CUTOFFS = "cutoffs.json"
POSITIVE = ("wiki_zh", "baidubaike", "medical_books", "medical_pretrain", "guidelines")
NEGATIVE = ("c4_zh", "wudao", "skypile", "minimind_pretrain")
BUCKETS = ("head", "middle", "tail")
BUCKET_PERCENTILES = (30, 60)        # CCNet's split of each corpus by perplexity
LM_ORDER = 3
KN_DISCOUNT = 0.75
FT_CHARS = 2000                      # characters of a document the classifier reads (its head)


def chars_of(text: str, limit: int | None = None) -> str:
    """The token sequence both models read: characters, whitespace dropped, separated by spaces."""
    text = "".join(text.split())
    return " ".join(text[:limit] if limit else text)


# ---------------------------------------------------------------- fastText classifier


def train_classifier(pos_docs: list[str], neg_docs: list[str], path: Path, seed: int = 0, epoch: int = 10):
    """Train the fastText quality classifier (balanced by down-sampling the larger side); returns the model."""
    import fasttext

    rng = random.Random(seed)
    n = min(len(pos_docs), len(neg_docs))
    if n == 0:
        raise ValueError(f"train-quality needs documents on both sides: {len(pos_docs)} positive, "
                         f"{len(neg_docs)} negative")
    pos, neg = rng.sample(pos_docs, n), rng.sample(neg_docs, n)
    lines = [f"__label__hq {chars_of(d, FT_CHARS)}" for d in pos] + [f"__label__lq {chars_of(d, FT_CHARS)}" for d in neg]
    rng.shuffle(lines)
    train_txt = path.with_suffix(".train.txt")
    train_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        model = fasttext.train_supervised(str(train_txt), epoch=epoch, lr=0.5, wordNgrams=3, dim=32, minCount=1,
                                          bucket=200_000, thread=1, seed=seed, verbose=0)
    finally:
        train_txt.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model.save_model(str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return model


def p_high_quality(model, text: str) -> float:
    # model.f.predict: the binding's own call; fasttext 0.9.3's Python predict() wraps it in np.array(copy=False),
    # which numpy 2 refuses
    predictions = model.f.predict(chars_of(text, FT_CHARS) + "\n", 2, 0.0, "strict")
    return float(dict((label, prob) for prob, label in predictions).get("__label__hq", 0.0))


# ---------------------------------------------------------------- Kneser-Ney character LM -> ARPA -> KenLM


def kn_counts(docs: list[str], order: int) -> list[Counter]:
    """Kneser-Ney counts per order over every line as <s> c1 c2 ... </s>: the highest order and the n-grams that
    start with <s> (they have no left context) keep their real counts; every other lower-order n-gram gets its
    continuation count (how many distinct characters precede it), as lmplz and SRILM's -kndiscount do."""
    counts = [Counter() for _ in range(order)]
    for doc in docs:
        for line in doc.split("\n"):
            toks = chars_of(line).split()
            if not toks:
                continue
            seq = ("<s>", *toks, "</s>")
            for i in range(len(seq) - order + 1):
                counts[order - 1][seq[i:i + order]] += 1
            for k in range(1, min(order, len(seq) + 1)):
                counts[k - 1][seq[:k]] += 1
    for k in range(order - 1, 0, -1):           # continuation counts of order k from the n-grams of order k+1
        for gram in counts[k]:
            counts[k - 1][gram[1:]] += 1
    return counts


def kn_model(counts: list[Counter], discount: float = KN_DISCOUNT):
    """Interpolated Kneser-Ney: prob[k][gram] for every seen gram of order k+1, and the backoff weight of every
    context, such that p(w|h) = prob(hw) for a seen hw and bow(h) * p(w|h[1:]) otherwise (which is how ARPA reads)."""
    order = len(counts)
    vocab = sorted(g for g in counts[0] if g != ("<s>",))
    prob: list[dict] = [dict() for _ in range(order)]
    bow: list[dict] = [dict() for _ in range(order)]
    total = sum(counts[0][g] for g in vocab)
    n_types = len(vocab)
    # unigrams: discounted continuation counts, the mass taken interpolated with the uniform distribution
    gamma0 = discount * n_types / total
    for g in vocab:
        prob[0][g] = max(counts[0][g] - discount, 0) / total + gamma0 / n_types
    for k in range(1, order):
        ctx_total, ctx_types = defaultdict(int), defaultdict(int)
        for gram, c in counts[k].items():
            ctx_total[gram[:-1]] += c
            ctx_types[gram[:-1]] += 1
        gamma = {h: discount * ctx_types[h] / ctx_total[h] for h in ctx_total}
        for gram, c in counts[k].items():
            lower = lower_prob(prob, bow, gram[1:])
            prob[k][gram] = max(c - discount, 0) / ctx_total[gram[:-1]] + gamma[gram[:-1]] * lower
        bow[k - 1] = gamma
    return prob, bow


def lower_prob(prob, bow, gram: tuple) -> float:
    """p(gram[-1] | gram[:-1]) in the backoff form (what KenLM computes from the ARPA file)."""
    k = len(gram) - 1
    if gram in prob[k]:
        return prob[k][gram]
    if k == 0:
        return 0.0  # an unknown character: ARPA's <unk> (never asked of training n-grams)
    return bow[k - 1].get(gram[:-1], 1.0) * lower_prob(prob, bow, gram[1:])


def write_arpa(prob, bow, path: Path, unk_prob: float = 1e-7) -> None:
    """The model as an ARPA file (the text format KenLM, SRILM and every n-gram toolkit read)."""
    order = len(prob)
    grams = [sorted(p.items()) for p in prob]
    grams[0] = [(("<unk>",), unk_prob), (("<s>",), None)] + grams[0]
    lines = ["\\data\\"] + [f"ngram {k + 1}={len(g)}" for k, g in enumerate(grams)] + [""]
    for k, items in enumerate(grams):
        lines.append(f"\\{k + 1}-grams:")
        for gram, p in items:
            line = f"{-99.0 if p is None else math.log10(p):.7f}\t{' '.join(gram)}"
            if k < order - 1 and gram in bow[k]:
                line += f"\t{math.log10(bow[k][gram]):.7f}"
            lines.append(line)
        lines.append("")
    lines.append("\\end\\")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def load_lm(path: Path):
    import kenlm

    config = kenlm.Config()
    config.show_progress = False      # one progress bar per work unit would bury the pipeline's own
    return kenlm.Model(str(path), config)


def doc_perplexity(lm, text: str) -> float:
    """KenLM perplexity of a document: log10 probabilities summed over its lines (each with <s> and </s>)."""
    log10, n = 0.0, 0
    for line in text.split("\n"):
        toks = chars_of(line)
        if not toks:
            continue
        log10 += lm.score(toks, bos=True, eos=True)
        n += toks.count(" ") + 2          # characters + </s>
    return 10.0 ** (-log10 / n) if n else float("inf")


# ---------------------------------------------------------------- the scorer the cleaner uses


def bucket_of(ppl: float, cutoffs: list[float]) -> str:
    return BUCKETS[int(np.searchsorted(np.asarray(cutoffs), ppl, side="right"))]


class Scorer:
    """Loads data/quality/ once per work unit; `score(text) -> dict`, `keep_or_reason(scores, doc_id)`."""

    def __init__(self, model_dir: Path, corpus: str, keep: str = "all", threshold: float = 0.5,
                 pareto_alpha: float = 9.0, ppl_keep: list[str] | None = None):
        import fasttext
        import kenlm

        model_dir = Path(model_dir)
        missing = [n for n in (CLASSIFIER, LM, CUTOFFS) if not (model_dir / n).exists()]
        if missing:
            raise FileNotFoundError(f"quality model {model_dir}: missing {missing}; run `python data_process.py "
                                    "train-quality` first")
        self.classifier = fasttext.load_model(str(model_dir / CLASSIFIER))
        self.lm = load_lm(model_dir / LM)
        self.cutoffs = json.loads((model_dir / CUTOFFS).read_text()).get(corpus)
        self.keep, self.threshold, self.alpha = keep, threshold, pareto_alpha
        self.ppl_keep = list(ppl_keep or [])
        if self.ppl_keep and self.cutoffs is None:
            raise ValueError(f"ppl_keep {self.ppl_keep} for corpus {corpus!r}, but {model_dir / CUTOFFS} has no "
                             "cutoffs for it (train-quality measures every pretraining corpus in data/clean)")

    def score(self, text: str) -> dict:
        scores = {"quality": round(p_high_quality(self.classifier, text), 4),
                  "ppl": round(doc_perplexity(self.lm, text), 2)}
        if self.cutoffs is not None:
            scores["ppl_bucket"] = bucket_of(scores["ppl"], self.cutoffs)
        return scores

    def keep_or_reason(self, scores: dict, doc_id: str) -> str | None:
        if self.keep == "threshold" and scores["quality"] < self.threshold:
            return "quality_below_threshold"
        if self.keep == "pareto":
            seed = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
            if np.random.default_rng(seed).pareto(self.alpha) <= 1 - scores["quality"]:
                return "quality_pareto"
        if self.ppl_keep and scores.get("ppl_bucket") not in self.ppl_keep:
            return "ppl_bucket"
        return None


def model_digest(model_dir: Path) -> str:
    """For the read step's fingerprint: a retrained model re-scores the corpora."""
    h = hashlib.sha256()
    for name in (CLASSIFIER, LM, CUTOFFS):
        p = Path(model_dir) / name
        h.update(p.read_bytes() if p.exists() else b"missing")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- train-quality


def corpus_docs(clean_root: Path, name: str, limit: int) -> list[str]:
    from data_process.records import checked_parts, iter_records

    out_dir = clean_root / name
    if not (out_dir / "manifest.json").exists():   # a corpus the read step has not written (not in this run)
        return []
    docs = []
    for r in iter_records(checked_parts(out_dir, require_manifest=True)):   # damaged parts: an error naming the step
        if r.get("kind") == "doc" and r["text"].strip():
            docs.append(r["text"])
            if len(docs) >= limit:
                break
    return docs


def train(recipe, out_dir: Path, positive=POSITIVE, negative=NEGATIVE, max_docs: int = 50_000,
          lm_chars: int = 5_000_000, seed: int = 0) -> dict:
    """Train the classifier and the LM on data/clean/, measure per-corpus perplexity cutoffs; returns a report."""
    t0 = time.time()
    clean_root = recipe.data_dir / "clean"
    pos_by = {n: corpus_docs(clean_root, n, max_docs) for n in positive}
    neg_by = {n: corpus_docs(clean_root, n, max_docs) for n in negative}
    pos = [d for n in positive for d in pos_by[n]]
    neg = [d for n in negative for d in neg_by[n]]
    out_dir.mkdir(parents=True, exist_ok=True)
    train_classifier(pos, neg, out_dir / CLASSIFIER, seed=seed)
    lm_docs, n_chars = [], 0
    for d in pos:                       # the curated text, up to lm_chars characters
        lm_docs.append(d)
        n_chars += len(d)
        if n_chars >= lm_chars:
            break
    write_arpa(*kn_model(kn_counts(lm_docs, LM_ORDER)), out_dir / LM)
    lm = load_lm(out_dir / LM)
    cutoffs = {}
    for spec in recipe.corpora:
        if spec.role != "pretrain":
            continue
        docs = corpus_docs(clean_root, spec.name, max_docs)
        if docs:
            ppl = [doc_perplexity(lm, d) for d in docs]
            cutoffs[spec.name] = [round(float(np.percentile(ppl, q)), 2) for q in BUCKET_PERCENTILES]
    atomic_write_bytes(out_dir / CUTOFFS, json.dumps(cutoffs, indent=1, sort_keys=True).encode())
    return {"positive_docs": {n: len(v) for n, v in pos_by.items()},
            "negative_docs": {n: len(v) for n, v in neg_by.items()},
            "lm_chars": n_chars, "lm_order": LM_ORDER, "cutoffs": cutoffs, "out_dir": str(out_dir),
            "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> int:
    import settings
    from data_process.recipe import RecipeError, load_recipe

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python data_process.py train-quality",
                                description="Train the fastText quality classifier (curated vs web documents of "
                                            "data/clean/) and the KenLM character perplexity model (curated text), "
                                            "and measure per-corpus perplexity buckets. Run the read step first. "
                                            "Exit status: 0 done; 1 no documents on one side; 2 a bad recipe; "
                                            "3 the data dir is in use by another run; 5 a corpus in data/clean/ is damaged.")
    p.add_argument("--recipe", type=Path, default=None, help="recipe TOML (default: config/recipe.toml)")
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (default: the recipe's)")
    p.add_argument("--out", type=Path, default=None, help="model folder (default: <data-dir>/quality)")
    p.add_argument("--positive", default=",".join(POSITIVE), help="curated corpora (comma-separated)")
    p.add_argument("--negative", default=",".join(NEGATIVE), help="web corpora (comma-separated)")
    p.add_argument("--max-docs", type=int, default=50_000, help="documents read per corpus")
    p.add_argument("--lm-chars", type=int, default=5_000_000, help="characters of curated text for the LM")
    p.add_argument("--seed", type=int, default=0)
    settings.add_set_flag(p, "run.data_dir=/big/data")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe or root / "config" / "recipe.toml",
                             root=root if args.recipe is None else Path.cwd(), sets=args.sets)
    except (RecipeError, OSError) as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        recipe.data_dir = args.data_dir.resolve()
    out = args.out or recipe.data_dir / "quality"
    from data_process.exits import EXIT_NOTHING_READ, run_command
    from fileio import DirLock

    def job():
        # the data dir's lock, as the pipeline takes it: no read step may rewrite data/clean/ while it is read here
        with DirLock(recipe.data_dir, "data_process.py train-quality"):
            return train(recipe, out, [s for s in args.positive.split(",") if s],
                         [s for s in args.negative.split(",") if s], args.max_docs, args.lm_chars, args.seed)
    report = run_command(job, recipe.data_dir, value_error_exit=EXIT_NOTHING_READ)   # ValueError: no documents
    if isinstance(report, int):
        return report
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0
