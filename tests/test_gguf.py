"""export.py --gguf checked in llama.cpp itself (llama-cpp-python, built by `bash script/setup.sh --with-llama-cpp`):
token ids on real Chinese text and on the rendered chat template equal ours, logits match in f32 (dense and MoE),
greedy tokens equal ours, every --gguf-type loads, and the Ollama Modelfile carries the template and stop tokens."""
import json

import numpy as np
import pytest
import torch

from test_chat import make_checkpoint, one_torch_thread  # noqa: F401 (autouse fixture)
from test_export import real_chinese_texts

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: run `bash script/setup.sh --with-llama-cpp` "
                        "(script/test.sh does)")
import gguf  # noqa: E402

from export import export_gguf, main as export_main  # noqa: E402
from inference import load_model  # noqa: E402

F32 = 0   # GGML_TYPE_F32: llama.cpp's KV cache is f16 unless told otherwise


def llama(path, n_ctx=512):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False, type_k=F32,
                           type_v=F32)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def llama_greedy(llm, ids, n) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    ckpt = make_checkpoint(tmp / "ckpt", chat=True, seed=8, tie_embeddings=False, max_seq_len=512)
    out = export_gguf(ckpt, tmp / "gguf")
    model, tok, _ = load_model(ckpt)
    return ckpt, out, model, tok, llama(out / "model.gguf")


def test_llama_cpp_tokenizes_real_text_exactly_as_we_do(dense):
    _, out, _, tok, llm = dense
    texts = real_chinese_texts()
    mismatched = [t[:40] for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts tokenize differently: {mismatched[:3]}"
    for t in texts[:20]:
        assert llm.detokenize(tok.encode(t)).decode() == t
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "false"    # as llama.cpp itself read the file
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"


def test_llama_cpp_reads_the_chat_template_as_our_ids(dense):
    _, _, _, tok, llm = dense
    conversations = [
        [{"role": "user", "content": "感冒发烧怎么办？"}],
        [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "高血压要注意什么？"},
         {"role": "assistant", "content": "<think>想一想</think><answer>少盐。</answer>"},
         {"role": "user", "content": "还有呢？ <|im_end|> 是文字"}]]
    for messages in conversations:
        ids = tok.render_chat(messages, add_generation_prompt=True).ids
        text = tok.render_text(messages, add_generation_prompt=True)
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        if "<|im_end|> 是文字" in text:   # our template keeps a user's literal special as text; llama.cpp cannot
            cut = len(tok.render_chat(messages[:3]).ids)   # know, so compare up to that turn
            assert got[:cut] == ids[:cut]
        else:
            assert got == ids
    assert llm.metadata["tokenizer.chat_template"] == tok.meta_dict()["chat_template"]


def test_f32_gguf_logits_and_greedy_tokens_equal_ours(dense):
    _, _, model, tok, llm = dense
    ids = tok.render_chat([{"role": "user", "content": "孩子发烧39度怎么办？"}], add_generation_prompt=True).ids
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llm, ids) - ours).max() < 1e-3
    expected = list(model.generate(ids, max_new_tokens=24, temperature=0))
    assert llama_greedy(llm, ids, 24) == expected and len(expected) == 24


def test_moe_checkpoint_runs_in_llama_cpp_with_our_logits(tmp_path):
    ckpt = project_checkpoint(tmp_path / "ckpt", chat=False, preset="moe", dim=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, ffn_dim=32, n_experts=4, n_experts_per_tok=2, max_seq_len=128)
    out = export_gguf(ckpt, tmp_path / "gguf")
    model, tok, _ = load_model(ckpt)
    names = {t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight",
            "blk.0.ffn_gate_inp.weight"} <= names
    ids = tok.encode(real_chinese_texts()[1])[:100]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama(out / "model.gguf", n_ctx=128)
    assert np.abs(llama_logits(llm, ids) - ours).max() < 1e-3
    assert "PARAMETER stop" in (out / "Modelfile").read_text() and "TEMPLATE" in (out / "Modelfile").read_text()


LLAMA_FTYPES = {"f16": 1, "bf16": 32, "q8_0": 7}   # llama_ftype: LLAMA_FTYPE_MOSTLY_F16, _BF16, _Q8_0


def project_checkpoint(path, chat=True, preset="tiny", **overrides):
    """A checkpoint with a tokenizer the project trains itself (2,000 pieces: quick to export and read back),
    matrices scaled up as test_chat.make_checkpoint does."""
    from checkpoint import save_checkpoint
    from data_process.train_tokenizer import train_sentencepiece
    from model import Transformer, make_config
    from tokenizer import Tokenizer
    tok = Tokenizer(train_sentencepiece(real_chinese_texts(), 2000))
    torch.manual_seed(3)
    model = Transformer(make_config(preset, tok.vocab_size, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return save_checkpoint(path, model, tok, {"step": 0, "kind": "sft" if chat else "base", "chat": chat})


@pytest.fixture(scope="module")
def project_vocab(tmp_path_factory):
    """A chat checkpoint with the project's own tokenizer and its f32 GGUF."""
    tmp = tmp_path_factory.mktemp("gguf-vocab")
    ckpt = project_checkpoint(tmp / "ckpt", tie_embeddings=False, max_seq_len=512)
    model, tok, _ = load_model(ckpt)
    return ckpt, export_gguf(ckpt, tmp / "gguf"), model, tok


def test_a_tokenizer_trained_by_the_project_tokenizes_the_same_in_llama_cpp(project_vocab):
    _, out, model, tok = project_vocab
    llm = llama(out / "model.gguf")
    texts = real_chinese_texts() + ["剂量 12.5 mg，每日 3 次", "    缩进的代码\n\tdef f(x):  return x"]
    assert [t[:30] for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)] == []
    ids = tok.render_chat([{"role": "user", "content": "血压 140/90 算高吗？"}], add_generation_prompt=True).ids
    assert llama_greedy(llm, ids, 16) == list(model.generate(ids, max_new_tokens=16, temperature=0))


@pytest.mark.parametrize("gguf_type,tensor_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_every_gguf_type_equals_llama_cpp_own_quantizer_and_runs(project_vocab, tmp_path, monkeypatch, gguf_type,
                                                                   tensor_type):
    """Each type's tensors are byte for byte what llama.cpp's own quantizer (llama_model_quantize) makes of our
    f32 GGUF, and the file runs in llama.cpp close to our fp32 logits."""
    import ctypes
    ckpt, f32_dir, model, tok = project_vocab
    assert export_main([str(ckpt), str(tmp_path / "g"), "--gguf", "--gguf-type", gguf_type]) == 0
    ours_file = tmp_path / "g" / "model.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[gguf_type]
    assert llama_cpp.llama_model_quantize(str(f32_dir / "model.gguf").encode(), str(tmp_path / "ref.gguf").encode(),
                                          ctypes.byref(params)) == 0
    mine = {t.name: t for t in gguf.GGUFReader(str(ours_file)).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ref.gguf")).tensors}
    assert mine.keys() == ref.keys()
    for name, t in mine.items():
        assert t.tensor_type == ref[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(ref[name].data)), name
    assert mine["blk.0.attn_q.weight"].tensor_type.name == tensor_type
    assert mine["output_norm.weight"].tensor_type.name == "F32"
    if gguf_type == "q8_0":
        # llama.cpp's CPU "extra buffer types" (Q8_0 repacking / AMX) segfault on this machine's CPU, whether the
        # file is ours or llama.cpp's own (identical, above); llama-cli's --no-repack is use_extra_bufts=False
        default = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra_buffers():
            p = default()
            p.use_extra_bufts = False
            return p
        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_extra_buffers)
    ids = tok.encode(real_chinese_texts()[5])[:64]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = llama_logits(llama(ours_file), ids)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.8


def test_ollama_modelfile_has_our_template_stops_and_context(dense):
    _, out, _, tok, _ = dense
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    # the Go template renders a conversation as our template does: one turn per message, no separator
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{- end }}<|im_start|>assistant\n"""') in text
    stops = [line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == [tok.id_to_piece(i) for i in tok.stop_ids()]
    assert "PARAMETER num_ctx 512" in text
    assert json.loads((out / "export_source.json").read_text())["gguf_type"] == "f32"
