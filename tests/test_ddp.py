"""DDP on CPU (torch.distributed gloo, launched by torchrun as a user would): 2 ranks give the same losses and the
same weights as 1 process on the same global batch, and SFT and DPO stages run under 2-process DDP.

Tolerance: fp32, losses equal to a relative 1e-5 and weights to 1e-5 absolute after 6 AdamW steps. The two runs
compute the same sums in a different order (per-rank means averaged by all_reduce vs one mean over the global
batch), so bit-equality is not expected; anything beyond float rounding (a rank seeing other rows, gradients not
averaged, a step applied twice) moves the losses by far more."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

import checkpoint
import train_loop

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

WORKER = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import numpy as np, torch
torch.set_num_threads(1)
import train_loop
from model import Transformer, make_config
from tokenizer import Tokenizer
from test_train_loop import _lines

GLOBAL_BATCH, T = 8, 32
tok = Tokenizer.load({tok!r})
env = train_loop.dist_env()
stream = np.array([t for l in _lines() for t in tok.encode(l) + [tok.eos_id]], dtype=np.int64)


class GlobalBatches:
    # the same global batch of windows at each (step, micro_step), whatever the world size; rank r trains its
    # contiguous share of the rows
    def __init__(self, rank, world):
        self.rank, self.per_rank = rank, GLOBAL_BATCH // world

    def next_batch(self, step, micro_step):
        rng = np.random.default_rng([step, micro_step])
        starts = rng.integers(0, len(stream) - T - 1, GLOBAL_BATCH)
        w = torch.from_numpy(np.stack([stream[s:s + T + 1] for s in starts]))
        mine = w[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return {{"input_ids": mine[:, :-1], "targets": mine[:, 1:]}}

    def state_dict(self):
        return {{}}

    def load_state_dict(self, state):
        pass


torch.manual_seed(0)
model = Transformer(make_config("tiny", tok.vocab_size))
cfg = train_loop.TrainConfig(out_dir={out!r}, total_steps=6, batch_size=GLOBAL_BATCH // env.world_size,
                             grad_accum=2, seq_len=T, lr=3e-3, min_lr=3e-4, warmup_steps=2, stable_steps=2,
                             decay_steps=2, dtype="fp32", device="cpu", save_interval=3, eval_interval=0,
                             progress=False, peak_flops=1e12)
summary = train_loop.train(cfg, model, tok, GlobalBatches(env.rank, env.world_size))
if env.is_main:
    print("SUMMARY " + json.dumps({{"step": summary["step"], "tokens_seen": summary["tokens_seen"]}}))
train_loop.shutdown_distributed()
"""


def _torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def _losses(out):
    return [(r["step"], r["loss"]) for r in train_loop.read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from test_train_loop import _lines
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    return Tokenizer(train_sentencepiece(_lines(), 2000)).save(tmp_path_factory.mktemp("tok"))


@pytest.mark.slow
def test_two_ranks_give_the_losses_and_weights_of_one_process_on_the_same_global_batch(tmp_path, tok_dir):
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        script = tmp_path / f"{name}.py"
        script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), tok=str(tok_dir),
                                        out=str(tmp_path / name)))
        cmd = [sys.executable, str(script)] if nproc == 1 else _torchrun(2, str(script))
        run = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD, timeout=240)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        summaries = [json.loads(l[8:]) for l in run.stdout.splitlines() if l.startswith("SUMMARY ")]
        assert summaries == [{"step": 6, "tokens_seen": 6 * 2 * 8 * 32}]   # once, from rank 0; global tokens
        runs[name] = tmp_path / name
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(6))   # logged once per step
    assert [l for _, l in two] == pytest.approx([l for _, l in one], rel=1e-5)
    assert one[-1][1] < one[0][1]
    meta_two = checkpoint.verify_checkpoint(runs["two"] / "final")
    assert meta_two["world_size"] == 2 and checkpoint.verify_checkpoint(runs["one"] / "final")["world_size"] == 1
    a, _, _ = checkpoint.load_checkpoint(runs["one"] / "final")
    b, _, _ = checkpoint.load_checkpoint(runs["two"] / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), name
    # resuming the 2-rank run from its step-3 checkpoint in 1 process is refused by nothing and continues
    assert len(checkpoint.load_train_state(runs["two"] / "step-000003")["rng"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("job", ["sft", "dpo"])
def test_sft_and_dpo_run_under_two_process_ddp(tmp_path, job):
    from test_sft_fixtures import (FAST_TRAIN, MEDICAL_REWARD, MEDICAL_SFT, base_checkpoint, read_records, stage,
                                   write_toml)
    from checkpoint import data_provenance, load_checkpoint, save_checkpoint
    base = base_checkpoint(tmp_path / "base")
    model, tok, meta = load_checkpoint(base)   # as a pretrain phase leaves it: with its provenance
    keep = {k: v for k, v in meta.items() if k not in ("files", "format", "tokenizer_sha256")}
    save_checkpoint(base, model, tok, {**keep, "provenance": [data_provenance("pretrain converge", tmp_path)]})
    if job == "sft":
        data = stage(tmp_path, read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=60), "medical",
                     max_tokens=96)
        top, script = {"data": str(data), "init_from": str(base)}, "sft.py"
    else:
        data = stage(tmp_path, read_records("medical_reward_jsonl", MEDICAL_REWARD, "medical_reward", limit=40),
                     "medical", kind="dpo", max_tokens=96)
        top, script = {"data": [str(data)], "init_from": str(base), "beta": 0.5}, "dpo.py"
    out = tmp_path / "out"
    config = write_toml(tmp_path / "run.toml", {**top, "out_dir": str(out)},
                        {**FAST_TRAIN, "batch_size": 2, "save_interval": 2})
    run = subprocess.run(_torchrun(2, script, str(config), "--steps", "4"), cwd=ROOT, capture_output=True,
                         text=True, env=ONE_THREAD, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = _losses(out)
    assert [s for s, _ in records] == list(range(4))   # logged once per step, not once per rank
    assert all(torch.isfinite(torch.tensor(l)) for _, l in records)
    meta = checkpoint.verify_checkpoint(out / "final")
    assert meta["world_size"] == 2 and meta["step"] == 4 and meta["kind"] == job
    # the loop all-gathers a parameter digest at every save and stops when the replicas differ: it saved twice
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", "final"))) == ["final", "step-000002"]
    model, _, _ = checkpoint.load_checkpoint(out / "final")
    assert checkpoint.param_digest(model) == meta["param_sha256"]
    # the provenance of the checkpoint it started from, carried on, then its own (recorded under DDP too)
    assert [r["job"] for r in meta["provenance"]] == ["pretrain converge", f"{job} run"]
