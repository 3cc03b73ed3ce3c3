"""Loading a trained checkpoint for generation, shared by chat.py, serve.py, export.py, eval.py and the
benchmarks: the checkpoint verified and loaded (checkpoint.load_checkpoint), a LoRA adapter merged in, the
device checked, a seeded generator, and the one `Sampling` type every generator takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


def load_model(ckpt_dir, lora_dir=None, dtype: str = "fp32", device: str = "cpu"):
    """-> (model in eval mode, tokenizer, meta) of a checkpoint directory, a LoRA adapter merged in if given."""
    from checkpoint import load_checkpoint
    model, tokenizer, meta = load_checkpoint(ckpt_dir)   # verifies sizes and hashes of every file first
    if lora_dir is not None:
        from lora import load_adapter, merge_lora
        merge_lora(load_adapter(model, lora_dir))   # merged: generation runs at the base model's speed
    model.eval().to(device)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    return model, tokenizer, meta


def seeded_generator(model, seed: int | None) -> torch.Generator:
    """A generator on the model's device (sampling there needs one there); an OS seed when none is given."""
    device = model.lm_head.weight.device
    return torch.Generator(device=device).manual_seed(seed if seed is not None else random_seed())


def device_error(device: str) -> str | None:
    """Why `device` cannot be used here, or None (a clear message instead of torch's assertion)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        return str(e)
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is available on this machine"
    return None


def random_seed() -> int:
    """A fresh seed from the OS (torch.seed() would also reseed torch's global generator as a side effect)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class Sampling:
    """How a reply is sampled: chat.py, eval.py, the server's requests and GRPO rollouts (engine.py) all use it.
    `stop` strings and `ignore_eos` are honoured by the engine."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def generate(self, model, prompt_ids: list[int], stop_ids, generator: torch.Generator | None = None):
        """model.generate with these settings: a stream of token ids (a generator seeded from `seed` unless
        one is given)."""
        return model.generate(prompt_ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              stop_ids=stop_ids, generator=generator or seeded_generator(model, self.seed))
