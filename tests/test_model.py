"""model.py: causality, KV-cache equivalence, MoE routing, loss definition, sampling, save/load, deep stability."""
import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

import bf16_gemv
from model import PRESETS, ModelConfig, Transformer, lm_loss, make_config, sample_next

V = 300


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: a second OpenMP thread only adds barrier waits, and on the shared 2-core machine it makes
    # these tests ~5x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(make_config("tiny", V, **overrides)).eval()


DENSE_GQA = dict(n_heads=4, n_kv_heads=2)
MOE_GQA = dict(n_heads=4, n_kv_heads=1, n_experts=4, n_experts_per_tok=2, n_shared_experts=1)
MOE_TOP1 = dict(n_experts=4, n_experts_per_tok=1)


def test_presets_take_vocab_from_tokenizer_and_reject_unknown_names():
    assert set(PRESETS) == {"tiny", "26m", "100m", "deep", "moe"}
    for name in PRESETS:
        cfg = make_config(name, 8000)
        assert cfg.vocab_size == 8000 and cfg.n_heads % cfg.n_kv_heads == 0
    assert (make_config("26m", 8).dim, make_config("26m", 8).n_layers) == (512, 8)
    assert (make_config("deep", 8).dim, make_config("deep", 8).n_layers) == (512, 24)
    assert make_config("tiny", 8, dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="unknown model preset"):
        make_config("huge", 8000)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**PRESETS["tiny"], "vocab_size": 8, "n_embd": 3})
    with pytest.raises(ValueError, match="n_kv_heads"):
        make_config("tiny", 8, n_kv_heads=3)


@pytest.mark.parametrize("overrides", [DENSE_GQA, MOE_GQA], ids=["dense", "moe"])
def test_changing_a_future_token_never_changes_earlier_logits(overrides):
    model = tiny(**overrides)
    x = torch.randint(0, V, (2, 40))
    base = model(x).logits
    for t in (0, 17, 39):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        changed = model(y).logits
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(changed[:, t], base[:, t])


@pytest.mark.parametrize("overrides", [DENSE_GQA, MOE_GQA], ids=["dense", "moe"])
def test_kv_cache_logits_match_full_recomputation(overrides):
    model = tiny(**overrides)
    x = torch.randint(0, V, (2, 48))
    full = model(x).logits
    with torch.inference_mode():
        # prefill 20, then a chunk of 8 after a prefix (needs the offset causal mask), then one token at a time
        cache = model.new_cache(2, 48)
        parts = [model.forward_with_cache(x[:, :20], cache, 0), model.forward_with_cache(x[:, 20:28], cache, 20)]
        parts += [model.forward_with_cache(x[:, t:t + 1], cache, t) for t in range(28, 48)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, DENSE_GQA, MOE_GQA], ids=["dense", "gqa", "moe"])
def test_batched_decode_of_different_length_sequences_matches_each_alone(overrides):
    """decode_step: every row at its own position in its own slot equals that sequence run alone; a slot
    freed and refilled by `move`, and a cache that grows between steps, keep it so."""
    model = tiny(**overrides)
    prompts = [torch.randint(0, V, (n,)) for n in (5, 17, 9)]
    with torch.inference_mode():
        slots = model.new_slot_cache(4)
        slots.reserve(30)
        alone = [model.new_cache(1, 64) for _ in prompts]
        for i, (prompt, cache) in enumerate(zip(prompts, alone)):
            torch.testing.assert_close(model.forward_with_cache(prompt[None], slots.slot(i), 0),
                                       model.forward_with_cache(prompt[None], cache, 0), rtol=0, atol=0)
        rows = [0, 1, 2]
        pos = [len(p) for p in prompts]

        def step(tokens):
            got = model.decode_step(tokens, [pos[r] for r in rows], slots)
            for b, r in enumerate(rows):
                want = model.forward_with_cache(torch.tensor([[tokens[b]]]), alone[r], pos[r])[0, -1]
                torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
                pos[r] += 1

        for _ in range(5):
            step(torch.randint(0, V, (len(rows),)).tolist())
        slots.move(2, 0, pos[2])   # sequence 0 finished: sequence 2 moves into its slot
        rows = [2, 1]
        step([7, 8])
        slots.reserve(60)          # grows, keeping what is cached
        step([9, 10])
        with pytest.raises(ValueError, match="overflow"):
            slots.reserve(model.config.max_seq_len + 1)


@pytest.mark.parametrize("overrides", [DENSE_GQA, MOE_GQA], ids=["dense", "moe"])
def test_greedy_generation_with_cache_equals_greedy_full_recomputation(overrides):
    model = tiny(**overrides)
    prompt = torch.randint(0, V, (7,)).tolist()
    got = list(model.generate(prompt, max_new_tokens=30, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]


def greedy_by_decode_step(model, prompts, n_new):
    """Greedy tokens of each prompt through the server's path: a prefill into its SlotCache slot, then
    decode_step for all rows together (the lean decode path for dense layers)."""
    slots = model.new_slot_cache(len(prompts))
    slots.reserve(max(map(len, prompts)) + n_new)
    out = [[int(model.forward_with_cache(torch.tensor([p]), slots.slot(i), 0)[0, -1].argmax())]
           for i, p in enumerate(prompts)]
    for step in range(1, n_new):
        logits = model.decode_step([o[-1] for o in out], [len(p) + step - 1 for p in prompts], slots)
        for o, row in zip(out, logits):
            o.append(int(row.argmax()))
    return out


def wandering(**overrides) -> Transformer:
    """tiny, weights scaled up (as bench_decode.py) so that greedy decoding does not settle on one token."""
    model = tiny(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


@pytest.mark.parametrize("overrides", [{}, DENSE_GQA, MOE_GQA], ids=["dense", "gqa", "moe"])
def test_decode_step_greedy_tokens_equal_generate_in_fp32_alone_and_batched(overrides):
    """The lean decode path (stacked projections, weight-left matmuls, 4-op RMSNorm, rotary on q and k at
    once) against the module path model.generate runs: the same greedy tokens, batch 1 and 3 rows."""
    model = wandering(**overrides)
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 13, 9)]
    with torch.inference_mode():
        want = [list(model.generate(p, max_new_tokens=24, temperature=0)) for p in prompts]
        assert len({tuple(w) for w in want}) == 3 and all(len(set(w)) > 4 for w in want)   # they do wander
        assert greedy_by_decode_step(model, prompts[:1], 24) == want[:1]
        assert greedy_by_decode_step(model, prompts, 24) == want


@pytest.mark.parametrize("overrides", [DENSE_GQA, MOE_GQA], ids=["dense", "moe"])
@pytest.mark.parametrize("n_rows", [1, 3])
def test_bf16_decode_step_logits_match_each_sequence_alone(overrides, n_rows):
    """bf16 weights: decode_step (batch 1 through bf16_gemv where the CPU runs it, else oneDNN; attention in fp32)
    against the module path (forward_with_cache of each sequence alone). Both round differently, so each is held
    against the exact result (the same bf16 weights and prompts in fp32): the lean path within bf16 noise of it
    (~5 bf16 steps at the largest logit) and no further from it than twice the module path's own error."""
    model = wandering(**overrides).to(torch.bfloat16)
    exact = copy.deepcopy(model).float()
    prompts = [torch.randint(0, V, (n,)) for n in (6, 11, 3)[:n_rows]]
    with torch.inference_mode():
        slots = model.new_slot_cache(n_rows)
        slots.reserve(32)
        alone = [model.new_cache(1, 32) for _ in prompts]
        alone_exact = [exact.new_cache(1, 32) for _ in prompts]
        for i, p in enumerate(prompts):
            model.forward_with_cache(p[None], slots.slot(i), 0)
            model.forward_with_cache(p[None], alone[i], 0)
            exact.forward_with_cache(p[None], alone_exact[i], 0)
        for step in range(4):
            tokens, pos = [10 * step + b for b in range(n_rows)], [len(p) + step for p in prompts]
            got = model.decode_step(tokens, pos, slots)
            assert got.dtype == torch.bfloat16 and got.shape == (n_rows, V)
            for b in range(n_rows):
                ids = torch.tensor([[tokens[b]]])
                want = model.forward_with_cache(ids, alone[b], pos[b])[0, -1].float()
                truth = exact.forward_with_cache(ids, alone_exact[b], pos[b])[0, -1]
                torch.testing.assert_close(got[b].float(), truth, rtol=0, atol=0.04 * float(truth.abs().max()))
                assert (got[b].float() - truth).abs().max() <= 2 * (want - truth).abs().max() + 1e-2


def test_decode_step_follows_weights_changed_in_place_replaced_or_cast():
    """The stacked/packed decode weights are rebuilt when a source weight changes (an optimizer step, as GRPO
    between rollouts), is loaded over, or the model is cast: decode_step keeps equal to forward_with_cache."""
    model = wandering(**DENSE_GQA)
    other = wandering(**DENSE_GQA)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randint(0, V, (7,))

    def check(tol, bf16=False):   # bf16: the two paths round differently; within bf16 noise (as above)
        with torch.inference_mode():
            slots, alone = model.new_slot_cache(1), model.new_cache(1, 16)
            slots.reserve(16)
            model.forward_with_cache(prompt[None], slots.slot(0), 0)
            model.forward_with_cache(prompt[None], alone, 0)
            got = model.decode_step([3], [len(prompt)], slots)[0]
            want = model.forward_with_cache(torch.tensor([[3]]), alone, len(prompt))[0, -1]
            atol = 0.04 * float(want.float().abs().max()) if bf16 else tol
            torch.testing.assert_close(got.float(), want.float(), rtol=0 if bf16 else tol, atol=atol)
            return got.float()

    first = check(1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randint(0, V, (1, 8)), targets=torch.randint(0, V, (1, 8))).loss.backward()
    opt.step()
    stepped = check(1e-5)
    assert not torch.allclose(first, stepped)
    model.load_state_dict(other.state_dict())
    check(1e-5)
    model.to(torch.bfloat16)
    check(0, bf16=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_linears_equal_f_linear(dtype):
    """decode_linear (mv / weight-left) and packed_linear against F.linear, batch 1 and 5."""
    from model import can_pack, decode_linear, packed_linear
    w = torch.randn(96, 64).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    with torch.inference_mode():
        for rows in (1, 5):
            x = torch.randn(rows, 64).to(dtype)
            want = torch.nn.functional.linear(x, w)
            torch.testing.assert_close(decode_linear(x, w), want, **tol)
            if can_pack(w):
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                torch.testing.assert_close(packed_linear(x, packed), want, **tol)
    assert can_pack(w) == (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.skipif(not bf16_gemv.available(), reason="no avx512_bf16 CPU or no C compiler")
@pytest.mark.parametrize("shape", [(96, 64), (14, 40), (2816, 512), (6, 1408)], ids=str)
def test_bf16_gemv_modes_equal_the_fp64_product(shape):
    """The hand-written kernel against the same product in fp64, odd row counts (not whole 8-row blocks) and
    column counts (not whole 32-column chunks) included: the plain product (fp32 out, + a residual), in bf16 out
    (within one bf16 step of the exact value, and never further than oneDNN's F.linear), with an RMSNorm folded in,
    SwiGLU, and rotary embeddings on the first rows. The kernel reads x rounded to bf16, so the fp64 reference is given bf16 inputs where it can be;
    where the rounding happens inside (after the norm), the bound allows one bf16 rounding of each input."""
    n_out, n_in = shape
    g = torch.Generator().manual_seed(n_out)
    w = torch.randn(n_out, n_in, generator=g).bfloat16()
    x = torch.randn(1, n_in, generator=g) * 3
    xb = x.bfloat16().double()
    exact = xb @ w.double().t()
    slack = 1e-5 * (xb.abs() @ w.double().abs().t())   # fp32 accumulation
    got = bf16_gemv.linear(x, bf16_gemv.Packed(w))
    assert got.dtype == torch.float32 and got.shape == (1, n_out)
    assert ((got.double() - exact).abs() <= slack).all()
    residual = torch.randn(1, n_out, generator=g)
    added = bf16_gemv.linear(x, bf16_gemv.Packed(w), residual=residual)
    assert ((added.double() - residual.double() - exact).abs() <= slack + 1e-6 * residual.abs()).all()
    rounded = bf16_gemv.linear(x, bf16_gemv.Packed(w, bf16_out=True))
    assert rounded.dtype == torch.bfloat16
    assert ((rounded.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + slack).all()
    onednn = torch.nn.functional.linear(x.bfloat16(), w)
    assert (rounded.double() - exact).abs().max() <= (onednn.double() - exact).abs().max() + 1e-12

    norm = torch.rand(n_in, generator=g).bfloat16() + 0.5
    folded = (w.float() * norm.float()).bfloat16().double()
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    input_rounding = 2.0 ** -8 * (xn.abs() @ folded.abs().t())
    normed = bf16_gemv.linear(x, bf16_gemv.Packed(w, norm, 1e-5))
    assert ((normed.double() - xn @ folded.t()).abs() <= input_rounding + slack).all()
    if n_out % 2 == 0:
        gate, up = (xb @ w.double().t()).chunk(2, dim=-1)
        swiglu = bf16_gemv.linear(x, bf16_gemv.Packed(w, swiglu=True))
        assert swiglu.shape == (1, n_out // 2)
        want = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(swiglu.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if n_out % 16 == 0 and n_out >= 48:   # rotary on the first rows (heads of 16), HF's rotate_half convention
        from model import apply_rope, rope_cos_sin
        cos, sin = rope_cos_sin(16, 64, 10000.0)
        turned = bf16_gemv.linear(x, bf16_gemv.Packed(w, rope_rows=32, head_dim=16), cos=cos[37], sin=sin[37])
        plain = exact[0]
        want = torch.cat((apply_rope(plain[:32].view(1, 2, 1, 16), cos[37:38].double(), sin[37:38].double()).flatten(),
                          plain[32:]))
        assert ((turned[0].double() - want).abs() <= 2 * slack[0].max()).all()
    with pytest.raises(ValueError, match="fp32"):
        bf16_gemv.linear(x.bfloat16(), bf16_gemv.Packed(w))


@pytest.mark.skipif(not bf16_gemv.available(), reason="no avx512_bf16 CPU or no C compiler")
@pytest.mark.parametrize("heads", [(4, 2, 16), (3, 3, 20)], ids=["gqa", "mha-odd-dim"])
def test_bf16_gemv_attend_writes_the_cache_and_equals_sdpa(heads):
    """attend(): the new key and value land at `position` of slot 0 (nothing else in the cache moves), and the
    output equals SDPA over keys 0..position (GQA, a head_dim not a multiple of 16 included)."""
    H, Hkv, D = heads
    g = torch.Generator().manual_seed(D)
    k_cache, v_cache = torch.randn(2, Hkv, 40, D, generator=g), torch.randn(2, Hkv, 40, D, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(1, (H + 2 * Hkv) * D, generator=g)
    y = bf16_gemv.attend(qkv, k_cache, v_cache, H, 29)
    k_new, v_new = qkv[0, H * D:(H + Hkv) * D].view(Hkv, D), qkv[0, (H + Hkv) * D:].view(Hkv, D)
    assert torch.equal(k_cache[0, :, 29], k_new) and torch.equal(v_cache[0, :, 29], v_new)
    before_k[0, :, 29], before_v[0, :, 29] = k_new, v_new
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    want = torch.nn.functional.scaled_dot_product_attention(
        qkv[:, :H * D].view(1, H, 1, D), k_cache[:1, :, :30], v_cache[:1, :, :30], enable_gqa=H != Hkv)
    torch.testing.assert_close(y, want.reshape(1, H * D), rtol=1e-5, atol=1e-5)
    sharp = qkv.clone()   # scores hundreds apart: most softmax weights underflow (the kernel's own exp)
    sharp[:, :H * D] *= 40
    y = bf16_gemv.attend(sharp, k_cache, v_cache, H, 30)
    want = torch.nn.functional.scaled_dot_product_attention(
        sharp[:, :H * D].view(1, H, 1, D), k_cache[:1, :, :31], v_cache[:1, :, :31], enable_gqa=H != Hkv)
    torch.testing.assert_close(y, want.reshape(1, H * D), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position"):
        bf16_gemv.attend(qkv, k_cache, v_cache, H, 40)


@pytest.mark.skipif(not bf16_gemv.available(), reason="no avx512_bf16 CPU or no C compiler")
def test_bf16_decode_at_batch_1_runs_the_gemv_kernel_and_above_it_onednn():
    """Where the kernel runs, batch 1 uses it (the fast path must not fall away unnoticed); larger batches keep
    oneDNN's packed weights (faster there), and so does batch 1 over a cache not in fp32 (SlotCache's default on a
    CPU); all give the module path's logits within bf16 noise."""
    model = wandering(**DENSE_GQA).to(torch.bfloat16)
    assert model._decode_weights(1)[2] is bf16_gemv.linear
    assert model._decode_weights(2)[2] is not bf16_gemv.linear
    with torch.inference_mode():
        for rows, cache_dtype in ((1, None), (2, None), (1, torch.bfloat16)):   # a bf16 cache: oneDNN's path
            slots = model.new_slot_cache(rows, dtype=cache_dtype)
            assert slots.dtype == (cache_dtype or torch.float32)
            slots.reserve(16)
            for i in range(rows):
                model.forward_with_cache(torch.tensor([[1, 2, 3 + i]]), slots.slot(i), 0)
            lean = model.decode_step([4] * rows, [3] * rows, slots)
            module = model.decode_step([4] * rows, [3] * rows, slots, lean=False)
            torch.testing.assert_close(lean.float(), module.float(), rtol=0, atol=0.04 * float(module.abs().max()))


@pytest.mark.skipif(not bf16_gemv.available(), reason="no avx512_bf16 CPU or no C compiler")
def test_token_decoder_gives_decode_steps_logits_and_their_argmax():
    """The engine's batch-1 decoder (one compiled call from the token to the logits and their argmax) against
    decode_step on a second cache with the same prefill: the same logits to the bit, over steps and a cache that
    grows between them (it binds to the new layers); the argmax is numpy's. After the weights change in place,
    a new decoder reads the new weights (the old one is bound to the weights as they were)."""
    model = wandering(**DENSE_GQA).to(torch.bfloat16)
    prompt = torch.randint(0, V, (5,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours, ref = model.new_slot_cache(2), model.new_slot_cache(2)
        for cache in (ours, ref):
            cache.reserve(8)
            model.forward_with_cache(prompt[None], cache.slot(0), 0)
        decoder = model.token_decoder(ours)
        assert decoder is not None and model.token_decoder(model.new_slot_cache(1, dtype=torch.bfloat16)) is None
        token, tokens = 11, []
        for position in range(5, 40):
            if position == 8:   # past the first capacity: SlotCache.reserve replaces every layer
                ours.reserve(64)
                ref.reserve(64)
            logits, best = decoder(token, position)
            want = model.decode_step([token], [position], ref)[0].float()
            assert logits.dtype == torch.float32 and torch.equal(logits, want)
            assert best == int(logits.numpy().argmax())
            token = best
            tokens.append(token)
        assert len(set(tokens)) > 4   # it wanders: the steps are not one repeated token
        with pytest.raises(ValueError, match="overflow"):
            decoder(1, 64)
        with pytest.raises(IndexError, match="vocabulary"):
            decoder(V, 40)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        fresh = model.token_decoder(ours)
        logits = fresh(token, 40)[0].clone()
        assert torch.equal(logits, model.decode_step([token], [40], ref)[0].float())


@pytest.mark.skipif(not bf16_gemv.available(), reason="no avx512_bf16 CPU or no C compiler")
def test_token_decoder_argmax_takes_the_first_of_ties_and_of_nans_as_numpy():
    """The argmax inside the compiled step breaks ties to the first index and returns the first NaN, as numpy's
    argmax over the same logits does (the engine takes it as the greedy token without looking at the logits)."""
    model = wandering(**DENSE_GQA, tie_embeddings=False).to(torch.bfloat16)
    head = model.lm_head.weight
    with torch.inference_mode():
        cache = model.new_slot_cache(1)
        cache.reserve(8)
        model.forward_with_cache(torch.tensor([[1, 2, 3]]), cache.slot(0), 0)
        with torch.no_grad():
            head.copy_(head[4].expand_as(head))   # every logit the same: the first index
        logits, best = model.token_decoder(cache)(5, 3)
        assert best == 0 == int(logits.numpy().argmax()) and bool((logits == logits[0]).all())
        with torch.no_grad():
            head[200:300] *= 2   # a tie of 100 at the top (or at the bottom, with row 0 first at the top)
            head[37] = float("nan")
            head[250] = float("nan")
        logits, best = model.token_decoder(cache)(5, 3)
        assert best == 37 == int(logits.numpy().argmax())
        with torch.no_grad():
            head[37] = head[250] = head[0]
        logits, best = model.token_decoder(cache)(5, 3)
        assert best == int(logits.numpy().argmax()) in (0, 200)


def test_generation_stops_at_stop_id_without_yielding_it_and_at_max_seq_len():
    model = tiny(max_seq_len=32)
    prompt = [5, 6, 7]
    free = list(model.generate(prompt, max_new_tokens=100, temperature=0))
    assert len(free) == 32 - len(prompt)     # prompt + generated never exceeds max_seq_len
    stop = free[4]
    first = free.index(stop)
    assert list(model.generate(prompt, max_new_tokens=100, temperature=0, stop_ids=[stop])) == free[:first]
    assert list(model.generate(prompt, max_new_tokens=3, temperature=0)) == free[:3]
    with pytest.raises(ValueError, match="no room"):
        list(model.generate(list(range(32)), temperature=0))
    with pytest.raises(ValueError, match="non-empty"):
        list(model.generate([], temperature=0))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny()
    prompt = [1, 2, 3, 4]
    run = lambda seed, **kw: list(model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw))
    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = list(model.generate(prompt, 20, temperature=0))
    assert run(3, top_k=1) == greedy
    assert run(4, top_p=1e-6) == greedy


def test_sample_next_temperature_zero_top_p_and_ctrl_repetition_penalty():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    seen = torch.tensor([True, False, True, False])
    assert sample_next(logits, 0.0, 0, 1.0, 1.0, seen) == 0
    # CTRL: positive seen logit divided (2 -> 2/2.5=0.8 < 1.0), negative seen logit multiplied
    assert sample_next(logits, 0.0, 0, 1.0, 2.5, seen) == 1
    g = torch.Generator().manual_seed(0)
    # top-p 0.5: only token 0 (p~0.57) is kept
    assert {sample_next(logits, 1.0, 0, 0.5, 1.0, seen, g) for _ in range(50)} == {0}
    # top-k 2: tokens 0 and 1 only
    assert {sample_next(logits, 1.0, 2, 1.0, 1.0, seen, g) for _ in range(200)} == {0, 1}


def test_loss_weights_give_weighted_mean_and_ignore_index_contributes_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    weights = torch.rand(2, 5) * 3
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp_min(0), reduction="none")
    mask = (targets.flatten() != -100).float()
    w = weights.flatten() * mask
    torch.testing.assert_close(lm_loss(logits, targets, weights), (w * nll).sum() / w.sum())
    torch.testing.assert_close(lm_loss(logits, targets), (mask * nll).sum() / mask.sum())
    torch.testing.assert_close(lm_loss(logits, targets, torch.ones(2, 5)), lm_loss(logits, targets))
    torch.testing.assert_close(
        lm_loss(logits, targets), torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    # no counted target at all: 0, not NaN (an SFT batch of only prompts must not poison the run)
    assert lm_loss(logits, torch.full((2, 5), -100)).item() == 0.0
    assert lm_loss(logits, targets, torch.zeros(2, 5)).item() == 0.0
    with pytest.raises(ValueError, match="-100"):
        lm_loss(logits, torch.full((2, 5), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_value_and_gradient_equal_torch_cross_entropy(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 70, 50) * 3).to(dtype).requires_grad_()   # 210 rows: several blocks of 64
    targets = torch.randint(0, 50, (3, 70))
    targets[1, 2:5] = -100
    ours = lm_loss(logits, targets)
    g_ours, = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours[1, 2:5].abs().max() == 0


def test_model_forward_uses_lm_loss():
    # the model's forward uses exactly this definition
    model = tiny()
    x = torch.randint(0, V, (2, 9))
    w9 = torch.rand(2, 9)
    out = model(x, x, loss_weights=w9)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, x, w9))


@pytest.mark.parametrize("overrides", [MOE_TOP1, MOE_GQA], ids=["top1", "top2_shared"])
def test_moe_router_gets_a_real_gradient_from_the_lm_loss(overrides):
    model = tiny(**overrides).train()
    x = torch.randint(0, V, (4, 64))
    model(x, x).loss.backward()            # LM loss only, no aux loss
    moe = model.model.layers[0].block_sparse_moe
    router = moe.gate.weight.grad.norm() / moe.gate.weight.norm()
    expert = moe.experts[0].w1.weight.grad.norm() / moe.experts[0].w1.weight.norm()
    # MiniMind's top-1-renormalized router gets ~5e-7; ours is of the experts' own order
    assert router > 1e-3 * expert and router > 1e-4


def test_aux_loss_is_one_times_coef_when_balanced_and_training_on_it_balances_the_experts():
    model = tiny(n_experts=4, n_experts_per_tok=1, aux_loss_coef=1.0).train()
    moe = [layer.block_sparse_moe for layer in model.model.layers]
    with torch.no_grad():                 # skew every router hard toward expert 0
        for m in moe:
            m.gate.weight[0] += 0.3 * m.gate.weight.norm(dim=0) / m.gate.weight.norm(dim=0).mean()
            m.gate.weight[0] += torch.randn_like(m.gate.weight[0]) * 0.5
    x = torch.randint(0, V, (8, 64))

    def load_max_share():
        shares = []
        def hook(mod, inp, out):
            h = inp[0].reshape(-1, inp[0].shape[-1])
            top = mod.gate(h).argmax(-1)
            shares.append(torch.bincount(top, minlength=4).max().item() / top.numel())
        handles = [m.register_forward_hook(hook) for m in moe]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        return max(shares)

    before = load_max_share()
    opt = torch.optim.Adam([m.gate.weight for m in moe], lr=3e-2)
    for _ in range(30):
        opt.zero_grad()
        model(x).aux_loss.backward()
        opt.step()
    after = load_max_share()
    # 4 experts: a perfectly balanced router gives each 0.25 of the tokens
    assert before > 0.4 and after < 0.32 and after < before - 0.1, (before, after)
    assert model(x).aux_loss.item() < 1.2   # E * sum f_j P_j -> 1 at balance


def test_dense_aux_loss_is_zero_and_flops_follow_palm():
    model = tiny(tie_embeddings=False)
    out = model(torch.randint(0, V, (1, 8)))
    assert out.loss is None and out.aux_loss.item() == 0.0
    cfg = model.config
    n = model.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.dim   # lm_head multiplies, lookup doesn't
    assert model.flops_per_token(128) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 128
    tied = tiny()
    assert tied.num_params() == model.num_params() - cfg.vocab_size * cfg.dim
    moe = tiny(n_experts=4, n_experts_per_tok=1)
    assert moe.active_params() == tied.active_params() + cfg.n_layers * cfg.dim * 4   # + router only


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False), MOE_GQA], ids=["tied", "untied", "moe"])
def test_save_then_load_gives_identical_outputs(tmp_path, overrides, monkeypatch):
    model = tiny(**overrides)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == V
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)   # tied weights saved once
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("from_pretrained must not unpickle"))
    loaded = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, V, (2, 16))
    assert torch.equal(loaded(x).logits, model(x).logits)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.slow
def test_deep_preset_trains_a_few_steps_without_the_loss_exploding():
    torch.manual_seed(0)
    model = Transformer(make_config("deep", 512)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, 512, (2, 33))
    losses = []
    for _ in range(6):
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    assert abs(losses[0] - math.log(512)) < 0.3        # the init predicts ~uniform
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("overrides", [DENSE_GQA, MOE_GQA], ids=["dense", "moe"])
def test_bf16_autocast_training_step_matches_fp32_loss(overrides):
    model = tiny(**overrides).train()
    x = torch.randint(0, V, (2, 32))
    ref = model(x, x).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    (out.loss + out.aux_loss).backward()
    assert out.loss.dtype == torch.float32 and abs(out.loss.item() - ref) < 0.05
    grads = [p.grad for p in model.parameters() if p.grad is not None]   # an expert without tokens has none
    assert all(torch.isfinite(g).all() for g in grads)
    if not model.config.n_experts:
        assert len(grads) == len(list(model.parameters()))


def test_dropout_is_active_in_train_mode_only():
    model = tiny(dropout=0.2)
    x = torch.randint(0, V, (1, 16))
    assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_generate_with_bf16_weights_runs_and_streams():
    model = tiny().to(torch.bfloat16)
    out = list(model.generate([1, 2, 3], max_new_tokens=5, temperature=0.7, top_p=0.9,
                              generator=torch.Generator().manual_seed(0)))
    assert len(out) == 5 and all(0 <= t < V for t in out)
