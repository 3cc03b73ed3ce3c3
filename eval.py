"""Evaluate checkpoints: bits per character on every corpus, C-Eval/CMMLU multiple choice, generation samples.

    python eval.py out/sft/medical/final                       # one checkpoint: report.json + report.md
    python eval.py out/pretrain/converge/final out/sft/medical/final   # comparison table
    python eval.py CKPT --shots 0,5 --ceval ../ceval-exam --cmmlu ../cmmlu
    python eval.py CKPT --judge-url http://127.0.0.1:8000/v1     # add 0-10 scores from an OpenAI-compatible judge

Language modelling: loss and bits per character on the `val` split of every corpus in data/pretrain/ (bits per
character = summed token NLL / ln 2 / characters of the text, so models with different tokenizers compare).
Multiple choice: C-Eval (`id,question,A,B,C,D,answer[,explanation]`, CRLF) and CMMLU (`,Question,A,B,C,D,Answer`)
subject CSVs, zero- and k-shot (shots from the `dev` split), base models with the C-Eval prompt and chat models
through the chat template. The answer is the option letter with the highest probability at the answer position,
where each letter's token ids are the ones it gets *in that context* (SentencePiece gives "A" alone and "A" after
Chinese text different ids), so nothing is generated and nothing is parsed.
"""
import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference import Sampling

LETTERS = "ABCD"
LN2 = math.log(2)

# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice data: C-Eval and CMMLU subject CSVs


@dataclass
class Question:
    subject: str
    question: str
    options: list  # four strings, A..D
    answer: str    # "A".."D"
    id: str = ""


def read_mc_csv(path: Path) -> list:
    """Read one C-Eval or CMMLU subject CSV (the layout is told by its header) into Questions."""
    subject = subject_name(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    try:
        q_col, a_col = lower.index("question"), lower.index("answer")
        opt_cols = [header.index(letter) for letter in LETTERS]
    except ValueError:
        raise ValueError(f"{path}: not a C-Eval (id,question,A,B,C,D,answer) or CMMLU (,Question,A,B,C,D,Answer) "
                         f"header: {header}") from None
    questions = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header) - (1 if lower[-1] == "explanation" else 0):
            raise ValueError(f"{path}:{line_no}: {len(row)} fields, expected {len(header)}")
        answer = row[a_col].strip().upper() if a_col < len(row) else ""
        if answer and answer not in LETTERS:
            raise ValueError(f"{path}:{line_no}: answer {answer!r} is not one of A-D")
        questions.append(Question(subject, row[q_col], [row[c] for c in opt_cols], answer, row[0]))
    return questions


def subject_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("_dev", "_val", "_test"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_benchmark(root: Path) -> dict:
    """{subject: (questions, dev_shots)} from a C-Eval folder (dev/ val/ [test/]) or a CMMLU folder (dev/ test/).

    C-Eval's public test split has no answers, so its questions come from val/; CMMLU's from test/.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {root}")
    split = next((s for s in ("val", "test") if (root / s).is_dir() and any((root / s).glob("*.csv"))), None)
    if split is None:
        raise FileNotFoundError(f"{root}: no val/ or test/ folder with subject CSVs")
    subjects = {}
    for path in sorted((root / split).glob("*.csv")):
        questions = [q for q in read_mc_csv(path) if q.answer]
        dev_path = next(iter(sorted((root / "dev").glob(f"{subject_name(path)}*.csv"))), None) \
            if (root / "dev").is_dir() else None
        shots = read_mc_csv(dev_path) if dev_path else []
        subjects[subject_name(path)] = (questions, shots)
    return subjects


# ----------------------------------------------------------------------------------------------------------------
# Prompts and in-context letter ids

SUBJECT_ZH = {  # C-Eval's own prompt names the subject in Chinese; unknown subjects fall back to the file name
    "basic_medicine": "基础医学", "clinical_medicine": "临床医学", "physician": "医师资格",
    "veterinary_medicine": "兽医学", "anatomy": "解剖学", "clinical_knowledge": "临床知识",
    "college_medicine": "大学医学", "college_medical_statistics": "大学医学统计", "genetics": "遗传学",
    "nutrition": "营养学", "professional_medicine": "专业医学", "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
}


def format_question(q: Question) -> str:
    return q.question.strip() + "\n" + "\n".join(f"{l}. {o.strip()}" for l, o in zip(LETTERS, q.options)) + "\n答案："


def base_prompt(q: Question, shots: list) -> str:
    """The C-Eval paper's answer-only prompt: instruction, k solved examples, then the question up to 答案："""
    head = f"以下是中国关于{SUBJECT_ZH.get(q.subject, q.subject)}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(format_question(s) + s.answer + "\n\n" for s in shots) + format_question(q)


def chat_messages(q: Question, shots: list) -> list:
    """Chat models see the shots as earlier turns, each answered with the bare letter."""
    msgs = [{"role": "system", "content": "请回答单项选择题，只输出正确选项的字母。"}]
    for s in shots:
        msgs += [{"role": "user", "content": format_question(s)}, {"role": "assistant", "content": s.answer}]
    return msgs + [{"role": "user", "content": format_question(q)}]


def letter_candidates(tokenizer, q: Question, shots: list, chat: bool):
    """Context ids and, per letter, the continuation ids that letter gets in that context.

    Each letter is encoded together with its prompt; the context is the longest prefix all four encodings share
    (so a piece shared by every letter, or a letter that merges with the prompt's last piece, is handled), and a
    letter's continuation is what follows, minus the end-of-turn tokens a chat template appends to every answer.
    Returns (context_ids, {letter: continuation_ids}).
    """
    if chat:
        msgs = chat_messages(q, shots)
        full = {l: tokenizer.render_chat(msgs + [{"role": "assistant", "content": l}]).ids for l in LETTERS}
    else:  # a base model saw every document start right after an end-of-text token
        text = base_prompt(q, shots)
        full = {l: [tokenizer.eos_id] + tokenizer.encode(text + l) for l in LETTERS}
    seqs = list(full.values())
    n = min(common_prefix_len(seqs[0], s) for s in seqs[1:])
    suffix = common_suffix_len([s[n:] for s in seqs]) if chat else 0
    cont = {l: ids[n: len(ids) - suffix] for l, ids in full.items()}
    return seqs[0][:n], cont


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


def run_mc(model, tokenizer, subjects: dict, shots: int, chat: bool, dtype, max_questions=0, batch_size=8) -> dict:
    """Per-subject and overall accuracy for one benchmark at one shot count."""
    per_subject, all_scores, all_answers = {}, [], []
    for subject, (questions, dev) in subjects.items():
        if max_questions:
            questions = questions[:max_questions]
        requests = []
        for q in questions:
            ctx, cand = letter_candidates(tokenizer, q, dev[:shots], chat)
            requests.append((ctx, [cand[letter] for letter in LETTERS]))
        logps = option_logprobs(model, requests, dtype, batch_size)
        scores = [dict(zip(LETTERS, lp)) for lp in logps]
        answers = [q.answer for q in questions]
        per_subject[subject] = {"accuracy": expected_accuracy(scores, answers), "n": len(questions),
                                "chance": 0.25}
        all_scores += scores
        all_answers += answers
    overall = {"accuracy": expected_accuracy(all_scores, all_answers), "n": len(all_answers), "chance": 0.25}
    return {"overall": overall, "subjects": per_subject}


# ----------------------------------------------------------------------------------------------------------------
# Language modelling: loss and bits per character on val splits


@torch.no_grad()
def sequence_nll(model, tokens: np.ndarray, seq_len: int, dtype=torch.float32, batch_size=4) -> tuple:
    """Summed NLL (nats) of tokens[1:] given what precedes them, in windows of seq_len predictions.

    Consecutive windows overlap by one token, so every token but the first is predicted exactly once.
    Returns (total_nats, predicted_tokens).
    """
    n = len(tokens)
    starts = list(range(0, max(n - 1, 0), seq_len))
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = [tokens[s: s + seq_len + 1].astype(np.int64) for s in starts[b: b + batch_size]]
        T = max(len(c) for c in chunk) - 1
        inp = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, c in enumerate(chunk):
            inp[j, : len(c) - 1] = torch.from_numpy(c[:-1])
            tgt[j, : len(c) - 1] = torch.from_numpy(c[1:])
        h = hidden_states(model, inp, dtype)
        for j in range(len(chunk)):  # one row at a time: never the whole [B, T, V] logits at once
            logp = head_logprobs(model, h[j], dtype)
            total -= logp[torch.arange(len(chunk[j]) - 1), tgt[j, : len(chunk[j]) - 1]].sum().item()
            count += len(chunk[j]) - 1
    return total, count


def run_lm(model, tokenizer_sha256: str, data_dir: Path, dtype, max_tokens=0, batch_size=4) -> dict:
    """Loss and bits per character on every corpus's val split under data_dir/pretrain/."""
    from data_process.shards import IndexedDataset
    results = {}
    for manifest_path in sorted(Path(data_dir, "pretrain").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        corpus = manifest_path.parent.name
        if manifest.get("tokenizer_sha256") != tokenizer_sha256:
            results[corpus] = {"error": "shards were made with another tokenizer "
                                        f"({manifest.get('tokenizer_sha256', '?')[:12]}…): re-tokenize or skip"}
            continue
        val = manifest.get("splits", {}).get("val", {})
        if not val.get("tokens"):
            continue
        nats = predicted = total_tokens = 0
        budget = max_tokens or float("inf")
        for shard in val["shards"]:  # memmapped, one shard at a time: nothing is copied into RAM whole
            tokens = IndexedDataset(manifest_path.parent / shard).tokens
            total_tokens += len(tokens)
            if budget <= 0:
                continue
            used = tokens[: int(min(len(tokens), budget + 1))]
            n, p = sequence_nll(model, used, model.config.max_seq_len, dtype, batch_size)
            nats, predicted, budget = nats + n, predicted + p, budget - p
        # characters of the evaluated tokens: the split's characters in proportion to the tokens scored
        chars = val["chars"] * predicted / max(1, total_tokens - len(val["shards"]))
        results[corpus] = {"loss": nats / max(1, predicted), "bits_per_char": nats / LN2 / max(chars, 1e-9),
                           "tokens": predicted, "chars": round(chars)}
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
    """Score each sample with an OpenAI-compatible judge; unreadable replies are counted, not fatal."""
    from openai import OpenAI
    client = OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=1)
    if not model_name:
        model_name = client.models.list().data[0].id
    failures = 0
    for s in samples:
        try:
            reply = client.chat.completions.create(
                model=model_name, temperature=0, max_tokens=64,
                messages=[{"role": "user", "content": JUDGE_RUBRIC % (s["prompt"], s["output"])}])
            s["judge_reply"] = reply.choices[0].message.content or ""
            s["scores"] = parse_scores(s["judge_reply"])
        except Exception as e:  # a judge that is down or rude costs its scores, not the report
            s["judge_reply"], s["scores"] = f"error: {e}", None
        failures += s["scores"] is None
    scored = [s["scores"] for s in samples if s["scores"]]
    mean = {k: sum(x[k] for x in scored) / len(scored) for k in ("language", "knowledge")} if scored else None
    return {"url": url, "model": model_name, "mean": mean, "scored": len(scored), "unreadable": failures}


# ----------------------------------------------------------------------------------------------------------------
# Reports


def evaluate(ckpt_dir: Path, args) -> dict:
    from checkpoint import load_checkpoint
    model, tokenizer, meta = load_checkpoint(ckpt_dir)
    model.eval()
    torch.manual_seed(0)
    chat = bool(meta.get("chat")) if args.template == "auto" else args.template == "chat"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    report = {"checkpoint": str(ckpt_dir), "kind": meta.get("kind"), "chat": chat, "dtype": args.dtype,
              "params": model.num_params(), "tokenizer_sha256": tokenizer.sha256}
    t0 = time.perf_counter()
    if not args.no_lm:
        report["lm"] = run_lm(model, tokenizer.sha256, args.data_dir, dtype, args.max_val_tokens)
    if not args.no_mc:
        report["mc"] = {}
        for name, root in [("ceval", p) for p in args.ceval] + [("cmmlu", p) for p in args.cmmlu]:
            subjects = load_benchmark(Path(root))
            for k in args.shots:
                t = time.perf_counter()
                r = run_mc(model, tokenizer, subjects, k, chat, dtype, args.max_questions)
                r["questions_per_s"] = r["overall"]["n"] / max(1e-9, time.perf_counter() - t)
                report["mc"][f"{name} {k}-shot"] = r
    if not args.no_gen:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, seed=args.seed)
        report["generation"] = {"sampling": asdict(sampling),
                                "samples": run_generation(model, tokenizer, chat, sampling)}
        if args.judge_url:
            report["generation"]["judge"] = judge_samples(report["generation"]["samples"], args.judge_url,
                                                          args.judge_model, args.judge_key)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def table_rows(reports: list) -> list:
    """(section, metric, [value per checkpoint]) rows shared by the one- and many-checkpoint tables."""
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
            n = next((c["n"] for c in cells if c), 0)
            rows.append((b, f"{s} (n={n}, chance 25%)", [c["accuracy"] * 100 if c else None for c in cells]))
    for r_i, r in enumerate(reports):
        judge = r.get("generation", {}).get("judge")
        if judge and judge.get("mean"):
            for k in ("language", "knowledge"):
                cells = [None] * len(reports)
                cells[r_i] = judge["mean"][k]
                rows.append(("judge", k + " (0-10)", cells))
    return rows


def to_markdown(reports: list) -> str:
    names = [Path(r["checkpoint"]).as_posix() for r in reports]
    lines = ["| section | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for section, metric, cells in table_rows(reports):
        lines.append(f"| {section} | {metric} | " + " | ".join("—" if v is None else f"{v:.3f}" if v < 100
                                                            else f"{v:.1f}" for v in cells) + " |")
    for r in reports:
        errors = {c: v["error"] for c, v in r.get("lm", {}).items() if "error" in v}
        for c, e in errors.items():
            lines.append(f"\n{r['checkpoint']}: val {c}: {e}")
        gen = r.get("generation")
        if gen:
            lines.append(f"\n### Samples from {r['checkpoint']} ({'chat' if r['chat'] else 'continuation'}; "
                         f"sampling {json.dumps(gen['sampling'])})\n")
            for s in gen["samples"]:
                score = f" — judge {s['scores']}" if s.get("scores") else ""
                lines.append(f"- **{s['prompt']}** → {s['output'].strip()}{score}")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint dirs (two or more: a comparison table)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where data/pretrain/<corpus>/ val shards are")
    p.add_argument("--ceval", action="append", default=None,
                   help="C-Eval folder with dev/ and val/ (repeatable; default corpora/eval/ceval)")
    p.add_argument("--cmmlu", action="append", default=None,
                   help="CMMLU folder with dev/ and test/ (repeatable; default corpora/eval/cmmlu)")
    p.add_argument("--shots", default="0,5", help="comma-separated shot counts (examples from dev/)")
    p.add_argument("--template", choices=["auto", "base", "chat"], default="auto",
                   help="prompt format: auto = chat template for SFT/DPO checkpoints, C-Eval prompt for base ones")
    p.add_argument("--max-questions", type=int, default=0, help="per subject, 0 = all")
    p.add_argument("--max-val-tokens", type=int, default=0, help="per corpus, 0 = the whole val split")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="autocast dtype for scoring")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-lm", action="store_true", help="skip bits per character")
    p.add_argument("--no-mc", action="store_true", help="skip C-Eval/CMMLU")
    p.add_argument("--no-gen", action="store_true", help="skip generation samples")
    p.add_argument("--judge-url", default="", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--judge-model", default="", help="judge model name (default: the endpoint's first model)")
    p.add_argument("--judge-key", default="", help="API key for the judge endpoint")
    p.add_argument("--out", type=Path, default=Path("out/eval"), help="where report.json/report.md go")
    args = p.parse_args(argv)
    args.shots = [int(s) for s in args.shots.split(",") if s.strip()]
    args.ceval = args.ceval if args.ceval is not None else ["corpora/eval/ceval"]
    args.cmmlu = args.cmmlu if args.cmmlu is not None else ["corpora/eval/cmmlu"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [str(c) for c in args.checkpoints if not (c / "config.json").is_file()]
    if missing:
        print(f"error: not a checkpoint dir (no config.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    reports = [evaluate(c, args) for c in args.checkpoints]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "report" if len(reports) == 1 else "compare"
    (args.out / f"{stem}.json").write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2,
                                                      ensure_ascii=False))
    md = to_markdown(reports)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
