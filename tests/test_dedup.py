"""The dedup step (data_process/dedup.py): cross-corpus exact/near dedup with the keep policy, decontamination
against the real C-Eval/CMMLU samples, determinism across worker counts, re-runs, bad input."""
import csv
import json
import random

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLES, edit
from data_process import dedup, evalsets, minhash
from data_process.recipe import parse_recipe
from data_process.records import iter_records, write_parts


def skywork(k=None):
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:k]


def toyhom(k):
    with open(SAMPLES / "toyhom-medical-dialogue" / "样例_内科5000-6000.csv", encoding="gb18030", newline="") as f:
        rows = list(csv.DictReader(f))[:k]
    return [r["ask"] + "\n" + r["answer"] for r in rows]


def fever(k):
    lines = (SAMPLES / "medicalgpt" / "pretrain" / "fever.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if len(line) >= 200][:k]


def firefly(k):
    with open(SAMPLES / "firefly" / "dummy_pretrain.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:k]



def docs(corpus, texts, start=0):
    return [{"id": f"{corpus}.jsonl:{start + i}", "corpus": corpus, "kind": "doc", "text": t}
            for i, t in enumerate(texts)]


def make_run(tmp_path, corpora: dict, priorities: dict, eval_sets=(), dedup_cfg=None, part_records=100_000):
    """Write cleaned corpora (in the given recipe order) and return (recipe, clean_root, out_root)."""
    clean = tmp_path / "clean"
    for name, records in corpora.items():
        write_parts(records, clean / name, part_records=part_records)
        (clean / name / "manifest.json").write_text(json.dumps({"records": len(records)}))
    raw = {"corpus": [{"name": n, "reader": "jsonl", "paths": [], "priority": priorities[n]} for n in corpora],
           "eval_set": list(eval_sets), "dedup": dedup_cfg or {}}
    return parse_recipe(raw, tmp_path), clean, tmp_path / "dedup"


def kept_ids(out_root, name):
    return [r["id"] for r in iter_records(out_root / name)]


def test_planted_exact_and_near_duplicates_across_corpora_keep_the_higher_priority_copy(tmp_path):
    rng = random.Random(0)
    texts = skywork(60)
    web = docs("web", texts[:40])
    books = docs("books", texts[40:60])
    # exact copies hidden by full-width punctuation, whitespace and case; near copies with 1% edits
    web.append({**docs("web", [texts[45].replace("，", ",").replace("。", ". ").upper()], 100)[0]})
    web.append({**docs("web", [edit(texts[50], 0.01, rng)], 101)[0]})
    books.append({**docs("books", [edit(texts[3], 0.01, rng)], 200)[0]})
    # web is listed first in the recipe but books has the higher priority
    recipe, clean, out = make_run(tmp_path, {"web": web, "books": books}, {"web": 30, "books": 90})
    report = dedup.run(recipe, clean, out, workers=1)

    assert "web.jsonl:100" not in kept_ids(out, "web") and "web.jsonl:101" not in kept_ids(out, "web")
    assert "books.jsonl:5" in kept_ids(out, "books") and "books.jsonl:10" in kept_ids(out, "books")
    # the near copy in the higher-priority corpus wins over the web original
    assert "books.jsonl:200" in kept_ids(out, "books") and "web.jsonl:3" not in kept_ids(out, "web")
    r = report["corpora"]
    assert r["web"]["exact_dups"] == 1 and r["web"]["exact_dups_of"] == {"books": 1}
    assert r["web"]["near_dups"] == 2 and r["web"]["near_dups_of"] == {"books": 2}
    assert r["books"]["exact_dups"] == r["books"]["near_dups"] == 0
    assert r["web"]["kept"] == 39 and r["books"]["kept"] == 21
    assert report["settings"]["keep_order"] == ["books", "web"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["corpora"] == r
    manifest = json.loads((out / "web" / "manifest.json").read_text())
    assert manifest["records"] == 39 and manifest["dedup"]["near_dups"] == 2
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in examples}
    assert kinds == {"exact", "near"}
    for e in examples:
        assert e["kept"]["corpus"] == "books" and e["dropped"]["corpus"] == "web"
        if e["kind"] == "near":
            assert e["true_jaccard"] > 0.8 and abs(e["estimated_jaccard"] - e["true_jaccard"]) < 0.1


def test_equal_priority_keeps_recipe_order_then_first_seen(tmp_path):
    texts = skywork(6)
    a = docs("a", [texts[0], texts[1], texts[1]])
    b = docs("b", [texts[0], texts[2]])
    recipe, clean, out = make_run(tmp_path, {"a": a, "b": b}, {"a": 50, "b": 50})
    report = dedup.run(recipe, clean, out, workers=1)
    assert kept_ids(out, "a") == ["a.jsonl:0", "a.jsonl:1"]
    assert kept_ids(out, "b") == ["b.jsonl:1"]
    assert report["corpora"]["a"]["exact_dups_of"] == {"a": 1}
    assert report["corpora"]["b"]["exact_dups_of"] == {"a": 1}


def test_near_duplicates_from_real_samples_are_found_by_edit_rate():
    """Real Chinese web pages, medical dialogues, a textbook and Firefly pretrain text, each with variants at
    controlled character edit rates: light edits (true Jaccard >= 0.85) are found, heavy ones (<= 0.5) not."""
    rng = random.Random(3)
    base = skywork(40) + toyhom(300) + fever(30) + firefly(20)
    base = [t for t in base if len(t) >= 150][:200]
    texts, pairs = list(base), []
    for i, t in enumerate(base):
        for rate in (0.005, 0.01, 0.15, 0.3):
            pairs.append((i, len(texts)))
            texts.append(edit(t, rate, rng))
    norm = [minhash.normalize(t) for t in texts]
    bands_n, rows_n = minhash.lsh_params(0.8, 128)
    sigs = minhash.MinHasher().signatures(norm)
    bands, sk = minhash.band_hashes(sigs, bands_n, rows_n), minhash.sketch(sigs)
    edges, _ = dedup.verified_edges(bands, sk, np.ones(len(texts), bool), 0.8)
    found = set(zip(edges["u"].tolist(), edges["v"].tolist()))
    high, low = [], []
    for a, b in pairs:
        j = minhash.jaccard(set(minhash.shingles(norm[a], 5)), set(minhash.shingles(norm[b], 5)))
        (high if j >= 0.85 else low if j <= 0.5 else []).append((a, b) in found)
    assert len(high) >= 300 and len(low) >= 300
    assert np.mean(high) >= 0.95
    assert np.mean(low) <= 0.01


def test_same_kept_set_with_one_and_two_workers(tmp_path, monkeypatch):
    rng = random.Random(5)
    texts = skywork(80)
    a = docs("a", texts[:50] + [edit(t, 0.01, rng) for t in texts[60:70]])
    b = docs("b", texts[40:80] + [edit(t, 0.01, rng) for t in texts[:10]])
    monkeypatch.setattr(dedup, "BATCH_CHARS", 20_000)     # many batches, so both workers get some
    results = []
    for workers in (1, 2):
        recipe, clean, out = make_run(tmp_path / str(workers), {"a": a, "b": b}, {"a": 50, "b": 60})
        report = dedup.run(recipe, clean, out, workers=workers)
        results.append((kept_ids(out, "a"), kept_ids(out, "b"), report["corpora"],
                        (out / "examples.jsonl").read_text()))
    assert results[0] == results[1]
    assert results[0][2]["a"]["exact_dups"] == 10 and results[0][2]["a"]["near_dups"] == 20


def test_rerun_with_same_inputs_is_skipped_and_a_changed_setting_recomputes(tmp_path):
    texts = skywork(10)
    recipe, clean, out = make_run(tmp_path, {"a": docs("a", texts + texts[:3])}, {"a": 50})
    first = dedup.run(recipe, clean, out, workers=1)
    part = out / "a" / "part-00000.jsonl.zst"
    mtime = part.stat().st_mtime_ns
    assert dedup.run(recipe, clean, out, workers=1) == first
    assert part.stat().st_mtime_ns == mtime
    recipe.dedup.exact = False
    recipe.dedup.near = False
    second = dedup.run(recipe, clean, out, workers=1)
    assert second["corpora"]["a"]["kept"] == 13 and first["corpora"]["a"]["kept"] == 10


def test_conversations_and_preference_pairs_are_compared_on_their_own_text(tmp_path):
    conv = lambda i, sys_prompt, q, a: {"id": f"c:{i}", "corpus": "sft", "kind": "conv", "messages": [
        {"role": "system", "content": sys_prompt}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    pref = lambda i, q, c, r: {"id": f"p:{i}", "corpus": "dpo", "kind": "pref",
                               "prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}
    (q, a), (_, other) = (t.split("\n", 1) for t in toyhom(2))
    sft = [conv(0, "你是医生。", q, a), conv(1, "You are a helpful assistant.", q, a),   # same turns: duplicate
           conv(2, "你是医生。", q, other)]
    dpo = [pref(0, q, a, "不知道"), pref(1, q, a, "去医院吧"),                       # same prompt+chosen
           pref(2, q, "建议先做血常规检查。", "不知道")]
    recipe, clean, out = make_run(tmp_path, {"sft": sft, "dpo": dpo}, {"sft": 60, "dpo": 40})
    report = dedup.run(recipe, clean, out, workers=1)
    assert kept_ids(out, "sft") == ["c:0", "c:2"]
    assert kept_ids(out, "dpo") == ["p:2"]     # p:0 has the same prompt + chosen text as c:0: a copy of it
    assert report["corpora"]["dpo"]["exact_dups_of"] == {"sft": 2}


def ceval_questions():
    rows = []
    for f in sorted((SAMPLES / "ceval-medical" / "val").glob("*.csv")):
        rows += dedup.read_eval_questions(f, "ceval")[0]
    return rows


def cmmlu_questions():
    rows = []
    for f in sorted((SAMPLES / "cmmlu-medical" / "test").glob("*.csv")):
        rows += dedup.read_eval_questions(f, "cmmlu")[0]
    return rows


def test_decontamination_on_real_ceval_and_cmmlu_samples_removes_planted_questions_only(tmp_path):
    ceval, cmmlu = ceval_questions(), cmmlu_questions()
    long_ceval = [q for q in ceval if len(minhash.normalize_alnum(q.question)) >= 20]
    cq, mq = long_ceval[3], cmmlu[7]
    clean_texts = skywork(120) + toyhom(200)
    web = docs("web", clean_texts)
    # a C-Eval question pasted into a page; a CMMLU question with its options as exam dumps print them;
    # a C-Eval question stated with its blank filled in by the answer
    page = clean_texts[0][:300]
    web.append(docs("web", [page + cq.question + page[:50]], 1000)[0])
    opts = " ".join(f"{letter}. {o}" for letter, o in mq.options.items())
    web.append(docs("web", [f"第{7}题：{mq.question}（ ）\n{opts}\n答案：{mq.answer}"], 1001)[0])
    filled = long_ceval[5]
    statement = filled.question.replace("____", filled.answer_text, 1)
    web.append(docs("web", ["复习要点：" + statement + "。" + clean_texts[1][:200]], 1002)[0])
    sft = [{"id": "s:0", "corpus": "sft", "kind": "conv", "messages": [
        {"role": "user", "content": "请回答：" + cq.question}, {"role": "assistant", "content": "选B。"}]}]
    # preference pairs are checked on their prompt only
    pref = lambda i, prompt, chosen: {"id": f"p:{i}", "corpus": "dpo", "kind": "pref", "chosen": chosen,
                                      "rejected": "不清楚。", "prompt": [{"role": "user", "content": prompt}]}
    dpo = [pref(0, "考考你：" + mq.question + "？" + opts, "选" + mq.answer),
           pref(1, "请解释一下这个知识点。", "原题是：" + cq.question)]
    eval_sets = [{"name": "ceval", "format": "ceval", "paths": [str(SAMPLES / "ceval-medical/val/*.csv")]},
                 {"name": "cmmlu", "format": "cmmlu", "paths": [str(SAMPLES / "cmmlu-medical/test/*.csv")]}]
    recipe, clean, out = make_run(tmp_path, {"web": web, "sft": sft, "dpo": dpo}, {"web": 30, "sft": 60, "dpo": 40},
                                  eval_sets)
    report = dedup.run(recipe, clean, out, workers=1)

    kept = set(kept_ids(out, "web"))
    assert not kept & {"web.jsonl:1000", "web.jsonl:1001", "web.jsonl:1002"}
    assert kept == {f"web.jsonl:{i}" for i in range(len(clean_texts))} - {"web.jsonl:%d" % i for i in
                                                                          _dup_positions(clean_texts)}
    assert kept_ids(out, "sft") == []
    assert kept_ids(out, "dpo") == ["p:1"]
    assert report["eval_sets"]["ceval"]["removed"] == 3 and report["eval_sets"]["cmmlu"]["removed"] == 2
    assert report["eval_sets"]["ceval"]["questions"] == len(ceval)
    assert report["corpora"]["web"]["decontaminated"] == 3
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    hits = {e["dropped"]["id"]: e for e in examples if e["kind"] == "decontam"}
    assert hits["web.jsonl:1001"]["question"]["question"] == mq.question


def _dup_positions(texts):
    """Positions of texts whose normalized form already appeared (the real samples repeat some dialogues)."""
    seen, dups = set(), []
    for i, t in enumerate(texts):
        key = minhash.normalize(t)
        if key in seen:
            dups.append(i)
        seen.add(key)
    return dups


def test_eval_reader_handles_real_crlf_ceval_and_lf_cmmlu_and_the_project_files():
    q, bad = dedup.read_eval_questions(SAMPLES / "ceval-medical/dev/physician_dev.csv", "ceval")
    assert bad == 0 and len(q) == 5 and q[0].answer in "ABCD" and not q[0].question.endswith("\r")
    q, bad = dedup.read_eval_questions(SAMPLES / "cmmlu-medical/test/anatomy.csv", "cmmlu")
    assert bad == 0 and len(q) > 100 and q[0].question == "女性生殖腺是"
    root = dedup.Path(__file__).resolve().parents[1] / "corpora" / "eval"
    for f in sorted(root.glob("ceval/*/*.csv")):
        assert f.read_bytes().count(b"\r\n") == f.read_bytes().count(b"\n")    # CRLF like the real C-Eval
        q, bad = dedup.read_eval_questions(f, "ceval")
        assert bad == 0 and len(q) >= 5
    for f in sorted(root.glob("cmmlu/*/*.csv")):
        assert b"\r" not in f.read_bytes() and f.read_text(encoding="utf-8").startswith(",Question,A,B,C,D,Answer\n")
        q, bad = dedup.read_eval_questions(f, "cmmlu")
        assert bad == 0 and len(q) >= 5


def test_bad_eval_files_give_a_clear_error_or_a_counted_reject(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a cmmlu CSV"):
        dedup.read_eval_questions(wrong, "cmmlu")
    broken = tmp_path / "broken.csv"
    broken.write_text(",Question,A,B,C,D,Answer\n0,好的问题是什么呢,a,b,c,d,A\n1,缺答案的问题,a,b,c,d,\n"
                      "2,多了一列,a,b,c,d,A,extra\n", encoding="utf-8")
    q, bad = dedup.read_eval_questions(broken, "cmmlu")
    assert len(q) == 2 and bad == 1 and q[1].answer is None     # an answerless question is still decontaminated
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(",Question,A,B,C,D,Answer\n0,女性生殖腺是,卵巢,前庭大腺,前庭球,乳腺,A\n".encode("gbk"))
    with pytest.raises(ValueError, match="must be UTF-8"):
        dedup.read_eval_questions(gbk, "cmmlu")


def test_a_corpus_whose_read_step_did_not_finish_is_an_error(tmp_path):
    recipe, clean, out = make_run(tmp_path, {"a": docs("a", skywork(3))}, {"a": 50})
    (clean / "a" / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="read step did not finish"):
        dedup.run(recipe, clean, out, workers=1)


def test_a_run_killed_while_writing_is_redone_and_gives_the_same_output(tmp_path, monkeypatch):
    rng = random.Random(9)
    texts = skywork(30)
    corpora = {"a": docs("a", texts[:20]), "b": docs("b", texts[10:30] + [edit(texts[0], 0.01, rng)])}
    recipe, clean, out = make_run(tmp_path, corpora, {"a": 50, "b": 40})
    real_write = dedup.write_unit

    def dies_on_b(task):
        if task["out_dir"].endswith("b"):
            raise KeyboardInterrupt("killed")
        return real_write(task)
    monkeypatch.setattr(dedup, "write_unit", dies_on_b)
    with pytest.raises(KeyboardInterrupt):
        dedup.run(recipe, clean, out, workers=1)
    assert not (out / "report.json").exists()      # the done-marker is written last
    assert not (out / "a" / "manifest.json").exists()
    monkeypatch.setattr(dedup, "write_unit", real_write)
    report = dedup.run(recipe, clean, out, workers=1)
    assert kept_ids(out, "a") == [f"a.jsonl:{i}" for i in range(20)]
    assert kept_ids(out, "b") == [f"b.jsonl:{i}" for i in range(10, 20)]
    assert report["corpora"]["b"]["exact_dups"] == 10 and report["corpora"]["b"]["near_dups"] == 1


def test_decontam_options_alone_never_match_but_a_short_question_with_its_options_does():
    q = evalsets.Question("anatomy", "test", "0", "女性生殖腺是", dict(zip("ABCD", [
        "卵巢巢巢巢巢巢巢巢", "前庭大腺腺腺腺腺腺腺", "前庭球球球球球球", "乳腺腺腺腺腺腺"])), "A")
    index = dedup.eval_index([[q]], 13)
    assert index["too_short"] == 0 and len(index["hashes"]) > 0

    def hit(text):
        cps, lengths = minhash.fold_batch(*minhash.encode_batch([text]), alnum=True)
        return dedup.find_contamination(cps, lengths, index, 13, 0.5)[0][0] >= 0
    assert hit("第3题 女性生殖腺是（ ）A. 卵巢巢巢巢巢巢巢巢 B. 前庭大腺腺腺腺腺腺腺 C. 前庭球球球球球球 D. 乳腺腺腺腺腺腺")
    assert not hit("A. 卵巢巢巢巢巢巢巢巢 B. 前庭大腺腺腺腺腺腺腺 C. 前庭球球球球球球 D. 乳腺腺腺腺腺腺")
    assert not hit("女性生殖腺是卵巢，男性生殖腺是睾丸。")     # a short stem alone is a common phrase, not a leak


LATEX_ROWS = [  # hand-written, in C-Eval's layout; answers whose text is LaTeX with backslashes
    ("0", "在微积分中，以某个常数为底的指数函数的导数等于它本身，这个常数通常记作____",
     "$\\pi$", "$\\mathrm{e}$", "$\\gamma$", "$\\varphi$", "B"),
    ("1", "血浆中含量最多的阳离子是维持细胞外液渗透压的主要因素，这种阳离子是____",
     "$\\mathrm{K}^{+}$", "$\\mathrm{Ca}^{2+}$", "$\\mathrm{Na}^{+}$", "$\\mathrm{Mg}^{2+}$", "C"),
]


def write_ceval(root, split, subject, rows, answers=True):
    """A C-Eval-layout file: <root>/<split>/<subject>_<split>.csv, UTF-8, CRLF."""
    path = root / split / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for r in rows:
            w.writerow([*r[:6], r[6] if answers else ""])
    return path


def test_latex_answers_do_not_crash_and_their_filled_statements_are_caught(tmp_path):
    write_ceval(tmp_path / "ceval", "val", "basic_medicine", LATEX_ROWS)
    stated = [q[1].replace("____", q[2 + "ABCD".index(q[6])]) for q in LATEX_ROWS]
    texts = skywork(20)
    web = docs("web", texts) + docs("web", ["复习：" + stated[0] + "。" + texts[0][:100],
                                            texts[1][:120] + stated[1]], 100)
    eval_sets = [{"name": "ceval", "format": "ceval", "paths": [str(tmp_path / "ceval/*/*.csv")]}]
    recipe, clean, out = make_run(tmp_path, {"web": web}, {"web": 30}, eval_sets)
    report = dedup.run(recipe, clean, out, workers=1)
    assert not {"web.jsonl:100", "web.jsonl:101"} & set(kept_ids(out, "web"))
    assert report["eval_sets"]["ceval"]["removed"] == 2 and report["corpora"]["web"]["decontaminated"] == 2


def test_answerless_test_split_questions_are_decontaminated(tmp_path):
    write_ceval(tmp_path / "ceval", "test", "basic_medicine", LATEX_ROWS, answers=False)
    texts = skywork(20)
    web = docs("web", texts) + docs("web", [texts[2][:150] + LATEX_ROWS[0][1] + texts[3][:80]], 100)
    eval_sets = [{"name": "ceval", "format": "ceval", "paths": [str(tmp_path / "ceval/*/*.csv")]}]
    recipe, clean, out = make_run(tmp_path, {"web": web}, {"web": 30}, eval_sets)
    report = dedup.run(recipe, clean, out, workers=1)
    assert "web.jsonl:100" not in kept_ids(out, "web")
    assert report["eval_sets"]["ceval"]["questions"] == 2 and report["eval_sets"]["ceval"]["removed"] == 1


def test_default_recipe_decontaminates_every_split_that_exists():
    from data_process.recipe import load_recipe, resolve_paths
    recipe = load_recipe(dedup.Path(__file__).resolve().parents[1] / "config/recipe.toml",
                         root=dedup.Path(__file__).resolve().parents[1])
    for spec in recipe.eval_sets:
        files = resolve_paths(recipe, spec.paths)
        bench = evalsets.discover(recipe.root / "corpora/eval" / spec.name)
        assert sorted(files) == sorted(bench.files())
        assert {evalsets.split_of(f) for f in files} == set(bench.splits)
    assert "test" in evalsets.discover(recipe.root / "corpora/eval/ceval").splits


# ---------------------------------------------------------------------------------------------------------
# The chain rule, bounded memory, the audit file (issue 20 items 2-4), decontamination by share (issue 14.10)
def true_jaccard(a, b):
    return minhash.jaccard(set(minhash.shingles(minhash.normalize(a), 5)), set(minhash.shingles(minhash.normalize(b), 5)))


def chains(n_chains, length, rate, seed):
    """Chains of documents from real text, each link `rate` of its characters edited from the previous one."""
    rng = random.Random(seed)
    base = [t for t in skywork() + toyhom(400) + fever(60) if len(t) >= 300][:n_chains]
    out = []
    for t in base:
        chain = [t]
        for _ in range(length - 1):
            chain.append(edit(chain[-1], rate, rng))
        out.append(chain)
    return out


def components(n, u, v):
    """Connected components by union-find: the old cluster rule, as the reference of what collapsed."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in zip(u, v):
        parent[find(a)] = find(b)
    return [find(x) for x in range(n)]


def test_chains_with_small_edits_per_link_keep_a_document_within_the_threshold_of_every_removed_one(tmp_path):
    cs = chains(40, 8, 0.015, seed=11)
    texts = [t for chain in cs for t in chain]
    recipe, clean, out = make_run(tmp_path, {"web": docs("web", texts)}, {"web": 50})
    report = dedup.run(recipe, clean, out, workers=1)
    kept = {int(i.split(":")[1]) for i in kept_ids(out, "web")}
    audit = pd.read_parquet(out / "removed.parquet")
    removed = {int(i.split(":")[1]): row for i, row in zip(audit["id"], audit.itertuples())}
    assert len(kept) + len(removed) == len(texts) and report["totals"]["near_dups"] == len(removed) > 0
    for c in range(len(cs)):
        members = range(c * 8, c * 8 + 8)
        assert c * 8 in kept                                  # the original of every chain stays
        assert len(kept & set(members)) >= 2                  # no chain collapses to one document
    # every removed document names a kept one, truly within Jaccard 0.7 (the issue's audit criterion)
    far = 0
    for i, row in removed.items():
        k = int(row.kept_id.split(":")[1])
        assert k in kept and k < i and row.reason == "near" and row.similarity >= 0.8
        far += true_jaccard(texts[i], texts[k]) < 0.7
    assert far / len(removed) < 0.02
    # what the old rule (connected components over the same verified edges) did to the same chains
    norm = [minhash.normalize(t) for t in texts]
    sigs = minhash.MinHasher().signatures(norm)
    b, r = minhash.lsh_params(0.8, 128)
    edges, _ = dedup.verified_edges(minhash.band_hashes(sigs, b, r), minhash.sketch(sigs), np.ones(len(texts), bool), 0.8)
    roots = components(len(texts), edges["u"].tolist(), edges["v"].tolist())
    collapsed = sum(len({roots[i] for i in range(c * 8, c * 8 + 8)}) == 1 for c in range(len(cs)))
    assert collapsed >= len(cs) // 2      # the chains are real chains: connectivity would have merged them


def test_greedy_rule_on_a_hand_made_graph():
    # 0~1, 1~2, 2~3 (a chain); 4~5 and 0~5; 6 alone. Keep order = index order.
    e = np.array([(1, 0, .9), (2, 1, .9), (3, 2, .9), (5, 4, .85), (5, 0, .95)], dedup.EDGE)
    status, matches = dedup.keep_greedy(7, e)
    assert [int(s) for s in status] == [0, 3, 0, 3, 0, 3, 0]
    assert {int(m["v"]): int(m["u"]) for m in matches} == {1: 0, 3: 2, 5: 0}   # 5: its best kept match
    # a record excluded (exact duplicate) is never the kept match of another
    status, matches = dedup.keep_greedy(4, e[:3], excluded=np.array([True, False, False, False]))
    assert [int(s) for s in status] == [2, 0, 3, 0]


def test_a_long_chain_is_resolved_past_the_vectorized_rounds():
    n = 300
    e = np.empty(n - 1, dedup.EDGE)
    e["v"], e["u"], e["s"] = np.arange(1, n), np.arange(n - 1), 0.9
    status = np.zeros(n, np.uint8)
    dedup.resolve(0, n, e, status, rounds=3)
    assert (status[0::2] == dedup.KEPT).all() and (status[1::2] == dedup.NEAR).all()


def mixed_corpora(seed=21):
    """Several corpora with exact copies, near copies across corpora, chains and a planted eval question."""
    rng = random.Random(seed)
    texts = skywork(150)
    cs = chains(12, 5, 0.015, seed)
    a = docs("a", texts[:100] + [t for c in cs[:6] for t in c])
    b = docs("b", texts[80:150] + [edit(t, 0.01, rng) for t in texts[:30]] + [t for c in cs[6:] for t in c])
    c = docs("c", [texts[5], texts[90], edit(texts[120], 0.005, rng)] + texts[140:150])
    return {"a": a, "b": b, "c": c}, {"a": 50, "b": 60, "c": 40}


def outputs(out, names):
    audit = pd.read_parquet(out / "removed.parquet").sort_values(["corpus", "id"]).reset_index(drop=True)
    return {n: kept_ids(out, n) for n in names}, audit


def test_a_tiny_memory_budget_cuts_the_work_into_many_partitions_and_gives_the_same_decisions(tmp_path):
    corpora, prio = mixed_corpora()
    small_parts = {}
    for budget in (64.0, 1e-5):
        recipe, clean, out = make_run(tmp_path / str(budget), corpora, prio, dedup_cfg={"memory_gb": budget},
                                      part_records=40)
        report = dedup.run(recipe, clean, out, workers=1)
        small_parts[budget] = (outputs(out, corpora), report)
    (big, big_report), (small, small_report) = small_parts[64.0], small_parts[1e-5]
    assert big_report["totals"]["bucket_partitions"] == 1 and big_report["totals"]["exact_partitions"] == 1
    assert small_report["totals"]["bucket_partitions"] >= 8 and small_report["totals"]["exact_partitions"] >= 2
    assert small_report["totals"]["decide_ranges"] >= 2 and small_report["totals"]["units"] >= 8
    assert big[0] == small[0]
    pd.testing.assert_frame_equal(big[1], small[1])
    assert big_report["corpora"] == small_report["corpora"]
    assert big_report["totals"]["exact_dups"] > 0 and big_report["totals"]["near_dups"] > 0


def test_a_mapper_that_runs_units_out_of_order_gives_the_same_output(tmp_path):
    corpora, prio = mixed_corpora()

    def scrambled(fn, units):       # what a cluster does: units finish in any order, results come back in order
        units = list(units)
        results = {i: fn(units[i]) for i in reversed(range(len(units)))}
        return [results[i] for i in range(len(units))]
    got = []
    for name, mapper in (("pool", None), ("scrambled", scrambled)):
        recipe, clean, out = make_run(tmp_path / name, corpora, prio, dedup_cfg={"memory_gb": 1e-5}, part_records=40)
        dedup.run(recipe, clean, out, workers=2, mapper=mapper)
        got.append(outputs(out, corpora))
    assert got[0][0] == got[1][0]
    pd.testing.assert_frame_equal(got[0][1], got[1][1])


def test_a_run_killed_in_the_bucket_stage_resumes_without_redoing_the_signatures(tmp_path, monkeypatch):
    corpora, prio = mixed_corpora()
    recipe, clean, out = make_run(tmp_path / "ref", corpora, prio, dedup_cfg={"memory_gb": 1e-5}, part_records=40)
    dedup.run(recipe, clean, out, workers=1)
    reference = outputs(out, corpora)

    recipe, clean, out = make_run(tmp_path / "run", corpora, prio, dedup_cfg={"memory_gb": 1e-5}, part_records=40)
    real_bucket, calls = dedup.bucket_partition, []

    def dies_after_three(task):
        calls.append(task["j"])
        if len(calls) > 3:
            raise KeyboardInterrupt("killed")
        return real_bucket(task)
    monkeypatch.setattr(dedup, "bucket_partition", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        dedup.run(recipe, clean, out, workers=1)
    assert not (out / "report.json").exists() and (out / dedup.WORK).is_dir()
    monkeypatch.setattr(dedup, "bucket_partition", real_bucket)
    real_hash, hashed = dedup.hash_batch, []
    monkeypatch.setattr(dedup, "hash_batch", lambda *a: hashed.append(1) or real_hash(*a))
    dedup.run(recipe, clean, out, workers=1)
    assert hashed == []                              # every signature unit was done and verified, none redone
    assert outputs(out, corpora)[0] == reference[0]
    pd.testing.assert_frame_equal(outputs(out, corpora)[1], reference[1])
    assert not (out / dedup.WORK).exists()           # the stage files go once the step is done
    (out / "removed.parquet").unlink()               # an output the report vouches for is gone: redone
    dedup.run(recipe, clean, out, workers=1)
    assert (out / "removed.parquet").is_file()


def test_two_runs_on_one_dedup_dir_cannot_mix(tmp_path):
    from fileio import DirLock, LockedError
    recipe, clean, out = make_run(tmp_path, {"a": docs("a", skywork(3))}, {"a": 50})
    with DirLock(out, "another dedup run"):
        with pytest.raises(LockedError, match="another dedup run"):
            dedup.run(recipe, clean, out, workers=1)


def test_the_audit_file_records_every_removed_document_with_what_it_matched(tmp_path):
    corpora, prio = mixed_corpora()
    q = [q for q in ceval_questions() if len(minhash.normalize_alnum(q.question)) >= 20][2]
    corpora["c"] = corpora["c"] + docs("c", ["题目：" + q.question + "。" + skywork(3)[2][:200]], 500)
    eval_sets = [{"name": "ceval", "format": "ceval", "paths": [str(SAMPLES / "ceval-medical/val/*.csv")]}]
    recipe, clean, out = make_run(tmp_path, corpora, prio, eval_sets)
    report = dedup.run(recipe, clean, out, workers=1)
    audit = pd.read_parquet(out / "removed.parquet")
    import pyarrow.parquet as pq
    assert pq.read_table(out / "removed.parquet").num_rows == len(audit)
    t = report["totals"]
    assert len(audit) == t["in"] - t["kept"]
    assert audit["reason"].value_counts().to_dict() == {"exact": t["exact_dups"], "near": t["near_dups"],
                                                        "contamination": t["decontaminated"]}
    by_id = {(c, i): text for c in corpora for i, text in ((r["id"], dedup.dedup_text(r)) for r in corpora[c])}
    kept = {(c, i) for c in corpora for i in kept_ids(out, c)}
    removed = set(zip(audit["corpus"], audit["id"]))
    assert not removed & kept and len(removed) == len(audit)
    assert len(kept) + len(removed) == sum(len(v) for v in corpora.values())
    for row in audit[audit["reason"] != "contamination"].itertuples():
        assert (row.kept_corpus, row.kept_id) in kept
        j = true_jaccard(by_id[(row.corpus, row.id)], by_id[(row.kept_corpus, row.kept_id)])
        assert j >= 0.7 and (row.reason != "exact" or row.similarity >= j - 0.1)
    hit = audit[audit["reason"] == "contamination"]
    assert list(hit["id"]) == ["c.jsonl:500"] and hit.iloc[0]["eval_question"] == q.question
    assert hit.iloc[0]["eval_set"] == "ceval" and hit.iloc[0]["eval_subject"] == q.subject
    assert hit.iloc[0]["similarity"] == 1.0 and pd.isna(hit.iloc[0]["kept_id"])
    assert report["eval_sets"]["ceval"]["removed_by_subject"] == {q.subject: 1}
    # the per-corpus "dups of" counts come from the same rows
    for name, r in report["corpora"].items():
        mine = audit[audit["corpus"] == name]
        assert r["near_dups_of"] == mine[mine["reason"] == "near"]["kept_corpus"].value_counts().to_dict()
        assert r["exact_dups_of"] == mine[mine["reason"] == "exact"]["kept_corpus"].value_counts().to_dict()


def test_a_stock_phrase_shared_with_a_question_is_not_contamination_but_the_question_is():
    stock = "全面建设社会主义现代化国家"
    q = evalsets.Question("law", "test", "0", f"党的二十大报告提出，{stock}的首要任务是____", dict(zip("ABCD", [
        "高质量发展", "科技创新", "乡村振兴", "共同富裕"])), "A")
    index = dedup.eval_index([[q]], 13)
    news = ("新华社北京电 各地区各部门认真贯彻落实党中央决策部署，为" + stock + "开好局起好步，"
            "推动经济运行持续好转，就业物价总体稳定。")
    pasted = "练习题：" + q.question + " A. 高质量发展 B. 科技创新"
    typo = "练习：" + q.question.replace("报告", "报道")        # one character changed
    texts = [news, pasted, typo]
    cps, lengths = minhash.fold_batch(*minhash.encode_batch(texts), alnum=True)
    question, share = dedup.find_contamination(cps, lengths, index, 13, 0.5)
    assert question.tolist() == [-1, 0, 0]
    assert 0 < share[0] < 0.2 and share[1] == 1.0 and 0.5 <= share[2] < 1.0
    # matching on any one shared window (the old rule) removes the news text
    question, _ = dedup.find_contamination(cps, lengths, index, 13, 1e-9)
    assert question[0] == 0


def test_inspect_dedup_summarizes_the_audit_and_shows_pairs_side_by_side(tmp_path, capsys):
    from data_process import dedup_audit
    sys_path_main = dedup.Path(__file__).resolve().parents[1] / "data_process.py"
    corpora, prio = mixed_corpora()
    recipe, clean, out = make_run(tmp_path, corpora, prio)
    report = dedup.run(recipe, clean, out, workers=1)
    capsys.readouterr()
    import importlib.util
    spec = importlib.util.spec_from_file_location("data_process_cli", sys_path_main)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["inspect", "dedup", "--dir", str(out), "--examples", "2", "--width", "30"]) == 0
    text = capsys.readouterr().out
    t = report["totals"]
    assert f"removed records: {t['in'] - t['kept']:,} of {t['in']:,} read" in text
    a = report["corpora"]["a"]
    assert any(line.split() == ["a", f"{a['exact_dups']:,}", f"{a['near_dups']:,}"] for line in text.splitlines())
    assert f"a -> b: {a['exact_dups_of']['b'] + a['near_dups_of']['b']:,}" in text
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    near = [e for e in examples if e["kind"] == "near"][0]
    first_line = dedup_audit.wrap(near["dropped"]["text"], 30, 3)[0]
    assert any(line.startswith(first_line) and " | " in line for line in text.splitlines())
    assert dedup_audit.main(["--dir", str(tmp_path / "nowhere")]) == 1


def test_a_deleted_or_truncated_output_part_is_noticed_and_redone(tmp_path):
    corpora, prio = mixed_corpora()
    recipe, clean, out = make_run(tmp_path, corpora, prio, part_records=40)
    dedup.run(recipe, clean, out, workers=1)
    before = {n: kept_ids(out, n) for n in corpora}
    parts = sorted((out / "a").glob("part-*.jsonl.zst"))
    assert len(parts) >= 2 and [p.name for p in parts] == json.loads((out / "a" / "manifest.json").read_text())["parts"]
    parts[0].unlink()
    parts[1].write_bytes(parts[1].read_bytes()[:-10])
    dedup.run(recipe, clean, out, workers=1)
    assert {n: kept_ids(out, n) for n in corpora} == before
