"""GRPO (grpo.py, rewards.py): advantages and the clipped loss against a hand computation on fixed logits, every
reward component and their weighted sum, failing rewards (raise, NaN, an unreadable or unreachable judge) counted
and given zero advantage, batched rollouts equal to one-at-a-time generation with the same seeds, a tiny model
whose mean reward rises on a synthetic verifiable task while the same run with shuffled rewards does not, and
kill -9 + resume giving the same losses as an uninterrupted run."""
import functools
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import grpo
import rewards
from conftest import ROOT, SAMPLES
from rewards import RewardSpec


# ------------------------------------------------------------------------------------------------ helpers

@functools.cache
def small_tokenizer():
    """A tokenizer trained the way the pipeline trains one, on real medical text plus the synthetic task's
    prompts: 1,200 pieces, so a tiny model's rollouts and updates cost milliseconds on a CPU."""
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    lines = (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").splitlines()[:60]
    lines += [it["prompt"][0]["content"] for it in grpo.synthetic_choice_items(200, seed=9)]
    return Tokenizer(train_sentencepiece([line for line in lines if line.strip()], vocab_size=1200))


def letter_task(n=16, seed=1):
    """Synthetic "which option contains X" items whose right option is C. A tiny random model cannot learn
    prompt-dependent letters within this CPU budget (prompts that differ in one character look alike to it),
    so the test asks whether the reward alone moves the policy: it must, and a shuffled reward must not."""
    items = [it for it in grpo.synthetic_choice_items(40 * n, seed=seed, layouts=4) if it["answer"] == "C"]
    return items[:n]


def policy_checkpoint(path, items, seed=0, sft_steps=40):
    """A tiny random model taught the answer format only: a random letter and <|im_end|> after each prompt."""
    from checkpoint import save_checkpoint
    from model import Transformer, make_config
    tok = small_tokenizer()
    torch.manual_seed(seed)
    model = Transformer(make_config("tiny", tok.vocab_size, max_seq_len=64))
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(sft_steps):
        rows = [tok.render_chat(it["prompt"] + [{"role": "assistant", "content": "ABCD"[rng.integers(4)]}])
                for it in items]
        T = max(len(r.ids) for r in rows) - 1
        x = torch.full((len(rows), T), tok.pad_id)
        y = torch.full((len(rows), T), -100)
        for i, r in enumerate(rows):
            ids, w = torch.tensor(r.ids), torch.tensor(r.weights)
            x[i, :len(ids) - 1] = ids[:-1]
            y[i, :len(ids) - 1] = torch.where(w[1:] > 0, ids[1:], -100)
        sel = y != -100
        loss = torch.nn.functional.cross_entropy(model(x, select=sel).logits, y[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(path, model, tok, {"kind": "sft", "step": 0, "tokens_seen": 0, "chat": True})


def write_items(path, items):
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path


def write_config(path, top: dict, train: dict, reward: list[dict]):
    def value(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)
    lines = [f"{k} = {value(v)}" for k, v in top.items()]
    for r in reward:
        lines += ["[[reward]]"] + [f"{k} = {value(v)}" for k, v in r.items()]
    lines += ["[train]"] + [f"{k} = {value(v)}" for k, v in train.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FAST_TRAIN = {"batch_size": 8, "lr": 2e-3, "min_lr": 2e-3, "weight_decay": 0.0, "dtype": "fp32", "device": "cpu",
              "peak_flops": 1e12, "eval_interval": 0, "save_interval": 0, "progress": False, "seed": 3}


def grpo_config(tmp_path, name, items, init, **top):
    data = write_items(tmp_path / f"{name}.jsonl", items)
    return grpo.GRPOConfig(**{"name": name, "data": [str(data)], "init_from": str(init),
                              "out_dir": str(tmp_path / name), "group_size": 8, "max_new_tokens": 4,
                              "reward": [RewardSpec("choice")], "train": dict(FAST_TRAIN), **top})


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and on a busy machine a second one spins for minutes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ objective

def test_group_advantages_match_a_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 7.0, 1.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, False, True]])   # one failed reward
    adv, zero_var = grpo.group_advantages(r, valid, "group")
    std0 = math.sqrt(4 * 0.25 / 3)                                  # sample std of 1,0,0,1
    mean2, std2 = 1.0, math.sqrt(((2 - 1) ** 2 + 1 + 0) / 2)        # over 2, 0, 1 (the NaN-ed 7 left out)
    expected = [[0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4), 0.5 / (std0 + 1e-4)],
                [0.0] * 4,
                [(2 - mean2) / (std2 + 1e-4), (0 - mean2) / (std2 + 1e-4), 0.0, (1 - mean2) / (std2 + 1e-4)]]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert zero_var.tolist() == [False, True, False]
    mean_only, _ = grpo.group_advantages(r, valid, "mean")
    torch.testing.assert_close(mean_only, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]]))


def _hand_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, norm, max_new):
    """The GRPO/DAPO/Dr. GRPO objective written out token by token with math.*."""
    N, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(N)]
    clipped = kl_sum = 0.0
    for i in range(N):
        for t in range(T):
            ratio = math.exp(logp[i][t] - old[i][t])
            c = min(max(ratio, 1 - eps_low), 1 + eps_high)
            per[i][t] = -min(ratio * adv[i], c * adv[i])
            d = ref[i][t] - logp[i][t]
            kl = math.exp(d) - d - 1
            per[i][t] += beta * kl
            if mask[i][t]:
                kl_sum += kl
                clipped += (ratio < 1 - eps_low and adv[i] < 0) or (ratio > 1 + eps_high and adv[i] > 0)
    n = sum(map(sum, mask))
    if norm == "token":
        loss = sum(per[i][t] for i in range(N) for t in range(T) if mask[i][t]) / n
    elif norm == "sequence":
        loss = sum(sum(per[i][t] for t in range(T) if mask[i][t]) / max(1, sum(mask[i])) for i in range(N)) / N
    else:
        loss = sum(per[i][t] for i in range(N) for t in range(T) if mask[i][t]) / (N * max_new)
    return loss, clipped / n, kl_sum / n


@pytest.mark.parametrize("norm", ["token", "sequence", "fixed"])
def test_loss_matches_a_hand_computation_on_fixed_logits(norm):
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 4, 5
    logits, old_logits, ref_logits = (torch.randn(N, T, V, generator=g) * 2 for _ in range(3))
    tokens = torch.randint(0, V, (N, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)   # row 1: 2 tokens
    adv = torch.tensor([1.5, -0.7, 0.3])

    def lp(x):
        return torch.log_softmax(x, -1).gather(-1, tokens[..., None])[..., 0]
    logits.requires_grad_(True)
    loss, metrics = grpo.grpo_loss(lp(logits), lp(old_logits), adv, mask, ref_logps=lp(ref_logits), eps_low=0.2,
                                   eps_high=0.28, beta=0.05, loss_norm=norm, max_new_tokens=6)
    # the reference: log-softmax by hand in float64, then the objective token by token
    def hand_lp(x):
        x = x.detach().double().tolist()
        return [[x[i][t][tokens[i, t]] - math.log(sum(math.exp(v) for v in x[i][t])) for t in range(T)]
                for i in range(N)]
    ref_loss, clip_frac, kl = _hand_loss(hand_lp(logits), hand_lp(old_logits), hand_lp(ref_logits), adv.tolist(),
                                         mask.int().tolist(), 0.2, 0.28, 0.05, norm, 6)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(clip_frac) and 0 < clip_frac < 1
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    loss.backward()
    assert logits.grad[0, 3].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0   # masked tokens: no grad
    # on-policy (old = pi): ratio 1, nothing clipped, and the gradient is -A * grad log pi per token
    p = lp(logits.detach()).requires_grad_(True)
    on, m = grpo.grpo_loss(p, p.detach(), adv, mask, loss_norm="token")
    on.backward()
    torch.testing.assert_close(p.grad, -adv[:, None] * mask / mask.sum())
    assert m["clip_fraction"].item() == 0 and m["kl"].item() == 0


def test_token_log_probs_are_the_completion_tokens_under_the_model():
    from model import Transformer, make_config
    tok = small_tokenizer()
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size, max_seq_len=64)).eval()
    prompts = [tok.render_chat(it["prompt"], add_generation_prompt=True).ids for it in letter_task(2)]
    completions = [grpo.Completion([tok.encode("C")[0], tok.special["im_end"]], "C", False),
                   grpo.Completion([tok.encode("A")[0], 17, 18], "A..", True)]
    batch = grpo.collate_completions(prompts, completions, tok.pad_id)
    with torch.no_grad():
        logps, _ = grpo.token_logps(model, batch["input_ids"], batch["targets"])
        for i, (p, c) in enumerate(zip(prompts, completions)):
            seq = torch.tensor(p + c.tokens)
            lp = torch.log_softmax(model(seq[None, :-1]).logits[0].double(), -1)
            expected = [float(lp[len(p) - 1 + k, t]) for k, t in enumerate(c.tokens)]
            got = logps[i][batch["targets"][i] != grpo.IGNORE].tolist()
            assert got == pytest.approx(expected, abs=1e-4)
            assert (logps[i][batch["targets"][i] == grpo.IGNORE] == 0).all()


# ------------------------------------------------------------------------------------------------ rewards

def test_each_reward_component_and_their_weighted_sum():
    qa = {"id": "q", "answer": "42"}
    assert rewards.exact_reward("<think>6*7</think><answer> 42。</answer>", qa) == 1.0
    assert rewards.exact_reward("４２", qa) == 1.0                      # NFKC: full-width digits
    assert rewards.exact_reward("<answer>43</answer>", qa) == 0.0
    mc = {"id": "m", "answer": "C"}
    assert rewards.choice_reward("C", mc) == rewards.choice_reward("答案：Ｃ。", mc) == 1.0
    assert rewards.choice_reward("<answer>c</answer>", mc) == 1.0
    assert rewards.choice_reward("B，不是C", mc) == 0.0                  # the first letter counts
    assert rewards.choice_reward("Cat", mc) == 0.0                       # not a stand-alone letter
    assert rewards.format_reward("<think>想</think>\n<answer>C</answer>", mc) == 1.0
    assert rewards.format_reward("<answer>C</answer>", mc) == 0.5
    assert rewards.format_reward("<think>a<think>b</think><answer>C</answer>", mc) == 0.0
    assert rewards.format_reward("C", mc) == 0.0
    assert rewards.length_penalty(10, 20) == 0 and rewards.length_penalty(30, 20) == -0.5
    assert rewards.length_penalty(100, 20) == -1.0
    assert rewards.repetition_penalty("abcdef", 2) == 0.0
    assert rewards.repetition_penalty("abababab", 2) == pytest.approx(-(1 - 2 / 7))
    specs = [RewardSpec("choice", weight=1.0), RewardSpec("format", weight=0.5),
             RewardSpec("length", weight=0.1, target_tokens=4)]
    scores = rewards.score_batch(specs, ["<think>x</think><answer>C</answer>", "B"], [mc, mc], [12, 2])
    assert scores.total.tolist() == pytest.approx([1.0 + 0.5 - 0.1 * 1.0, 0.0])
    assert scores.components["format"].tolist() == [1.0, 0.0] and not scores.failed.any()


def test_a_reward_that_raises_or_is_nan_is_counted_and_gets_zero_advantage(caplog):
    items = [{"id": f"i{k}", "answer": a} for k, a in enumerate("CCCCXCCC")]   # "X" is no option letter
    completions = ["C", "B", "C", "A", "C", "C", "nan", "B"]
    specs = [RewardSpec("choice"), RewardSpec("length", weight=0.0)]
    nan_on = {"nan"}

    def length_or_nan(c, item, n):
        return float("nan") if c in nan_on else 0.0
    scorers = rewards.make_scorers(specs)
    scores = rewards.score_batch(specs, completions, items, [1] * 8, [scorers[0], length_or_nan])
    assert scores.failed.tolist() == [False, False, False, False, True, False, True, False]
    assert scores.failures == {"choice": 1, "length": 1} and "failed" in caplog.text
    adv, _ = grpo.group_advantages(torch.tensor(scores.total).float().view(2, 4),
                                   torch.from_numpy(~scores.failed).view(2, 4))
    assert adv.flatten()[[4, 6]].tolist() == [0.0, 0.0]
    # the rest of the second group is normalized among itself: C, B -> +, - (the failed ones left out)
    assert adv[1, 1] > 0 and adv[1, 3] < 0 and adv[1, 1] == pytest.approx(-adv[1, 3].item())


class _Judge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every chat completion with the reply in self.server.reply."""

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.prompts.append(body["messages"][-1]["content"])
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": self.server.reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.reply, server.prompts = "8", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_judge_reward_scores_and_bad_or_unreachable_judges_are_failures(judge_server):
    item = {"id": "q", "prompt": [{"role": "user", "content": "发烧怎么办？"}], "answer": "多喝水，及时就医。"}
    url = f"http://127.0.0.1:{judge_server.server_port}/v1"
    spec = RewardSpec("judge", url=url, timeout=5)
    scores = rewards.score_batch([spec], ["多休息"], [item], [3])
    assert scores.total.tolist() == [0.8] and "多喝水" in judge_server.prompts[0]
    judge_server.reply = "我觉得还行"                      # no score in the reply
    scores = rewards.score_batch([spec], ["多休息"], [item], [3])
    assert scores.failed.tolist() == [True] and scores.failures == {"judge": 1}
    down = RewardSpec("judge", url=f"http://127.0.0.1:{_closed_port()}/v1", timeout=2)
    t0 = time.time()
    scores = rewards.score_batch([RewardSpec("choice"), down], ["C"] * 6, [{"id": "m", "answer": "C"}] * 6, [1] * 6)
    assert scores.failed.all() and scores.failures == {"judge": 6} and time.time() - t0 < 10


def test_rl_prompts_read_staged_and_medicalgpt_layouts_and_count_bad_lines(tmp_path, caplog):
    from data_process.stage import read_rl_jsonl
    lines = [json.dumps({"question": "1+1=?", "answer": 2}), "{broken",
             json.dumps({"id": "s", "prompt": [{"role": "user", "content": "选哪个？"}], "answer": "B"},
                        ensure_ascii=False),
             json.dumps({"question": "没有答案"}, ensure_ascii=False),
             json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "answer": "A"})]
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items, rejects = read_rl_jsonl(path)
    assert [it["answer"] for it in items] == ["2", "B"] and items[1]["id"] == "s"
    assert items[0]["prompt"] == [{"role": "user", "content": "1+1=?"}]
    assert rejects == {"bad_json": 1, "no_answer": 1, "malformed": 1} and "rejected" in caplog.text
    tok = small_tokenizer()
    lengths = [len(tok.render_chat(it["prompt"], add_generation_prompt=True).ids) for it in items]
    assert lengths[0] != lengths[1]
    data = grpo.load_prompts(tok, [path], max_prompt_tokens=min(lengths))
    assert len(data) == 1 and data.rejects == {**rejects, "too_long": 1}
    assert data.items[0]["answer"] == items[int(np.argmin(lengths))]["answer"]


# ------------------------------------------------------------------------------------------------ rollouts

def test_batched_rollouts_equal_one_at_a_time_generation_with_the_same_seeds(one_thread):
    from engine import Engine
    from inference import Sampling
    from model import Transformer, make_config
    tok = small_tokenizer()
    torch.manual_seed(1)
    model = Transformer(make_config("tiny", tok.vocab_size, max_seq_len=64)).eval()
    prompts = [tok.render_chat(it["prompt"], add_generation_prompt=True).ids for it in letter_task(3)] * 3
    samplings = [Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=s)
                 for s in range(len(prompts))]
    engine = Engine(model, tok, max_active=4)           # fewer slots than jobs: later jobs join as slots free up
    batched = grpo.sample_completions(engine, tok, prompts, samplings)
    for p, s, c in zip(prompts, samplings, batched):
        alone = list(s.generate(model, p, tok.stop_ids()))
        assert c.tokens[:len(alone)] == alone and c.truncated == (len(alone) == 6)
        assert c.tokens[len(alone):] == ([] if c.truncated else [c.tokens[-1]])
        assert c.truncated or c.tokens[-1] in tok.stop_ids()
    assert len({tuple(c.tokens) for c in batched}) > 1
    assert [c.tokens for c in grpo.sample_completions(engine, tok, prompts, samplings)] == \
        [c.tokens for c in batched]                    # a pure function of weights, prompts and seeds


# ------------------------------------------------------------------------------------------------ training

def _train_rewards(tmp_path, name, init, **top):
    from train_loop import read_jsonl
    cfg = grpo_config(tmp_path, name, letter_task(), init, **top)
    cfg.train["total_steps"] = 24
    grpo.run_grpo(cfg)
    records = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "reward/mean" in r]
    assert len(records) == 24
    return [r["reward/mean"] for r in records], records


@pytest.mark.slow
def test_mean_reward_rises_and_with_shuffled_rewards_it_does_not(tmp_path, one_thread):
    init = policy_checkpoint(tmp_path / "sft", letter_task())
    real, records = _train_rewards(tmp_path, "real", init)
    shuffled, _ = _train_rewards(tmp_path, "shuffled", init, shuffle_rewards=True)
    first, last = np.mean(real[:4]), np.mean(real[-4:])
    assert first < 0.45 and last > 0.8, real
    assert np.mean(shuffled[-4:]) < 0.5, shuffled
    keys = {"reward/mean", "reward/max", "reward/choice/mean", "zero_variance_groups", "kl", "clip_fraction",
            "completion_len", "truncated", "reward_failures", "rollout_s", "reference_s", "step_s", "data_s"}
    assert keys <= set(records[0])
    assert (tmp_path / "real" / "rewards.png").stat().st_size > 1000


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(out_dir):
    from train_loop import read_jsonl
    return [(r["step"], r["loss"], r["reward/mean"]) for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_resume_after_kill_9_gives_identical_losses(tmp_path):
    """Two updates per rollout batch, killed after step 3: the resume continues a rollout batch from the
    checkpoint (its old log-probs included), then samples fresh ones, and every loss matches."""
    updates_per_rollout = 2
    init = policy_checkpoint(tmp_path / "sft", letter_task(), sft_steps=10)
    data = write_items(tmp_path / "rl.jsonl", letter_task())
    steps = 5
    top = {"data": [str(data)], "val_data": [str(data)], "max_val_prompts": 4, "init_from": str(init),
           "group_size": 4, "max_new_tokens": 4, "beta": 0.05, "updates_per_rollout": updates_per_rollout}
    train = {**FAST_TRAIN, "batch_size": 4, "save_interval": 1, "eval_interval": 2}
    cmds = {}
    for name in ("straight", "killed"):
        config = write_config(tmp_path / f"{name}.toml", {**top, "out_dir": str(tmp_path / name)}, train,
                              [{"kind": "choice", "weight": 1.0}, {"kind": "length", "weight": 0.1,
                                                                    "target_tokens": 2}])
        cmds[name] = [sys.executable, "grpo.py", str(config), "--steps", str(steps)]
    straight = subprocess.Popen(cmds["straight"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=ONE_THREAD)   # the uninterrupted reference run, alongside
    try:
        out = tmp_path / "killed"
        proc = subprocess.Popen(cmds["killed"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=ONE_THREAD)
        deadline = time.time() + 240
        while not (out / "step-000003").is_dir():   # odd: with 2 updates per rollout, mid-rollout
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "final").exists(), "the run ended before the kill; the test proves nothing"
        done = subprocess.run(cmds["killed"], cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "resuming" in done.stdout
        assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
    reference = _losses(tmp_path / "straight")
    assert [s for s, _, _ in reference] == list(range(steps))
    assert _losses(out) == reference
    from train_loop import read_jsonl
    val = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "val"]
    assert [r["step"] for r in val] == [2, 4, 5] and "killed/choice" in val[0]


def test_a_run_with_an_unreachable_reward_url_goes_on(tmp_path, one_thread):
    from train_loop import read_jsonl
    init = policy_checkpoint(tmp_path / "sft", letter_task(4), sft_steps=5)
    data = write_items(tmp_path / "rl.jsonl", letter_task(4))
    config = write_config(tmp_path / "c.toml", {"data": [str(data)], "init_from": str(init), "group_size": 2,
                                                 "max_new_tokens": 3, "out_dir": str(tmp_path / "run")},
                          {**FAST_TRAIN, "batch_size": 2}, [{"kind": "choice"}])
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert grpo.main([str(config), "--steps", "2", "--reward-url", url]) == 0
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(r["reward_failures"] == 4 for r in records)
    assert all(r["loss"] == 0.0 and r["reward/mean"] == 0.0 for r in records)   # every advantage zeroed


# ------------------------------------------------------------------------------------------------ staging

def test_rl_prompt_sets_are_staged_decontaminated_and_every_record_accounted_for(tmp_path):
    """Real MedicalGPT {问, 答} records through the qa_jsonl reader, one C-Eval question planted among them:
    dedup drops it (decontamination, as for SFT), stage_rl writes the rest as RL prompts or counted rejects."""
    from data_process import dedup, stage
    from data_process.recipe import parse_recipe
    from data_process.records import iter_records, write_parts
    from test_sft_fixtures import read_records, real_tokenizer
    records = read_records("qa_jsonl", SAMPLES / "medicalgpt/rag/medical_corpus.txt", "med_qa", limit=60)
    ceval = [q for f in sorted((SAMPLES / "ceval-medical/val").glob("*.csv"))
             for q in dedup.read_eval_questions(f, "ceval")[0]]
    planted = next(q for q in ceval if len(q.question) >= 30)
    records.append({"id": "planted", "corpus": "med_qa", "kind": "conv", "messages": [
        {"role": "user", "content": planted.question}, {"role": "assistant", "content": planted.answer}]})
    records.append({"id": "long", "corpus": "med_qa", "kind": "conv", "messages": [
        {"role": "user", "content": "请详细解释：" + "发热的病因与诊断" * 80}, {"role": "assistant", "content": "A"}]})
    write_parts(iter(records), tmp_path / "clean" / "med_qa")
    (tmp_path / "clean" / "med_qa" / "manifest.json").write_text(json.dumps({"records": len(records)}))
    recipe = parse_recipe({"corpus": [{"name": "med_qa", "reader": "qa_jsonl", "paths": [], "role": "rl",
                                       "stage": "medical_qa"}],
                           "eval_set": [{"name": "ceval", "format": "ceval",
                                         "paths": [str(SAMPLES / "ceval-medical/val/*.csv")]}]}, tmp_path)
    report = dedup.run(recipe, tmp_path / "clean", tmp_path / "dedup", workers=1)
    kept = [r["id"] for r in iter_records(tmp_path / "dedup" / "med_qa")]
    assert "planted" not in kept and "long" in kept and report["corpora"]["med_qa"]["decontaminated"] == 1
    tok = real_tokenizer()
    out = tmp_path / "data" / "rl"
    out.mkdir(parents=True)
    assert stage._rl_groups(recipe) == {"medical_qa": ["med_qa"]}
    counts = stage.stage_rl(tok, tmp_path / "dedup", ["med_qa"], out, "medical_qa", max_tokens=256,
                            val_fraction=0.1)
    assert counts["train"] + counts["val"] + sum(counts["rejected"].values()) == len(kept)
    assert counts["rejected"].get("too_long") == 1 and counts["val"] >= 1
    items, bad = stage.read_rl_jsonl(out / "medical_qa.jsonl")
    val, _ = stage.read_rl_jsonl(out / "medical_qa.val.jsonl")
    assert bad == {} and len(items) == counts["train"] and len(val) == counts["val"]
    by_id = {f"med_qa:{r['id']}": r for r in records}
    for it in items + val:
        src = by_id[it["id"]]["messages"]
        assert it["prompt"] == src[:-1] and it["answer"] == src[-1]["content"]
    rejects = [json.loads(line) for line in (out / "medical_qa.rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects if r["reason"] == "too_long"] == ["med_qa:long"]


def test_default_recipe_stages_two_rl_tasks_from_the_embedded_samples():
    from data_process import stage
    from data_process.readers import READERS
    from data_process.recipe import load_recipe
    recipe = load_recipe(ROOT / "config/recipe.toml", root=ROOT)
    assert stage._rl_groups(recipe) == {"medical_qa": ["medical_qa_rl"], "medical_choice": ["medical_choice_rl"]}
    for spec in recipe.corpora:
        if spec.role == "rl":
            records = [r for path in spec.paths for r in READERS[spec.reader](ROOT / path, spec.name)
                       if isinstance(r, dict)]
            assert len(records) >= 16 and all(r["kind"] == "conv" for r in records)
    for task in ("medical_qa", "medical_choice"):   # the configs point at what the recipe stages
        cfg = grpo.load_grpo_config(task)
        assert cfg.data == [f"data/rl/{task}.jsonl"] and cfg.val_data == [f"data/rl/{task}.val.jsonl"]


@pytest.mark.slow
def test_two_ddp_ranks_roll_out_different_prompts_and_stay_in_sync(tmp_path):
    init = policy_checkpoint(tmp_path / "sft", letter_task(), sft_steps=5)
    data = write_items(tmp_path / "rl.jsonl", letter_task())
    config = write_config(tmp_path / "c.toml", {"data": [str(data)], "init_from": str(init), "group_size": 4,
                                                 "max_new_tokens": 3, "out_dir": str(tmp_path / "run")},
                          {**FAST_TRAIN, "batch_size": 2, "save_interval": 2}, [{"kind": "choice"}])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py",
           str(config), "--steps", "3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]   # train_loop checks the replicas' digests at each save
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "step-000002").is_dir()
    # the provenance chain goes on through GRPO: the SFT run it started from, then this run's data
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    assert [r["job"] for r in meta["provenance"]][-1] == "grpo c" and meta["provenance"][-1]["data"] == str(data)
    cfg = grpo.load_grpo_config(str(config))
    prompts = grpo.load_prompts(small_tokenizer(), cfg.data, 60)
    ranks = [grpo.GRPOBatches(cfg, prompts, None, small_tokenizer(), batch_size=2, seed=3, rank=r, world_size=2)
             for r in (0, 1)]
    for step in range(3):
        a, b = (set(x.prompts_for(step, 0).tolist()) for x in ranks)
        assert len(a) == len(b) == 2 and not a & b
