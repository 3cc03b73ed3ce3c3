"""Model-based quality scores (data_process/quality_model.py): the Kneser-Ney ARPA model scored by KenLM equals
the formula, both models train deterministically, scores land on records, keep-by-threshold/Pareto/bucket."""
import math
import tomllib
import subprocess
import sys

import kenlm
import pytest

from data_process import quality_model as qm
from data_process.readers import READERS
from data_process.recipe import parse_recipe


def sample_docs(samples, reader, rel, n=None):
    path = samples / rel
    docs = [r["text"] if r["kind"] == "doc" else "\n".join(m["content"] for m in r["messages"])
            for r in READERS[reader](path, path.name, None) if isinstance(r, dict)]
    return docs[:n] if n else docs


@pytest.fixture(scope="module")
def lm_and_model(samples, tmp_path_factory):
    docs = sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt", 30)
    counts = qm.kn_counts(docs, 3)
    prob, bow = qm.kn_model(counts)
    path = tmp_path_factory.mktemp("lm") / "lm.arpa"
    qm.write_arpa(prob, bow, path)
    return qm.load_kenlm(path), prob, bow, docs


def test_kenlm_scores_of_our_arpa_equal_the_kneser_ney_formula(lm_and_model, samples):
    lm, prob, bow, docs = lm_and_model
    held_out = sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt")[40].split("\n")[0][:60]
    prob = [dict(p) for p in prob]
    prob[0][("<unk>",)] = 1e-7                 # what write_arpa gives an unseen character
    for sentence in (docs[0].split("\n")[0][:60], held_out):
        chars = qm.chars_of(sentence).split()
        toks = ["<s>"] + [c if (c,) in prob[0] else "<unk>" for c in chars] + ["</s>"]
        assert "<unk>" in toks or sentence != held_out
        ours = sum(math.log10(qm.lower_prob(prob, bow, tuple(toks[max(0, i - 2):i + 1]))) for i in range(1, len(toks)))
        assert lm.score(" ".join(chars), bos=True, eos=True) == pytest.approx(ours, abs=1e-4)


# Text the scorer must read as KenLM does: whitespace of every kind dropped (str.split's, not only ASCII), empty and
# blank lines skipped, characters the model lacks as <unk> (astral ones, emoji, controls), ARPA's own words as
# text. Not NUL: kenlm's binding passes a C string, so it stops reading the line there (the cleaner removes
# control characters before any score; the compiled scorer reads NUL as <unk>).
HARD_CASES = ["", "\n", "\n\n \t\n", "发热", "发\n\n热\n", "\u3000发 热\xa0。\r\n咳嗽\u2028\u200b",
              "𠀀𠀁发热𪚥😀", "\x01发\x1f热\x85\x7f", "<s></s><unk> s", "abc DEF 123", "发" * 5000, "。\n" * 300]


@pytest.fixture
def kenlm_and_compiled(lm_and_model, tmp_path):
    """The reference LM as KenLM loads it and as the compiled scorer reads the same ARPA file."""
    kenlm_model, prob, bow, _ = lm_and_model
    path = tmp_path / "lm.arpa"
    qm.write_arpa(prob, bow, path)
    compiled = qm.load_lm(path)
    if not isinstance(compiled, qm.CharLM):
        pytest.skip("no C compiler: doc_perplexity scores with KenLM")
    return kenlm_model, compiled


def test_compiled_scorer_gives_kenlms_scores_on_real_samples_and_hard_cases(kenlm_and_compiled, samples):
    kenlm_model, compiled = kenlm_and_compiled
    docs = (sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt")
            + sample_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
            + sample_docs(samples, "medical_dialogue_csv", "toyhom-medical-dialogue/样例_内科5000-6000.csv", 200)
            + sample_docs(samples, "text_jsonl", "llamafactory-demo/c4_demo.jsonl", 100) + HARD_CASES)
    for doc in docs:
        ours, theirs = compiled.log10(doc), qm.kenlm_log10(kenlm_model, doc)
        assert ours[1] == theirs[1]
        assert ours[0] == theirs[0], doc[:40]    # the same float sums in the same order: the same bits
        assert qm.doc_perplexity(compiled, doc) == qm.doc_perplexity(kenlm_model, doc)
    with pytest.raises(UnicodeEncodeError):      # a lone surrogate: refused by both
        qm.kenlm_log10(kenlm_model, "发\ud800热")
    with pytest.raises(UnicodeEncodeError):
        compiled.log10("发\ud800热")


@pytest.mark.slow
def test_compiled_scorer_equals_kenlm_on_a_50_mb_record(kenlm_and_compiled, samples):
    kenlm_model, compiled = kenlm_and_compiled
    page = "\n".join(sample_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl", 50))
    record = (page * (50_000_000 // len(page.encode()) + 1))[:18_000_000]
    assert len(record.encode()) > 50_000_000
    ours, theirs = compiled.log10(record), qm.kenlm_log10(kenlm_model, record)
    assert ours == theirs


def test_an_arpa_the_compiled_scorer_cannot_hold_is_scored_by_kenlm(tmp_path):
    """Word-level ARPA files (multi-character words) are KenLM's to score: load_lm falls back."""
    path = tmp_path / "words.arpa"
    path.write_text("\\data\\\nngram 1=4\nngram 2=1\n\n\\1-grams:\n-1.0\t<unk>\n-99\t<s>\t-0.3\n-0.5\t</s>\n"
                    "-0.4\thello\t-0.1\n\n\\2-grams:\n-0.2\t<s> hello\n\n\\end\\\n")
    lm = qm.load_lm(path)
    assert not isinstance(lm, qm.CharLM)
    assert qm.doc_perplexity(lm, "hello") == qm.doc_perplexity(qm.load_kenlm(path), "hello")


def test_lm_estimation_is_deterministic(lm_and_model, tmp_path):
    _, _, _, docs = lm_and_model
    for name in ("a.arpa", "b.arpa"):
        qm.write_arpa(*qm.kn_model(qm.kn_counts(docs[:10], 3)), tmp_path / name)
    assert (tmp_path / "a.arpa").read_bytes() == (tmp_path / "b.arpa").read_bytes()


def test_every_context_is_a_probability_distribution(lm_and_model):
    _, prob, bow, _ = lm_and_model
    vocab = [g[0] for g in prob[0]]
    for context in [("<s>",), ("发",), ("<s>", "发"), ("发", "热")]:
        total = sum(qm.lower_prob(prob, bow, context + (w,)) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_curated_text_has_lower_perplexity_than_web_text_under_the_curated_lm(lm_and_model, samples):
    lm, _, _, _ = lm_and_model
    book = sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt")[35:55]
    web = sample_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl", 20)
    book_ppl = sorted(qm.doc_perplexity(lm, d) for d in book)
    web_ppl = sorted(qm.doc_perplexity(lm, d) for d in web)
    assert book_ppl[len(book_ppl) // 2] < web_ppl[len(web_ppl) // 2]


def test_classifier_trains_deterministically_and_separates_held_out_documents(samples, tmp_path):
    pos = sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt")
    neg = sample_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    a = qm.train_classifier(pos[:50], neg[:200], tmp_path / "a.bin", seed=0)
    b = qm.train_classifier(pos[:50], neg[:200], tmp_path / "b.bin", seed=0)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    held_pos = [qm.p_high_quality(a, d) for d in pos[50:]]
    held_neg = [qm.p_high_quality(a, d) for d in neg[200:]]
    assert [qm.p_high_quality(b, d) for d in pos[50:]] == held_pos
    accuracy = (sum(p > 0.5 for p in held_pos) + sum(p <= 0.5 for p in held_neg)) / (len(held_pos) + len(held_neg))
    assert accuracy >= 0.8


def test_scorer_keeps_by_threshold_pareto_and_bucket(tmp_path, samples):
    pos = sample_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt", 15)
    neg = sample_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl", 30)
    qm.train_classifier(pos, neg, tmp_path / qm.CLASSIFIER)
    qm.write_arpa(*qm.kn_model(qm.kn_counts(pos, 3)), tmp_path / qm.LM)
    (tmp_path / qm.CUTOFFS).write_text('{"web": [100.0, 200.0]}')
    scorer = qm.Scorer(tmp_path, "web", keep="threshold", threshold=0.5, ppl_keep=["head"])
    assert scorer.keep_or_reason({"quality": 0.4, "ppl": 50.0, "ppl_bucket": "head"}, "d") == "quality_below_threshold"
    assert scorer.keep_or_reason({"quality": 0.9, "ppl": 150.0, "ppl_bucket": "middle"}, "d") == "ppl_bucket"
    assert scorer.keep_or_reason({"quality": 0.9, "ppl": 50.0, "ppl_bucket": "head"}, "d") is None
    assert [qm.bucket_of(x, [100.0, 200.0]) for x in (99.9, 100.0, 150, 200.0, 1e9)] == \
        ["head", "middle", "middle", "tail", "tail"]
    pareto = qm.Scorer(tmp_path, "web", keep="pareto", pareto_alpha=9.0)
    decisions = [pareto.keep_or_reason({"quality": 0.9}, f"doc:{i}") for i in range(2000)]
    assert decisions == [pareto.keep_or_reason({"quality": 0.9}, f"doc:{i}") for i in range(2000)]  # seeded by id
    kept = decisions.count(None) / len(decisions)
    # GPT-3 keeps when np.random.pareto(alpha) > 1 - score; numpy's pareto is Lomax: P(X > t) = (1 + t)^-alpha
    assert kept == pytest.approx(1.1 ** -9, abs=0.04)
    scores = scorer.score(neg[0])
    assert set(scores) == {"quality", "ppl", "ppl_bucket"} and scores == scorer.score(neg[0])


@pytest.mark.slow
def test_train_quality_command_then_read_step_records_scores(samples, tmp_path):
    """The documented sequence: read, `data_process.py train-quality`, read again with quality_model set."""
    from data_process import pipeline
    from data_process.records import iter_records

    recipe_toml = tmp_path / "recipe.toml"
    recipe_toml.write_text(f"""
[run]
data_dir = "{tmp_path / 'data'}"
[[corpus]]
name = "medical_books"
reader = "plain_text"
paths = ["{samples / 'medicalgpt/pretrain/fever.txt'}"]
[[corpus]]
name = "skypile"
reader = "text_jsonl"
paths = ["{samples / 'skywork-zh-web/zh_general.jsonl'}"]
clean = {{ rules = true }}
""")
    recipe = parse_recipe(tomllib.loads(recipe_toml.read_text()), tmp_path)
    pipeline.read_step(recipe, workers=1, progress=False)
    root = qm.Path(__file__).resolve().parents[1]
    train = [sys.executable, str(root / "data_process.py"), "train-quality", "--recipe", str(recipe_toml),
             "--positive", "medical_books", "--negative", "skypile"]
    from fileio import DirLock

    with DirLock(recipe.data_dir, "a read step"):      # a run on the data dir keeps train-quality out
        locked = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True)
    assert locked.returncode == 3 and "in use by another run" in locked.stderr
    out = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    model_dir = tmp_path / "data" / "quality"
    assert set(qm.json.loads((model_dir / qm.CUTOFFS).read_text())) == {"medical_books", "skypile"}

    scored = parse_recipe({**tomllib.loads(recipe_toml.read_text()),
                           "clean": {"quality_model": str(model_dir), "quality_keep": "threshold"}}, tmp_path)
    result = pipeline.read_step(scored, workers=1, progress=False)
    web = list(iter_records(recipe.data_dir / "clean" / "skypile"))
    assert web and all(set(r["scores"]) == {"quality", "ppl", "ppl_bucket"} for r in web)
    assert all(r["scores"]["quality"] >= 0.5 for r in web)
    counts = result["corpora"]["skypile"]
    assert not counts["skipped"] and counts["kept"] + counts["rejected"] == counts["read"]
    assert counts["rejected_by_reason"].get("quality_below_threshold", 0) > 0

    # The top perplexity bucket as a corpus of its own (docs/cleaning.md): dedup splits the web text in two
    from data_process import dedup

    raw = tomllib.loads(recipe_toml.read_text())
    raw["corpus"].append({**raw["corpus"][1], "name": "skypile_head", "priority": 60,
                          "clean": {"quality_model": str(model_dir), "ppl_keep": ["head"],
                                    "ppl_reference": "skypile"}})
    split = parse_recipe(raw, tmp_path)
    pipeline.read_step(split, workers=1, progress=False)
    dedup.run(split, split.data_dir / "clean", split.data_dir / "dedup")
    head = {r["text"] for r in iter_records(split.data_dir / "dedup" / "skypile_head")}
    rest = {r["text"] for r in iter_records(split.data_dir / "dedup" / "skypile")}
    assert head and rest and not head & rest
    assert all(r["scores"]["ppl_bucket"] == "head" for r in iter_records(split.data_dir / "dedup" / "skypile_head"))
