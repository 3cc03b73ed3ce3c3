"""Evaluate checkpoints: bits per character on every corpus, C-Eval/CMMLU multiple choice, generation samples.

    python eval.py out/sft/medical/final                       # one checkpoint: report.json + report.md
    python eval.py out/pretrain/converge/final out/sft/medical/final   # comparison table
    python eval.py CKPT --shots 0,5 --ceval ../ceval-exam --cmmlu ../cmmlu [--split test|val]
    python eval.py CKPT --judge-url http://127.0.0.1:8000/v1     # add 0-10 scores from an OpenAI-compatible judge

Language modelling: loss and bits per character on the `val` split of every corpus in data/pretrain/, scored by
bpc.py (the scorer pretrain validation uses; characters of exactly the text tokens scored).
Multiple choice: C-Eval and CMMLU folders read by data_process/evalsets.py (the one parser, shared with
decontamination). The split scored is test when it has answers, else val (`--split`); shots come from exactly the
subject's own dev file. Each benchmark is prompted in its own published format (C-Eval's answer-only prompt,
CMMLU's 题目/答案是 prompt, subject names from their subject tables); chat checkpoints see the same text through
the chat template. A prompt longer than the model's context loses shots first, and only a zero-shot prompt is cut
(warned, counted). The answer is the option letter with the highest probability at the answer position, where
each letter's token ids are the ones it gets *in that context* (SentencePiece gives "A" alone and "A" after
Chinese text different ids), so nothing is generated and nothing is parsed. Scoring runs in fp32 by default.
report.json holds every question's prediction; report.md the answer-letter histogram, the majority-letter
baseline beside chance, judge means with scored/failed/unreadable counts, and per benchmark split whether the
checkpoint's training data was decontaminated against it (from the provenance in its meta.json).
"""
import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import bpc
from data_process import evalsets
from data_process.evalsets import Question
from fileio import atomic_write_text
from inference import Sampling
from settings import ConfigError, add_set_flag, apply_sets, build, limits, read_toml

LETTERS = "ABCD"
LN2 = math.log(2)

# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice data: C-Eval and CMMLU folders, read by data_process/evalsets.py (the one parser)


@dataclass
class Subject:
    name: str
    questions: list               # evalsets.Question with an answer, of the scored split
    shots: list                   # dev questions with an answer, exactly this subject's dev file
    file: str = ""
    shot_file: str = ""
    dropped: dict = field(default_factory=dict)        # scored split: reason -> rows dropped
    shot_dropped: dict = field(default_factory=dict)   # dev: reason -> rows dropped


@dataclass
class BenchmarkData:
    name: str                     # "ceval" | "cmmlu" (the label in the report)
    format: str                   # the layout, which also picks the prompt format
    root: str
    split: str                    # the split scored
    subjects: dict                # subject -> Subject

    @property
    def n_questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects.values())

    def dropped(self, shots: bool = False) -> dict:
        total = Counter()
        for s in self.subjects.values():
            total.update(s.shot_dropped if shots else s.dropped)
        return dict(total)


def load_benchmark(root, split: str = "auto", name: str = "") -> BenchmarkData:
    """A C-Eval folder (dev/ val/ test/) or a CMMLU folder (dev/ test/): the questions of one split with their
    dev shots. split "auto": test when it has answers (CMMLU, a C-Eval copy with answers), else val (the
    official C-Eval test has none). Shots come from exactly the subject's own dev file (evalsets.subject_file:
    `law` never borrows `law_and_ethics`); rows without an answer are dropped and counted, in both."""
    bench = evalsets.discover(root)
    if split == "auto":
        split = bench.scored_split
        if split is None:
            raise ValueError(f"{root}: neither test/ nor val/ has answered questions; nothing to score")
    elif split not in bench.splits:
        raise ValueError(f"{root}: no {split}/ split (it has {sorted(bench.splits)})")
    elif not bench.splits[split].has_answers:
        raise ValueError(f"{root}: the {split}/ split has no answers (C-Eval's official test is scored on its "
                         f"server); use --split val")
    subjects = {}
    for subject, path in bench.splits[split].files.items():
        result = evalsets.read_questions(path, bench.format, need_answer=True)
        shot_path = evalsets.subject_file(bench.root, "dev", subject, bench.format) if split != "dev" else None
        shots = evalsets.read_questions(shot_path, bench.format, need_answer=True) if shot_path else None
        subjects[subject] = Subject(subject, result.questions, shots.questions if shots else [], str(path),
                                    str(shot_path or ""), dict(result.dropped), dict(shots.dropped) if shots else {})
    return BenchmarkData(name or bench.format, bench.format, str(bench.root), split, subjects)


# ----------------------------------------------------------------------------------------------------------------
# Prompts (each benchmark's own published format) and in-context letter ids

PROMPT_FORMATS = {
    "ceval": "C-Eval answer-only (hkust-nlp/ceval): 以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。"
             " / {题干} A. .. D. .. 答案：",
    "cmmlu": "CMMLU (haonan-li/CMMLU src/mp_utils.py): 以下是关于{科目}的单项选择题，请直接给出正确答案的选项。"
             " / 题目：{题干} A. .. D. .. 答案是：",
}


def format_question(q: Question, fmt: str = "ceval") -> str:
    """One question up to its answer, as the benchmark's own evaluation code writes it."""
    options = "".join(f"\n{l}. {q.options[l]}" for l in LETTERS)
    if fmt == "cmmlu":
        return "题目：" + q.question + options + "\n答案是："
    return q.question + options + "\n答案："


def prompt_head(q: Question, fmt: str = "ceval") -> str:
    """The instruction, naming the subject in Chinese from the benchmark's published subject table."""
    zh = evalsets.subject_zh(fmt, q.subject)
    if fmt == "cmmlu":
        return f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n"


def base_prompt(q: Question, shots: list, fmt: str = "ceval") -> str:
    """Answer-only prompt: instruction, k solved examples, then the question up to the answer cue."""
    return prompt_head(q, fmt) + "".join(format_question(s, fmt) + s.answer + "\n\n" for s in shots) \
        + format_question(q, fmt)


def chat_messages(q: Question, shots: list, fmt: str = "ceval") -> list:
    """Chat models see the shots as earlier turns, each answered with the bare letter."""
    msgs = [{"role": "system", "content": prompt_head(q, fmt).strip() + "只输出正确选项的字母。"}]
    for s in shots:
        msgs += [{"role": "user", "content": format_question(s, fmt)}, {"role": "assistant", "content": s.answer}]
    return msgs + [{"role": "user", "content": format_question(q, fmt)}]


def letter_candidates(tokenizer, q: Question, shots: list, chat: bool, fmt: str = "ceval"):
    """Context ids and, per letter, the continuation ids that letter gets in that context.

    Each letter is encoded together with its prompt; the context is the longest prefix all four encodings share
    (so a piece shared by every letter, or a letter that merges with the prompt's last piece, is handled), and a
    letter's continuation is what follows, minus the end-of-turn tokens a chat template appends to every answer.
    Returns (context_ids, {letter: continuation_ids}).
    """
    if chat:
        msgs = chat_messages(q, shots, fmt)
        full = {l: tokenizer.render_chat(msgs + [{"role": "assistant", "content": l}]).ids for l in LETTERS}
    else:  # a base model saw every document start right after an end-of-text token
        text = base_prompt(q, shots, fmt)
        full = {l: [tokenizer.eos_id] + tokenizer.encode(text + l) for l in LETTERS}
    seqs = list(full.values())
    n = min(common_prefix_len(seqs[0], s) for s in seqs[1:])
    suffix = common_suffix_len([s[n:] for s in seqs]) if chat else 0
    cont = {l: ids[n: len(ids) - suffix] for l, ids in full.items()}
    return seqs[0][:n], cont


def fit_prompt(tokenizer, q: Question, shots: list, chat: bool, fmt: str, max_len: int):
    """letter_candidates for a prompt that fits the model's context: shots are dropped first (the longest
    first, as CMMLU's own code does), and only a zero-shot prompt that is still too long is cut from the left
    (its end, the options and the answer cue, is what the answer depends on).
    -> (context, {letter: continuation}, the shots kept (in their order), tokens cut)."""
    shots = list(shots)
    while True:
        ctx, cont = letter_candidates(tokenizer, q, shots, chat, fmt)
        room = max_len - max(len(c) for c in cont.values()) + 1   # the last scored token's input is ctx[-1] + ..
        if len(ctx) <= room:
            return ctx, cont, shots, 0
        if not shots:
            return ctx[len(ctx) - room:], cont, [], len(ctx) - room
        lengths = [len(format_question(s, fmt)) for s in shots]
        shots.pop(lengths.index(max(lengths)))


def common_prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def common_suffix_len(seqs) -> int:
    """Length of the suffix every sequence shares, leaving each at least one token."""
    k, shortest = 0, min(len(s) for s in seqs)
    while k < shortest - 1 and len({s[-1 - k] for s in seqs}) == 1:
        k += 1
    return k


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def expected_accuracy(letter_scores: list, answers: list) -> float:
    """Accuracy where a tie at the top splits the credit, so a scorer with no preference scores exactly chance."""
    credit = 0.0
    for scores, answer in zip(letter_scores, answers):
        best = max(scores.values())
        top = [l for l, s in scores.items() if s >= best - 1e-9]
        credit += (answer in top) / len(top)
    return credit / max(1, len(answers))


def hidden_states(model, input_ids, dtype):
    """Final-layer hidden states [B, T, C]; the vocabulary projection is applied only where it is needed
    (with a 65K vocabulary the full [B, T, V] logits would dominate time and memory)."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model.hidden_states(input_ids.to(device))


def head_logprobs(model, h, dtype):
    with torch.autocast(h.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model.lm_head(h)
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def option_logprobs(model, requests: list, dtype=torch.float32, batch_size=8) -> list:
    """For each (context, [continuation, ...]) request, log P(continuation | context) per continuation.

    When every continuation is a single token (the usual case for option letters) one forward pass of the
    context scores them all; otherwise each context + continuation is its own row. Rows are length-sorted
    and right-padded into batches.
    """
    rows = []  # (request index, option index or -1 for "all single tokens", token ids)
    for ri, (ctx, conts) in enumerate(requests):
        if all(len(c) == 1 for c in conts):
            rows.append((ri, -1, list(ctx)))
        else:
            rows += [(ri, oi, list(ctx) + list(c)) for oi, c in enumerate(conts)]
    out = [[0.0] * len(conts) for _, conts in requests]
    max_len = model.config.max_seq_len
    rows.sort(key=lambda r: len(r[2]))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        # keep each row's end: what is scored must stay inside the window
        seqs = [ids[-max_len:] if oi < 0 else ids[-(max_len + 1):-1] for _, oi, ids in batch]
        inp = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for j, q in enumerate(seqs):
            inp[j, : len(q)] = torch.tensor(q)
        h = hidden_states(model, inp, dtype)
        for j, (ri, oi, ids) in enumerate(batch):
            conts, n = requests[ri][1], len(seqs[j])
            if oi < 0:
                logp = head_logprobs(model, h[j, n - 1], dtype)
                out[ri] = [logp[c[0]].item() for c in conts]
            else:
                k = len(conts[oi])
                logp = head_logprobs(model, h[j, n - k: n], dtype)
                out[ri][oi] = logp[torch.arange(k), torch.tensor(conts[oi])].sum().item()
    return out


def run_mc(model, tokenizer, bench: BenchmarkData, shots: int, chat: bool, dtype, max_questions=0,
           batch_size=8) -> dict:
    """Per-subject and overall accuracy for one benchmark at one shot count, with every question's prediction,
    the answer-letter histograms (predicted and correct), the majority-letter baseline beside chance, and how
    many prompts had to be shortened to fit the context."""
    per_subject, all_scores, all_answers, predictions = {}, [], [], []
    fit = Counter()
    max_len = model.config.max_seq_len
    for subject, sub in bench.subjects.items():
        questions = sub.questions[:max_questions] if max_questions else sub.questions
        requests = []
        for q in questions:
            ctx, cand, kept_shots, cut = fit_prompt(tokenizer, q, sub.shots[:shots], chat, bench.format, max_len)
            kept = len(kept_shots)
            wanted = min(shots, len(sub.shots))
            fit["prompts"] += 1
            fit["over_context"] += kept < wanted or cut > 0
            fit["shots_dropped"] += wanted - kept
            fit["fewer_shots"] += kept < wanted
            fit["question_cut"] += cut > 0
            requests.append((ctx, [cand[letter] for letter in LETTERS]))
        logps = option_logprobs(model, requests, dtype, batch_size)
        scores = [dict(zip(LETTERS, lp)) for lp in logps]
        answers = [q.answer for q in questions]
        for q, sc in zip(questions, scores):
            pred = max(LETTERS, key=lambda l: sc[l])
            predictions.append({"subject": subject, "id": q.id, "answer": q.answer, "prediction": pred,
                                "correct": pred == q.answer, "logprobs": {l: round(v, 4) for l, v in sc.items()}})
        per_subject[subject] = {"accuracy": expected_accuracy(scores, answers), "n": len(questions),
                                "chance": 0.25, **letter_stats(answers, [max(LETTERS, key=lambda l: s[l])
                                                                         for s in scores])}
        all_scores += scores
        all_answers += answers
    overall = {"accuracy": expected_accuracy(all_scores, all_answers), "n": len(all_answers), "chance": 0.25,
               **letter_stats(all_answers, [p["prediction"] for p in predictions])}
    return {"overall": overall, "subjects": per_subject, "predictions": predictions, "split": bench.split,
            "format": bench.format, "prompt_format": PROMPT_FORMATS[bench.format], "shots": shots,
            "context": {"max_seq_len": max_len, **{k: fit[k] for k in ("prompts", "over_context", "fewer_shots",
                                                                        "shots_dropped", "question_cut")}}}


def letter_stats(answers: list, predicted: list) -> dict:
    """Histograms of the correct and the predicted letters, and the accuracy of always answering the most
    common correct letter (a model that answers one letter to everything scores about this, not 25%)."""
    gold = Counter(answers)
    pred = Counter(predicted)
    majority, count = max(((l, gold[l]) for l in LETTERS), key=lambda x: x[1]) if answers else ("A", 0)
    return {"answer_letters": {l: gold[l] for l in LETTERS}, "predicted_letters": {l: pred[l] for l in LETTERS},
            "majority_letter": majority, "majority_baseline": count / max(1, len(answers))}


# ----------------------------------------------------------------------------------------------------------------
# Language modelling: loss and bits per character on val splits


def run_lm(model, tokenizer, data_dir: Path, dtype, max_tokens=0, batch_size=4) -> dict:
    """Loss and bits per character on every corpus's val split under data_dir/pretrain/, scored by bpc.py (the
    scorer pretrain validation uses): characters are counted on exactly the text tokens scored, so a prefix cut
    by max_tokens (per corpus) counts its own characters, and chat-template tokens are not charged to them."""
    from data_process.shards import IndexedDataset
    from data_process.tokenize_docs import ManifestError, check_manifest
    results = {}
    seq_len = model.config.max_seq_len
    for manifest_path in sorted(Path(data_dir, "pretrain").glob("*/manifest.json")):
        corpus = manifest_path.parent.name
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("tokenizer_sha256") != tokenizer.sha256:
            results[corpus] = {"error": "shards were made with another tokenizer "
                                        f"({manifest.get('tokenizer_sha256', '?')[:12]}…): re-tokenize or skip"}
            continue
        try:   # finished, every shard there with the sizes, counts and sample digest its manifest recorded
            manifest = check_manifest(manifest_path.parent, tokenizer.sha256)
        except ManifestError as e:
            results[corpus] = {"error": str(e)}
            continue
        val = manifest.get("splits", {}).get("val", {})
        if not val.get("tokens"):
            continue
        score, budget = bpc.Score(), max_tokens
        for shard in val["shards"]:  # memmapped, one shard at a time: nothing is copied into RAM whole
            if max_tokens and budget <= 0:
                break
            tokens = IndexedDataset(manifest_path.parent / shard).tokens
            part = bpc.score_windows(model, tokenizer, bpc.contiguous_windows(tokens, seq_len, budget), batch_size,
                                     dtype)
            score, budget = score.add(part), budget - part.tokens
        results[corpus] = score.as_dict()
    return results


# ----------------------------------------------------------------------------------------------------------------
# Generation samples and optional judging

BASE_PROMPTS = ["高血压是一种常见的慢性病，", "糖尿病患者在饮食上应该", "感冒和流行性感冒的区别在于",
                "阿司匹林的主要作用是", "北京是中国的首都，"]
CHAT_PROMPTS = ["高血压患者日常生活中要注意什么？", "孩子发烧到三十九度该怎么办？", "什么是二型糖尿病？",
                "请简单介绍一下长城。", "失眠有哪些改善方法？"]


def run_generation(model, tokenizer, chat: bool, sampling: Sampling, prompts=None) -> list:
    prompts = prompts or (CHAT_PROMPTS if chat else BASE_PROMPTS)
    samples = []
    for i, prompt in enumerate(prompts):
        if chat:
            ids = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True).ids
        else:
            ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # as in pretraining: a document follows eos
        gen = torch.Generator().manual_seed(sampling.seed + i)  # each prompt its own seed: order-independent
        out = list(sampling.generate(model, ids, tokenizer.stop_ids(), generator=gen))
        samples.append({"prompt": prompt, "output": tokenizer.decode(out), "tokens": len(out)})
    return samples


JUDGE_RUBRIC = (
    "你是一名严格的评审。请为下面这段由小型语言模型生成的回答打分，两个维度各 0-10 分的整数：\n"
    "language：语言是否通顺、连贯、没有重复和乱码；knowledge：内容是否正确、有用、切题（医学问题尤其看是否准确安全）。\n"
    "只输出一个 JSON 对象，例如 {\"language\": 6, \"knowledge\": 4}。\n\n【问题或开头】\n%s\n\n【模型的回答】\n%s")


def parse_scores(text: str):
    """Pull {"language": int, "knowledge": int} out of a judge reply; None when it cannot be read."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
        scores = {k: float(obj[k]) for k in ("language", "knowledge")}
    except (ValueError, KeyError, TypeError):
        return None
    return scores if all(0 <= v <= 10 for v in scores.values()) else None


def judge_samples(samples: list, url: str, model_name: str, api_key: str, timeout: float = 60.0) -> dict:
    """Score each sample with an OpenAI-compatible judge. A call that fails (HTTP error, timeout) and a reply
    that cannot be read are counted apart, never fatal: every mean is reported beside scored/failed/unreadable."""
    from openai import OpenAI
    client = OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=1)
    failed = unreadable = 0
    if not model_name:
        try:
            model_name = client.models.list().data[0].id
        except Exception as e:   # no model list: every sample fails the same way, and says so
            for s in samples:
                s["judge_reply"], s["scores"], s["judge_error"] = f"error: {e}", None, True
            return {"url": url, "model": None, "mean": None, "n": len(samples), "scored": 0,
                    "failed": len(samples), "unreadable": 0}
    for s in samples:
        try:
            reply = client.chat.completions.create(
                model=model_name, temperature=0, max_tokens=64,
                messages=[{"role": "user", "content": JUDGE_RUBRIC % (s["prompt"], s["output"])}])
            s["judge_reply"] = reply.choices[0].message.content or ""
            s["scores"] = parse_scores(s["judge_reply"])
            unreadable += s["scores"] is None
        except Exception as e:  # a judge that is down or rude costs its scores, not the report
            s["judge_reply"], s["scores"], s["judge_error"] = f"error: {e}", None, True
            failed += 1
    scored = [s["scores"] for s in samples if s["scores"]]
    mean = {k: sum(x[k] for x in scored) / len(scored) for k in ("language", "knowledge")} if scored else None
    return {"url": url, "model": model_name, "mean": mean, "n": len(samples), "scored": len(scored),
            "failed": failed, "unreadable": unreadable}


def judge_counts(judge: dict) -> str:
    return (f"scored {judge['scored']} of {judge['n']}, failed {judge['failed']}, "
            f"unreadable {judge['unreadable']}")


# ----------------------------------------------------------------------------------------------------------------
# Contamination: was this checkpoint's training data decontaminated against what is scored?


def contamination(meta: dict, bench: BenchmarkData) -> dict:
    """Per training job in the checkpoint's provenance: how many of the scored split's files were in that job's
    decontamination eval sets (matched by sha256, so a moved folder still counts) and how many training
    documents the dedup report says were removed against those sets. status: "checked" (every job, every
    file), "partial", or "not checked" (no provenance, no dedup report, or files that were not in the sets)."""
    from fileio import file_sha256
    files = {file_sha256(s.file): s.file for s in bench.subjects.values()}
    jobs = []
    for rec in meta.get("provenance", []):
        eval_files = rec.get("eval_files") or {}
        sets = [name for name, shas in eval_files.items() if set(files) & set(shas)]
        matched = len({h for name in sets for h in eval_files[name] if h in files})
        report = rec.get("dedup_report")
        removed = sum(report["eval_sets"].get(n, {}).get("removed", 0) for n in sets) if report else None
        jobs.append({"job": rec.get("job"), "data": rec.get("data"), "files_in_eval_sets": matched,
                     "eval_sets": sets, "removed": removed, "dedup_report": bool(report),
                     "checked": bool(report) and matched == len(files) and rec.get("recipe_matches_report", True)})
    status = "not checked" if not jobs or not any(j["checked"] for j in jobs) else \
        "checked" if all(j["checked"] for j in jobs) else "partial"
    return {"status": status, "files": len(files), "jobs": jobs}


def contamination_line(name: str, split: str, c: dict) -> str:
    head = f"{name} {split}: "
    if not c["jobs"]:
        return head + "NOT checked for contamination: the checkpoint records no data provenance"
    groups: dict[str, list[str]] = {}   # what was found -> the jobs it holds for, in training order
    for j in c["jobs"]:
        if not j["dedup_report"]:
            what = f"no dedup report for {j['data']}"
        else:
            sets = ", ".join(repr(s) for s in j["eval_sets"]) or "none"
            what = (f"{j['files_in_eval_sets']}/{c['files']} files in decontamination eval set(s) {sets}, "
                    f"{j['removed']} training docs removed against them (all their splits)")
        groups.setdefault(what, []).append(str(j["job"]))
    verdict = {"checked": "decontaminated", "partial": "only PARTLY checked for contamination",
               "not checked": "NOT checked for contamination"}[c["status"]]
    return head + verdict + " — " + "; ".join(f"{', '.join(jobs)}: {what}" for what, jobs in groups.items())


# ----------------------------------------------------------------------------------------------------------------
# Reports


def evaluate(ckpt_dir: Path, cfg: "EvalConfig") -> dict:
    from checkpoint import load_checkpoint
    model, tokenizer, meta = load_checkpoint(ckpt_dir)
    model.eval()
    torch.manual_seed(0)
    chat = bool(meta.get("chat")) if cfg.template == "auto" else cfg.template == "chat"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    report = {"checkpoint": str(ckpt_dir), "kind": meta.get("kind"), "chat": chat, "dtype": cfg.dtype,
              "device": "cpu", "params": model.num_params(), "tokenizer_sha256": tokenizer.sha256}
    t0 = time.perf_counter()
    if not cfg.no_lm:
        report["lm"] = run_lm(model, tokenizer, Path(cfg.data_dir), dtype, cfg.max_val_tokens)
    if not cfg.no_mc:
        report["mc"], report["benchmarks"] = {}, {}
        for name, root in [("ceval", p) for p in cfg.ceval] + [("cmmlu", p) for p in cfg.cmmlu]:
            bench = load_benchmark(Path(root), cfg.split, name)
            dropped, shot_dropped = bench.dropped(), bench.dropped(shots=True)
            cont = contamination(meta, bench)
            report["benchmarks"][name] = {"root": bench.root, "split": bench.split, "format": bench.format,
                                          "prompt_format": PROMPT_FORMATS[bench.format],
                                          "subjects": len(bench.subjects), "questions": bench.n_questions,
                                          "dropped": dropped, "shot_dropped": shot_dropped,
                                          "shots_available": {s: len(v.shots) for s, v in bench.subjects.items()},
                                          "contamination": cont}
            print(f"{name}: {bench.root}: scoring split {bench.split}/ ({len(bench.subjects)} subjects, "
                  f"{bench.n_questions} questions; dropped {dropped or 'none'}), shots from dev/ (dropped "
                  f"{shot_dropped or 'none'}), {bench.format} prompt format, {cfg.dtype}")
            print(("" if cont["status"] == "checked" else "warning: ") + contamination_line(name, bench.split, cont),
                  file=sys.stdout if cont["status"] == "checked" else sys.stderr)
            for k in cfg.shots:
                t = time.perf_counter()
                r = run_mc(model, tokenizer, bench, k, chat, dtype, cfg.max_questions)
                r["questions_per_s"] = r["overall"]["n"] / max(1e-9, time.perf_counter() - t)
                fit = r["context"]
                if fit["over_context"]:
                    print(f"warning: {name} {k}-shot: {fit['over_context']} of {fit['prompts']} prompts are longer "
                          f"than the model's context ({fit['max_seq_len']} tokens): {fit['fewer_shots']} scored with "
                          f"fewer shots ({fit['shots_dropped']} shots dropped), {fit['question_cut']} zero-shot "
                          f"prompts cut from the left", file=sys.stderr)
                report["mc"][f"{name} {k}-shot"] = r
    if not cfg.no_gen:
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        report["generation"] = {"sampling": asdict(sampling),
                                "samples": run_generation(model, tokenizer, chat, sampling)}
        if cfg.judge_url:
            judge = judge_samples(report["generation"]["samples"], cfg.judge_url, cfg.judge_model, cfg.judge_key)
            report["generation"]["judge"] = judge
            print(("warning: " if judge["scored"] < judge["n"] else "") + f"judge {cfg.judge_url}: "
                  + judge_counts(judge), file=sys.stderr if judge["scored"] < judge["n"] else sys.stdout)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def table_rows(reports: list) -> list:
    """(section, metric, [value per checkpoint]) rows shared by the one- and many-checkpoint tables; a value is
    a number or a string (shown as it is)."""
    rows = []
    corpora = sorted({c for r in reports for c in r.get("lm", {})})
    for c in corpora:
        for key, label in (("bits_per_char", "bits/char"), ("loss", "loss")):
            rows.append(("val " + c, label, [r.get("lm", {}).get(c, {}).get(key) for r in reports]))
    benches = [b for b in dict.fromkeys(b for r in reports for b in r.get("mc", {}))]
    for b in benches:
        subjects = sorted({s for r in reports for s in r.get("mc", {}).get(b, {}).get("subjects", {})})
        for s in subjects + ["overall"]:
            cells = []
            for r in reports:
                res = r.get("mc", {}).get(b, {})
                cell = res.get("overall") if s == "overall" else res.get("subjects", {}).get(s)
                cells.append(cell)
            first = next((c for c in cells if c), None)
            n = first["n"] if first else 0
            base = f", majority letter {first['majority_letter']} {first['majority_baseline']:.1%}" if first else ""
            rows.append((b, f"{s} (n={n}, chance 25%{base})", [c["accuracy"] * 100 if c else None for c in cells]))
        rows.append((b, "predicted letters A/B/C/D", [
            "/".join(str(v) for v in r["mc"][b]["overall"]["predicted_letters"].values()) if b in r.get("mc", {})
            else None for r in reports]))
    for r_i, r in enumerate(reports):
        judge = r.get("generation", {}).get("judge")
        if judge:
            for k in ("language", "knowledge"):
                cells = [None] * len(reports)
                mean = judge["mean"][k] if judge.get("mean") else None
                cells[r_i] = (f"{mean:.2f}" if mean is not None else "—") + f" ({judge_counts(judge)})"
                rows.append(("judge", k + " (0-10)", cells))
    return rows


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def to_markdown(reports: list) -> str:
    names = [Path(r["checkpoint"]).as_posix() for r in reports]
    lines = []
    for r in reports:
        lines.append(f"- {r['checkpoint']}: scored in {r['dtype']} on {r.get('device', 'cpu')}, "
                     f"{'chat template' if r['chat'] else 'base prompt'}")
        for name, b in r.get("benchmarks", {}).items():
            lines.append(f"  - {name}: split {b['split']}/ of {b['root']} ({b['subjects']} subjects, {b['questions']} "
                         f"questions; dropped {b['dropped'] or 'none'}; shots dropped {b['shot_dropped'] or 'none'}); "
                         f"prompt: {b['prompt_format']}")
            lines.append(f"  - {contamination_line(name, b['split'], b['contamination'])}")
        for key, res in r.get("mc", {}).items():
            fit = res["context"]
            if fit["over_context"]:
                lines.append(f"  - {key}: {fit['over_context']} of {fit['prompts']} prompts over the context "
                             f"({fit['max_seq_len']}): {fit['shots_dropped']} shots dropped, {fit['question_cut']} "
                             f"questions cut")
    lines += ["", "| section | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for section, metric, cells in table_rows(reports):
        lines.append(f"| {section} | {metric} | " + " | ".join(_cell(v) for v in cells) + " |")
    for r in reports:
        errors = {c: v["error"] for c, v in r.get("lm", {}).items() if "error" in v}
        for c, e in errors.items():
            lines.append(f"\n{r['checkpoint']}: val {c}: {e}")
        gen = r.get("generation")
        if gen:
            lines.append(f"\n### Samples from {r['checkpoint']} ({'chat' if r['chat'] else 'continuation'}; "
                         f"sampling {json.dumps(gen['sampling'])})\n")
            for s in gen["samples"]:
                score = f" — judge {s['scores']}" if s.get("scores") else " — judge failed" \
                    if s.get("judge_error") else " — judge reply unreadable" if "scores" in s else ""
                lines.append(f"- **{s['prompt']}** → {s['output'].strip()}{score}")
    return "\n".join(lines) + "\n"


@dataclass
class EvalConfig:
    """Every eval setting, with its default (the one place): a `--config` TOML file (keys at the top level or in
    an [eval] table), then `--set key=value`, then the command-line shortcuts below."""
    data_dir: str = "data"                  # where data/pretrain/<corpus>/ val shards are
    ceval: list[str] = field(default_factory=lambda: ["corpora/eval/ceval"])   # folders with dev/ val/ [test/]
    cmmlu: list[str] = field(default_factory=lambda: ["corpora/eval/cmmlu"])   # folders with dev/ and test/
    split: str = field(default="auto", metadata=limits(choices=("auto", "test", "val")))
    shots: list[int] = field(default_factory=lambda: [0, 5], metadata=limits(ge=0))
    template: str = field(default="auto", metadata=limits(choices=("auto", "base", "chat")))
    max_questions: int = field(default=0, metadata=limits(ge=0))     # per subject, 0 = all
    max_val_tokens: int = field(default=0, metadata=limits(ge=0))    # per corpus, 0 = the whole val split
    dtype: str = field(default="fp32", metadata=limits(choices=("fp32", "bf16")))
    max_new_tokens: int = field(default=96, metadata=limits(gt=0))
    seed: int = 1234
    lm: bool = True                         # bits per character
    mc: bool = True                         # C-Eval/CMMLU multiple choice
    gen: bool = True                        # generation samples
    judge_url: str = ""
    judge_model: str = ""
    judge_key: str = ""
    out: str = "out/eval"

    # the names evaluate() reads
    @property
    def no_lm(self) -> bool:
        return not self.lm

    @property
    def no_mc(self) -> bool:
        return not self.mc

    @property
    def no_gen(self) -> bool:
        return not self.gen


def parse_args(argv) -> tuple[list[Path], EvalConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint dirs (two or more: a comparison table)")
    p.add_argument("--config", type=Path, default=None,
                   help="a TOML file of eval settings (EvalConfig's keys, at the top level or in [eval])")
    add_set_flag(p, example="shots=[0,5]")
    g = p.add_argument_group("shortcuts for --set <key>=...")
    g.add_argument("--data-dir", help="where data/pretrain/<corpus>/ val shards are (default data)")
    g.add_argument("--ceval", action="append", default=None,
                   help="C-Eval folder with dev/ val/ [test/] (repeatable; default corpora/eval/ceval)")
    g.add_argument("--cmmlu", action="append", default=None,
                   help="CMMLU folder with dev/ and test/ (repeatable; default corpora/eval/cmmlu)")
    g.add_argument("--split", help="split to score: auto (default) = test when it has answers, else val (C-Eval's "
                                   "official test has none); test; val")
    g.add_argument("--shots", help="comma-separated shot counts, examples from dev/ (default 0,5)")
    g.add_argument("--template", help="prompt format: auto (default) = chat template for SFT/DPO checkpoints, C-Eval "
                                      "prompt for base ones; base; chat")
    g.add_argument("--max-questions", type=int, help="per subject, 0 = all (default)")
    g.add_argument("--max-val-tokens", type=int, help="per corpus, 0 = the whole val split (default)")
    g.add_argument("--dtype", help="fp32 (default: bf16 flips a few close choices; one pass per question is cheap on "
                                   "a CPU) or bf16; the report states it")
    g.add_argument("--max-new-tokens", type=int, help="generation samples (default 96)")
    g.add_argument("--seed", type=int, help="generation seed (default 1234)")
    g.add_argument("--no-lm", action="store_true", help="skip bits per character")
    g.add_argument("--no-mc", action="store_true", help="skip C-Eval/CMMLU")
    g.add_argument("--no-gen", action="store_true", help="skip generation samples")
    g.add_argument("--judge-url", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    g.add_argument("--judge-model", help="judge model name (default: the endpoint's first model)")
    g.add_argument("--judge-key", help="API key for the judge endpoint")
    g.add_argument("--out", help="where report.json/report.md go (default out/eval)")
    args = p.parse_args(argv)
    table, where = {}, "eval"
    if args.config is not None:
        table, where = read_toml(args.config), str(args.config)
        if set(table) == {"eval"}:
            table = table["eval"]
    table = apply_sets(table, args.sets, f"{where}: --set")
    shortcuts = {"data_dir": args.data_dir, "ceval": args.ceval, "cmmlu": args.cmmlu, "split": args.split,
                 "template": args.template, "max_questions": args.max_questions,
                 "max_val_tokens": args.max_val_tokens, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                 "seed": args.seed, "judge_url": args.judge_url, "judge_model": args.judge_model,
                 "judge_key": args.judge_key, "out": args.out,
                 "lm": False if args.no_lm else None, "mc": False if args.no_mc else None,
                 "gen": False if args.no_gen else None}
    if args.shots is not None:
        try:
            shortcuts["shots"] = [int(s) for s in args.shots.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--shots: expected comma-separated integers, got {args.shots!r}") from None
    table.update({k: v for k, v in shortcuts.items() if v is not None})
    return args.checkpoints, build(EvalConfig, table, where)


def main(argv=None) -> int:
    try:
        checkpoints, cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = [str(c) for c in checkpoints if not (c / "config.json").is_file()]
    if missing:
        print(f"error: not a checkpoint dir (no config.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    reports = [evaluate(c, cfg) for c in checkpoints]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "report" if len(reports) == 1 else "compare"
    atomic_write_text(out / f"{stem}.json", json.dumps(reports if len(reports) > 1 else reports[0], indent=2,
                                                       ensure_ascii=False))
    md = to_markdown(reports)
    atomic_write_text(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
