"""Tokenizer benchmark: compression of our trained tokenizer vs ChatGLM2 and MiniMind, and the vocabulary-size sweep
that sets the default `[tokenizer] vocab_size`.

Text: real samples from ../shared/corpora-samples, split by source into a training sample and held-out text:
  general  train: Skywork zh web (first 80 % of articles), C4 + English wiki (80 %)
           held-out: Skywork zh web (last 20 %), Firefly web articles (another source)
  medical  train: MedicalGPT fever textbook (80 % of paragraphs), Toyhom dialogues (80 %), MedicalGPT SFT (80 %)
           held-out: the rest of those three + MedicalGPT RAG corpus (another source)
Figures: Chinese characters per token (CJK ideographs / tokens) and UTF-8 bytes per token on each held-out set;
the ratio to ChatGLM2 (64,789 pieces, trained on far more text) measured in the same run; the embedding's share
of each model preset's parameters at each vocabulary size (tied input/output embedding, vocab x dim).

    python bench/bench_tokenizer.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from data_process.train_tokenizer import train_sentencepiece  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "corpora-samples"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002ffff]")
SWEEP = [6400, 8192, 12288, 16384, 24576, 32768]   # multiples of 128: GPU-friendly output layer
QUICK_SWEEP = [8192, 12288]
PRESETS = ["26m", "100m"]
SPLITS = ["general", "medical", "medical_unseen"]


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _split(items, frac=0.8):
    k = int(len(items) * frac)
    return items[:k], items[k:]


def load_text() -> dict[str, list[str]]:
    """{"train": docs, "general": held-out docs, "medical": held-out docs} from the real samples."""
    web = [o["text"] for o in _jsonl(SAMPLES / "skywork-zh-web/zh_general.jsonl")]
    c4 = [o["text"] for o in _jsonl(SAMPLES / "llamafactory-demo/c4_demo.jsonl")]
    wiki = [line for line in (SAMPLES / "llamafactory-demo/wiki_demo.txt").read_text(encoding="utf-8").split("\n") if line]
    firefly = [o["text"] for o in _jsonl(SAMPLES / "firefly/dummy_pretrain.jsonl")]
    fever = [p for p in (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    toyhom = pd.read_csv(next((SAMPLES / "toyhom-medical-dialogue").glob("*.csv")), encoding="gb18030",
                         dtype=str, keep_default_na=False)
    dialogues = [f"{r.title}\n{r.ask}\n{r.answer}" for r in toyhom.itertuples()]
    sft = ["\n".join(t["value"] for t in o["conversations"])
           for o in _jsonl(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl")]
    rag = [o["问"] + "\n" + o["答"] for o in _jsonl(SAMPLES / "medicalgpt/rag/medical_corpus.txt")]
    exams = []   # medical exam questions (C-Eval, CMMLU): a source no training text comes from
    for path in sorted((SAMPLES / "ceval-medical").rglob("*.csv")) + sorted((SAMPLES / "cmmlu-medical").rglob("*.csv")):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        exams += ["\n".join(str(v) for k, v in row.items() if k in ("question", "Question", "A", "B", "C", "D",
                                                                      "explanation")) for row in df.to_dict("records")]
    train, general, medical = [], [], []
    for docs, held in ((web, general), (c4, None), (wiki, None), (fever, medical), (dialogues, medical), (sft, medical)):
        a, b = _split(docs)
        train += a
        if held is not None:
            held += b
    return {"train": train, "general": general + firefly, "medical": medical, "medical_unseen": rag + exams}


def compression(encode, docs: list[str]) -> dict:
    t0 = time.perf_counter()
    n_tokens = sum(len(encode(d)) for d in docs)
    seconds = time.perf_counter() - t0
    cjk = sum(len(CJK.findall(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"zh_chars_per_token": cjk / n_tokens, "bytes_per_token": n_bytes / n_tokens,
            "mchars_per_s": sum(map(len, docs)) / seconds / 1e6}


def embedding_share(vocab_size: int) -> dict:
    """Share of each preset's parameters that the (tied) embedding takes at this vocabulary size."""
    from model import Transformer, make_config
    out = {}
    for preset in PRESETS:
        with torch.device("meta"):
            model = Transformer(make_config(preset, vocab_size))
        total, body = model.num_params(), model.num_params(exclude_embeddings=True)
        out[preset] = {"embedding_m": (total - body) / 1e6, "total_m": total / 1e6, "share": (total - body) / total,
                       "flops_per_token": model.flops_per_token(model.config.max_seq_len)}
    return out


def _best_seconds(fn, repeats: int = 3) -> float:
    """Fastest of a few runs: the machine is shared, the minimum is the least disturbed measurement."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def template_overhead(tok: Tokenizer) -> dict:
    """render_chat (what SFT staging and training run per conversation) vs raw encode of the same contents, and
    render_chat_batch (one SentencePiece call for many conversations) vs render_chat one by one."""
    role = {"human": "user", "gpt": "assistant"}
    convs = [[{"role": role[t["from"]], "content": t["value"]} for t in o["conversations"]]
             for o in _jsonl(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl")]
    texts = ["\n".join(m["content"] for m in c) for c in convs]
    n_raw = sum(len(tok.sp.encode(t)) for t in texts)
    n_chat = sum(len(tok.render_chat(c).ids) for c in convs)
    raw_s = _best_seconds(lambda: [tok.sp.encode(t) for t in texts])
    chat_s = _best_seconds(lambda: [tok.render_chat(c) for c in convs])
    batch_s = _best_seconds(lambda: tok.render_chat_batch(convs))
    print(f"\nchat template: render_chat {len(convs) / chat_s:,.0f} conversations/s, {n_chat / chat_s / 1e6:.2f} M tokens/s;"
          f" raw encode of the same contents {n_raw / raw_s / 1e6:.2f} M tokens/s (render_chat at {raw_s / chat_s:.2f}x"
          f" the raw speed); render_chat_batch {len(convs) / batch_s:,.0f} conversations/s ({chat_s / batch_s:.2f}x)")
    return {"render_chat_convs_per_s": round(len(convs) / chat_s), "render_chat_mtokens_per_s": round(n_chat / chat_s / 1e6, 3),
            "raw_encode_mtokens_per_s": round(n_raw / raw_s / 1e6, 3), "render_chat_vs_raw_encode": round(raw_s / chat_s, 3),
            "render_chat_batch_convs_per_s": round(len(convs) / batch_s), "render_chat_batch_speedup": round(chat_s / batch_s, 3)}


def run(quick: bool = False) -> dict:
    text = load_text()
    if quick:   # a third of each set keeps --quick well under a minute
        text = {k: v[::3] for k, v in text.items()}
    lines = [line for d in text["train"] for line in d.split("\n") if line.strip()]
    n_train_chars = sum(map(len, lines))
    print(f"training sample: {len(text['train'])} docs, {n_train_chars:,} chars; held-out: general "
          f"{sum(map(len, text['general'])):,} chars, medical {sum(map(len, text['medical'])):,} chars")

    results: dict = {}
    glm = Tokenizer.load(SAMPLES / "chatglm2-tokenizer/tokenizer.model")
    from tokenizers import Tokenizer as HFTokenizer
    minimind = HFTokenizer.from_file(str(SAMPLES / "minimind-tokenizer/tokenizer.json"))
    refs = {"chatglm2": (glm.vocab_size, glm.encode),
            "minimind": (minimind.get_vocab_size(), lambda t: minimind.encode(t, add_special_tokens=False).ids)}
    rows = []
    for name, (vocab, encode) in refs.items():
        row = {"tokenizer": name, "vocab": vocab}
        for split in SPLITS:
            row[split] = compression(encode, text[split])
        rows.append(row)
    for vocab in QUICK_SWEEP if quick else SWEEP:
        t0 = time.perf_counter()
        tok = Tokenizer(train_sentencepiece(lines, vocab))
        row = {"tokenizer": f"ours-{vocab}", "vocab": tok.vocab_size, "train_s": time.perf_counter() - t0}
        for split in SPLITS:
            row[split] = compression(tok.encode, text[split])
        row["embedding"] = embedding_share(tok.vocab_size)
        rows.append(row)

    base = rows[0]
    print("\nChinese characters per token on held-out text (ratio to ChatGLM2), bytes per token; embedding share")
    print(f"{'tokenizer':<12}{'vocab':>7}" + "".join(f" | {s:>26}" for s in SPLITS) + " | emb share 26m / 100m")
    for row in rows:
        cells = []
        key = row["tokenizer"].replace("-", "_")
        for split in SPLITS:
            c = row[split]
            ratio = c["zh_chars_per_token"] / base[split]["zh_chars_per_token"]
            cells.append(f"{c['zh_chars_per_token']:>6.3f} ({ratio:4.2f}x) {c['bytes_per_token']:>5.2f} B/t")
            results[f"{key}_{split}_zh_chars_per_token"] = round(c["zh_chars_per_token"], 3)
            results[f"{key}_{split}_bytes_per_token"] = round(c["bytes_per_token"], 3)
            results[f"{key}_{split}_ratio_vs_chatglm2"] = round(ratio, 3)
        emb = row.get("embedding")
        share = " / ".join(f"{emb[p]['share']:.0%} ({emb[p]['embedding_m']:.1f}M)" for p in PRESETS) if emb else ""
        if emb:
            results[f"{key}_embedding_share_26m"] = round(emb["26m"]["share"], 3)
            results[f"{key}_train_s"] = round(row["train_s"], 1)
            share += f" | trained in {row['train_s']:.1f}s"
        print(f"{row['tokenizer']:<12}{row['vocab']:>7}" + "".join(f" | {c:>26}" for c in cells) + f" | {share}")
    # The trade-off in one number: Chinese characters learned per unit of training compute. A bigger vocabulary
    # packs more text into each token, but the output layer (vocab x dim) makes every token cost more FLOPs.
    print("\nChinese chars per training TFLOP (mean of the three held-out sets; higher = more text per compute)")
    for preset in PRESETS:
        best, cells = None, []
        for row in rows[2:]:
            chars = sum(row[split]["zh_chars_per_token"] for split in SPLITS) / len(SPLITS)
            per_tflop = chars / row["embedding"][preset]["flops_per_token"] * 1e12
            results[f"{row['tokenizer'].replace('-', '_')}_{preset}_zh_chars_per_tflop"] = round(per_tflop, 1)
            cells.append(f"{row['vocab']}: {per_tflop:.0f}")
            if best is None or per_tflop > best[1]:
                best = (row, per_tflop)
        results[f"best_vocab_{preset}"] = best[0]["vocab"]
        print(f"  {preset:>5}: " + "  ".join(cells) + f"   -> best {best[0]['vocab']}")
    results.update(template_overhead(glm))
    glm_emb = embedding_share(glm.vocab_size)
    print(f"(chatglm2's {glm.vocab_size} vocab would take "
          + " / ".join(f"{glm_emb[p]['share']:.0%} ({glm_emb[p]['embedding_m']:.1f}M)" for p in PRESETS)
          + " of the 26m / 100m presets)")
    results["train_sample_chars"] = n_train_chars
    results["encode_mchars_per_s_chatglm2"] = round(base["medical"]["mchars_per_s"], 2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a third of the text, two vocabulary sizes (< 60 s)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
