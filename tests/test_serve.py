"""serve.py as a real uvicorn server (a subprocess on 127.0.0.1), driven by the official `openai` client and raw
HTTP: chat and completions (streaming and not), sampling fields, every bad-request case, 8 concurrent streams,
a client disconnect, the API key. Replies are checked against model.generate run here on the same checkpoint."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from conftest import ROOT
from test_chat import make_checkpoint, one_torch_thread  # noqa: F401 (autouse fixture)

API_KEY = "test-key-1234"
MODEL = "test-model"
CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, *extra, timeout=180):
    """-> (process, base_url) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", str(ckpt), "--port", str(port), "--model-name", MODEL,
                             "--max-body-bytes", "65536", "--max-tokens", "64", "--threads", "1", *map(str, extra)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("serve.py did not come up in time")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", chat=True, seed=21, tie_embeddings=False,
                           max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--api-key", API_KEY)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same checkpoint loaded here: what the server must answer, computed with model.generate."""
    from inference import load_model
    from tokenizer import StreamDecoder
    model, tok, _ = load_model(ckpt)

    def reply(prompt_ids, max_tokens, stop=True, **sampling) -> str:
        decoder = StreamDecoder(tok)
        ids = model.generate(prompt_ids, max_new_tokens=max_tokens, stop_ids=tok.stop_ids() if stop else (),
                             **({"temperature": 0} | sampling))
        return "".join(decoder.push(t) for t in ids)

    def chat_ids(messages):
        return tok.render_chat(messages, add_generation_prompt=True).ids

    return reply, chat_ids, tok


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


# ----------------------------------------------------------------------------- the happy paths

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL


def test_chat_completion_with_usage_matches_generate(client, reference):
    reply, chat_ids, _ = reference
    messages = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "感冒发烧怎么办？"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    expected = reply(chat_ids(messages), 20)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and expected
    assert r.usage.prompt_tokens == len(chat_ids(messages))
    assert r.usage.completion_tokens <= 20 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 20 else "stop")


def test_streamed_chat_equals_the_whole_reply_and_ends_with_done(client, server, reference):
    reply, chat_ids, _ = reference
    messages = [{"role": "user", "content": "高血压要注意什么？"},
                {"role": "assistant", "content": "少盐。"}, {"role": "user", "content": "还有呢？"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply(chat_ids(messages), 24)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3      # streamed, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == len(chat_ids(messages))
    # the raw wire format: server-sent events, the last one data: [DONE]
    body = {"model": MODEL, "messages": messages, "max_tokens": 5, "stream": True}
    raw = httpx.post(server + "/v1/chat/completions", json=body, timeout=60,
                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_continue_text_like_a_base_model(client, reference):
    reply, _, tok = reference
    prompt = "发热是指体温升高超过正常范围，"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == reply([tok.eos_id] + tok.encode(prompt), 16)
    assert r.usage.prompt_tokens == 1 + len(tok.encode(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_seed_temperature_top_p_and_max_tokens_are_honoured(client, reference):
    reply, chat_ids, _ = reference
    messages = [{"role": "user", "content": "失眠怎么办？"}]

    def sample(seed, **kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=seed,
                                              **({"temperature": 1.0, "top_p": 0.9} | kw)).choices[0].message.content
    a, b, c = sample(5), sample(5), sample(6)
    assert a == b != c
    expected = reply(chat_ids(messages), 16, temperature=1.0, top_p=0.9,
                     generator=torch.Generator().manual_seed(5))
    assert a == expected
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=1.0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_reply_streamed_or_not(client, reference):
    reply, chat_ids, _ = reference
    messages = [{"role": "user", "content": "头疼怎么办？"}]
    full = reply(chat_ids(messages), 30, stop=False)
    stop = full[10:13]                      # a string from the middle of the greedy reply
    expected = full[:full.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == expected


# ----------------------------------------------------------------------------- bad requests

def _post(server, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server + path, json=body, headers=headers, timeout=60)
    return httpx.post(server + path, content=body, headers=headers | {"Content-Type": "application/json"},
                      timeout=60)


OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
BAD_REQUESTS = [
    # (name, path, body, status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "test-model", "messages": [', 400, None),
    ("not UTF-8", "/v1/chat/completions", b'{"model": "\xc3\x28"}', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("missing model", "/v1/chat/completions", {"messages": OK_CHAT["messages"]}, 400, "model"),
    ("messages not a list", "/v1/chat/completions", OK_CHAT | {"messages": "你好"}, 400, "messages"),
    ("content a number", "/v1/chat/completions", OK_CHAT | {"messages": [{"role": "user", "content": 5}]},
     400, "messages[0].content"),
    ("unknown role", "/v1/chat/completions", OK_CHAT | {"messages": [{"role": "doctor", "content": "x"}]},
     400, "messages[0].role"),
    ("empty messages", "/v1/chat/completions", OK_CHAT | {"messages": []}, 400, "messages"),
    ("ends with assistant", "/v1/chat/completions",
     OK_CHAT | {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("system not first", "/v1/chat/completions", OK_CHAT | {"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]},
     400, "messages"),
    ("temperature a string", "/v1/chat/completions", OK_CHAT | {"temperature": "hot"}, 400, "temperature"),
    ("temperature too high", "/v1/chat/completions", OK_CHAT | {"temperature": 3}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", OK_CHAT | {"top_p": 0}, 400, "top_p"),
    ("max_tokens a string", "/v1/chat/completions", OK_CHAT | {"max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens a bool", "/v1/chat/completions", OK_CHAT | {"max_tokens": True}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", OK_CHAT | {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", OK_CHAT | {"max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens over the context", "/v1/chat/completions", OK_CHAT | {"max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("stream a string", "/v1/chat/completions", OK_CHAT | {"stream": "yes"}, 400, "stream"),
    ("seed a float", "/v1/chat/completions", OK_CHAT | {"seed": 1.5}, 400, "seed"),
    ("seed too large", "/v1/chat/completions", OK_CHAT | {"seed": 2 ** 80}, 400, "seed"),
    ("temperature NaN", "/v1/chat/completions",
     b'{"model": "test-model", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
     400, "temperature"),
    ("stop a number", "/v1/chat/completions", OK_CHAT | {"stop": 7}, 400, "stop"),
    ("five stop strings", "/v1/chat/completions", OK_CHAT | {"stop": list("abcde")}, 400, "stop"),
    ("n = 2", "/v1/chat/completions", OK_CHAT | {"n": 2}, 400, "n"),
    ("unknown model", "/v1/chat/completions", OK_CHAT | {"model": "gpt-4o"}, 404, "model"),
    ("prompt over the context", "/v1/chat/completions",
     OK_CHAT | {"messages": [{"role": "user", "content": "病人发烧" * 2000}], "max_tokens": None}, 400, "messages"),
    ("prompt + max_tokens over the context", "/v1/chat/completions",
     OK_CHAT | {"messages": [{"role": "user", "content": "病人发烧" * 100}], "max_tokens": 2000}, 400, "messages"),
    ("body over the byte limit", "/v1/chat/completions",
     OK_CHAT | {"messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
    ("completion prompt a number", "/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("two completion prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("empty completion prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("logprobs asked for", "/v1/chat/completions", OK_CHAT | {"logprobs": True}, 400, "logprobs"),
    ("echo asked for", "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
    ("completions unknown model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    # malformed input that used to be a 500
    ("seed of 5000 digits", "/v1/chat/completions",
     b'{"model": "test-model", "messages": [{"role": "user", "content": "a"}], "seed": ' + b"1" * 5000 + b"}",
     400, None),
    ("30000-deep nested arrays", "/v1/chat/completions",
     b'{"model": "test-model", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, None),
    ("lone surrogate in content", "/v1/chat/completions",
     b'{"model": "test-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages[0].content"),
    ("lone surrogate in system", "/v1/chat/completions",
     b'{"model": "test-model", "messages": [{"role": "system", "content": "\\udfff"}, '
     b'{"role": "user", "content": "a"}]}', 400, "messages[0].content"),
    ("lone surrogate in a text part", "/v1/chat/completions",
     b'{"model": "test-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     400, "messages[0].content[0].text"),
    ("lone surrogate in model", "/v1/chat/completions",
     b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}', 400, "model"),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "test-model", "prompt": "x\\udc00"}', 400, "prompt"),
    ("repetition_penalty 1e-300", "/v1/chat/completions", OK_CHAT | {"repetition_penalty": 1e-300}, 400,
     "repetition_penalty"),
    ("prompt token id out of range", "/v1/completions", {"model": MODEL, "prompt": [1, 10 ** 7]}, 400, "prompt"),
    ("two token-id prompts", "/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3]]}, 400, "prompt"),
    ("prefill without a user turn", "/v1/chat/completions",
     OK_CHAT | {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    # official parameters this server does not implement: a 400, not a silent 200
    ("tool_choice required", "/v1/chat/completions", OK_CHAT | {"tool_choice": "required"}, 400, "tool_choice"),
    ("tool_choice naming a function", "/v1/chat/completions",
     OK_CHAT | {"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("a tool that is not a function", "/v1/chat/completions", OK_CHAT | {"tools": [{"type": "retrieval"}]},
     400, "tools[0].type"),
    ("tool-call arguments not JSON", "/v1/chat/completions", OK_CHAT | {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, 400, "messages"),
    ("ends with an assistant tool call", "/v1/chat/completions", OK_CHAT | {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "messages"),
    ("response_format json", "/v1/chat/completions", OK_CHAT | {"response_format": {"type": "json_object"}},
     400, "response_format"),
    ("frequency_penalty", "/v1/chat/completions", OK_CHAT | {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("presence_penalty", "/v1/chat/completions", OK_CHAT | {"presence_penalty": -1}, 400, "presence_penalty"),
    ("logit_bias", "/v1/chat/completions", OK_CHAT | {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("top_logprobs without logprobs", "/v1/chat/completions", OK_CHAT | {"top_logprobs": 2}, 400, "top_logprobs"),
    ("suffix", "/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("best_of", "/v1/completions", {"model": MODEL, "prompt": "a", "best_of": 3}, 400, "best_of"),
    ("an unknown argument", "/v1/chat/completions", OK_CHAT | {"temprature": 0.5}, 400, "temprature"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_openai_error_body(server, name, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


ODD_VALUES = [None, 0, -1, 1, 1.5, 1e308, "x", "", [], [1], {}, {"a": 1}, True]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
               "stream", "stream_options", "n", "top_k", "repetition_penalty", "ignore_eos", "logprobs"]


def test_no_field_value_of_any_json_type_makes_a_500(server):
    """Every field set to every kind of JSON value: a 200 or a 4xx with an OpenAI error body, never a 5xx."""
    base = OK_CHAT | {"max_tokens": 2}
    cases = [base | {f: v} for f in CHAT_FIELDS for v in ODD_VALUES]
    cases += [base | {"messages": [{"role": v, "content": "a"}]} for v in ODD_VALUES]
    cases += [base | {"messages": [{"role": "user", "content": v}]} for v in ODD_VALUES]
    statuses = set()
    http = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    completions = [{"model": MODEL, "prompt": "a", "max_tokens": 2} | {f: v} for f in ("prompt", "echo", "stop")
                   for v in ODD_VALUES]
    for path, body in [("/v1/chat/completions", c) for c in cases] + [("/v1/completions", c) for c in completions]:
        r = http.post(path, json=body)
        statuses.add(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    http.close()
    assert 200 in statuses and 400 in statuses


def test_denormal_sampling_values_give_the_greedy_reply_streamed_or_not(client, reference):
    """temperature 1e-320 and top_p 5e-324 pass the schema; their fp32 math would overflow, so they sample
    greedily (as vLLM does below 1e-5): a 200 with the greedy reply, streamed too (no 200-then-error)."""
    reply, chat_ids, _ = reference
    messages = [{"role": "user", "content": "咳嗽有痰怎么办？"}]
    greedy = reply(chat_ids(messages), 12)
    for sampling in ({"temperature": 1e-320}, {"top_p": 5e-324, "temperature": 1.0}, {"temperature": 5e-324}):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **sampling)
        assert r.choices[0].message.content == greedy, sampling
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                     **sampling))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy


def test_bad_requests_do_not_reset_the_keep_alive_connection(server):
    """Every malformed body is answered on the same keep-alive connection, which then still serves a reply."""
    import http.client
    from urllib.parse import urlsplit
    conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    sock = None
    for name, path, body, status, _ in BAD_REQUESTS:
        conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body), headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == status and r.getheader("connection") != "close", name
        sock = sock or conn.sock
        assert conn.sock is sock, f"the connection was closed after {name!r}"
    conn.request("POST", "/v1/chat/completions", body=json.dumps(OK_CHAT), headers=headers)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["role"] == "assistant"
    assert conn.sock is sock
    conn.close()


def test_unsupported_parameters_are_refused_unless_neutral(client):
    messages = [{"role": "user", "content": "你好"}]
    with pytest.raises(openai.BadRequestError, match="unsupported parameter"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, frequency_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       response_format={"type": "json_object"})
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, frequency_penalty=0,
                                       presence_penalty=0.0, response_format={"type": "text"}, logit_bias={},
                                       user="someone", metadata={"k": "v"}, store=False)
    assert r.choices[0].message.role == "assistant"


def test_models_retrieve_fingerprint_and_null_usage_on_stream_chunks(client, server):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    messages = [{"role": "user", "content": "你好"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    raw = httpx.post(server + "/v1/chat/completions", json=body, timeout=60,
                     headers={"Authorization": f"Bearer {API_KEY}"})
    chunks = [json.loads(e[6:]) for e in raw.text.split("\n\n") if e and e != "data: [DONE]"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])        # OpenAI's layout
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert {c["system_fingerprint"] for c in chunks} == {r.system_fingerprint}
    plain = httpx.post(server + "/v1/chat/completions", json=body | {"stream_options": None}, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert all("usage" not in json.loads(e[6:]) for e in plain.text.split("\n\n") if e and e != "data: [DONE]")


def test_assistant_prefill_continues_the_last_message(client, reference):
    reply, _, tok = reference
    messages = [{"role": "user", "content": "发烧了怎么办？"}, {"role": "assistant", "content": "首先，"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    rendered = tok.render_chat(messages).ids
    assert rendered[-1] == tok.special["im_end"]
    assert r.choices[0].message.content == reply(rendered[:-1], 12)
    assert r.usage.prompt_tokens == len(rendered) - 1


def test_completion_prompt_as_token_ids_equals_the_text_prompt(client, reference):
    _, _, tok = reference
    prompt = "高血压患者应当"
    ids = [tok.eos_id] + tok.encode(prompt)
    as_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    for as_ids in (ids, [ids]):
        r = client.completions.create(model=MODEL, prompt=as_ids, max_tokens=10, temperature=0)
        assert r.choices[0].text == as_text.choices[0].text and r.usage.prompt_tokens == len(ids)


def test_cors_is_off_by_default_and_opt_in(ckpt):
    """In-process (the app itself): no CORS headers unless --cors-origin names the origin."""
    from fastapi.testclient import TestClient
    from engine import Engine
    from inference import load_model
    from serve import ServerSettings, create_app
    model, tok, _ = load_model(ckpt)
    engine = Engine(model, tok, max_active=1)
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = TestClient(create_app(engine, ServerSettings(MODEL, CONTEXT)))
    assert "access-control-allow-origin" not in closed.get("/v1/models", headers={"Origin": preflight["Origin"]}).headers
    opened = TestClient(create_app(engine, ServerSettings(MODEL, CONTEXT, cors_origins=["http://localhost:3000"])))
    r = opened.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = opened.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in opened.get("/v1/models", headers={"Origin": "http://evil.test"}).headers


def test_unknown_route_wrong_method_and_missing_key_are_openai_errors(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(server + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server + "/v1/chat/completions", headers=auth, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    for key in (None, "wrong-key"):
        r = _post(server, "/v1/chat/completions", OK_CHAT, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {},
                         timeout=30).status_code == 401
    assert httpx.get(server + "/health", timeout=30).status_code == 200    # no key needed to check liveness


def test_official_client_raises_its_typed_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    bad_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_listening_beyond_loopback_needs_an_api_key(ckpt, monkeypatch, capsys):
    import serve
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        serve.main([str(ckpt), "--host", "0.0.0.0"])
    assert exit_info.value.code == 2 and "API key" in capsys.readouterr().err


# ----------------------------------------------------------------------------- concurrency and disconnects

QUESTIONS = ["感冒了怎么办？", "高血压吃什么好？", "失眠的原因有哪些？", "糖尿病能治愈吗？",
             "孩子发烧39度怎么办？", "胃疼是怎么回事？", "How to treat a cough?", "腰疼要做什么检查？"]


def test_eight_concurrent_streams_each_get_their_own_reply(server, reference):
    reply, chat_ids, _ = reference
    expected = [reply(chat_ids([{"role": "user", "content": q}]), 32, stop=False) for q in QUESTIONS]
    assert len(set(expected)) == 8

    async def one(client, question):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        parts, times = [], []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                times.append(time.monotonic())
        return "".join(parts), times[0], times[-1]

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, q) for q in QUESTIONS))

    results = asyncio.run(all_of_them())
    assert [text for text, _, _ in results] == expected
    # served together (round-robin), not one after another: every stream started before any one finished
    assert max(first for _, first, _ in results) < min(last for _, _, last in results)


def test_client_disconnect_stops_its_generation(server):
    before = health(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "请详细介绍一下肺炎。"}], "max_tokens": 1500,
            "temperature": 1.0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(12)) if line.startswith("data: ")]
    assert len(got) >= 5                                   # it was streaming, then we hung up
    deadline = time.time() + 30
    while health(server)["active"] and time.time() < deadline:
        time.sleep(0.2)
    stopped = health(server)
    time.sleep(1.0)
    after = health(server)
    assert stopped["active"] == 0
    assert after["tokens_generated"] == stopped["tokens_generated"]     # the counter no longer moves
    assert after["tokens_generated"] - before["tokens_generated"] < 1000  # far from the 1500 asked for
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1


def test_non_streaming_client_that_times_out_cancels_every_try(server):
    """The official client with timeout=2 and its default 2 retries hangs up three times; each of the three
    generations (1500 tokens, ~20 s at this model's speed) is cancelled, none is left running."""
    before = health(server)
    impatient = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=2)   # default max_retries=2
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "请详细介绍肺炎。"}],
                                          max_tokens=1500, temperature=1.0, extra_body={"ignore_eos": True})
    deadline = time.time() + 30
    while (health(server)["active"] or health(server)["requests_cancelled"] < before["requests_cancelled"] + 3) \
            and time.time() < deadline:
        time.sleep(0.2)
    after = health(server)
    assert after["active"] == 0 and after["requests_cancelled"] == before["requests_cancelled"] + 3
    assert after["requests_finished"] == before["requests_finished"]      # none ran to its end
    assert after["tokens_generated"] - before["tokens_generated"] < 3 * 1500


def test_server_survived_everything(server):
    h = health(server)
    assert h["status"] == "ok" and h["active"] == 0 and h["queued"] == 0


# ----------------------------------------------------------------------------- the web page, in headless Chromium

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def headless_chromium(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian's chromium + chromium-driver are needed: run script/setup.sh (apt-get install)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_web_page_streams_multi_turn_chinese_replies_in_headless_chromium(server, reference, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    reply, chat_ids, _ = reference
    driver = headless_chromium(tmp_path)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server + "/")
        assert driver.execute_script("return document.characterSet") == "UTF-8"
        font = driver.execute_script("return getComputedStyle(document.body).fontFamily")
        assert "Noto Sans CJK SC" in font and "PingFang SC" in font
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.execute_script("""
            const t = document.getElementById('temperature'); t.value = '0';
            t.dispatchEvent(new Event('input'));
            window.updates = 0;   // count DOM updates of the reply: a streamed reply arrives in many
            new MutationObserver((records) => { window.updates += records.length; })
              .observe(document.getElementById('messages'), {childList: true, characterData: true, subtree: true});
        """)
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("24")
        wait = WebDriverWait(driver, 120)

        def ask(question: str, n: int) -> str:
            box = driver.find_element(By.ID, "input")
            box.send_keys(question)
            box.send_keys(Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == n)
            return driver.execute_script(
                "const m = document.querySelectorAll('.msg.assistant'); return m[m.length - 1].textContent")

        q1, q2 = "我最近总是头疼，怎么办？", "需要去医院做什么检查？"
        a1 = ask(q1, 1)
        expected1 = reply(chat_ids([{"role": "user", "content": q1}]), 24)
        assert a1 == expected1 and a1
        assert driver.execute_script("return window.updates") >= 5
        a2 = ask(q2, 2)   # the page sends the whole conversation: the answer is the multi-turn one
        assert a2 == reply(chat_ids([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                     {"role": "user", "content": q2}]), 24)
        bubbles = driver.execute_script(
            "return [...document.querySelectorAll('.msg')].map(m => m.textContent)")
        assert bubbles == [q1, a1, q2, a2]
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        png = tmp_path / "chat_page.png"
        assert driver.save_screenshot(str(png)) and png.stat().st_size > 10_000
        print(f"screenshot: {png}")
    finally:
        driver.quit()


SMALL_CONTEXT = 256   # the tiny preset's whole context, which the page's max_tokens once equalled


@pytest.mark.slow
def test_web_page_fits_replies_to_a_small_context_and_drops_failed_turns(tmp_path_factory, tmp_path):
    """A server whose model has a 256-token context and a 512-token default reply: the page's first question is
    answered (the reply fits the room the prompt leaves), a max_tokens setting beyond the context still gets an
    answer, a conversation that outgrows the context drops its oldest exchanges, and a failed turn (a wrong API
    key) is left out of the conversation the next question sends."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from inference import load_model
    from tokenizer import StreamDecoder
    ckpt = make_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", chat=True, seed=5, tie_embeddings=False,
                           max_seq_len=SMALL_CONTEXT)
    model, tok, _ = load_model(ckpt)

    def expected(conversation):
        """What the page must show: the reply to the conversation it sends (oldest exchanges dropped until
        the prompt fits), as long as the context allows."""
        while len(tok.render_chat(conversation, add_generation_prompt=True).ids) >= SMALL_CONTEXT:
            conversation = conversation[2:]
        ids = tok.render_chat(conversation, add_generation_prompt=True).ids
        decoder = StreamDecoder(tok)
        return "".join(decoder.push(t) for t in model.generate(ids, max_new_tokens=SMALL_CONTEXT - len(ids),
                                                               temperature=0, stop_ids=tok.stop_ids()))

    proc, url = start_server(ckpt, "--api-key", API_KEY, "--max-tokens", "512")
    driver = headless_chromium(tmp_path)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url + "/")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                              "t.dispatchEvent(new Event('input'));")
        wait = WebDriverWait(driver, 120)

        def ask(question: str) -> tuple[str, bool]:
            n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
            box = driver.find_element(By.ID, "input")
            box.send_keys(question)
            box.send_keys(Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == n + 1)
            return driver.execute_script("const m = document.querySelectorAll('.msg.assistant');"
                                         "const last = m[m.length - 1];"
                                         "return [last.textContent, last.classList.contains('error')]")

        history = []
        for question, max_tokens in [("我最近总是头疼，怎么办？", ""), ("需要做什么检查？", "1000"),
                                     ("平时饮食要注意什么？", "1000")]:
            driver.execute_script(f"document.getElementById('max_tokens').value = '{max_tokens}'")
            answer, error = ask(question)
            history += [{"role": "user", "content": question}]
            assert not error and answer == expected(history) and answer, (question, answer)
            history += [{"role": "assistant", "content": answer}]
        key = driver.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys("wrong-key")
        answer, error = ask("这句不会被回答")
        assert error and "API key" in answer
        key.clear()
        key.send_keys(API_KEY)
        answer, error = ask("谢谢医生")
        assert not error and answer == expected(history + [{"role": "user", "content": "谢谢医生"}])
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user.failed")[0].text == "这句不会被回答"
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=20)


# ----------------------------------------------------------------------------- pieces, in-process

def test_stop_matcher_holds_back_a_possible_stop_prefix_across_pieces():
    from engine import StopMatcher
    m = StopMatcher(["<END>", "停止"])
    assert m.push("你好<E") == ("你好", False)        # "<E" might begin "<END>": held back
    assert m.push("X") == ("<EX", False)             # it did not
    assert m.push("再见停") == ("再见", False)
    assert m.push("止之后") == ("", True)              # cut at the stop string, nothing after it
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False) and m.flush() == ""


def test_full_queue_is_a_429_not_a_hang(ckpt):
    from inference import load_model
    from engine import Engine, EngineBusy, Job
    from inference import Sampling
    model, tok, _ = load_model(ckpt)
    engine = Engine(model, tok, max_active=1, max_queue=1)
    jobs = [Job(tok.encode("发热"), Sampling(max_new_tokens=1500, temperature=1.0, top_p=1.0, ignore_eos=True),
                lambda *event: None) for _ in range(3)]
    try:
        engine.submit(jobs[0])
        deadline = time.time() + 30
        while engine.stats["active"] == 0 and time.time() < deadline:   # the engine took it: the queue is empty
            time.sleep(0.01)
        engine.submit(jobs[1])                                         # waits in the queue
        with pytest.raises(EngineBusy):
            engine.submit(jobs[2])
    finally:
        for job in jobs:
            job.cancelled.set()
        deadline = time.time() + 30
        while (engine.stats["active"] or engine.waiting.qsize()) and time.time() < deadline:
            time.sleep(0.05)
    assert engine.stats["requests_cancelled"] == 2 and engine.stats["active"] == 0


def test_batched_engine_gives_each_request_the_reply_it_gets_alone(ckpt, reference):
    """Five requests through an engine that decodes at most three together: different prompts, lengths,
    seeds, sampling settings and stop strings, so requests finish at different steps, their slots are
    refilled and late requests join a running batch. Each reply is the one model.generate gives alone."""
    from inference import load_model
    from engine import Engine
    from inference import Sampling
    from serve import HttpJob
    _, chat_ids, tok = reference
    model, _, _ = load_model(ckpt)
    cases = [("感冒了怎么办？", dict(max_new_tokens=24, temperature=0.0, top_p=1.0)),
             ("高血压吃什么好？", dict(max_new_tokens=9, temperature=0.9, top_p=0.8, seed=3)),
             ("失眠的原因有哪些？", dict(max_new_tokens=30, temperature=1.2, top_p=1.0, top_k=20, seed=11,
                                   repetition_penalty=1.3)),
             ("How to treat a cough?", dict(max_new_tokens=5, temperature=0.7, top_p=0.95, seed=5)),
             ("孩子发烧39度怎么办？", dict(max_new_tokens=18, temperature=0.0, top_p=1.0, repetition_penalty=1.2))]
    prompts = [chat_ids([{"role": "user", "content": q}]) for q, _ in cases]
    from inference import seeded_generator
    from tokenizer import StreamDecoder

    def alone(prompt, max_new_tokens, seed=None, **sampling):
        decoder = StreamDecoder(tok)
        ids = model.generate(prompt, max_new_tokens=max_new_tokens, generator=seeded_generator(model, seed), **sampling)
        return "".join(decoder.push(t) for t in ids)
    expected = [alone(p, **s) for p, (_, s) in zip(prompts, cases)]
    assert len(set(expected)) == 5
    engine = Engine(model, tok, max_active=3, max_queue=8)

    async def run_all():
        jobs = [HttpJob.create(p, Sampling(ignore_eos=True, **s)) for p, (_, s) in zip(prompts, cases)]
        for job in jobs:
            engine.submit(job)

        async def collect(job):
            parts = []
            while True:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=120)
                if kind == "text":
                    parts.append(value)
                else:
                    assert (kind, value) == ("done", "length")
                    return "".join(parts), job.completion_tokens
        return await asyncio.gather(*(collect(job) for job in jobs))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == expected
    assert [n for _, n in results] == [s["max_new_tokens"] for _, s in cases]
    assert engine.stats["requests_finished"] == 5 and engine.stats["active"] == 0


@pytest.mark.skipif(not __import__("bf16_gemv").available(), reason="no avx512_bf16 CPU or no C compiler")
def test_engine_batch_1_fast_path_gives_the_replies_of_decode_step(ckpt, monkeypatch):
    """bf16 weights at batch 1: the engine's one-call step (model.token_decoder; the greedy token from the
    compiled argmax) against the same engine stepping through decode_step (token_decoder turned off), greedy and
    seeded sampling, each with and without a repetition penalty: the same tokens and text, request after request."""
    from engine import Engine, Job, run_jobs
    from inference import Sampling, load_model
    model, tok, _ = load_model(ckpt, dtype="bf16")
    prompt = tok.encode("感冒了怎么办？")
    settings = [dict(temperature=0.0, repetition_penalty=1.0), dict(temperature=0.0, repetition_penalty=3.0),
                dict(temperature=0.9, top_p=0.9, seed=4, repetition_penalty=1.0),
                dict(temperature=0.9, top_p=0.9, seed=4, repetition_penalty=3.0)]

    def replies(engine):
        texts = []
        jobs = [Job(prompt, Sampling(max_new_tokens=60, ignore_eos=True, **s),
                    lambda kind, value, texts=texts, i=i: texts.append((i, value)) if kind == "text" else None)
                for i, s in enumerate(settings)]
        run_jobs(engine, jobs)
        return [job.tokens for job in jobs], ["".join(v for i, v in texts if i == k) for k in range(len(jobs))]
    fast = Engine(model, tok, max_active=1)
    got = replies(fast)
    assert fast._one is not None
    monkeypatch.setattr(model, "token_decoder", lambda cache: None)   # every step through decode_step
    slow = Engine(model, tok, max_active=1)
    want = replies(slow)
    assert slow._one is None
    assert got == want and all(len(t) == 60 for t in got[0]) and got[0][0] != got[0][2]


def test_a_request_whose_sampling_fails_ends_alone_and_the_batch_goes_on(ckpt, reference):
    """In one batch of four: one job's temperature turns denormal after its third token (its fp32 sampling then
    overflows to nan mid-batch), another has one from the start (fails at its first token). Each of those ends
    alone with a clear error; the other two give exactly the replies they get alone. The stats are updated
    before each job's last event (the event's listener sees its job no longer counted as active)."""
    from engine import Engine, Job
    from inference import Sampling, load_model, seeded_generator
    from tokenizer import StreamDecoder
    _, chat_ids, tok = reference
    model, _, _ = load_model(ckpt)
    prompts = [chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    settings = [dict(max_new_tokens=20, temperature=0.0, top_p=1.0), dict(max_new_tokens=16, temperature=0.9,
                                                                           top_p=0.9, seed=4),
                dict(max_new_tokens=20, temperature=0.8, top_p=1.0, seed=1),
                dict(max_new_tokens=20, temperature=1e-320, top_p=1.0, seed=2)]

    def alone(prompt, max_new_tokens, seed=None, **sampling):
        decoder = StreamDecoder(tok)
        ids = model.generate(prompt, max_new_tokens=max_new_tokens, generator=seeded_generator(model, seed),
                             **sampling)
        return "".join(decoder.push(t) for t in ids)
    expected = [alone(p, **s) for p, s in zip(prompts[:2], settings[:2])]
    engine = Engine(model, tok, max_active=4)
    results = [{"text": [], "end": None, "active_at_end": None} for _ in prompts]

    def listener(i):
        def on_event(kind, value):
            out = results[i]
            if kind == "text":
                out["text"].append(value)
                if i == 2 and len(out["text"]) == 3:   # engine thread, between two batched steps
                    jobs[2].sampling.temperature = 1e-320
            else:
                out["end"], out["active_at_end"] = (kind, value), engine.stats["active"]
                finished.release()
        return on_event
    import threading
    finished = threading.Semaphore(0)
    jobs = [Job(p, Sampling(ignore_eos=True, **s), listener(i)) for i, (p, s) in enumerate(zip(prompts, settings))]
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        assert finished.acquire(timeout=120)
    assert ["".join(r["text"]) for r in results[:2]] == expected
    assert [r["end"] for r in results[:2]] == [("done", "length")] * 2
    for r in results[2:]:
        assert r["end"][0] == "error" and "sampling failed with temperature=1e-320" in r["end"][1]
    assert len(results[2]["text"]) == 3 and results[3]["text"] == []
    assert engine.stats["requests_failed"] == 2 and engine.stats["requests_finished"] == 2
    last = max(range(4), key=lambda i: jobs[i].completion_tokens if results[i]["end"][0] == "done" else -1)
    assert results[last]["active_at_end"] == 0            # the last one to finish sees an idle engine
    assert all(r["active_at_end"] < 4 for r in results)


def test_reasoning_parser_splits_think_and_answer_however_the_text_is_cut():
    from serve import ReasoningParser
    text = "<think>先想：发热 38.5℃，<可能>是感冒</think><answer>多喝水，必要时就医。</answer>"
    expected = [("reasoning_content", "先想：发热 38.5℃，<可能>是感冒"), ("content", "多喝水，必要时就医。")]
    for size in range(1, len(text) + 1):   # every piece size, so a tag is split at every place
        parser, fields = ReasoningParser(), {"reasoning_content": "", "content": ""}
        for i in range(0, len(text), size):
            for field, piece in parser.push(text[i:i + size]):
                fields[field] += piece
        for field, piece in parser.flush():
            fields[field] += piece
        assert [(k, v) for k, v in fields.items() if v] == expected, size
    assert ReasoningParser(thinking=True).push("还在想</think>答") == [("reasoning_content", "还在想"),
                                                                  ("content", "答")]
    parser = ReasoningParser()
    assert parser.push("没有标签 <thi") == [("content", "没有标签 ")] and parser.flush() == [("content", "<thi")]


def _split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """The reference split, by regular expressions: what is inside <think>…</think> (or before </think> when the
    prompt opened it) is reasoning; the rest is content, <answer> tags removed."""
    import re
    if thinking:
        text = "<think>" + text
    reasoning = "".join(re.findall(r"<think>(.*?)(?:</think>|$)", text, flags=re.S))
    content = re.sub(r"<think>.*?(?:</think>|$)", "", text, flags=re.S)
    return reasoning, re.sub(r"</?answer>", "", content)


def test_enable_thinking_switch_and_reasoning_content_streamed_and_whole(client, reference):
    """chat_template_kwargs.enable_thinking puts <think> (or <think></think>) after the generation prompt; with it on
    the reply is reasoning until </think>, returned as reasoning_content, streamed as delta.reasoning_content."""
    reply, _, tok = reference
    messages = [{"role": "user", "content": "胸口疼是怎么回事？"}]
    for thinking in (True, False):
        ids = tok.render_chat(messages, add_generation_prompt=True, enable_thinking=thinking).ids
        think = [tok.special["think_start"]] + ([] if thinking else [tok.special["think_end"]])
        assert ids[-len(think):] == think
        reasoning, content = _split_reasoning(reply(ids, 20), thinking)
        kwargs = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                      extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        r = client.chat.completions.create(**kwargs)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == content
        assert (getattr(r.choices[0].message, "reasoning_content", None) or "") == reasoning
        if thinking:
            assert reasoning        # the whole reply was reasoning (the model never closed it)
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == content
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning


def test_tool_call_parser_cuts_calls_out_of_the_stream_however_it_is_cut():
    from serve import ToolCallParser
    text = '先查一下。<tool_call>\n{"name": "lookup_dose", "arguments": {"drug": "布洛芬"}}\n</tool_call>' \
           '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    for size in (1, 2, 3, 7, len(text)):
        parser, out = ToolCallParser(), []
        for i in range(0, len(text), size):
            out += parser.push(text[i:i + size])
        out += parser.flush()
        content = "".join(v for k, v in out if k == "content")
        calls = [v["function"] for k, v in out if k == "tool_call"]
        assert content == "先查一下。", size
        assert calls == [{"name": "lookup_dose", "arguments": '{"drug": "布洛芬"}'}, {"name": "f", "arguments": '{"a": 1}'}]
        assert [c["index"] for c in parser.calls] == [0, 1]
    parser = ToolCallParser()      # not JSON: stays text; an unclosed but whole call at the end is a call
    assert parser.push("<tool_call>oops</tool_call>") == [("content", "<tool_call>oops</tool_call>")]
    assert [k for k, _ in parser.push('<tool_call>{"name": "g", "arguments": {}}') + parser.flush()] == ["tool_call"]


def tool_checkpoint(path):
    """A small chat model whose tokenizer (trained here, 2,000 pieces) knows the tool prompt's words."""
    from checkpoint import save_checkpoint
    from data_process.train_tokenizer import train_sentencepiece
    from model import Transformer, make_config
    from test_export import real_chinese_texts
    from tokenizer import Tokenizer, openai_to_chat
    from tool_data import tool_conversations
    turns = [m["content"] for r in tool_conversations() for m in openai_to_chat(r["messages"], r["tools"])]
    tok = Tokenizer(train_sentencepiece(real_chinese_texts() + turns * 20, 2000))
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=256, max_seq_len=512))
    return save_checkpoint(path, model, tok, {"step": 0, "kind": "sft", "chat": True})


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """Fine-tune (train_loop.train, 60 full-batch steps) on the project's tiny tool set read through the
    openai_tools_jsonl reader, then serve the result."""
    from checkpoint import load_checkpoint
    from data_process.readers import READERS
    from tool_data import write_tool_dataset
    from train_loop import TrainConfig, train
    tmp = tmp_path_factory.mktemp("tools")
    path = write_tool_dataset(tmp / "tools.jsonl")
    conversations = [r["messages"] for r in READERS["openai_tools_jsonl"](path, "tools")]
    assert len(conversations) == 3 and all(c[0]["role"] == "system" and "<tools>" in c[0]["content"]
                                           for c in conversations)
    model, tok, _ = load_checkpoint(tool_checkpoint(tmp / "init"))
    rendered = [tok.render_chat(c) for c in conversations]
    T = max(len(r.ids) for r in rendered)
    ids, weights = torch.full((len(rendered), T), tok.pad_id), torch.zeros(len(rendered), T)
    for i, r in enumerate(rendered):
        ids[i, :len(r.ids)], weights[i, :len(r.ids)] = torch.tensor(r.ids), torch.tensor(r.weights)

    class Batches:   # the whole set every step
        def next_batch(self, step, micro_step):
            return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": weights[:, 1:]}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass
    cfg = TrainConfig(out_dir=str(tmp / "sft"), total_steps=60, batch_size=len(rendered), seq_len=T - 1, lr=5e-3,
                      min_lr=1e-4, warmup_steps=5, stable_steps=35, decay_steps=20, weight_decay=0.0, dtype="fp32",
                      device="cpu", eval_interval=0, save_interval=0, progress=False)
    summary = train(cfg, model, tok, Batches(), meta={"kind": "sft", "chat": True, "stage": "tools"})
    proc, url = start_server(summary["final_dir"], "--api-key", API_KEY)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.slow
def test_official_client_tool_loop_on_a_model_fine_tuned_for_tools(tool_server):
    from tool_data import DOSES, DRUG_TOOL, answer
    client = openai.OpenAI(base_url=tool_server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for drug in ("布洛芬", "阿莫西林"):
        messages = [{"role": "user", "content": f"{drug}怎么吃？"}]
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[DRUG_TOOL], temperature=0,
                                           max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "lookup_dose" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert args == {"drug": drug}
        # streamed: the same call as a tool_calls delta, finish_reason tool_calls
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[DRUG_TOOL],
                                                     temperature=0, max_tokens=60, stream=True))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
            [(0, "lookup_dose", {"drug": drug})]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        # the client runs the tool and sends its result back: the model answers from it
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": DOSES[args["drug"]]}]
        final = client.chat.completions.create(model=MODEL, messages=messages, tools=[DRUG_TOOL], temperature=0,
                                               max_tokens=60)
        assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
        assert final.choices[0].message.content == answer(drug)
    # tool_choice "none": the tools are not offered, so no call comes back
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "布洛芬怎么吃？"}],
                                       tools=[DRUG_TOOL], tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls
