"""Export a checkpoint to a Hugging Face folder: `LlamaForCausalLM` (dense) or `MixtralForCausalLM` (MoE).

    python export.py out/sft/medical/final hf/medical-26m
    python export.py out/sft/medical_dialogue/final hf/dialogue --lora out/sft/medical_dialogue/adapter
    python export.py out/sft/medical/final hf/base --lora out/sft/medical_dialogue/adapter --adapter-out hf/lora
    python export.py out/sft/medical/final gguf/medical --gguf --gguf-type bf16   # llama.cpp / Ollama

Then, anywhere `transformers` is installed:
    tok = AutoTokenizer.from_pretrained("hf/medical-26m"); model = AutoModelForCausalLM.from_pretrained("hf/medical-26m")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

Our parameter names already are LlamaForCausalLM's (and Mixtral's `block_sparse_moe.{gate,experts.j.w1/w2/w3}`),
and RoPE uses HF's rotate_half layout, so the weights are copied as they are; a tied lm_head is stored once.
The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json (the SentencePiece model
converted by transformers' own converter, then set to SentencePiece's exact behaviour: no dummy-prefix "▁", no
BOS added) + tokenizer_config.json with the special tokens and the project's Jinja chat template, and the original
tokenizer.model (for SentencePiece-based tools such as llama.cpp's converter).
Differences from our Tokenizer: the HF tokenizer turns a literal "<|im_end|>" in text into the special token
(that is how chat templates work there); ours keeps it text. tests/test_export.py checks logits (fp32, max abs
difference < 1e-4), greedy generation, token ids on real Chinese text and the rendered chat template.
The folder is written beside its destination and renamed into place, so it is complete or absent; it and its
files get the modes of a normal mkdir/create (0755/0644 under umask 022), not mkdtemp's private 0700/0600.
`--adapter-out DIR` keeps a LoRA adapter apart instead of merging it: the base is exported to out_dir and DIR holds
the adapter in peft's layout with `task_type: CAUSAL_LM` and out_dir's absolute path as its base, so
`AutoPeftModelForCausalLM.from_pretrained(DIR)` loads base + adapter.

`--gguf` writes out_dir/model.gguf for llama.cpp (GGUF v3 through the `gguf` library, llama.cpp's own writer;
architecture "llama", MoE as llama.cpp's Mixtral layout: stacked ffn_{gate,up,down}_exps + ffn_gate_inp) in
f32, f16, bf16 or q8_0 (norms stay f32, as llama.cpp's converter does; a matrix whose rows are not a multiple of
32 stays f16 under q8_0), and out_dir/Modelfile for Ollama (FROM ./model.gguf, the chat template in Go template
syntax, the stop tokens, the sampling defaults, num_ctx). Tokenization is ours: the SentencePiece pieces, scores
and types as they are, `tokenizer.ggml.add_space_prefix = false` (our model has no dummy prefix; llama.cpp adds
"▁" otherwise) and no BOS. Q and K rows are permuted from HF's rotate_half layout to llama.cpp's interleaved
RoPE, as llama.cpp's convert_hf_to_gguf.py does. tests/test_gguf.py checks all of it in llama.cpp itself
(llama-cpp-python): token ids on real text and the chat template, logits and greedy tokens.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from inference import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_NOISE = {"id2label", "label2id", "output_hidden_states", "output_attentions", "return_dict",
                 "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_name_or_path"}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(cfg, tokenizer, chat: bool, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM (dense) or MixtralForCausalLM (MoE), from our ModelConfig."""
    from transformers import LlamaConfig, MixtralConfig
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_dropout=0.0, bos_token_id=tokenizer.bos_id, eos_token_id=eos_ids(tokenizer, chat),
        pad_token_id=tokenizer.pad_id)
    if cfg.n_experts:
        if cfg.n_shared_experts:
            raise ValueError("Mixtral has no shared experts: a model with n_shared_experts > 0 cannot be exported "
                             "to the Mixtral layout without changing its outputs")
        if cfg.n_experts_per_tok < 2:
            raise ValueError("Mixtral renormalizes the top-k router weights, which for k=1 is the constant 1.0 "
                             "while our k=1 keeps p (Switch): export would change the outputs")
        config = MixtralConfig(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                               router_aux_loss_coef=cfg.aux_loss_coef, sliding_window=None, **common)
        config.architectures = ["MixtralForCausalLM"]
    else:
        config = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        config.architectures = ["LlamaForCausalLM"]
    d = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
    # older transformers read these two top-level keys (newer ones read rope_parameters / dtype)
    d["rope_theta"] = cfg.rope_theta
    d["torch_dtype"] = d["dtype"] = HF_DTYPE_NAMES[dtype]
    return d


def eos_ids(tokenizer, chat: bool) -> list[int] | int:
    """A chat model's turn ends at <|im_end|> (and a document at end-of-text); a base model's at end-of-text."""
    return tokenizer.stop_ids() if chat else tokenizer.eos_id


def hf_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict under HF names (identical by construction); a tied lm_head is stored once, as HF does."""
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return state


@functools.lru_cache(maxsize=4)
def _converted_backend(model_bytes: bytes) -> str:
    """tokenizer.json text of a SentencePiece model via transformers' own converter, set to SentencePiece's exact
    behaviour. Cached: converting a 64k-piece BPE model takes seconds (it rebuilds the merges)."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import LlamaTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model_bytes)
        backend = LlamaTokenizer.from_pretrained(tmp, legacy=False).backend_tokenizer
    # our model has add_dummy_prefix off (tokenizer.prepare_model): no "▁" in front, none stripped on decode
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")   # no BOS: we train without
    return backend.to_str()


def export_tokenizer(tokenizer, out_dir: Path, chat: bool, context: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, tokenizer.model) that AutoTokenizer loads
    and that give our ids."""
    from tokenizers import Tokenizer as BackendTokenizer
    from transformers import PreTrainedTokenizerFast
    backend = BackendTokenizer.from_str(_converted_backend(tokenizer.model_bytes))
    pieces = {name: tokenizer.id_to_piece(i) for name, i in tokenizer.special.items()}
    eos = pieces["im_end"] if chat else pieces["eot"]
    extra = [p for p in dict.fromkeys(pieces.values()) if p not in (eos, pieces["pad"])]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=pieces["pad"], unk_token=tokenizer.id_to_piece(0),
        bos_token=tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        additional_special_tokens=extra, chat_template=tokenizer.meta_dict()["chat_template"],
        clean_up_tokenization_spaces=False, model_max_length=context)
    hf.save_pretrained(out_dir)
    # tokenizer_config.json readable by transformers 4.x too: a class name both know, the list-valued field name
    # 4.x expects, and the chat template inline (newer versions also read chat_template.jinja)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("extra_special_tokens", None)
    config.pop("backend", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=extra,
                  chat_template=tokenizer.meta_dict()["chat_template"], add_bos_token=False, add_eos_token=False)
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.model").write_bytes(tokenizer.model_bytes)


def generation_config(tokenizer, chat: bool) -> dict:
    """The sampling defaults chat.py and serve.py use, so `model.generate(**inputs)` behaves alike."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids(tokenizer, chat),
            "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
            "repetition_penalty": 1.1}


def export(ckpt_dir, out_dir, lora_dir=None, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the HF folder for a checkpoint (LoRA merged in if given); -> out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    model, tokenizer, meta = load_model(ckpt_dir, lora_dir=lora_dir)
    chat = bool(meta.get("chat", False))
    torch_dtype = DTYPES[dtype]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        config = hf_config(model.config, tokenizer, chat, torch_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf_state_dict(model, torch_dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(tokenizer, chat), indent=2) + "\n")
        export_tokenizer(tokenizer, tmp, chat, context=model.config.max_seq_len)
        source = {"checkpoint": str(Path(ckpt_dir).resolve()), "lora": str(lora_dir) if lora_dir else None,
                  "meta": {k: v for k, v in meta.items() if k != "files"}}
        (tmp / "export_source.json").write_text(json.dumps(source, ensure_ascii=False, indent=2) + "\n")
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: Path, out_dir: Path) -> None:
    """Give the temp folder (mkdtemp: 0700) and its files the modes a plain mkdir/open would, then rename it
    into place (replacing an older out_dir)."""
    mask = current_umask()
    for path in tmp.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    tmp.chmod(0o777 & ~mask)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


def export_adapter(lora_dir, base_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """A peft adapter folder for the exported base: the adapter weights as they are (peft's key names already),
    adapter_config.json with task_type CAUSAL_LM and base_model_name_or_path = base_dir's absolute path."""
    from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    out_dir, lora_dir = Path(out_dir), Path(lora_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    config = json.loads((lora_dir / ADAPTER_CONFIG).read_text())
    config.update(task_type="CAUSAL_LM", base_model_name_or_path=str(Path(base_dir).resolve()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        shutil.copyfile(lora_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- GGUF (llama.cpp, Ollama)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# our (HF Llama) parameter names -> llama.cpp's GGUF tensor names (gguf.constants.TENSOR_NAMES for LLM_ARCH_LLAMA)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm":
              "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "block_sparse_moe.gate": "ffn_gate_inp"}
MOE_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate_half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """Our fp32 weights under llama.cpp's names; experts stacked [n_expert, out, in]."""
    cfg = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state.pop("model.embed_tokens.weight"),
           "output_norm.weight": state.pop("model.norm.weight")}
    lm_head = state.pop("lm_head.weight")
    if not cfg.tie_embeddings:
        out["output.weight"] = lm_head
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in GGUF_NAMES.items():
            w = state.pop(prefix + ours + ".weight", None)
            if w is None:
                continue
            if ours == "self_attn.q_proj":
                w = rope_permute(w, cfg.n_heads)
            elif ours == "self_attn.k_proj":
                w = rope_permute(w, cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
        for ours, theirs in MOE_EXPERT_NAMES.items():
            experts = [state.pop(f"{prefix}block_sparse_moe.experts.{j}.{ours}.weight") for j in range(cfg.n_experts)]
            if experts:
                out[f"blk.{i}.{theirs}.weight"] = torch.stack(experts)
    left = [k for k in state if not k.endswith("rope_cos") and not k.endswith("rope_sin")]
    if left:
        raise ValueError(f"no GGUF name for {left[:5]}")
    return out


def gguf_vocab(tokenizer):
    """(pieces, scores, llama.cpp token types) of our SentencePiece model, as llama.cpp's SPM tokenizer reads them."""
    import gguf
    sp = tokenizer.sp
    pieces, scores, types = [], [], []
    for i in range(tokenizer.vocab_size):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                     else gguf.TokenType.NORMAL)
    return pieces, scores, types


def ollama_modelfile(tokenizer, chat: bool, context: int, gguf_name: str = "model.gguf") -> str:
    """An Ollama Modelfile: our chat template in Go template syntax (the same text as CHAT_TEMPLATE_JINJA), the
    stop tokens, the sampling defaults of chat.py/serve.py and the context."""
    stops = [tokenizer.id_to_piece(i) for i in eos_ids(tokenizer, chat)] if chat else \
        [tokenizer.id_to_piece(tokenizer.eos_id)]
    gen = generation_config(tokenizer, chat)
    lines = [f"FROM ./{gguf_name}"]
    if chat:
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{- end }}<|im_start|>assistant\n"""')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {gen['temperature']}", f"PARAMETER top_p {gen['top_p']}",
              f"PARAMETER repeat_penalty {gen['repetition_penalty']}", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n"


def write_gguf(model, tokenizer, chat: bool, path: Path, gguf_type: str = "f32", name: str = "model") -> None:
    import gguf
    import numpy as np
    from tokenizer import CHAT_TEMPLATE_JINJA
    cfg = model.config
    if cfg.n_experts:   # the same limits as the Mixtral export: llama.cpp's llama MoE is Mixtral's routing
        hf_config(cfg, tokenizer, chat, torch.float32)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_types[gguf_type])
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)
    pieces, scores, types = gguf_vocab(tokenizer)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    eos = tokenizer.special["im_end"] if chat else tokenizer.eos_id
    w.add_eos_token_id(eos)
    w.add_eot_token_id(eos)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_unk_token_id(next((i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_unknown(i)), 0))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)   # our model has no dummy prefix: without this llama.cpp prepends "▁"
    w.add_remove_extra_whitespaces(False)
    w.add_chat_template(CHAT_TEMPLATE_JINJA)
    for tensor_name, t in gguf_tensors(model).items():
        data = t.numpy().astype(np.float32)
        qtype = qtypes[gguf_type]
        if data.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32         # norms: f32 in every file type
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16         # q8_0 blocks are 32 wide
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tensor_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(tensor_name, data.astype(np.float16))
        else:
            w.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(ckpt_dir, out_dir, lora_dir=None, gguf_type: str = "f32", overwrite: bool = False) -> Path:
    """out_dir/model.gguf + out_dir/Modelfile for a checkpoint (LoRA merged in if given); -> out_dir."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    model, tokenizer, meta = load_model(ckpt_dir, lora_dir=lora_dir)
    chat = bool(meta.get("chat", False))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        write_gguf(model, tokenizer, chat, tmp / "model.gguf", gguf_type, name=out_dir.name)
        (tmp / "Modelfile").write_text(ollama_modelfile(tokenizer, chat, model.config.max_seq_len), encoding="utf-8")
        source = {"checkpoint": str(Path(ckpt_dir).resolve()), "lora": str(lora_dir) if lora_dir else None,
                  "gguf_type": gguf_type, "meta": {k: v for k, v in meta.items() if k != "files"}}
        (tmp / "export_source.json").write_text(json.dumps(source, ensure_ascii=False, indent=2) + "\n")
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face transformers folder "
                                            "(LlamaForCausalLM, or MixtralForCausalLM for MoE) with its tokenizer.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (model.safetensors, config.json, tokenizer)")
    p.add_argument("out_dir", type=Path, help="the folder to write (written beside and renamed into place)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA adapter directory to merge into the weights")
    p.add_argument("--adapter-out", type=Path, default=None,
                   help="with --lora: do not merge; export the base to out_dir and the adapter (peft, CAUSAL_LM, "
                        "based on out_dir) to this folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    p.add_argument("--gguf", action="store_true",
                   help="write out_dir/model.gguf (llama.cpp) + out_dir/Modelfile (Ollama) instead of an HF folder")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f32", help="GGUF weight type (with --gguf)")
    args = p.parse_args(argv)
    if args.gguf:
        if args.adapter_out:
            p.error("--adapter-out is for the HF export; --gguf merges --lora into the weights")
        try:
            out = export_gguf(args.checkpoint, args.out_dir, lora_dir=args.lora, gguf_type=args.gguf_type,
                              overwrite=args.overwrite)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"export.py: {e}", file=sys.stderr)
            return 1
        print(f"exported {args.checkpoint} -> {out / 'model.gguf'} ({args.gguf_type}) + {out / 'Modelfile'}")
        return 0
    if args.adapter_out and not args.lora:
        p.error("--adapter-out needs --lora (the adapter to export)")
    try:
        merged = None if args.adapter_out else args.lora
        out = export(args.checkpoint, args.out_dir, lora_dir=merged, dtype=args.dtype, overwrite=args.overwrite)
        if args.adapter_out:
            print(f"adapter {args.lora} -> {export_adapter(args.lora, out, args.adapter_out, args.overwrite)}")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
