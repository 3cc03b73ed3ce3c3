"""Our weights load into the real transformers LlamaForCausalLM / MixtralForCausalLM and give the same logits.

This pins the export contract (issue 9): parameter names are HF's, RoPE is HF's rotate_half convention,
RMSNorm is HF's, GQA groups kv heads as HF's repeat_kv, a tied lm_head is simply absent from the file.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from model import Transformer, make_config

transformers = pytest.importorskip("transformers")

V = 300


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()   # tiny tensors: a second thread only adds barrier waits
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama_config(cfg):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_for_causal_lm_gives_our_logits_in_fp32(tmp_path, tied):
    torch.manual_seed(0)
    ours = Transformer(make_config("tiny", V, tie_embeddings=tied, rope_theta=50000.0)).eval()
    with torch.no_grad():   # non-trivial norm weights so a wrong norm convention would show
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))   # exactly what export reads
    hf = transformers.LlamaForCausalLM(llama_config(ours.config)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if tied else [])
    if tied:
        hf.tie_weights()
        assert torch.equal(hf.lm_head.weight, state["model.embed_tokens.weight"])
    x = torch.randint(0, V, (2, 100))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours(x).logits
    assert (got - ref).abs().max().item() < 1e-4


def test_mixtral_for_causal_lm_loads_our_moe_checkpoint_and_gives_our_logits(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(make_config("tiny", V, n_experts=4, n_experts_per_tok=2, tie_embeddings=False)).eval()
    ours.save_pretrained(tmp_path)
    cfg = ours.config
    mixtral = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, sliding_window=None,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
        tie_word_embeddings=cfg.tie_embeddings)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (tmp_path / "model.safetensors").rename(hf_dir / "model.safetensors")
    (hf_dir / "config.json").write_text(json.dumps(mixtral.to_dict()))
    # our block_sparse_moe.experts.{j}.w1/w2/w3 names are Mixtral's checkpoint names: transformers converts them
    hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.randint(0, V, (2, 64))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours(x).logits
    assert (got - ref).abs().max().item() < 1e-4
