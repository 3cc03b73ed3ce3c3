"""Bits per character: the one scorer of loss and bits per character, used by pretrain validation and eval.py.

    score = score_windows(model, tokenizer, windows)      # windows: token arrays; window[1:] is what is scored
    score.loss, score.bits_per_char, score.chars

Bits per character = summed NLL (nats) / ln 2 / characters, which compares models with different tokenizers
(per-token loss does not). Both sides count exactly the same text: the numerator sums the NLL of the scored
targets that are text, and the denominator counts the characters those very tokens decode to. Special tokens
(end-of-text, the chat template's <|im_start|>/<|im_end|>, padding) are not text: their NLL goes into `loss`
but not into bits per character, and they add no characters. So a chat-rendered corpus (sft_*) is not charged
template tokens against message characters, and a scored prefix (--max-val-tokens) counts its own characters
instead of a share of the split's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2)


@dataclass
class Score:
    nats: float = 0.0          # summed NLL of every scored target token
    tokens: int = 0
    text_nats: float = 0.0     # summed NLL of the targets that are text (not special tokens)
    text_tokens: int = 0
    chars: int = 0             # characters the text targets decode to

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.text_nats / LN2 / self.chars if self.chars else float("nan")

    def add(self, other: "Score") -> "Score":
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.text_nats + other.text_nats,
                     self.text_tokens + other.text_tokens, self.chars + other.chars)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "bits_per_char": self.bits_per_char, "tokens": self.tokens,
                "text_tokens": self.text_tokens, "chars": self.chars}


def special_ids(tokenizer) -> np.ndarray:
    """Ids that are not text: end-of-text, padding, begin-of-text and the chat template's special tokens."""
    ids = {tokenizer.eos_id, tokenizer.pad_id, *tokenizer.special.values()}
    if tokenizer.bos_id is not None:
        ids.add(tokenizer.bos_id)
    return np.array(sorted(i for i in ids if i is not None and i >= 0), dtype=np.int64)


def text_mask(targets: np.ndarray, specials: np.ndarray) -> np.ndarray:
    return ~np.isin(targets, specials)


def text_chars(tokenizer, ids) -> int:
    """Characters of the text `ids` decode to (ids already free of special tokens)."""
    return len(tokenizer.decode([int(i) for i in ids])) if len(ids) else 0


@torch.no_grad()
def window_nll(model, windows: list[np.ndarray], dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """Per-token NLL (nats, fp32 log-softmax) of window[1:] given what precedes it, for each window of one batch.
    The vocabulary projection runs one row at a time: never the whole [B, T, V] logits at once. `dtype`: autocast
    to it (fp32: none); None keeps the caller's autocast context."""
    device = next(model.parameters()).device
    T = max(len(w) for w in windows) - 1
    inp = torch.zeros(len(windows), T, dtype=torch.long)
    for j, w in enumerate(windows):
        inp[j, : len(w) - 1] = torch.from_numpy(np.asarray(w[:-1], dtype=np.int64))
    ctx = contextlib.nullcontext() if dtype is None else \
        torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    out = []
    with ctx:
        h = model.hidden_states(inp.to(device))
        for j, w in enumerate(windows):
            n = len(w) - 1
            logits = model.lm_head(h[j, :n])
            tgt = torch.from_numpy(np.asarray(w[1:], dtype=np.int64)).to(device)
            out.append(F.cross_entropy(logits.float(), tgt, reduction="none").double().cpu().numpy())
    return out


def score_windows(model, tokenizer, windows: Iterable[np.ndarray], batch_size: int = 4,
                  dtype: torch.dtype | None = None) -> Score:
    """Score token windows (each of >= 2 tokens; window[1:] are the targets) -> Score."""
    specials = special_ids(tokenizer)
    total = Score()
    batch: list[np.ndarray] = []

    def flush():
        nonlocal total
        for w, nll in zip(batch, window_nll(model, batch, dtype)):
            tgt = np.asarray(w[1:], dtype=np.int64)
            mask = text_mask(tgt, specials)
            total = total.add(Score(float(nll.sum()), len(tgt), float(nll[mask].sum()), int(mask.sum()),
                                    text_chars(tokenizer, tgt[mask])))
        batch.clear()

    for w in windows:
        if len(w) < 2:
            continue
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return total


def contiguous_windows(tokens, seq_len: int, max_targets: int = 0):
    """Windows of seq_len + 1 tokens over a token stream, overlapping by one token, so every token but the first
    is a target exactly once; max_targets > 0 stops after that many targets (a prefix, scored exactly)."""
    n = len(tokens) if not max_targets else min(len(tokens), max_targets + 1)
    for s in range(0, max(n - 1, 0), seq_len):
        yield np.asarray(tokens[s: min(s + seq_len + 1, n)], dtype=np.int64)
