"""export.py: the Hugging Face folder is checked against transformers itself (logits, greedy tokens, tokenizer
ids on real Chinese text, the chat template), never assumed."""
import csv
import json

import pytest
import torch

from conftest import SAMPLES
from test_chat import make_checkpoint, one_torch_thread  # noqa: F401 (autouse fixture)

from transformers import AutoModelForCausalLM, AutoTokenizer

from inference import load_model  # noqa: E402
from export import export, main as export_main  # noqa: E402


def real_chinese_texts() -> list[str]:
    """Real text of several kinds: a medical textbook, medical dialogues (GB18030 CSV), SFT answers, web pages."""
    texts = [line.strip() for line in (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8")
             .splitlines() if line.strip()][:40]
    with open(SAMPLES / "toyhom-medical-dialogue/样例_内科5000-6000.csv", encoding="gb18030", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            texts.append(f"{row['title']}\n{row['ask']}\n{row['answer']}")
            if i == 30:
                break
    with open(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        for i, line in zip(range(20), f):
            texts.extend(turn["value"] for turn in json.loads(line)["conversations"])
    with open(SAMPLES / "skywork-zh-web/zh_general.jsonl", encoding="utf-8") as f:
        texts.extend(json.loads(line)["text"][:2000] for _, line in zip(range(10), f))
    texts += ["  两个空格开头", "tab\there", "结尾换行\n\n", "English and 中文 mixed, 3.14 ℃ 😀 \u00a0nbsp"]
    return texts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, our tokenizer, HF model, HF tokenizer) for an untied chat checkpoint, exported once."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(tmp / "ckpt", chat=True, seed=3, tie_embeddings=False)
    out = export(ckpt, tmp / "hf")
    model, tok, _ = load_model(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    return model, tok, hf_model, hf_tok, out


def max_logit_diff(model, hf_model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return (model(x).logits - hf_model(x).logits).abs().max().item()


def test_exported_folder_loads_as_llama_with_our_config(exported):
    model, tok, hf_model, hf_tok, out = exported
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    cfg, hf_cfg = model.config, hf_model.config
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads,
            hf_cfg.intermediate_size, hf_cfg.vocab_size, hf_cfg.rms_norm_eps, hf_cfg.max_position_embeddings) == \
           (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.norm_eps,
            cfg.max_seq_len)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == cfg.rope_theta
    assert hf_cfg.tie_word_embeddings is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.stop_ids()      # a chat model stops at <|im_end|> and end-of-text
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token_id == tok.pad_id


def test_transformers_logits_match_ours_in_fp32(exported):
    model, tok, hf_model, _, _ = exported
    for text in real_chinese_texts()[:5]:
        ids = tok.encode(text)[: model.config.max_seq_len]
        assert max_logit_diff(model, hf_model, ids) < 1e-4


def test_tied_embeddings_export_matches_too(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", chat=False, seed=5)   # tie_embeddings=True (the presets' default)
    out = export(ckpt, tmp_path / "hf")
    model, tok, _ = load_model(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf_model.config.tie_word_embeddings
    ids = tok.encode(real_chinese_texts()[0])[:200]
    assert max_logit_diff(model, hf_model, ids) < 1e-4
    assert AutoTokenizer.from_pretrained(out).eos_token_id == tok.eos_id   # a base model ends at end-of-text


def test_greedy_generation_gives_the_same_tokens(exported):
    model, tok, hf_model, hf_tok, _ = exported
    messages = [{"role": "user", "content": "发烧三天，咳嗽，应该怎么办？"}]
    prompt = tok.render_chat(messages, add_generation_prompt=True).ids
    ours = list(model.generate(prompt, max_new_tokens=40, temperature=0, stop_ids=tok.stop_ids()))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                eos_token_id=tok.stop_ids(), pad_token_id=tok.pad_id, repetition_penalty=1.0)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:-1] if theirs and theirs[-1] in tok.stop_ids() else theirs   # we never yield the stop id
    assert len(ours) > 5
    assert ours == theirs


def test_hf_tokenizer_gives_our_ids_on_real_chinese_text(exported):
    _, tok, _, hf_tok, _ = exported
    texts = real_chinese_texts()
    assert len(texts) > 100
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text[:80]
        assert hf_tok.decode(ids) == tok.decode(ids)


def test_chat_template_renders_identically(exported):
    _, tok, _, hf_tok, _ = exported
    messages = [{"role": "system", "content": "你是一名经验丰富的全科医生。"},
                {"role": "user", "content": "我最近总是头疼，晚上睡不好。"},
                {"role": "assistant", "content": "<think>可能与睡眠不足和压力有关。</think><answer>建议规律作息，"
                                                 "必要时就医检查血压。</answer>"},
                {"role": "user", "content": "需要吃药吗？"}]
    for gen in (True, False):
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert text == tok.render_text(messages, add_generation_prompt=gen)
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
        assert ids["input_ids"] == tok.render_chat(messages, add_generation_prompt=gen).ids


def test_thinking_switch_renders_identically_in_transformers(exported):
    """apply_chat_template(..., enable_thinking=...) (the kwarg Qwen3's template takes) gives our ids."""
    _, tok, _, hf_tok, _ = exported
    messages = [{"role": "user", "content": "发烧三天了，要紧吗？"}]
    for thinking in (None, True, False):
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert text == tok.render_text(messages, add_generation_prompt=True, enable_thinking=thinking)
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, **kwargs)
        assert ids["input_ids"] == tok.render_chat(messages, add_generation_prompt=True, enable_thinking=thinking).ids
    assert text.endswith("<|im_start|>assistant\n<think></think>")


def test_moe_checkpoint_exports_to_mixtral_with_matching_logits(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", preset="moe", chat=False, seed=1, dim=64, n_layers=2, n_heads=4,
                           n_kv_heads=2, ffn_dim=32, n_experts=4, n_experts_per_tok=2, max_seq_len=128)
    out = export(ckpt, tmp_path / "hf")
    model, tok, _ = load_model(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    assert max_logit_diff(model, hf_model, tok.encode(real_chinese_texts()[1])[:100]) < 1e-4


def test_lora_adapter_is_merged_into_the_export(tmp_path):
    from lora import LoraSettings, add_lora, load_adapter, save_adapter
    ckpt = make_checkpoint(tmp_path / "ckpt", chat=True, seed=2)
    model, tok, _ = load_model(ckpt)
    settings = LoraSettings(rank=4, alpha=8, targets=["q", "v", "down"])
    add_lora(model, settings)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:       # peft starts B at zero (a no-op adapter); make it change the outputs
            torch.nn.init.normal_(p, std=0.5)
    save_adapter(model, settings, tmp_path / "adapter")
    out = export(ckpt, tmp_path / "hf", lora_dir=tmp_path / "adapter")
    base, _, _ = load_model(ckpt)
    with_adapter = load_adapter(load_model(ckpt)[0], tmp_path / "adapter").eval()   # peft layers, unmerged
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode(real_chinese_texts()[2])[:100]
    assert max_logit_diff(with_adapter, hf_model, ids) < 1e-4
    assert max_logit_diff(base, hf_model, ids) > 1e-2


def test_export_refuses_a_non_empty_destination_and_a_missing_checkpoint(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert export_main([str(ckpt), str(tmp_path / "busy")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]   # no half-written folder left


def test_export_cli_writes_bf16_weights(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert export_main([str(ckpt), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf_model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_tokenizer_trained_by_the_project_exports_with_the_same_ids(tmp_path):
    """The project's own trainer settings (identity normalization, no dummy prefix, split digits, no BOS)."""
    from model import Transformer, make_config
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    from checkpoint import save_checkpoint
    texts = real_chinese_texts()
    tok = Tokenizer(train_sentencepiece(texts, 2000))
    assert tok.bos_id is None
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, {"step": 0, "kind": "sft", "chat": True})
    out = export(ckpt, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in texts + ["剂量 12.5 mg，每日 3 次", "    缩进的代码\n\tdef f(x):  return x"]:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text[:80]
        assert hf_tok.decode(ids) == text
    messages = [{"role": "user", "content": "血压 140/90 算高吗？"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        tok.render_chat(messages, add_generation_prompt=True).ids
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.bos_token is None


def test_export_modes_follow_the_umask_and_the_context_is_the_model_max_length(tmp_path):
    import os
    import stat
    ckpt = make_checkpoint(tmp_path / "ckpt", max_seq_len=384)
    old = os.umask(0o022)
    try:
        out = export(ckpt, tmp_path / "hf")
        os.umask(0o077)
        private = export(ckpt, tmp_path / "private")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in private.iterdir()} == {0o600}
    assert AutoTokenizer.from_pretrained(out).model_max_length == 384
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 384


def test_lora_adapter_exported_apart_loads_with_auto_peft_model(tmp_path, monkeypatch):
    """--adapter-out: the base exported unmerged, the adapter in peft's layout naming it by absolute path, so
    peft's AutoPeftModelForCausalLM loads both from the adapter folder (from any working directory)."""
    from peft import AutoPeftModelForCausalLM
    from lora import LoraSettings, add_lora, load_adapter, save_adapter
    ckpt = make_checkpoint(tmp_path / "ckpt", chat=True, seed=4)
    model, tok, _ = load_model(ckpt)
    settings = LoraSettings(rank=4, alpha=8, targets=["q", "v", "down"])
    add_lora(model, settings)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_adapter(model, settings, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    assert export_main([str(ckpt), "hf-base", "--lora", "adapter", "--adapter-out", "hf-lora"]) == 0
    config = json.loads((tmp_path / "hf-lora" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "hf-base")
    monkeypatch.chdir("/")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "hf-lora", dtype=torch.float32).eval()
    with_adapter = load_adapter(load_model(ckpt)[0], tmp_path / "adapter").eval()
    ids = tok.encode(real_chinese_texts()[3])[:80]
    assert max_logit_diff(with_adapter, peft_model, ids) < 1e-4
    assert max_logit_diff(load_model(ckpt)[0], peft_model, ids) > 1e-2     # the adapter is really applied
