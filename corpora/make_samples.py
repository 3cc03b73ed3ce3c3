"""Writes the embedded sample corpora under corpora/<corpus>/, one small file set per upstream format.

    python corpora/make_samples.py      # rewrites the samples (deterministic: same bytes every run)

The committed files are the samples; this script documents how they were made. Text comes from sample_text.py
(written for this project). Each file follows its upstream layout exactly (see config/recipe.toml): JSON arrays
for Wikipedia and WuDao, GB18030 CSV with a quoted multi-line field, parquet for MagpieLM, a zstd SkyPile shard,
a gzipped C4 shard, BaiduBaike with a null and a missing summary, and so on. A few deliberate problems are
included so a bare `python data_process.py` shows rejects (a truncated JSON line in C4, an English page in
SkyPile, a too-short line) and cross-corpus duplicates for the dedup step (a Toyhom dialogue also in
medical_finetune, a C4 page repeated in SkyPile with small edits, an encyclopedia entry in two corpora).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sample_text import CITIES, DISEASES, NAMES, TOPICS  # noqa: E402

rng = random.Random(20240601)


def jl(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def write(rel: str, data: bytes | str) -> None:
    path = HERE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    print(f"{rel}: {path.stat().st_size} bytes")


def join(items, sep="、") -> str:
    return sep.join(items)


# ---------------------------------------------------------------- medical prose in several styles


def encyclopedia(d) -> str:
    return (f"{d['name']}是{d['define']}。{d['name']}属于{d['system']}疾病，患者通常到{d['dept']}就诊。"
            f"常见症状有{join(d['symptoms'])}等。主要危险因素包括{join(d['causes'])}。"
            f"诊断时常用的检查有{join(d['exams'])}。治疗需在医生指导下进行，常用药物包括{join(d['drugs'])}。"
            f"日常生活中应注意：{join(d['advice'], '；')}。")


def book_section(i: int, d) -> list[str]:
    return [f"第{i + 1}节 {d['name']}",
            f"【概述】{d['name']}是{d['define']}。本病在临床上较为常见，早期识别和规范管理可以明显改善预后。",
            f"【病因与危险因素】本病的发生与多种因素有关，其中以{d['causes'][0]}和{d['causes'][1]}最为重要，"
            f"{join(d['causes'][2:])}也可增加发病风险。",
            f"【临床表现】典型表现为{join(d['symptoms'][:3])}，部分患者可伴有{join(d['symptoms'][3:]) or '其他非特异性症状'}。"
            f"症状轻重因人而异，少数患者早期可无明显不适。",
            f"【辅助检查】{join(d['exams'], '；')}。应结合病史和体格检查综合判断，必要时动态复查。",
            f"【治疗】治疗目标是控制症状、减少并发症和复发。药物可选用{join(d['drugs'])}等，具体方案须个体化。"
            f"同时应重视患者教育：{join(d['advice'][:3], '，')}。"]


def baike_entry(d, summary_mode: str) -> dict:
    sections = [{"title": "病因", "content": f"{d['name']}的病因包括{join(d['causes'])}。"},
                {"title": "临床表现", "content": f"患者可出现{join(d['symptoms'])}等表现，病情严重时应及时就医。"},
                {"title": "检查", "content": f"常用检查：{join(d['exams'], '；')}。"},
                {"title": "预防", "content": f"{join(d['advice'], '；')}。"}]
    entry = {"title": d["name"], "summary": f"{d['name']}，{d['define']}。", "sections": sections}
    if summary_mode == "null":
        entry["summary"] = None
    elif summary_mode == "missing":
        del entry["summary"]
    return entry


def web_health_article(d, city: str) -> str:
    doctor = rng.choice(NAMES)
    return (f"{d['name']}离我们并不遥远，{city}{d['dept']}{doctor}医生提醒：这些信号要当心\n"
            f"近日，{city}某医院{d['dept']}门诊接诊了不少{d['name']}患者。{doctor}医生介绍，{d['name']}的早期表现"
            f"往往是{join(d['symptoms'][:2])}，很多人以为只是累了，没有放在心上。\n"
            f"“{d['causes'][0]}和{d['causes'][1]}是常见的诱因。”{doctor}医生说，如果出现{d['symptoms'][-1]}，"
            f"建议尽早就诊，医生会根据情况安排{d['exams'][0]}等检查。\n"
            f"医生建议：{join(d['advice'][:3], '；')}。不要自行购药，更不要轻信偏方。\n"
            f"点击阅读全文\n版权所有 © {city}健康网 未经授权禁止转载")


def dialogue(d, k: int) -> tuple[str, str, str]:
    age = 20 + (k * 7 + len(d["name"]) * 3) % 55
    who = ["我", "我妈妈", "我爸爸", "我爱人"][k % 4]
    sym = d["symptoms"][k % len(d["symptoms"])]
    title = f"{sym}是不是{d['name']}？该怎么办？"
    ask = (f"{who}今年{age}岁，最近一段时间总是{sym}，有时还{d['symptoms'][(k + 1) % len(d['symptoms'])]}，"
           f"在网上查了一下怀疑是{d['name']}，请问需要做什么检查？平时要注意什么？")
    answer = (f"您好，根据您描述的情况，{sym}确实可以是{d['name']}的表现，但也可能由其他原因引起，"
              f"建议到{d['dept']}就诊，做{join(d['exams'][:2])}明确诊断。如果确诊，"
              f"一般需要在医生指导下用药，例如{d['drugs'][k % len(d['drugs'])]}。"
              f"平时请{join(d['advice'][k % 2:k % 2 + 3], '，')}。祝早日康复！")
    return title, ask, answer


# ---------------------------------------------------------------- corpora


def wiki_zh():
    items = []
    for title, paras in TOPICS:
        items.append({"completion": f"{title}\n" + "\n".join(paras), "source": "wikipedia.zh2307"})
    for d in DISEASES[:10]:
        items.append({"completion": f"{d['name']}\n{d['name']}（{d['en']}）是{d['define']}。\n"
                                    f"== 临床表现 ==\n主要症状包括{join(d['symptoms'])}。\n"
                                    f"== 治疗 ==\n治疗药物有{join(d['drugs'])}等。",
                      "source": "wikipedia.zh2307"})
    # upstream layout: one JSON array, pretty-printed
    write("wiki_zh/wikipedia-cn-20230720-filtered.json", json.dumps(items, ensure_ascii=False, indent=2) + "\n")


def baidubaike():
    lines = []
    modes = ["full", "null", "missing", "full"]
    for i, d in enumerate(DISEASES):
        lines.append(jl(baike_entry(d, modes[i % 4])))
    lines.append(jl({"title": "空词条", "summary": None, "sections": []}))  # only a title: rejected as too short
    write("baidubaike/563w_baidubaike.json", "\n".join(lines) + "\n")


C4_SHARED = None


def c4_zh():
    global C4_SHARED
    lines = []
    for i, d in enumerate(DISEASES):
        text = web_health_article(d, CITIES[i % len(CITIES)])
        if i == 3:
            C4_SHARED = text
        lines.append(jl({"text": text, "url": f"https://health.example.cn/news/{1000 + i}.html",
                         "timestamp": f"2023-0{1 + i % 9}-1{i % 9}T08:00:00Z"}))
    for title, paras in TOPICS[:4]:
        lines.append(jl({"text": f"{title}小知识\n" + paras[-1] + "\n" + paras[0] + "\n扫一扫关注我们",
                         "url": "https://www.example.com/kb", "timestamp": "2022-11-02T10:00:00Z"}))
    lines.insert(7, '{"text": "这一行在抓取时被截断，缺少结尾的引号和括号')  # malformed JSON, as real dumps have
    write("c4_zh/c4-zh-00000.json.gz", gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def skypile():
    import zstandard

    lines = []
    for title, paras in TOPICS:
        lines.append(jl({"text": "。".join(reversed(paras[1].rstrip("。").split("。"))) + "。\n" + paras[2]}))
    # the C4 page again, lightly edited (a near duplicate across corpora)
    lines.append(jl({"text": C4_SHARED.replace("近日", "日前").replace("建议尽早就诊", "建议及早就诊")}))
    for i, d in enumerate(DISEASES[8:]):
        lines.append(jl({"text": f"关于{d['name']}的{len(d['advice'])}个误区\n很多人认为{d['symptoms'][0]}忍一忍就过去了，"
                                 f"其实{d['name']}需要规范治疗。误区一：症状缓解就停药。误区二：只靠饮食就能治好。"
                                 f"正确的做法是：{join(d['advice'], '；')}。"}))
    lines.append(jl({"text": "This page is only available in English. Please select your language to continue. "
                             "Terms of use and privacy policy apply to all visitors of this site."}))
    data = ("\n".join(lines) + "\n").encode()
    write("skypile/2020-40_zh_head_0000.jsonl.zst", zstandard.ZstdCompressor(level=19).compress(data))


def medical_pretrain():
    lines = [jl({"text": encyclopedia(d)}) for d in DISEASES]
    lines.append(jl({"text": "头痛。"}))  # too short
    write("medical_pretrain/train_encyclopedia.json", "\n".join(lines) + "\n")


def minimind_pretrain():
    lines = []
    for i, d in enumerate(DISEASES):
        lines.append(jl({"text": f"<s>{d['name']}的高危人群主要是有{d['causes'][0]}或{d['causes'][1]}的人，"
                                 f"这类人群应定期体检。</s> <s>想要确诊{d['name']}，{d['exams'][0]}是最基本的一步，"
                                 f"结果要请{d['dept']}医生解读。</s>"}))
        # a second line per disease, so that the corpus holds more than one 256-token window at the tiny preset
        lines.append(jl({"text": f"<s>有人出现{d['symptoms'][0]}、{d['symptoms'][1]}时会担心自己得了{d['name']}，"
                                 f"其实还要结合{d['exams'][1]}等结果综合判断。</s> <s>确诊后，医生可能会开"
                                 f"{d['drugs'][0]}等药物，同时建议{d['advice'][0]}、{d['advice'][1]}。</s>"}))
    write("minimind_pretrain/pretrain_hq.jsonl", "\n".join(lines))  # no final newline


def medical_books():
    out = ["内科学（节选）", ""]
    for i, d in enumerate(DISEASES):
        out.extend(book_section(i, d))
        out.append("")
    write("medical_books/internal_medicine.txt", "\n".join(out))


def guidelines():
    lines = []
    for i, d in enumerate(DISEASES):
        en = d["en"]
        text = (f"# Management of {en} in adults\n\n## Recommendations\n\n"
                + "\n".join(f"{k + 1}. Clinicians should {a}." for k, a in enumerate(d["en_advice"]))
                + f"\n\n## Rationale\n\nThese recommendations apply to adults presenting with {en} in primary care. "
                  f"They summarise good practice and should be applied with clinical judgement, taking into account "
                  f"the preferences of the individual patient and any other conditions they have.")
        lines.append(jl({"id": f"{i:04x}{'a1b2c3' * 3}", "source": ["cco", "cdc", "nice", "who"][i % 4],
                         "title": f"Management of {en} in adults", "clean_text": text, "raw_text": text,
                         "url": f"https://guidelines.example.org/{en.replace(' ', '-')}", "overview": None}))
    write("guidelines/open_guidelines.jsonl", "\n".join(lines) + "\n")


DUP_DIALOGUES = []


def medical_dialogue():
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["department", "title", "ask", "answer"])
    for i, d in enumerate(DISEASES):
        for k in range(3):
            title, ask, answer = dialogue(d, k + i)
            if k == 1:  # a quoted field spanning lines, as in the real files
                answer = answer.replace("。如果确诊，", "。\n如果确诊，")
            if i in (2, 9) and k == 0:
                DUP_DIALOGUES.append((title, ask, answer))
            w.writerow([d["dept"], title, ask, answer])
    # GBK-only characters (not in gb2312): decoding as gb2312 would fail on this row
    w.writerow(["心血管科", "喆喆的外公血压高，堃哥问能喝咖啡吗？", "家里老人高血压多年，平时爱喝咖啡，请问能喝吗？",
                "高血压患者可以少量饮用咖啡，但不宜空腹或大量饮用，血压控制不稳定时最好暂停，并注意监测血压。"])
    write("medical_dialogue/内科5000-6000.csv", buf.getvalue().encode("gb18030"))


def medical_finetune():
    lines = []
    for d in DISEASES:
        for q, a in [(f"{d['name']}有哪些症状？", f"{d['name']}的常见症状包括{join(d['symptoms'])}。如症状持续或加重，应及时到{d['dept']}就诊。"),
                     (f"{d['name']}是什么原因引起的？", f"{d['name']}与{join(d['causes'])}等因素有关。"),
                     (f"怎么确诊{d['name']}？", f"一般需要结合病史和体格检查，并进行{join(d['exams'])}等检查。"),
                     (f"{d['name']}患者生活中要注意什么？", f"建议{join(d['advice'], '；')}。")]:
            lines.append(jl({"instruction": q, "input": "", "output": a}))
    for title, ask, answer in DUP_DIALOGUES:  # the Toyhom dialogues shibing624/medical also contains
        lines.append(jl({"instruction": title, "input": ask, "output": answer}))
    lines.append(jl({"instruction": "血常规", "input": "", "output": None}))  # missing output
    write("medical_finetune/train_zh_0.json", "\n".join(lines) + "\n")


def general_tasks():
    for i, d in enumerate(DISEASES):
        yield f"将下面的疾病名称翻译成英文。", d["name"], f"{d['name']}的英文是“{d['en']}”。"
        celsius = round(35.9 + i * 0.2, 1)
        yield (f"把体温{celsius}℃换算成华氏温度，并说明是否发热。",
               f"华氏温度 = 摄氏温度 × 9/5 + 32 = {celsius} × 1.8 + 32 = {celsius * 1.8 + 32:.1f}°F。"
               + ("腋下体温超过37.3℃一般认为是发热。" if celsius > 37.3 else "这个体温在正常范围内。"))
    for dept in sorted({d["dept"] for d in DISEASES}):
        names = [d["name"] for d in DISEASES if d["dept"] == dept]
        yield f"{dept}主要诊治哪些疾病？请举例。", f"{dept}诊治的常见疾病包括{join(names)}等，具体以医院的科室设置为准。"


def alpaca_zh():
    items = []
    for task in general_tasks():
        if len(task) == 2:
            items.append({"instruction": task[0], "input": "", "output": task[1]})
        else:
            items.append({"instruction": task[0], "input": task[1], "output": task[2]})
    write("alpaca_zh/alpaca_gpt4_data_zh.json", json.dumps(items, ensure_ascii=False, indent=4))


def belle():
    lines = []
    for i, d in enumerate(DISEASES):
        height, weight = 1.55 + (i % 5) * 0.05, 50 + (i * 7) % 40
        bmi = weight / height ** 2
        lines.append(jl({"instruction": f"身高{height:.2f}米、体重{weight}公斤的人，BMI是多少？属于什么范围？", "input": "",
                         "output": f"BMI = 体重 ÷ 身高² = {weight} ÷ {height:.2f}² ≈ {bmi:.1f}。按中国成人标准，"
                                   + ("BMI≥28属于肥胖。" if bmi >= 28 else "24≤BMI<28属于超重。" if bmi >= 24
                                      else "18.5≤BMI<24属于正常范围。" if bmi >= 18.5 else "BMI<18.5属于体重过低。")}))
        lines.append(jl({"instruction": f"{d['name']}应该挂哪个科？", "input": "",
                         "output": f"{d['name']}一般挂{d['dept']}。如果症状很重或出现急症，请直接去急诊。"}))
    for i, city in enumerate(CITIES):
        lines.append(jl({"instruction": f"为去{city}旅游的游客写一条健康提示。", "input": "",
                         "output": f"去{city}旅游时，请根据天气增减衣物，注意饮食卫生，随身携带常用药品；"
                                   f"如有{DISEASES[i]['name']}等慢性病，请按时服药并备足药量。"}))
    write("belle/train_0.5M_CN_sample.json", "\n".join(lines) + "\n")


def sharegpt():
    lines = []
    for d in DISEASES[:10]:
        conv = [{"from": "human", "value": f"医生你好，我最近{d['symptoms'][0]}，会是什么问题？"},
                {"from": "gpt", "value": f"{d['symptoms'][0]}可能与多种情况有关，其中包括{d['name']}。还有其他不舒服吗？比如{join(d['symptoms'][1:3])}？"},
                {"from": "human", "value": f"有的，偶尔会{d['symptoms'][1]}。"},
                {"from": "gpt", "value": f"建议您到{d['dept']}就诊，做{d['exams'][0]}。在此之前，{d['advice'][0]}。"}]
        lines.append(jl({"conversations": conv}))
    lines.append(jl({"conversations": [{"from": "human", "value": "你好"}, {"from": "human", "value": "在吗"}]}))  # bad roles
    write("sharegpt/sharegpt_zh_sample.jsonl", "\n".join(lines) + "\n")


def minimind_sft():
    lines = []
    for i, (title, paras) in enumerate(TOPICS):
        msgs = [{"role": "user", "content": f"{title}是什么？"}, {"role": "assistant", "content": paras[0]}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "你是一个知识渊博、回答简洁的中文助手。"})
        if i % 2 == 0:
            msgs += [{"role": "user", "content": "再多说一点。"}, {"role": "assistant", "content": paras[1]}]
        lines.append(jl({"conversations": msgs}))
    write("minimind_sft/sft_mini_512.jsonl", "\n".join(lines) + "\n")


def minimind_r1():
    lines = []
    for i, d in enumerate(DISEASES):
        per_day, per_dose, days = 1 + i % 3, 1 + i % 2, 7 + i % 8
        total = per_day * per_dose * days
        q = f"某{d['name']}患者遵医嘱服用{d['drugs'][0]}，每天{per_day}次，每次{per_dose}片，连续服用{days}天，一共需要多少片？"
        a = (f"<think>\n每天的片数是{per_day}×{per_dose}={per_day * per_dose}片。\n"
             f"{days}天一共是{per_day * per_dose}×{days}={total}片。\n</think>\n"
             f"<answer>\n一共需要{total}片。具体用药请以医生和药师的指导为准。\n</answer>")
        lines.append(jl({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    write("minimind_r1/r1_mix_1024.jsonl", "\n".join(lines) + "\n")


def medical_reward():
    lines = []
    for d in DISEASES:
        lines.append(jl({"question": f"得了{d['name']}平时要注意什么？",
                         "response_chosen": f"{d['name']}患者应{join(d['advice'], '，')}。如有疑问请咨询{d['dept']}医生。",
                         "response_rejected": f"{d['name']}不用管，过几天自己就好了。"}))
        lines.append(jl({"question": f"{d['name']}需要做哪些检查？",
                         "response_chosen": f"通常包括{join(d['exams'])}，医生会根据病情选择。",
                         "response_rejected": "随便做个体检就行。"}))
    lines.append(jl({"question": "同样的回答", "response_chosen": "一样的内容。", "response_rejected": "一样的内容。"}))
    write("medical_reward/train.json", "\n".join(lines) + "\n")


def magpie_dpo():
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, d in enumerate(DISEASES):
        inst = f"What are the key recommendations for managing {d['en']}?"
        chosen = [{"content": inst, "role": "user"},
                  {"content": "Key recommendations:\n" + "\n".join(f"- {a[0].upper()}{a[1:]}." for a in d["en_advice"]),
                   "role": "assistant"}]
        rejected = [{"content": inst, "role": "user"},
                    {"content": f"There is nothing specific to do about {d['en']}.", "role": "assistant"}]
        rows.append({"uuid": f"00000000-0000-4000-8000-{i:012d}", "instruction": inst,
                     "task_category": "Information seeking", "difficulty": "medium",
                     "chosen": chosen, "rejected": rejected})
    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    schema = pa.schema([("uuid", pa.string()), ("instruction", pa.string()), ("task_category", pa.string()),
                        ("difficulty", pa.string()), ("chosen", msg), ("rejected", msg)])
    table = pa.Table.from_pylist(rows, schema=schema)
    path = HERE / "magpie_dpo/train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8)
    print(f"magpie_dpo/train-00000-of-00001.parquet: {path.stat().st_size} bytes")


def minimind_dpo():
    lines = []
    for title, paras in TOPICS:
        q = [{"role": "user", "content": f"关于{title}，还有什么值得一提的？"}]
        lines.append(jl({"chosen": q + [{"role": "assistant", "content": paras[2]}],
                         "rejected": q + [{"role": "assistant", "content": f"{title}没什么好介绍的。"}]}))
    write("minimind_dpo/dpo.jsonl", "\n".join(lines) + "\n")


def medical_rl():
    """GRPO prompt sets in MedicalGPT's {question, answer} layout: short answers (department, body system) and
    multiple-choice items (one symptom of the disease among three of others; the answer is the letter)."""
    qa, choice = [], []
    for d in DISEASES:
        qa.append(jl({"question": f"{d['name']}患者通常应到哪个科室就诊？只回答科室名称。", "answer": d["dept"]}))
        qa.append(jl({"question": f"{d['name']}属于哪个系统的疾病？只回答系统名称。", "answer": d["system"]}))
        others = [s for o in DISEASES if o is not d for s in o["symptoms"] if s not in d["symptoms"]]
        options = rng.sample(sorted(set(others)), 3)
        right = rng.randrange(4)
        options.insert(right, rng.choice(d["symptoms"]))
        choice.append(jl({"question": f"下列哪一项是{d['name']}的常见症状？\n"
                                      + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
                                      + "\n只回答选项字母。", "answer": "ABCD"[right]}))
    qa.append(jl({"question": "这一行没有答案。"}))   # a record the reader rejects (no answer field)
    write("medical_rl/medical_qa.jsonl", "\n".join(qa) + "\n")
    write("medical_rl/medical_choice.jsonl", "\n".join(choice) + "\n")


def main() -> None:
    for make in (wiki_zh, baidubaike, c4_zh, skypile, medical_pretrain, minimind_pretrain, medical_books, guidelines,
                 medical_dialogue, medical_finetune, alpaca_zh, belle, sharegpt, minimind_sft, minimind_r1,
                 medical_reward, magpie_dpo, minimind_dpo):
        make()
    medical_rl()   # last: the samples above keep their bytes (rng order)
    wudao()


def wudao():
    relations = ["父亲", "母亲", "外婆", "舅舅", "同事", "邻居", "大学室友", "表姐"]
    for part, chunk in enumerate((DISEASES[:8], DISEASES[8:])):
        items = []
        for k, d in enumerate(chunk):
            who = relations[k % len(relations)]
            content = (f"去年冬天，我{who}总说自己{d['symptoms'][0]}，一开始全家人都没当回事。后来{d['symptoms'][1]}越来越明显，"
                       f"我们才陪着去了医院，挂的是{d['dept']}。医生问得很仔细，又安排了{d['exams'][0]}，最后确诊是{d['name']}。"
                       f"回家路上{who}一直念叨，说早知道就该早点来。现在按医生的要求，{d['advice'][0]}，{d['advice'][1]}，"
                       f"复查的结果一次比一次好。写下这些，是想提醒大家：身体发出的信号别硬扛。")
            items.append({"id": part * 100 + k, "uniqueKey": f"{part:02d}{k:04d}{'ab' * 8}", "titleUkey": f"{k:08d}",
                          "dataType": "博客" if k % 2 else "社区", "title": f"陪{who}看病的那些事", "content": content})
        items.append({"id": part * 100 + 99, "uniqueKey": "x", "titleUkey": "x", "dataType": "博客",
                      "title": "无正文"})  # no content field
        write(f"wudao/part-202127864{part}.json", json.dumps(items, ensure_ascii=False))


if __name__ == "__main__":
    main()
