"""eval.py: C-Eval/CMMLU parsing and scoring on the real samples, in-context letter ids, bits per character."""
import json
import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bpc
import eval as ev
from conftest import SAMPLES
from model import Transformer, make_config
from tokenizer import Tokenizer

CEVAL = SAMPLES / "ceval-medical"
CMMLU = SAMPLES / "cmmlu-medical"


@pytest.fixture(scope="module")
def glm():
    return Tokenizer.load(SAMPLES / "chatglm2-tokenizer" / "tokenizer.model")


@pytest.fixture(scope="module")
def ours():
    """A tokenizer trained the way the pipeline trains one (train_sentencepiece), on real general and medical text."""
    from data_process.train_tokenizer import train_sentencepiece
    lines = [json.loads(l)["text"] for l in open(SAMPLES / "skywork-zh-web/zh_general.jsonl", encoding="utf-8")]
    lines += open(SAMPLES / "medicalgpt/pretrain/fever.txt", encoding="utf-8").read().splitlines()
    return Tokenizer(train_sentencepiece([l for l in lines if l.strip()], vocab_size=4000))


@pytest.fixture(scope="module")
def tiny(glm):
    torch.manual_seed(0)
    return Transformer(make_config("tiny", glm.vocab_size, max_seq_len=512)).eval()


def _copy_bench(src, dst, edit=None):
    """A copy of a benchmark folder (CRLF and all), optionally with some files rewritten: edit(path, text)."""
    import shutil
    shutil.copytree(src, dst)
    for p in sorted(dst.glob("*/*.csv")):
        if edit is not None:
            edit(p)
    return dst


def test_benchmark_folders_read_every_answered_row_of_the_scored_split_with_exactly_their_own_dev_shots():
    ceval = ev.load_benchmark(CEVAL)           # the sample has dev/ and val/ only
    assert ceval.split == "val" and ceval.format == "ceval"
    assert set(ceval.subjects) == {"basic_medicine", "clinical_medicine", "physician", "veterinary_medicine"}
    for sub in ceval.subjects.values():
        expected = pd.read_csv(sub.file)
        assert [q.question for q in sub.questions] == [str(x).strip() for x in expected["question"]]
        assert [q.answer for q in sub.questions] == list(expected["answer"])
        assert len(sub.shots) == 5 and sub.shot_file.endswith(f"dev/{sub.name}_dev.csv")
    assert len(ceval.subjects["physician"].questions) == 49
    cmmlu = ev.load_benchmark(CMMLU)
    assert cmmlu.split == "test" and cmmlu.format == "cmmlu"
    assert set(cmmlu.subjects) == {"anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition"}
    for sub in cmmlu.subjects.values():
        expected = pd.read_csv(sub.file, index_col=0)
        assert [q.answer for q in sub.questions] == list(expected["Answer"]) and len(sub.shots) == 5


def test_ceval_scores_its_answered_test_split_by_default_and_val_on_request(tmp_path, capsys):
    # the whole C-Eval zip with answers in test/ (as a copy with the answers filled in has): test is scored
    root = tmp_path / "ceval"
    import shutil
    shutil.copytree(CEVAL, root)
    (root / "test").mkdir()
    for p in sorted((root / "val").glob("*.csv")):
        shutil.copy(p, root / "test" / p.name.replace("_val", "_test"))
    (root / "val" / "physician_val.csv").write_bytes(b"\r\n".join((root / "val/physician_val.csv").read_bytes()
                                                                 .split(b"\r\n")[:4]) + b"\r\n")
    assert ev.load_benchmark(root).split == "test" and len(ev.load_benchmark(root).subjects["physician"].questions) == 49
    val = ev.load_benchmark(root, "val")
    assert val.split == "val" and len(val.subjects["physician"].questions) == 3
    # the official layout: test/ without answers -> val, and asking for test is a clear error
    for p in (root / "test").glob("*.csv"):
        lines = p.read_text(encoding="utf-8").split("\n")
        p.write_text("\n".join([lines[0]] + [l[: l.rstrip().rfind(",") + 1] for l in lines[1:] if l.strip()]) + "\n",
                     encoding="utf-8")
    assert ev.load_benchmark(root).split == "val"
    with pytest.raises(ValueError, match="test/ split has no answers"):
        ev.load_benchmark(root, "test")


def test_few_shot_examples_come_from_exactly_the_subjects_dev_file_and_empty_answers_are_counted(tmp_path):
    root = tmp_path / "ceval"
    (root / "dev").mkdir(parents=True)
    (root / "val").mkdir()
    head = "id,question,A,B,C,D,answer"
    rows = [f"{i},问题{i}____,甲,乙,丙,丁,{'ABCD'[i % 4]}" for i in range(4)]
    (root / "val" / "law_val.csv").write_text("\r\n".join([head, *rows, "9,无答案的问题,甲,乙,丙,丁,"]) + "\r\n",
                                              encoding="utf-8")
    (root / "dev" / "law_and_ethics_dev.csv").write_text(
        "\r\n".join([head + ",explanation", *[r + ",解析" for r in rows]]) + "\r\n", encoding="utf-8")
    (root / "val" / "law_and_ethics_val.csv").write_text("\r\n".join([head, *rows]) + "\r\n", encoding="utf-8")
    bench = ev.load_benchmark(root)
    assert bench.subjects["law"].shots == [] and bench.subjects["law"].shot_file == ""   # never law_and_ethics'
    assert len(bench.subjects["law_and_ethics"].shots) == 4
    assert len(bench.subjects["law"].questions) == 4 and bench.dropped() == {"no_answer": 1}
    (root / "dev" / "law_dev.csv").write_text("\r\n".join([head + ",explanation", rows[0] + ",x",
                                                            "5,q,a,b,c,d,,x"]) + "\r\n", encoding="utf-8")
    bench = ev.load_benchmark(root)
    assert len(bench.subjects["law"].shots) == 1 and bench.dropped(shots=True) == {"no_answer": 1}


def test_each_benchmark_is_prompted_in_its_own_published_format_with_its_subject_names():
    q = ev.load_benchmark(CMMLU).subjects["clinical_knowledge"].questions[0]
    shot = ev.load_benchmark(CMMLU).subjects["clinical_knowledge"].shots[0]
    o = q.options
    # CMMLU's own src/mp_utils.py: gen_prompt + format_example
    assert ev.base_prompt(q, [shot], "cmmlu") == (
        "以下是关于临床知识的单项选择题，请直接给出正确答案的选项。\n\n"
        f"题目：{shot.question}\nA. {shot.options['A']}\nB. {shot.options['B']}\nC. {shot.options['C']}\n"
        f"D. {shot.options['D']}\n答案是：{shot.answer}\n\n"
        f"题目：{q.question}\nA. {o['A']}\nB. {o['B']}\nC. {o['C']}\nD. {o['D']}\n答案是：")
    c = ev.load_benchmark(CEVAL).subjects["physician"].questions[0]
    assert ev.base_prompt(c, [], "ceval") == (
        "以下是中国关于医师资格考试的单项选择题，请选出其中的正确答案。\n\n"
        f"{c.question}\nA. {c.options['A']}\nB. {c.options['B']}\nC. {c.options['C']}\nD. {c.options['D']}\n答案：")
    # a subject outside any hard-coded medical list gets its published Chinese name, not its file name
    from data_process.evalsets import Question
    tcm = Question("traditional_chinese_medicine", "test", "0", "q", dict(zip("ABCD", "abcd")), "A")
    assert ev.base_prompt(tcm, [], "cmmlu").startswith("以下是关于中医中药的单项选择题")


def test_oracle_scorer_gets_everything_right_and_uniform_scorer_gets_chance():
    questions = [q for sub in ev.load_benchmark(CMMLU).subjects.values() for q in sub.questions]
    answers = [q.answer for q in questions]
    oracle = [{l: (0.0 if l == a else -5.0) for l in ev.LETTERS} for a in answers]
    uniform = [{l: -1.386 for l in ev.LETTERS} for _ in answers]
    assert ev.expected_accuracy(oracle, answers) == 1.0
    assert ev.expected_accuracy(uniform, answers) == pytest.approx(0.25)


@pytest.mark.parametrize("which", ["glm", "ours"])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("fmt", ["ceval", "cmmlu"])
def test_letter_ids_are_the_ones_the_letters_get_in_context(request, which, chat, fmt):
    glm = request.getfixturevalue(which)  # the ChatGLM2 model, or one we trained
    sub = ev.load_benchmark(CEVAL).subjects["clinical_medicine"]
    q, shots = sub.questions[0], sub.shots[:2]
    ctx, cont = ev.letter_candidates(glm, q, shots, chat, fmt)
    for letter in ev.LETTERS:
        if chat:
            full = glm.render_chat(ev.chat_messages(q, shots, fmt) + [{"role": "assistant", "content": letter}]).ids
        else:
            full = [glm.eos_id] + glm.encode(ev.base_prompt(q, shots, fmt) + letter)
        assert full[: len(ctx)] == ctx and full[len(ctx): len(ctx) + len(cont[letter])] == cont[letter]
        assert glm.decode(cont[letter]).strip() == letter
    assert len({tuple(c) for c in cont.values()}) == 4


def _subset(bench, subject, n):
    import copy
    b = copy.copy(bench)
    sub = copy.copy(bench.subjects[subject])
    sub.questions = sub.questions[:n]
    b.subjects = {subject: sub}
    return b


class BiasedHead(torch.nn.Module):
    """An output layer with a large bonus on one token's logit: the model always 'answers' that token."""

    def __init__(self, head, token_id):
        super().__init__()
        self.head, self.token_id = head, token_id

    def forward(self, h):
        logits = self.head(h)
        logits[..., self.token_id] += 50.0
        return logits


def test_model_that_prefers_the_right_letter_scores_it_and_letter_bias_shows_in_the_report(glm, tiny):
    """End to end through the real model: bias the output layer toward one letter's token."""
    bench = _subset(ev.load_benchmark(CEVAL), "clinical_medicine", 12)
    questions = bench.subjects["clinical_medicine"].questions
    base = ev.run_mc(tiny, glm, bench, shots=0, chat=False, dtype=torch.float32)
    assert base["overall"]["n"] == 12 and 0 <= base["overall"]["accuracy"] <= 1
    # a model that always says "B" is right exactly on the questions whose answer is B
    _, cont = ev.letter_candidates(glm, questions[0], [], False)
    always_b = Transformer(tiny.config).eval()
    always_b.load_state_dict(tiny.state_dict())
    always_b.lm_head = BiasedHead(always_b.lm_head, cont["B"][0])
    r = ev.run_mc(always_b, glm, bench, shots=0, chat=False, dtype=torch.float32)
    gold = {l: sum(q.answer == l for q in questions) for l in ev.LETTERS}
    assert r["overall"]["accuracy"] == pytest.approx(gold["B"] / 12)
    # every question's prediction is in the report; the histogram and the majority-letter baseline expose the bias
    assert [(p["id"], p["answer"], p["prediction"]) for p in r["predictions"]] == \
        [(q.id, q.answer, "B") for q in questions]
    assert all(p["correct"] == (p["answer"] == "B") and set(p["logprobs"]) == set("ABCD") for p in r["predictions"])
    assert r["overall"]["predicted_letters"] == {"A": 0, "B": 12, "C": 0, "D": 0}
    assert r["overall"]["answer_letters"] == gold
    top = max(ev.LETTERS, key=lambda l: gold[l])
    assert r["overall"]["majority_letter"] == top and r["overall"]["majority_baseline"] == gold[top] / 12
    md = ev.to_markdown([{"checkpoint": "x", "chat": False, "dtype": "fp32", "mc": {"ceval 0-shot": r}}])
    assert f"majority letter {top} {gold[top] / 12:.1%}" in md and "| predicted letters A/B/C/D | 0/12/0/0 |" in md


def test_prompts_over_the_context_lose_shots_first_then_are_cut_and_are_counted(glm, tiny, capsys):
    bench = _subset(ev.load_benchmark(CEVAL), "physician", 6)
    sub = bench.subjects["physician"]
    short = Transformer(make_config("tiny", glm.vocab_size, max_seq_len=160)).eval()
    fits = []
    for q in sub.questions:
        ctx, cont, kept, cut = ev.fit_prompt(glm, q, sub.shots[:5], False, "ceval", 160)
        assert len(ctx) + max(map(len, cont.values())) - 1 <= 160
        assert [s for s in sub.shots[:5] if s in kept] == kept          # a subset, in order
        full, _ = ev.letter_candidates(glm, q, kept, False)
        if cut:
            assert kept == [] and ctx == full[cut:]                    # the end of the question is kept
        else:
            assert ctx == full
        if len(kept) < 5:   # it was over the context with every shot
            assert len(ev.letter_candidates(glm, q, sub.shots[:5], False)[0]) > 160
        fits.append((len(kept), cut))
    assert any(k < 5 for k, _ in fits)
    r = ev.run_mc(short, glm, bench, shots=5, chat=False, dtype=torch.float32)
    c = r["context"]
    assert c["prompts"] == 6 and c["over_context"] == sum(k < 5 or cut > 0 for k, cut in fits)
    assert c["shots_dropped"] == sum(5 - k for k, _ in fits) and c["question_cut"] == sum(cut > 0 for _, cut in fits)
    # a question alone longer than the context: cut from the left, never an error
    from data_process.evalsets import Question
    long_q = Question("physician", "val", "x", "很长的题目" * 200, dict(zip("ABCD", "甲乙丙丁")), "A")
    ctx, cont, kept, cut = ev.fit_prompt(glm, long_q, sub.shots[:2], False, "ceval", 160)
    assert cut > 0 and kept == [] and len(ctx) == 160 and glm.decode(ctx).endswith("丁\n答案：")


def test_option_scores_equal_a_full_logits_recomputation(glm, tiny):
    ctx = glm.encode("高血压的诊断标准是")
    single = [glm.encode("A"), glm.encode("B")]
    multi = [glm.encode("收缩压"), glm.encode("舒张压升高")]
    got = ev.option_logprobs(tiny, [(ctx, single), (ctx, multi)], batch_size=3)
    for conts, scores in zip((single, multi), got):
        for c, score in zip(conts, scores):
            full = torch.tensor(ctx + c)
            with torch.no_grad():
                logp = torch.log_softmax(tiny(full[None, :-1]).logits[0].float(), -1)
            expected = logp[torch.arange(len(ctx) - 1, len(full) - 1), full[len(ctx):]].sum().item()
            assert score == pytest.approx(expected, abs=1e-4)


def _val_corpus(tmp_path, tok, docs, name="demo"):
    from data_process.shards import write_shard
    corpus = tmp_path / "pretrain" / name
    corpus.mkdir(parents=True)
    write_shard(corpus / "val-00000", docs)
    (corpus / "manifest.json").write_text(json.dumps({
        "tokenizer_sha256": tok.sha256, "splits": {"val": {"shards": ["val-00000"], "documents": len(docs),
                                                           "tokens": sum(map(len, docs)), "chars": 1}}}))
    return torch.tensor([t for d in docs for t in d])


def _by_hand(model, tok, stream):
    """Full logits, float64, one pass: loss over every target; bits per character over the targets that are not
    special tokens, divided by the characters those targets decode to."""
    with torch.no_grad():
        logp = torch.log_softmax(model(stream[None, :-1]).logits[0].double(), -1)
    per = -logp[torch.arange(len(stream) - 1), stream[1:]]
    special = set(tok.special.values()) | {tok.eos_id, tok.pad_id}
    text = torch.tensor([int(t) not in special for t in stream[1:]])
    chars = len(tok.decode(stream[1:].tolist(), skip_special=True))
    return per.sum().item() / len(per), per[text].sum().item() / math.log(2) / chars, chars


def test_bits_per_char_equals_a_recomputation_by_hand(tmp_path, glm, tiny):
    texts = ["高血压是以体循环动脉压增高为主要特征的临床综合征。", "Aspirin inhibits platelet aggregation."]
    stream = _val_corpus(tmp_path, glm, [glm.encode(t) + [glm.eos_id] for t in texts])
    result = ev.run_lm(tiny, glm, tmp_path, torch.float32)["demo"]
    loss, bits, chars = _by_hand(tiny, glm, stream)
    assert result["tokens"] == len(stream) - 1 and result["chars"] == chars
    assert result["bits_per_char"] == pytest.approx(bits, rel=1e-6)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    # with windows shorter than the stream, every token but the first is still predicted exactly once
    windows = list(bpc.contiguous_windows(stream.numpy(), 7))
    assert sum(len(w) - 1 for w in windows) == len(stream) - 1
    assert np.array_equal(np.concatenate([windows[0][:1]] + [w[1:] for w in windows]), stream.numpy())


def test_bits_per_char_of_a_chat_rendered_corpus_counts_only_the_text_it_scores(tmp_path, glm, tiny):
    convs = [[{"role": "user", "content": "发烧了怎么办？"}, {"role": "assistant", "content": "多喝水，注意休息。"}],
             [{"role": "user", "content": "高血压要注意什么"}, {"role": "assistant", "content": "少盐，按时服药。"}]]
    docs = [glm.render_chat(c).ids + [glm.eos_id] for c in convs]   # as tokenize writes an sft_<stage> corpus
    stream = _val_corpus(tmp_path, glm, docs, "sft_medical")
    result = ev.run_lm(tiny, glm, tmp_path, torch.float32)["sft_medical"]
    loss, bits, chars = _by_hand(tiny, glm, stream)
    assert result["bits_per_char"] == pytest.approx(bits, rel=1e-6) and result["chars"] == chars
    assert result["text_tokens"] < result["tokens"]   # the template's special tokens are scored in loss only
    # a prefix (--max-val-tokens): the characters of exactly that prefix, not a share of the split's
    cut = ev.run_lm(tiny, glm, tmp_path, torch.float32, max_tokens=9)["sft_medical"]
    loss9, bits9, chars9 = _by_hand(tiny, glm, stream[:10])
    assert cut["tokens"] == 9 and cut["chars"] == chars9
    assert cut["bits_per_char"] == pytest.approx(bits9, rel=1e-6) and cut["loss"] == pytest.approx(loss9, rel=1e-6)


def test_shards_from_another_tokenizer_are_refused_not_scored(tmp_path, tiny):
    corpus = tmp_path / "pretrain" / "other"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({"tokenizer_sha256": "f" * 64, "splits": {}}))
    class Other:
        sha256 = "0" * 64
    result = ev.run_lm(tiny, Other(), tmp_path, torch.float32)
    assert "another tokenizer" in result["other"]["error"]


class Judge:
    """A minimal OpenAI-compatible endpoint on 127.0.0.1 (FastAPI + uvicorn), hit through the official openai
    client. reply(prompt) -> the judge's text, or an int HTTP status to fail with."""

    def __init__(self, reply):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse
        app, self.seen = FastAPI(), []

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "t"}]}

        @app.post("/v1/chat/completions")
        def chat(body: dict):
            self.seen.append(body)
            content = reply(body["messages"][0]["content"])
            if isinstance(content, int):
                return JSONResponse({"error": {"message": "bad request", "type": "invalid_request_error"}},
                                    status_code=content)
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.split(":")[2][:-3]),
                                                    log_level="warning"))

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_judge_scores_come_from_a_local_openai_compatible_server(glm):
    reply = lambda p: '评分：{"language": 7, "knowledge": 3}' if "高血压" in p else "I refuse to score."
    samples = [{"prompt": "高血压是一种", "output": "常见病。"}, {"prompt": "北京是", "output": "首都。"}]
    with Judge(reply) as judge_server:
        judge = ev.judge_samples(samples, judge_server.url, "", "")
    assert judge["model"] == "judge" and judge["scored"] == 1 and judge["unreadable"] == 1 and judge["failed"] == 0
    assert samples[0]["scores"] == {"language": 7.0, "knowledge": 3.0} and samples[1]["scores"] is None
    assert judge["mean"] == {"language": 7.0, "knowledge": 3.0}
    assert "常见病" in judge_server.seen[0]["messages"][0]["content"]


def _samples(n=5):
    return [{"prompt": f"问题{i}", "output": f"回答{i}"} for i in range(n)]


def _report(judge, samples):
    return {"checkpoint": "ck", "chat": True, "dtype": "fp32",
            "generation": {"sampling": {}, "samples": samples, "judge": judge}}


def test_judge_failures_and_unreadable_replies_are_counted_beside_every_mean_in_the_report():
    # every call fails with HTTP 400: no mean, and the report says why there is none
    samples = _samples()
    with Judge(lambda p: 400) as j:
        judge = ev.judge_samples(samples, j.url, "judge", "")
    assert (judge["scored"], judge["failed"], judge["unreadable"], judge["mean"]) == (0, 5, 0, None)
    md = ev.to_markdown([_report(judge, samples)])
    assert "| judge | language (0-10) | — (scored 0 of 5, failed 5, unreadable 0) |" in md
    assert md.count("— judge failed") == 5
    # 3 of 5 replies unreadable: the mean is over the 2 scored, and says so
    samples = _samples()
    with Judge(lambda p: '{"language": 8, "knowledge": 6}' if p.count("问题0") or p.count("问题1") else "嗯") as j:
        judge = ev.judge_samples(samples, j.url, "judge", "")
    assert (judge["scored"], judge["failed"], judge["unreadable"]) == (2, 0, 3)
    md = ev.to_markdown([_report(judge, samples)])
    assert "| judge | language (0-10) | 8.00 (scored 2 of 5, failed 0, unreadable 3) |" in md
    assert "| judge | knowledge (0-10) | 6.00 (scored 2 of 5, failed 0, unreadable 3) |" in md
    assert md.count("— judge reply unreadable") == 3


def test_parse_scores_rejects_out_of_range_and_garbage():
    assert ev.parse_scores('{"language": 11, "knowledge": 2}') is None
    assert ev.parse_scores("no json") is None
    assert ev.parse_scores('x {"language": "5", "knowledge": 0} y') == {"language": 5.0, "knowledge": 0.0}


def _decontaminated_data(tmp_path):
    """A data dir whose dedup report comes from the real dedup step, run from a recipe file whose eval set is
    the C-Eval sample's val/ split, over a corpus with one C-Eval question pasted into it."""
    from data_process import dedup
    from data_process.recipe import load_recipe
    from data_process.records import write_parts
    q = ev.load_benchmark(CEVAL).subjects["physician"].questions[10]
    texts = [json.loads(l)["text"] for l in open(SAMPLES / "skywork-zh-web/zh_general.jsonl", encoding="utf-8")][:30]
    texts.append(texts[0][:200] + q.question + "（ ）" + texts[1][:100])
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(
        f'[run]\ndata_dir = "{tmp_path / "data"}"\n[[corpus]]\nname = "web"\nreader = "jsonl"\npaths = []\n'
        f'[[eval_set]]\nname = "ceval"\nformat = "ceval"\npaths = ["{CEVAL}/val/*.csv"]\n', encoding="utf-8")
    recipe = load_recipe(recipe_path, root=tmp_path)
    clean = tmp_path / "data/clean"
    write_parts([{"id": f"web:{i}", "corpus": "web", "kind": "doc", "text": t} for i, t in enumerate(texts)],
                clean / "web")
    (clean / "web/manifest.json").write_text(json.dumps({"records": len(texts)}))
    report = dedup.run(recipe, clean, tmp_path / "data/dedup", workers=1)
    assert report["eval_sets"]["ceval"]["removed"] == 1
    (tmp_path / "data/pretrain").mkdir()
    return recipe_path


def test_eval_says_per_benchmark_split_whether_training_was_decontaminated_against_it(tmp_path, glm, tiny, capsys):
    from checkpoint import data_provenance, load_checkpoint, provenance_chain, save_checkpoint
    recipe_path = _decontaminated_data(tmp_path)
    pre = data_provenance("pretrain warmup", tmp_path / "data/pretrain", recipe_path)
    assert pre["recipe"]["sha256"] == __import__("fileio").file_sha256(recipe_path)
    assert pre["dedup_report"]["path"] == str(tmp_path / "data/dedup/report.json")
    sft = data_provenance("sft medical", tmp_path / "data/sft/medical.csv")   # same data dir, no recipe given
    meta = {"kind": "sft", "step": 0, "tokens_seen": 0, "chat": True,
            "provenance": provenance_chain({"provenance": [pre]}, sft)}
    ckpt = save_checkpoint(tmp_path / "ck", tiny, glm, meta)
    _, _, loaded = load_checkpoint(ckpt)
    assert [r["job"] for r in loaded["provenance"]] == ["pretrain warmup", "sft medical"]   # carried through
    ceval, cmmlu = ev.load_benchmark(CEVAL), ev.load_benchmark(CMMLU)
    c = ev.contamination({"provenance": [pre]}, ceval)
    assert c["status"] == "checked" and c["jobs"][0]["files_in_eval_sets"] == 4 and c["jobs"][0]["removed"] == 1
    line = ev.contamination_line("ceval", "val", c)
    assert line.startswith("ceval val: decontaminated — pretrain warmup: 4/4 files in decontamination eval set(s) "
                           "'ceval', 1 training docs removed against them")
    assert ev.contamination({"provenance": [pre]}, cmmlu)["status"] == "not checked"   # not in its eval sets
    # the SFT job read the same data dir (same dedup report): it inherits the recipe's eval files
    assert loaded["provenance"][1]["recipe_from"] == "pretrain warmup"
    assert ev.contamination(loaded, ceval)["status"] == "checked"
    assert "pretrain warmup, sft medical: 4/4 files" in ev.contamination_line("ceval", "val",
                                                                            ev.contamination(loaded, ceval))
    other = data_provenance("sft other", tmp_path / "elsewhere")          # data without a dedup report
    assert ev.contamination({"provenance": [pre, other]}, ceval)["status"] == "partial"
    none = ev.contamination({}, ceval)
    assert none["status"] == "not checked" and "records no data provenance" in ev.contamination_line("c", "v", none)
    # through main: printed per benchmark split, and in report.md
    args = ["--data-dir", str(tmp_path / "nodata"), "--ceval", str(CEVAL), "--cmmlu", str(CMMLU), "--shots", "0",
            "--max-questions", "1", "--no-gen", "--no-lm", "--out", str(tmp_path / "out")]
    assert ev.main([str(save_checkpoint(tmp_path / "base", tiny, glm, {"kind": "base", "step": 0, "tokens_seen": 0,
                                                                       "chat": False, "provenance": [pre]})),
                    *args]) == 0
    out, err = capsys.readouterr()
    assert "ceval val: decontaminated" in out and "warning: cmmlu test: NOT checked for contamination" in err
    md = (tmp_path / "out/report.md").read_text()
    assert "ceval val: decontaminated" in md and "cmmlu test: NOT checked" in md


@pytest.mark.slow
def test_eval_main_writes_json_and_markdown_reports_and_compares_checkpoints(tmp_path, glm, tiny, capsys):
    from checkpoint import save_checkpoint
    base = save_checkpoint(tmp_path / "base", tiny, glm, {"kind": "base", "step": 0, "tokens_seen": 0,
                                                           "chat": False})
    chat = save_checkpoint(tmp_path / "chat", tiny, glm, {"kind": "sft", "step": 0, "tokens_seen": 0,
                                                           "chat": True})
    args = ["--data-dir", str(tmp_path / "nodata"), "--ceval", str(CEVAL), "--cmmlu", str(CMMLU),
            "--shots", "0,1", "--max-questions", "1", "--max-new-tokens", "2"]
    assert ev.main([str(base), *args, "--out", str(tmp_path / "one")]) == 0
    out, err = capsys.readouterr()
    assert f"ceval: {CEVAL}: scoring split val/ (4 subjects, 113 questions; dropped none)" in out
    assert f"cmmlu: {CMMLU}: scoring split test/" in out and "cmmlu prompt format, fp32" in out
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert set(report["mc"]) == {"ceval 0-shot", "ceval 1-shot", "cmmlu 0-shot", "cmmlu 1-shot"}
    assert report["mc"]["ceval 0-shot"]["overall"]["n"] == 4  # 4 subjects x 1 question
    assert len(report["mc"]["ceval 0-shot"]["predictions"]) == 4 and report["dtype"] == "fp32"
    assert report["benchmarks"]["cmmlu"]["prompt_format"].startswith("CMMLU")
    assert report["chat"] is False and len(report["generation"]["samples"]) == len(ev.BASE_PROMPTS)
    md = (tmp_path / "one" / "report.md").read_text()
    assert "chance 25%, majority letter" in md and "scored in fp32 on cpu" in md
    assert "split val/ of" in md and "prompt: CMMLU (haonan-li/CMMLU" in md
    assert ev.main([str(base), str(chat), *args, "--shots", "1", "--no-gen", "--out", str(tmp_path / "two")]) == 0
    md = (tmp_path / "two" / "compare.md").read_text()
    assert str(base) in md and str(chat) in md and "cmmlu 1-shot" in md
    both = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert [r["chat"] for r in both] == [False, True]


def test_eval_main_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert ev.main([str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_eval_settings_come_from_one_config_a_toml_file_then_set_then_the_flags(tmp_path, capsys):
    cfg_file = tmp_path / "eval.toml"
    cfg_file.write_text('[eval]\nshots = [0, 3]\ndtype = "bf16"\nmax_questions = 7\n')
    ckpts, cfg = ev.parse_args(["ck", "--config", str(cfg_file), "--set", "max_questions=9", "--shots", "1,2",
                                "--no-gen"])
    assert ckpts == [Path("ck")]
    assert (cfg.shots, cfg.dtype, cfg.max_questions, cfg.gen, cfg.lm) == ([1, 2], "bf16", 9, False, True)
    assert cfg.ceval == ["corpora/eval/ceval"] and cfg.out == "out/eval"   # defaults: EvalConfig only
    # typos, wrong types and out-of-range values are one-line errors naming the file and key, exit code 2
    for bad, where in ((["--set", "shot=[1]"], "shot"), (["--set", "max_questions=-1"], "max_questions"),
                       (["--set", 'dtype="fp16"'], "dtype"), (["--shots", "a,b"], "--shots")):
        assert ev.main([str(tmp_path), "--config", str(cfg_file), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and where in err and err.count("\n") == 1


def test_a_damaged_val_shard_is_an_error_for_its_corpus_not_a_score(tmp_path, glm, tiny):
    _val_corpus(tmp_path, glm, [glm.encode("发烧了怎么办？多喝水。") + [glm.eos_id]] * 4)
    shard = tmp_path / "pretrain" / "demo" / "val-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])   # truncated: the .idx says more tokens than the .bin holds
    result = ev.run_lm(tiny, glm, tmp_path, torch.float32)["demo"]
    assert "val-00000" in result["error"] and "bits_per_char" not in result
