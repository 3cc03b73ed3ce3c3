"""Shared helpers for the SFT, LoRA and DPO tests (no tests here): the real ChatGLM2 tokenizer, a tiny base
checkpoint, and staged SFT/DPO files built from the real samples by the real pipeline pieces
(data_process.readers -> records -> data_process.stage), exactly the inputs sft.py and dpo.py read."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from conftest import SAMPLES

TOKENIZER_MODEL = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"
MEDICAL_SFT = SAMPLES / "medicalgpt" / "sft" / "medical_sft_1K_format.jsonl"
MEDICAL_REWARD = SAMPLES / "medicalgpt" / "reward" / "medical_reward_pairs.jsonl"
FIREFLY_DPO = SAMPLES / "firefly" / "dummy_dpo.jsonl"
MINIMIND_SFT = SAMPLES / "minimind-format-tiny" / "tiny_sft.jsonl"
MINIMIND_DPO = SAMPLES / "minimind-format-tiny" / "tiny_dpo.jsonl"


@functools.cache
def real_tokenizer():
    from tokenizer import Tokenizer
    return Tokenizer.load(TOKENIZER_MODEL)


def base_checkpoint(path, seed: int = 0, max_seq_len: int = 128, **overrides) -> Path:
    """A tiny random base model (narrowed: the 64,796-token vocabulary dominates its cost) as a checkpoint."""
    from model import Transformer, make_config
    from checkpoint import save_checkpoint
    tok = real_tokenizer()
    torch.manual_seed(seed)
    config = make_config("tiny", tok.vocab_size, **{"dim": 32, "ffn_dim": 64, "max_seq_len": max_seq_len,
                                                    **overrides})
    model = Transformer(config)
    return save_checkpoint(path, model, tok, {"kind": "base", "step": 0, "tokens_seen": 0, "chat": False})


def read_records(reader: str, path: Path, corpus: str, limit: int | None = None) -> list[dict]:
    """Records of one real sample file through its issue-2 reader (rejects dropped)."""
    from data_process.readers import READERS
    out = []
    for r in READERS[reader](Path(path), corpus):
        if isinstance(r, dict):
            out.append({**r, "corpus": corpus})
            if limit and len(out) >= limit:
                break
    return out


def stage(tmp_path: Path, records: list[dict], stage_name: str, kind: str = "sft", max_tokens: int = 128) -> Path:
    """Stage records with data_process.stage (val_fraction 0) -> the CSV / JSONL path."""
    from data_process import stage as stage_mod
    from data_process.records import write_parts
    docs = tmp_path / "docs"
    corpus = records[0]["corpus"]
    write_parts(iter(records), docs / corpus)
    out = tmp_path / "data" / kind
    out.mkdir(parents=True, exist_ok=True)
    fn = stage_mod.stage_sft if kind == "sft" else stage_mod.stage_dpo
    fn(real_tokenizer(), docs, [corpus], out, stage_name, max_tokens, 0.0)
    return out / (f"{stage_name}.csv" if kind == "sft" else f"{stage_name}.jsonl")


def write_toml(path: Path, top: dict, train: dict, lora: dict | None = None) -> Path:
    """A small stage/run config file (TOML) for sft.py / dpo.py."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    lines = [f"{k} = {value(v)}" for k, v in top.items()]
    for name, table in (("lora", lora), ("train", train)):
        if table is not None:
            lines += [f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FAST_TRAIN = {"batch_size": 4, "seq_len": 96, "lr": 3e-3, "min_lr": 3e-4, "dtype": "fp32", "device": "cpu",
              "peak_flops": 1e12,
              "eval_interval": 0, "save_interval": 0, "progress": False, "seed": 7}
