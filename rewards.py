"""Verifiable rewards for GRPO (grpo.py): small functions of (completion, item), composed with weights.

    specs = [RewardSpec("choice", weight=1.0), RewardSpec("format", weight=0.2)]
    scored = score_batch(specs, completions, items, n_tokens)   # -> Scores: total [N], per component, failed [N]

Items are the RL prompt records (data/rl/<task>.jsonl, data_process/stage.py `read_rl_jsonl`): `answer` is the
reference (a short answer, or the letter for multiple choice). Components:

    exact        1 if the answer (inside <answer>…</answer> if present) equals the reference, after normalization
                 (NFKC, case, whitespace and punctuation removed); for the {question, answer} layout of
                 MedicalGPT's GRPO data
    choice       1 if the first option letter A-D (E…) of the answer is the reference letter, else 0
    format       1 for exactly <think>…</think><answer>…</answer> (DeepSeek-R1's template), 0.5 for the
                 answer tags alone
    length       -min(1, max(0, tokens - target_tokens) / target_tokens): no penalty up to target_tokens
    repetition   -(share of repeated character n-grams): 0 for text without repeats, towards -1 for a loop
    judge        0-10 score of an OpenAI-compatible endpoint (`url`, e.g. our own serve.py) against the reference,
                 scaled to 0-1

A component that raises, returns NaN/inf, or (judge) cannot be reached or read marks that completion as failed:
it is counted (`failures` per component) and grpo.py gives it zero advantage; the run goes on.
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from settings import limits

log = logging.getLogger("rewards")

KINDS = ("exact", "choice", "format", "length", "repetition", "judge")

JUDGE_RUBRIC = (
    "你是一名严格的评审。根据参考答案判断模型的回答是否正确，给出 0-10 的整数分"
    "（10 = 与参考答案一致且正确，0 = 错误或答非所问）。\n"
    "只输出这个整数。\n\n【问题】\n%s\n\n【参考答案】\n%s\n\n【模型的回答】\n%s")


@dataclass
class RewardSpec:
    """One [[reward]] table of config/grpo/<task>.toml."""
    kind: str = field(metadata=limits(choices=KINDS))
    weight: float = 1.0
    target_tokens: int = field(default=256, metadata=limits(ge=1))   # length: no penalty up to here
    ngram: int = field(default=4, metadata=limits(ge=1))             # repetition: character n-gram size
    url: str = ""                     # judge: OpenAI-compatible base URL (http://host:port/v1); --reward-url sets it
    model: str = ""                   # judge: model name (default: the endpoint's first model)
    api_key: str = ""
    timeout: float = field(default=30.0, metadata=limits(gt=0))

    @property
    def name(self) -> str:
        return self.kind


# ------------------------------------------------------------------------------------------- text helpers

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
FORMAT_RE = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>|</?think>).)*"
                       r"</answer>\s*", re.S)
ANSWER_ONLY_RE = re.compile(r"\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.S)
LETTER_RE = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])")


def extract_answer(text: str) -> str:
    """The content of the last <answer>…</answer> if there is one, else the whole text."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else text


def normalize_answer(text: str) -> str:
    """NFKC, lower case, no whitespace or punctuation (Unicode categories P* and S*): "  42。" == "42"."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch)[0] not in "PS")


def choice_letter(text: str) -> str | None:
    """The first stand-alone option letter (A-J, upper case after NFKC) of the answer, or None."""
    m = LETTER_RE.search(unicodedata.normalize("NFKC", extract_answer(text)).upper())
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------- components

def exact_reward(completion: str, item: dict) -> float:
    reference = normalize_answer(str(item["answer"]))
    if not reference:
        raise ValueError(f"item {item.get('id')} has an empty reference answer")
    return float(normalize_answer(extract_answer(completion)) == reference)


def choice_reward(completion: str, item: dict) -> float:
    reference = str(item["answer"]).strip().upper()
    if not re.fullmatch(r"[A-J]", reference):
        raise ValueError(f"item {item.get('id')}: answer {item['answer']!r} is not an option letter")
    return float(choice_letter(completion) == reference)


def format_reward(completion: str, item: dict) -> float:
    if FORMAT_RE.fullmatch(completion):
        return 1.0
    return 0.5 if ANSWER_ONLY_RE.fullmatch(completion) else 0.0


def length_penalty(n_tokens: int, target_tokens: int) -> float:
    return -min(1.0, max(0, n_tokens - target_tokens) / target_tokens)


def repetition_penalty(completion: str, ngram: int) -> float:
    """-(1 - distinct n-grams / n-grams) over character n-grams (0 when the text is shorter than n)."""
    grams = [completion[i:i + ngram] for i in range(len(completion) - ngram + 1)]
    return -(1.0 - len(set(grams)) / len(grams)) if grams else 0.0


def parse_judge_score(text: str) -> float:
    """The first number 0-10 in a judge reply, scaled to 0-1; ValueError when there is none."""
    m = re.search(r"\d+(?:\.\d+)?", text or "")
    if not m or not 0 <= float(m.group()) <= 10:
        raise ValueError(f"judge reply has no score 0-10: {text[:80]!r}")
    return float(m.group()) / 10.0


class Judge:
    """An OpenAI-compatible chat endpoint as a reward (the official `openai` client, like eval.py --judge-url).
    An unreachable endpoint or an unreadable reply raises; score_batch counts that as a failed reward."""

    def __init__(self, spec: RewardSpec):
        from openai import OpenAI
        self.spec = spec
        self.client = OpenAI(base_url=spec.url, api_key=spec.api_key or "none", timeout=spec.timeout, max_retries=0)
        self._model = spec.model
        self.down_until = 0.0   # after a connection error, fail fast for a while instead of timing out N times

    def model(self) -> str:
        if not self._model:
            self._model = self.client.models.list().data[0].id
        return self._model

    def __call__(self, completion: str, item: dict) -> float:
        import time

        import openai
        if time.monotonic() < self.down_until:
            raise ConnectionError(f"judge {self.spec.url} was unreachable moments ago; skipped")
        try:
            return self._score(completion, item)
        except (openai.APIConnectionError, openai.APITimeoutError):
            self.down_until = time.monotonic() + 10.0
            raise

    def _score(self, completion: str, item: dict) -> float:
        question = item["prompt"][-1]["content"] if item.get("prompt") else item.get("question", "")
        reply = self.client.chat.completions.create(
            model=self.model(), temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": JUDGE_RUBRIC % (question, item.get("answer", ""), completion)}])
        return parse_judge_score(reply.choices[0].message.content or "")


# ------------------------------------------------------------------------------------------- composition

@dataclass
class Scores:
    total: np.ndarray                    # [N] weighted sum over components; 0 where failed
    components: dict[str, np.ndarray]    # name -> [N] raw values (NaN where that component failed)
    failed: np.ndarray                   # [N] bool: some component raised or was not finite
    failures: dict[str, int]             # name -> failed completions


def make_scorers(specs: list[RewardSpec]) -> list:
    """One callable (completion, item, n_tokens) -> float per spec."""
    out = []
    for spec in specs:
        if spec.kind == "exact":
            out.append(lambda c, item, n: exact_reward(c, item))
        elif spec.kind == "choice":
            out.append(lambda c, item, n: choice_reward(c, item))
        elif spec.kind == "format":
            out.append(lambda c, item, n: format_reward(c, item))
        elif spec.kind == "length":
            out.append(lambda c, item, n, t=spec.target_tokens: length_penalty(n, t))
        elif spec.kind == "repetition":
            out.append(lambda c, item, n, g=spec.ngram: repetition_penalty(c, g))
        elif spec.kind == "judge":
            if not spec.url:
                raise ValueError("the judge reward needs a url (config `url` or --reward-url)")
            judge = Judge(spec)
            out.append(lambda c, item, n, j=judge: j(c, item))
        else:
            raise ValueError(f"unknown reward kind {spec.kind!r} ({', '.join(KINDS)})")
    return out


def score_batch(specs: list[RewardSpec], completions: list[str], items: list[dict], n_tokens: list[int],
                scorers: list | None = None) -> Scores:
    """Every component on every completion. A component that raises or is not finite leaves NaN in its column,
    marks the completion failed and is counted; the first few of each kind are logged."""
    scorers = scorers if scorers is not None else make_scorers(specs)
    N = len(completions)
    components = {}
    failures = {}
    failed = np.zeros(N, dtype=bool)
    total = np.zeros(N, dtype=np.float64)
    for spec, fn in zip(specs, scorers):
        name = spec.name
        while name in components:   # the same kind twice (e.g. two judges): keep both columns
            name += "_"
        values = np.full(N, np.nan)
        for i, (c, item, n) in enumerate(zip(completions, items, n_tokens)):
            try:
                v = float(fn(c, item, n))
                if not math.isfinite(v):
                    raise ValueError(f"reward is {v}")
                values[i] = v
            except Exception as e:   # a broken reward costs its sample's advantage, never the run
                failures[name] = failures.get(name, 0) + 1
                if failures[name] <= 3:
                    log.warning("reward %s failed on item %s: %s: %s", name, item.get("id"), type(e).__name__, e)
        bad = np.isnan(values)
        failed |= bad
        total += spec.weight * np.where(bad, 0.0, values)
        components[name] = values
    total[failed] = 0.0
    return Scores(total, components, failed, failures)
