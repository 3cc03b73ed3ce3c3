"""eval.py: C-Eval/CMMLU parsing and scoring on the real samples, in-context letter ids, bits per character."""
import json
import math
import socket
import threading
import time

import pandas as pd
import pytest
import torch

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


def test_ceval_layout_parses_every_row_of_every_subject():
    for path in sorted(CEVAL.glob("*/*.csv")):
        assert b"\r\n" in path.read_bytes()[:200], "the real C-Eval files are CRLF"
        expected = pd.read_csv(path)
        questions = ev.read_mc_csv(path)
        assert len(questions) == len(expected) > 0, path
        assert [q.question for q in questions] == list(expected["question"])
        assert [q.options[3] for q in questions] == [str(x) for x in expected["D"]]
        assert [q.answer for q in questions] == list(expected["answer"])


def test_cmmlu_layout_parses_every_row_of_every_subject():
    for path in sorted(CMMLU.glob("*/*.csv")):
        expected = pd.read_csv(path, index_col=0)
        questions = ev.read_mc_csv(path)
        assert len(questions) == len(expected) > 0, path
        assert [q.question for q in questions] == list(expected["Question"])
        assert [q.answer for q in questions] == list(expected["Answer"])
        assert questions[0].subject == path.stem


def test_benchmark_folders_pair_questions_with_their_dev_shots():
    ceval = ev.load_benchmark(CEVAL)
    assert set(ceval) == {"basic_medicine", "clinical_medicine", "physician", "veterinary_medicine"}
    questions, shots = ceval["physician"]
    assert len(questions) == 49 and len(shots) == 5
    cmmlu = ev.load_benchmark(CMMLU)
    assert set(cmmlu) == {"anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition"}
    assert all(len(shots) == 5 for _, shots in cmmlu.values())


def test_malformed_csv_is_a_clear_error(tmp_path):
    bad = tmp_path / "x_val.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not one of A-D"):
        ev.read_mc_csv(bad)
    bad.write_text("foo,bar\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        ev.read_mc_csv(bad)


def test_oracle_scorer_gets_everything_right_and_uniform_scorer_gets_chance():
    questions = [q for qs, _ in ev.load_benchmark(CMMLU).values() for q in qs]
    answers = [q.answer for q in questions]
    oracle = [{l: (0.0 if l == a else -5.0) for l in ev.LETTERS} for a in answers]
    uniform = [{l: -1.386 for l in ev.LETTERS} for _ in answers]
    assert ev.expected_accuracy(oracle, answers) == 1.0
    assert ev.expected_accuracy(uniform, answers) == pytest.approx(0.25)


@pytest.mark.parametrize("which", ["glm", "ours"])
@pytest.mark.parametrize("chat", [False, True])
def test_letter_ids_are_the_ones_the_letters_get_in_context(request, which, chat):
    glm = request.getfixturevalue(which)  # the ChatGLM2 model, or one we trained
    q = ev.load_benchmark(CEVAL)["clinical_medicine"][0][0]
    ctx, cont = ev.letter_candidates(glm, q, ev.load_benchmark(CEVAL)["clinical_medicine"][1][:2], chat)
    for letter in ev.LETTERS:
        shots = ev.load_benchmark(CEVAL)["clinical_medicine"][1][:2]
        if chat:
            full = glm.render_chat(ev.chat_messages(q, shots) + [{"role": "assistant", "content": letter}]).ids
        else:
            full = [glm.eos_id] + glm.encode(ev.base_prompt(q, shots) + letter)
        assert full[: len(ctx)] == ctx and full[len(ctx): len(ctx) + len(cont[letter])] == cont[letter]
        assert glm.decode(cont[letter]).strip() == letter
    assert len({tuple(c) for c in cont.values()}) == 4


class BiasedHead(torch.nn.Module):
    """An output layer with a large bonus on one token's logit: the model always 'answers' that token."""

    def __init__(self, head, token_id):
        super().__init__()
        self.head, self.token_id = head, token_id

    def forward(self, h):
        logits = self.head(h)
        logits[..., self.token_id] += 50.0
        return logits


def test_model_that_prefers_the_right_letter_scores_it(glm, tiny):
    """End to end through the real model: bias the output layer toward each question's answer token."""
    subjects = {"clinical_medicine": ev.load_benchmark(CEVAL)["clinical_medicine"]}
    questions = subjects["clinical_medicine"][0][:6]
    subjects["clinical_medicine"] = (questions, subjects["clinical_medicine"][1])
    base = ev.run_mc(tiny, glm, subjects, shots=0, chat=False, dtype=torch.float32)
    assert base["overall"]["n"] == 6 and 0 <= base["overall"]["accuracy"] <= 1
    # a model that always says "B" is right exactly on the questions whose answer is B
    _, cont = ev.letter_candidates(glm, questions[0], [], False)
    always_b = Transformer(tiny.config).eval()
    always_b.load_state_dict(tiny.state_dict())
    always_b.lm_head = BiasedHead(always_b.lm_head, cont["B"][0])
    r = ev.run_mc(always_b, glm, subjects, shots=0, chat=False, dtype=torch.float32)
    expected = sum(q.answer == "B" for q in questions) / len(questions)
    assert r["overall"]["accuracy"] == pytest.approx(expected)


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


def test_bits_per_char_equals_a_recomputation_by_hand(tmp_path, glm, tiny):
    from data_process.shards import write_shard
    texts = ["高血压是以体循环动脉压增高为主要特征的临床综合征。", "Aspirin inhibits platelet aggregation."]
    docs = [glm.encode(t) + [glm.eos_id] for t in texts]
    corpus = tmp_path / "pretrain" / "demo"
    corpus.mkdir(parents=True)
    write_shard(corpus / "val-00000", docs)
    chars = sum(len(t) for t in texts)
    (corpus / "manifest.json").write_text(json.dumps({
        "tokenizer_sha256": glm.sha256, "splits": {"val": {"shards": ["val-00000"], "documents": 2,
                                                           "tokens": sum(map(len, docs)), "chars": chars}}}))
    result = ev.run_lm(tiny, glm.sha256, tmp_path, torch.float32)["demo"]
    stream = torch.tensor([t for d in docs for t in d])
    with torch.no_grad():
        logp = torch.log_softmax(tiny(stream[None, :-1]).logits[0].float(), -1)
    nats = -logp[torch.arange(len(stream) - 1), stream[1:]].sum().item()
    assert result["tokens"] == len(stream) - 1
    assert result["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
    assert result["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-5)
    # with windows shorter than the stream, every token but the first is still predicted exactly once
    nats_w, n_w = ev.sequence_nll(tiny, stream.numpy(), seq_len=7)
    assert n_w == len(stream) - 1


def test_shards_from_another_tokenizer_are_refused_not_scored(tmp_path, tiny):
    corpus = tmp_path / "pretrain" / "other"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({"tokenizer_sha256": "f" * 64, "splits": {}}))
    result = ev.run_lm(tiny, "0" * 64, tmp_path, torch.float32)
    assert "another tokenizer" in result["other"]["error"]


def test_judge_scores_come_from_a_local_openai_compatible_server(glm):
    """A minimal OpenAI-compatible endpoint on 127.0.0.1, hit through the official openai client."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    seen = []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        seen.append(body)
        prompt = body["messages"][0]["content"]
        content = '评分：{"language": 7, "knowledge": 3}' if "高血压" in prompt else "I refuse to score."
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        samples = [{"prompt": "高血压是一种", "output": "常见病。"}, {"prompt": "北京是", "output": "首都。"}]
        judge = ev.judge_samples(samples, f"http://127.0.0.1:{port}/v1", "", "")
    finally:
        server.should_exit = True
        thread.join(10)
    assert judge["model"] == "judge" and judge["scored"] == 1 and judge["unreadable"] == 1
    assert samples[0]["scores"] == {"language": 7.0, "knowledge": 3.0} and samples[1]["scores"] is None
    assert judge["mean"] == {"language": 7.0, "knowledge": 3.0}
    assert "常见病" in seen[0]["messages"][0]["content"]


def test_parse_scores_rejects_out_of_range_and_garbage():
    assert ev.parse_scores('{"language": 11, "knowledge": 2}') is None
    assert ev.parse_scores("no json") is None
    assert ev.parse_scores('x {"language": "5", "knowledge": 0} y') == {"language": 5.0, "knowledge": 0.0}


@pytest.mark.slow
def test_eval_main_writes_json_and_markdown_reports_and_compares_checkpoints(tmp_path, glm, tiny, capsys):
    from checkpoint import save_checkpoint
    base = save_checkpoint(tmp_path / "base", tiny, glm, {"kind": "base", "step": 0, "tokens_seen": 0,
                                                           "chat": False})
    chat = save_checkpoint(tmp_path / "chat", tiny, glm, {"kind": "sft", "step": 0, "tokens_seen": 0,
                                                           "chat": True})
    args = ["--data-dir", str(tmp_path / "nodata"), "--ceval", str(CEVAL), "--cmmlu", str(CMMLU),
            "--shots", "0,1", "--max-questions", "1", "--max-new-tokens", "2", "--dtype", "fp32"]
    assert ev.main([str(base), *args, "--out", str(tmp_path / "one")]) == 0
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert set(report["mc"]) == {"ceval 0-shot", "ceval 1-shot", "cmmlu 0-shot", "cmmlu 1-shot"}
    assert report["mc"]["ceval 0-shot"]["overall"]["n"] == 4  # 4 subjects x 1 question
    assert report["chat"] is False and len(report["generation"]["samples"]) == len(ev.BASE_PROMPTS)
    assert "chance 25%" in (tmp_path / "one" / "report.md").read_text()
    assert ev.main([str(base), str(chat), *args, "--shots", "1", "--no-gen", "--out", str(tmp_path / "two")]) == 0
    md = (tmp_path / "two" / "compare.md").read_text()
    assert str(base) in md and str(chat) in md and "cmmlu 1-shot" in md
    both = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert [r["chat"] for r in both] == [False, True]


def test_eval_main_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert ev.main([str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
