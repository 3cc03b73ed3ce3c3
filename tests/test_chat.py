"""chat.py: a real subprocess fed through stdin, compared with in-process generation on the same checkpoint."""
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SAMPLES


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Batch-1 generation of tiny models gains nothing from a second thread, and on a shared, loaded 2-core
    machine two spinning OpenMP threads make it many times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(out_dir: Path, preset: str = "tiny", chat: bool = True, seed: int = 0, scale: float = 20.0,
                    **overrides) -> Path:
    """A random-init model + the real ChatGLM2 tokenizer, written by checkpoint.save_checkpoint.
    Matrices are scaled up (x`scale`) so that, as in a trained model, what it generates depends on the prompt
    (at init scale the output distribution is nearly the same whatever the context)."""
    from model import Transformer, make_config
    from tokenizer import Tokenizer
    from checkpoint import save_checkpoint
    tok = Tokenizer.load(SAMPLES / "chatglm2-tokenizer" / "tokenizer.model")
    torch.manual_seed(seed)
    model = Transformer(make_config(preset, tok.vocab_size, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    meta = {"step": 0, "tokens_seen": 0, "kind": "sft" if chat else "base", "stage": "test", "chat": chat}
    return save_checkpoint(out_dir, model, tok, meta)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", chat=True, seed=11, tie_embeddings=False)


SAMPLING = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.1)
CLI_SAMPLING = ["--temperature", "1.0", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "7",
                "--max-new-tokens", "16"]


def reference_reply(model, tok, prompt_ids, seed=7, max_new_tokens=16) -> str:
    """What the CLI must print for one turn: model.generate on the same ids, the same seed, decoded."""
    from tokenizer import StreamDecoder
    decoder = StreamDecoder(tok)
    ids = model.generate(prompt_ids, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids(),
                         generator=torch.Generator().manual_seed(seed), **SAMPLING)
    return "".join(decoder.push(t) for t in ids)


def run_chat(args, stdin: str = "", timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C",   # a hostile locale: output stays UTF-8
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "chat.py", *map(str, args)], input=stdin.encode("utf-8"), cwd=ROOT,
                          capture_output=True, timeout=timeout, env=env)


def test_interactive_chat_keeps_history_and_resets_through_stdin(chat_ckpt):
    from inference import load_model
    turns = ["你好，医生。", "我头疼三天了，还有点发烧，怎么办？", "/reset", "太长" * 400, "高血压患者饮食要注意什么？"]
    run = run_chat([chat_ckpt, *CLI_SAMPLING], "\n".join(turns) + "\n/quit\nnever read\n")
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout.decode("utf-8")          # strict: never half a character

    model, tok, meta = load_model(chat_ckpt)
    assert meta["chat"] is True
    first = [{"role": "user", "content": turns[0]}]
    r1 = reference_reply(model, tok, tok.render_chat(first, add_generation_prompt=True).ids)
    second = first + [{"role": "assistant", "content": r1}, {"role": "user", "content": turns[1]}]
    r2 = reference_reply(model, tok, tok.render_chat(second, add_generation_prompt=True).ids)
    third = [{"role": "user", "content": turns[4]}]              # after /reset: no history
    r3 = reference_reply(model, tok, tok.render_chat(third, add_generation_prompt=True).ids)
    assert r1 and r2 and r3 and len({r1, r2, r3}) == 3
    assert out == f"{r1}\n{r2}\n{r3}\n"
    err = run.stderr.decode("utf-8")
    assert "[conversation cleared]" in err
    assert "at most" in err               # the over-long message was refused, the session went on


def test_base_checkpoint_continues_text_without_history(tmp_path):
    from chat import Sampling, Session
    from inference import load_model
    ckpt = make_checkpoint(tmp_path / "base", chat=False, seed=4, tie_embeddings=False)
    model, tok, meta = load_model(ckpt)
    assert meta["chat"] is False
    session = Session(model, tok, chat=False, sampling=Sampling(max_new_tokens=16, seed=7, **SAMPLING))
    first, second = "发热是指体温升高超过正常范围", "高血压的诊断标准是"
    out = io.StringIO()
    session.turn(first, out)
    session.turn(second, out)     # a base model gets each text alone: end-of-text (a document start) + the text
    expected = [reference_reply(model, tok, [tok.eos_id] + tok.encode(t)) for t in (first, second)]
    assert out.getvalue() == "".join(expected) and expected[0] != expected[1]


@pytest.mark.slow   # imports peft (+ transformers) in the subprocess
def test_one_shot_prompt_with_lora_adapter_answers_as_the_adapted_model(chat_ckpt, tmp_path):
    from inference import load_model
    from lora import LoraSettings, add_lora, load_adapter, save_adapter
    model, tok, _ = load_model(chat_ckpt)
    settings = LoraSettings(rank=4, alpha=8, targets=["q", "v", "up"])
    add_lora(model, settings)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:          # peft initialises B to zero; a trained adapter is not a no-op
            torch.nn.init.normal_(p, std=0.5)
    save_adapter(model, settings, tmp_path / "adapter")
    question = "咳嗽有痰是什么原因？"
    run = run_chat([chat_ckpt, "--lora", tmp_path / "adapter", "--prompt", question, *CLI_SAMPLING])
    assert run.returncode == 0, run.stderr.decode()
    ids = tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True).ids
    unmerged = load_adapter(load_model(chat_ckpt)[0], tmp_path / "adapter").eval()   # peft layers as trained
    plain = load_model(chat_ckpt)[0]
    expected = reference_reply(unmerged, tok, ids)
    assert run.stdout.decode("utf-8") == expected + "\n"
    assert expected != reference_reply(plain, tok, ids)


def test_missing_or_corrupted_checkpoint_is_a_clear_error(chat_ckpt, tmp_path, capsys):
    from chat import main
    assert main([str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "cannot load" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(chat_ckpt, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert main([str(broken), "--prompt", "hi"]) == 2
    assert "cannot load" in capsys.readouterr().err
