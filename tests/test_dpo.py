"""DPO (dpo.py): response-only log-probs, the loss against a hand computation, the cached reference equals a
fresh reference pass, training raises the chosen-minus-rejected margin, and kill -9 + resume (DPO, a full SFT
stage with tag weights, a LoRA SFT stage) gives the same losses as an uninterrupted run. Real tokenizer, real
preference samples."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dpo
from data_process.stage import read_dpo_pairs
from conftest import ROOT
from test_sft_fixtures import (FAST_TRAIN, FIREFLY_DPO, MEDICAL_REWARD, MEDICAL_SFT, base_checkpoint,
                               read_records, real_tokenizer, stage, write_toml)


def medical_pairs(tmp_path, limit=40, max_tokens=96):
    return stage(tmp_path, read_records("medical_reward_jsonl", MEDICAL_REWARD, "medical_reward", limit=limit),
                 "medical", kind="dpo", max_tokens=max_tokens)


def test_log_probs_count_only_the_response_tokens(tmp_path):
    tok = real_tokenizer()
    path = medical_pairs(tmp_path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    data = dpo.load_pairs(tok, [path], max_tokens=96)
    assert len(data) == len(records) > 5
    batch = dpo.collate_pairs(data, np.arange(len(data)), tok.pad_id)
    B = len(data)
    im_end = tok.special["im_end"]
    for i, r in enumerate(records):
        for side, key in ((0, "chosen"), (1, "rejected")):
            targets = batch["targets"][side * B + i]
            assert targets[targets != dpo.IGNORE].tolist() == tok.encode(r[key]) + [im_end]
        # both sides share the prompt, rendered with the generation header
        prompt = tok.render_chat(r["prompt"], add_generation_prompt=True).ids
        assert data.ids[0][i][:len(prompt)].tolist() == data.ids[1][i][:len(prompt)].tolist() == prompt


def test_sequence_log_probs_and_loss_match_a_hand_computation(tmp_path):
    from checkpoint import load_checkpoint
    tok = real_tokenizer()
    model, _, _ = load_checkpoint(base_checkpoint(tmp_path / "base"))
    model.eval()
    data = dpo.load_pairs(tok, [medical_pairs(tmp_path)], max_tokens=96)
    idx = np.array([0, 3])
    batch = dpo.collate_pairs(data, idx, tok.pad_id)
    with torch.no_grad():
        logps, _ = dpo.sequence_logps(model, batch["input_ids"], batch["targets"])
    for row, (side, i) in enumerate([(0, 0), (0, 3), (1, 0), (1, 3)]):
        ids, mask = data.ids[side][i], data.masks[side][i]
        with torch.no_grad():   # each sequence alone, unpadded, per-token log_softmax
            lp = torch.log_softmax(model(torch.from_numpy(ids[None, :-1]).long()).logits[0].double(), -1)
        expected = sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
        assert logps[row].item() == pytest.approx(expected, abs=1e-3)
    policy = torch.tensor([-10.0, -20.0, -12.0, -18.0])
    ref = torch.tensor([-11.0, -19.0, -11.0, -19.0])
    loss, metrics = dpo.dpo_loss(policy, ref, beta=0.5)
    margins = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-20 + 19) - (-18 + 19))]
    assert loss.item() == pytest.approx(np.mean([-math.log(1 / (1 + math.exp(-m))) for m in margins]), rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(np.mean(margins))
    assert metrics["reward_accuracy"].item() == 0.5


def test_cached_reference_log_probs_equal_a_fresh_reference_pass(tmp_path, capsys):
    from checkpoint import load_checkpoint
    tok = real_tokenizer()
    base = base_checkpoint(tmp_path / "base")
    model, _, _ = load_checkpoint(base)
    data = dpo.load_pairs(tok, [medical_pairs(tmp_path)], max_tokens=96)
    cache_dir = tmp_path / "ref_logps"
    cached = dpo.cached_reference_logps(model, data, base, tok, cache_dir, batch_size=4)
    files = list(cache_dir.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == dpo.cache_key(data, base, tok)
    capsys.readouterr()
    again = dpo.cached_reference_logps(model, data, base, tok, cache_dir, batch_size=4)
    assert "cached" in capsys.readouterr().out and torch.equal(again, cached)
    # the training batches (other groupings, other padding) carry log-probs equal to a fresh reference pass
    batches = dpo.DPOBatches(data, 3, tok.pad_id, ref_logps=cached, seed=1)
    for step in range(3):
        batch = batches.next_batch(step, 0)
        fresh = dpo.reference_logps(model, batch)
        torch.testing.assert_close(batch["ref_logps"], fresh, rtol=1e-5, atol=1e-3)
    # the key follows the data and the reference weights
    records, _ = read_dpo_pairs([medical_pairs(tmp_path)])
    fewer = dpo.tokenize_pairs(tok, records[:-1], max_tokens=96)
    assert dpo.cache_key(fewer, base, tok) != dpo.cache_key(data, base, tok)
    assert dpo.cache_key(dpo.tokenize_pairs(tok, records, max_tokens=96), base, tok) == dpo.cache_key(data, base, tok)
    other = base_checkpoint(tmp_path / "other", seed=1)
    assert dpo.cache_key(data, other, tok) != dpo.cache_key(data, base, tok)


def test_bad_lines_are_counted_and_empty_data_is_an_error(tmp_path, caplog):
    good = {"id": "g", "prompt": [{"role": "user", "content": "头痛怎么办？"}], "chosen": "多休息。", "rejected": "不知道"}
    lines = [json.dumps(good, ensure_ascii=False), "{broken", json.dumps({"prompt": "x", "chosen": "a"}),
             json.dumps({**good, "id": "same", "rejected": good["chosen"]}, ensure_ascii=False)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = dpo.load_pairs(real_tokenizer(), [path], max_tokens=64)
    assert data.pair_ids == ["g"]
    assert data.rejects == {"bad_json": 1, "malformed": 1, "chosen_equals_rejected": 1}
    assert "rejected" in caplog.text
    path.write_text(lines[1] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable preference pair"):
        dpo.load_pairs(real_tokenizer(), [path], max_tokens=64)
    with pytest.raises(FileNotFoundError, match="data_process.py"):
        dpo.expand([str(tmp_path / "absent*.jsonl")])


@pytest.mark.slow
def test_dpo_raises_the_chosen_minus_rejected_margin(tmp_path):
    from checkpoint import load_checkpoint
    from train_loop import read_jsonl
    tok = real_tokenizer()
    base = base_checkpoint(tmp_path / "base")
    path = stage(tmp_path, read_records("pref_messages_jsonl", FIREFLY_DPO, "firefly_dpo") +
                 read_records("medical_reward_jsonl", MEDICAL_REWARD, "firefly_dpo", limit=40),
                 "general", kind="dpo", max_tokens=96)
    out = tmp_path / "out"
    config = write_toml(tmp_path / "dpo.toml", {"data": [str(path)], "val_data": [str(path)], "init_from": str(base),
                                                 "out_dir": str(out), "beta": 0.5, "warmup_fraction": 0.0},
                        {**FAST_TRAIN, "lr": 1e-2, "batch_size": 4})
    assert dpo.main([str(config), "--steps", "6"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert len(train) == 6 and {"reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"} <= set(train[0])
    assert abs(train[0]["reward_margin"]) < 1e-3   # step 0: policy == reference
    # independently of the logged figures: the trained policy's margin over the reference, on all pairs
    data = dpo.load_pairs(tok, [path], max_tokens=96)
    ref_model, _, _ = load_checkpoint(base)
    policy, _, meta = load_checkpoint(out / "final")
    assert meta["kind"] == "dpo" and meta["chat"]
    ref = dpo.compute_reference_logps(ref_model, data, tok.pad_id)
    new = dpo.compute_reference_logps(policy, data, tok.pad_id)
    margin = (new[:, 0] - ref[:, 0]) - (new[:, 1] - ref[:, 1])
    assert margin.mean() > 1.0 and (margin > 0).float().mean() > 0.7
    val = [r for r in records if r.get("kind") == "val"]
    assert val and val[-1]["dpo_dpo/reward_accuracy"] > 0.7


def _losses(out_dir):
    from train_loop import read_jsonl
    return [(r["step"], r["loss"]) for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}   # runs side by side on 2 cores, same reduction order


def _kill_and_resume(cmd, out_dir):
    """Run cmd, SIGKILL it once its step-2 checkpoint exists (before it ends), run it again to the end."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ONE_THREAD)
    deadline = time.time() + 240
    while not (out_dir / "step-000002").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out_dir / "final").exists(), "the run ended before the kill; the test proves nothing"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    return _losses(out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["dpo", "sft_lora", "sft"])
def test_resume_after_kill_9_gives_identical_losses(tmp_path, job):
    base = base_checkpoint(tmp_path / "base")
    steps = 5
    train = {**FAST_TRAIN, "save_interval": 2, "batch_size": 2}
    if job == "dpo":
        data = medical_pairs(tmp_path)
        top = {"data": [str(data)], "init_from": str(base), "beta": 0.5}
        script, lora = "dpo.py", None
    else:
        data = stage(tmp_path, read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=60),
                     "medical_dialogue", max_tokens=96)
        top = {"data": str(data), "init_from": str(base), "tag_weight": 3.0}
        script, lora = "sft.py", None
        if job == "sft_lora":
            lora = {"rank": 4, "alpha": 8, "dropout": 0.1}   # dropout: the RNG must resume too
    cmds = {}
    for name in ("straight", "killed"):
        config = write_toml(tmp_path / f"{name}.toml", {**top, "out_dir": str(tmp_path / name)}, train, lora)
        cmds[name] = [sys.executable, script, str(config), "--steps", str(steps)]
    straight = subprocess.Popen(cmds["straight"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=ONE_THREAD)   # the uninterrupted reference run, alongside
    try:
        killed = _kill_and_resume(cmds["killed"], tmp_path / "killed")
        assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
    reference = _losses(tmp_path / "straight")
    assert [s for s, _ in reference] == list(range(steps))
    assert killed == reference
