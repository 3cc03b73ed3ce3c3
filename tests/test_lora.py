"""LoRA (lora.py over peft): adapters only train, base weights stay untouched, merged outputs equal adapter
outputs, the adapter loads with peft onto a Hugging Face Llama, and a LoRA SFT stage runs end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lora
import sft
from test_sft_fixtures import (FAST_TRAIN, MEDICAL_SFT, base_checkpoint, read_records, stage,
                               write_toml)


def test_settings_validate_and_select_the_named_projections(tmp_path):
    from checkpoint import load_checkpoint
    model, _, _ = load_checkpoint(base_checkpoint(tmp_path / "base"))
    settings = lora.LoraSettings(rank=4, alpha=8, dropout=0.0, targets="q,v,down")
    assert settings.module_names() == ["down_proj", "q_proj", "v_proj", "w2"]
    lora.add_lora(model, settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    # rank 4, 2 layers: q 32->32, v 32->16 (2 kv heads of 8), down 64->32; A is r x in, B is out x r
    assert sum(p.numel() for p in lora.lora_parameters(model)) == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model, settings)
    for bad in (dict(targets=["q", "lm_head"]), dict(targets=[]), dict(rank=0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            lora.LoraSettings(**bad)


@pytest.mark.slow
def test_lora_stage_trains_adapters_only_and_merged_outputs_equal_adapter_outputs(tmp_path):
    from checkpoint import load_checkpoint
    base_dir = base_checkpoint(tmp_path / "base")
    csv = stage(tmp_path, read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=60),
                "medical_dialogue", max_tokens=96)
    out = tmp_path / "out" / "medical_dialogue"
    config = write_toml(tmp_path / "md.toml", {"data": str(csv), "init_from": str(base_dir), "out_dir": str(out)},
                        {**FAST_TRAIN, "save_interval": 2, "lr": 1e-2},
                        lora={"rank": 4, "alpha": 16, "dropout": 0.0, "targets": ["q", "k", "v", "o", "gate",
                                                                                  "up", "down"]})
    assert sft.main([str(config), "--steps", "3"]) == 0

    base = load_file(str(base_dir / "model.safetensors"))
    # the step-2 checkpoint (what the loop resumes from) holds the LoRA model: base weights bit-identical
    mid = load_file(str(out / "step-000002" / "model.safetensors"))
    for name, weight in base.items():
        mid_name = name if name in mid else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(mid[mid_name], weight), name
    adapter = load_file(str(out / "adapter" / lora.ADAPTER_WEIGHTS))
    assert adapter and all(k.startswith("base_model.model.model.layers.") for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())   # it trained
    config_json = json.loads((out / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert config_json["peft_type"] == "LORA" and config_json["r"] == 4

    # final = the merged full model, a normal checkpoint; its outputs equal base + adapter (unmerged), fp32
    merged, tok, meta = load_checkpoint(out / "final")
    assert meta["kind"] == "sft" and meta["chat"] and meta["lora_merged"]
    with_adapter, _, _ = load_checkpoint(base_dir)
    lora.load_adapter(with_adapter, out / "adapter")
    merged.eval(), with_adapter.eval()
    ids = torch.tensor([tok.render_chat([{"role": "user", "content": "头痛发热怎么办？"},
                                         {"role": "assistant", "content": "多喝水，注意休息。"}]).ids])
    with torch.no_grad():
        a, b = merged(ids).logits, with_adapter(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, load_checkpoint(base_dir)[0].eval()(ids).logits, atol=1e-3)   # not a no-op

    # the merge command folds the same adapter into the same weights
    assert sft.main(["merge", "--base", str(base_dir), "--adapter", str(out / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    again, _, meta2 = load_checkpoint(tmp_path / "merged")
    assert meta2["kind"] == "sft" and meta2["lora_merged"]
    for (n1, p1), (n2, p2) in zip(merged.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-7), n1

    # re-running the finished LoRA stage trains nothing (final holds merged weights the loop cannot resume)
    assert sft.main([str(config), "--steps", "3"]) == 0


@pytest.mark.slow
def test_adapter_loads_with_peft_onto_the_hugging_face_llama(tmp_path):
    """Our parameter names are LlamaForCausalLM's, so peft's own loader applies our adapter file unchanged."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    from checkpoint import load_checkpoint
    base_dir = base_checkpoint(tmp_path / "base")
    model, tok, _ = load_checkpoint(base_dir)
    settings = lora.LoraSettings(rank=4, alpha=8, dropout=0.0)
    lora.add_lora(model, settings)
    torch.manual_seed(1)
    for p in lora.lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    lora.save_adapter(model, settings, tmp_path / "adapter")

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False))
    state = load_file(str(base_dir / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tok.encode("患者主诉头痛三天，伴有低热。")])
    model.eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
