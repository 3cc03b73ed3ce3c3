"""SFT/DPO staging on real samples with the real ChatGLM2 tokenizer: one CSV pair per curriculum stage, loss weights
on exactly the assistant spans, exact CSV round trip of Chinese text and newlines, counted rejects, deterministic
validation split, re-runnable and atomic outputs, one DPO schema for four real preference formats."""
import json

import pandas as pd
import pytest

from conftest import SAMPLES
from data_process.recipe import parse_recipe
from data_process.records import write_parts
from data_process.stage import SFT_COLUMNS, StageInputError, is_val, read_dpo_jsonl, read_sft_csv, row_messages, run
from tokenizer import TAGS, Tokenizer

CHATGLM2 = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"
ROLE = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def jsonl(path):
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def messages_of(turns):
    """ShareGPT {from, value} or MiniMind {role, content} turns -> CONTRACTS.md messages."""
    return [{"role": ROLE[t.get("from", t.get("role"))], "content": t.get("value", t.get("content"))} for t in turns]


def conv(i, messages):
    return {"id": f"f.jsonl:{i}", "corpus": "", "kind": "conv", "messages": messages}


def medical_sft():
    return [conv(i, messages_of(o["conversations"]))
            for i, o in enumerate(jsonl(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl"))]


def general_sft():
    records = [conv(i, messages_of(o["conversations"]))
               for i, o in enumerate(jsonl(SAMPLES / "minimind-format-tiny/tiny_sft.jsonl"))]
    tricky = [  # CSV-hostile content: quotes, commas, CRLF, blank lines, NA-like strings, leading/trailing spaces
        [{"role": "system", "content": "NA"}, {"role": "user", "content": 'He said "hi", then\r\nleft,'},
         {"role": "assistant", "content": "  null  \n\n\n第二段，\"引号\"\t制表符 "}],
        [{"role": "user", "content": "多轮一"}, {"role": "assistant", "content": "答一"},
         {"role": "user", "content": "多轮二\n换行"}, {"role": "assistant", "content": "答二\n"}],
    ]
    return records + [conv(100 + i, m) for i, m in enumerate(tricky)]


def reasoning_sft():
    return [conv(0, [{"role": "user", "content": "发烧38.5度该吃什么药？"},
                     {"role": "assistant", "content": "<think>\n体温38.5℃属于中度发热。\n</think>\n<answer>\n可服用对乙酰氨基酚，"
                                                      "多喝水；持续不退请就医。\n</answer>"}])]


def bad_sft():
    return [
        conv(0, [{"role": "user", "content": "只有问题"}]),                                         # no answer
        conv(1, [{"role": "assistant", "content": "先回答"}, {"role": "user", "content": "后问"}]),  # wrong order
        conv(2, [{"role": "user", "content": "问"}, {"role": "assistant", "content": "   "}]),      # blank answer
        conv(3, [{"role": "user", "content": "长" * 3000}, {"role": "assistant", "content": "答"}]),  # too long
        {"id": "f.jsonl:4", "corpus": "", "kind": "doc", "text": "not a conversation"},
        conv(5, "not a list"),
    ]


def prefs():
    out = {"medical_reward": [], "dpo_zh": [], "minimind_dpo": [], "firefly_dpo": []}
    for i, o in enumerate(jsonl(SAMPLES / "medicalgpt/reward/medical_reward_pairs.jsonl")):
        out["medical_reward"].append({"prompt": [{"role": "user", "content": o["question"]}],
                                      "chosen": o["response_chosen"], "rejected": o["response_rejected"]})
    for o in jsonl(SAMPLES / "medicalgpt/reward/dpo_zh_500.jsonl"):
        out["dpo_zh"].append({"prompt": messages_of(o["conversations"]), "chosen": o["chosen"],
                              "rejected": o["rejected"]})
    for name, path in (("minimind_dpo", "minimind-format-tiny/tiny_dpo.jsonl"), ("firefly_dpo", "firefly/dummy_dpo.jsonl")):
        for o in jsonl(SAMPLES / path):
            out[name].append({"prompt": messages_of(o["chosen"][:-1]), "chosen": o["chosen"][-1]["content"],
                              "rejected": o["rejected"][-1]["content"]})
    out["minimind_dpo"].append({"prompt": [{"role": "user", "content": "同"}], "chosen": "一样", "rejected": "一样"})
    out["minimind_dpo"].append({"prompt": [{"role": "assistant", "content": "错"}], "chosen": "a", "rejected": "b"})
    return {name: [{"id": f"p.jsonl:{i}", "corpus": name, "kind": "pref", **r} for i, r in enumerate(rs)]
            for name, rs in out.items()}


def rejected_sft():
    return [conv(0, [{"role": "user", "content": "长" * 3000}, {"role": "assistant", "content": "答"}]),
            {"id": "f.jsonl:1", "corpus": "", "kind": "doc", "text": "not a conversation"}]


SFT_CORPORA = {"medical_finetune": ("medical", medical_sft), "minimind_sft": ("general", general_sft),
               "minimind_r1": ("reasoning", reasoning_sft), "broken": ("general", bad_sft),
               "medical_dialogue": ("medical_dialogue", rejected_sft)}
DPO_STAGES = {"medical_reward": "medical", "dpo_zh": "general", "minimind_dpo": "general", "firefly_dpo": ""}


def make_recipe(root, **sft):
    corpora = [{"name": n, "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": s} for n, (s, _) in SFT_CORPORA.items()
               if n != "medical_dialogue"]
    corpora += [{"name": n, "reader": "jsonl", "paths": ["x"], "role": "dpo", "stage": s} for n, s in DPO_STAGES.items()]
    corpora += [{"name": "medical_dialogue", "reader": "toyhom_csv", "paths": ["x"], "role": "sft",
                 "stage": "medical_dialogue"}]   # every record rejected: an empty stage, no CSV written
    return parse_recipe({"corpus": corpora, "sft": {"max_tokens": 1024, "val_fraction": 0.1, **sft}}, root)


@pytest.fixture(scope="module")
def glm():
    return Tokenizer.load(CHATGLM2)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, glm):
    root = tmp_path_factory.mktemp("stage")
    for name, (_, make) in SFT_CORPORA.items():
        write_parts([{**r, "corpus": name} for r in make()], root / "dedup" / name)
    for name, records in prefs().items():
        write_parts(records, root / "dedup" / name)
    glm.save(root / "tokenizer")
    summary = run(make_recipe(root), root / "dedup", root / "tokenizer", root / "data")
    return root, summary


def test_real_medical_sft_weights_cover_exactly_the_assistant_spans(glm):
    for record in medical_sft()[:200] + general_sft() + reasoning_sft():
        chat = glm.render_chat(record["messages"], tag_weight=0.3)
        weighted = [i for i, w in zip(chat.ids, chat.weights) if w > 0]
        expected = "".join(m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant")
        assert glm.decode(weighted) == expected
        assert glm.decode(chat.ids) == glm.render_text(record["messages"])
    chat = glm.render_chat(reasoning_sft()[0]["messages"], tag_weight=0.3)
    tags = [w for i, w in zip(chat.ids, chat.weights) if i in {glm.special[t] for t in TAGS}]
    assert tags == [0.3] * 4


def test_system_prompt_and_multi_turn_render_as_the_template_says(glm):
    with_system = general_sft()[2]["messages"]          # MiniMind's real system-prompt sample
    assert glm.decode(glm.render_chat(with_system).ids) == (
        "<|im_start|>system\n你是一个简洁的 AI 助手。<|im_end|>"
        "<|im_start|>user\n用一句话解释 tokenizer。<|im_end|>"
        "<|im_start|>assistant\ntokenizer 负责把文本切分并映射成模型可以处理的 token id。<|im_end|>")
    multi = general_sft()[-1]["messages"]
    chat = glm.render_chat(multi, add_generation_prompt=False)
    assert glm.decode(chat.ids) == ("<|im_start|>user\n多轮一<|im_end|><|im_start|>assistant\n答一<|im_end|>"
                                    "<|im_start|>user\n多轮二\n换行<|im_end|><|im_start|>assistant\n答二\n<|im_end|>")
    assert chat.ids.count(glm.special["im_start"]) == 4 and chat.ids[0] == glm.special["im_start"]
    assert chat.ids[-1] == glm.special["im_end"] and chat.weights[-1] == 1.0


def test_one_csv_pair_per_stage_in_curriculum_order(staged):
    root, summary = staged
    assert list(summary["sft"]) == ["general", "medical", "medical_dialogue", "reasoning"]
    for stage in ("general", "medical", "reasoning"):
        for suffix in (".csv", ".val.csv"):
            df = read_sft_csv(root / "data" / "sft" / f"{stage}{suffix}")
            assert list(df.columns) == SFT_COLUMNS
    med = summary["sft"]["medical"]
    assert med["train"] + med["val"] + sum(med["rejected"].values()) == 1000
    assert 50 <= med["val"] <= 160                      # ~10 % held out
    empty = summary["sft"]["medical_dialogue"]
    assert (empty["train"], empty["val"], empty["missing_corpora"]) == (0, 0, [])
    assert empty["empty"] == ["medical_dialogue: all 2 record(s) rejected here (too_long 1, not_a_conversation 1)"]
    assert not (root / "data" / "sft" / "medical_dialogue.csv").exists()          # no header-only CSV
    assert not (root / "data" / "sft" / "medical_dialogue.val.csv").exists()
    assert len(jsonl(root / "data" / "sft" / "medical_dialogue.rejects.jsonl")) == 2
    assert summary["sft"]["reasoning"]["train"] + summary["sft"]["reasoning"]["val"] == 1
    assert not list((root / "data").rglob(".*tmp*"))    # no temporary files left


def test_rejects_are_counted_by_reason_and_logged(staged):
    root, summary = staged
    general = summary["sft"]["general"]
    assert general["rejected"] == {"malformed": 3, "empty_turn": 1, "too_long": 1, "not_a_conversation": 1}
    assert general["sources"] == {"minimind_sft": 5}
    logged = jsonl(root / "data" / "sft" / "general.rejects.jsonl")
    assert sorted(r["reason"] for r in logged) == sorted(
        ["malformed"] * 3 + ["empty_turn", "too_long", "not_a_conversation"])
    dpo = summary["dpo"]["general"]["rejected"]
    assert dpo["chosen_equals_rejected"] == 1 and dpo["malformed"] == 1 and set(dpo) <= {
        "chosen_equals_rejected", "malformed", "too_long"}


def test_csv_round_trip_keeps_text_and_turns_exactly(staged, glm):
    root, summary = staged
    originals = {}
    for name, (_, make) in SFT_CORPORA.items():
        for r in make():
            originals[f"{name}:{r['id']}"] = r.get("messages")
    rows = 0
    for stage in ("general", "medical", "reasoning"):
        for suffix in (".csv", ".val.csv"):
            df = read_sft_csv(root / "data" / "sft" / f"{stage}{suffix}")
            for _, row in df.iterrows():
                messages = row_messages(row)
                assert messages == originals[row["id"]]
                assert row["answer"] == messages[-1]["content"]
                assert row["system"] == (messages[0]["content"] if messages[0]["role"] == "system" else "")
                assert row["n_tokens"] == len(glm.render_chat(messages).ids) <= 1024
                assert row["source"] == row["id"].split(":")[0]
                if suffix == ".csv":
                    assert not is_val(row["id"], 0.1)
                elif stage == "medical":                 # big enough: the hash split alone
                    assert is_val(row["id"], 0.1)
                rows += 1
    assert rows == sum(summary["sft"][s]["train"] + summary["sft"][s]["val"] for s in ("general", "medical", "reasoning"))
    assert rows > 900
    tricky = read_sft_csv(root / "data" / "sft" / "general.csv")
    tricky = pd.concat([tricky, read_sft_csv(root / "data" / "sft" / "general.val.csv")])
    assert "NA" in set(tricky["system"]) and "" in set(tricky["system"])


def test_small_stage_still_gets_one_validation_row(tmp_path, glm):
    write_parts([{**r, "corpus": "minimind_sft"} for r in general_sft()], tmp_path / "dedup" / "minimind_sft")
    glm.save(tmp_path / "tokenizer")
    recipe = parse_recipe({"corpus": [{"name": "minimind_sft", "reader": "jsonl", "paths": ["x"], "role": "sft",
                                       "stage": "general"}], "sft": {"val_fraction": 0.001}}, tmp_path)
    summary = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["sft"]["general"]
    assert (summary["train"], summary["val"]) == (4, 1)
    val = read_sft_csv(tmp_path / "data" / "sft" / "general.val.csv")
    train = read_sft_csv(tmp_path / "data" / "sft" / "general.csv")
    assert len(val) == 1 and len(train) == 4 and val["id"][0] not in set(train["id"])
    assert summary["val_tokens"] == val["n_tokens"].sum() and summary["train_tokens"] == train["n_tokens"].sum()


def test_dpo_pairs_share_one_schema(staged):
    root, summary = staged
    assert set(summary["dpo"]) == {"medical", "general", "firefly_dpo"}   # a corpus without a stage uses its name
    medical = summary["dpo"]["medical"]
    assert medical["train"] + medical["val"] + sum(medical["rejected"].values()) == 100
    for stage in summary["dpo"]:
        for suffix in (".jsonl", ".val.jsonl"):
            for r in read_dpo_jsonl(root / "data" / "dpo" / f"{stage}{suffix}"):
                assert list(r) == ["id", "source", "prompt", "chosen", "rejected"]
                assert r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"]
                assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
    firefly = read_dpo_jsonl(root / "data" / "dpo" / "firefly_dpo.jsonl")
    assert firefly[0]["prompt"] == [{"role": "user", "content": "how can i develop a habit of drawing daily"}]


def test_rerun_keeps_finished_stages_and_redoes_changed_ones(staged):
    root, summary = staged
    csv = root / "data" / "sft" / "medical.csv"
    mtime = csv.stat().st_mtime_ns
    again = run(make_recipe(root), root / "dedup", root / "tokenizer", root / "data")
    assert csv.stat().st_mtime_ns == mtime
    assert again["sft"]["medical"]["train"] == summary["sft"]["medical"]["train"]
    stricter = run(make_recipe(root, max_tokens=200), root / "dedup", root / "tokenizer", root / "data")
    assert stricter["sft"]["medical"]["rejected"]["too_long"] > summary["sft"]["medical"]["rejected"].get("too_long", 0)
    run(make_recipe(root), root / "dedup", root / "tokenizer", root / "data")   # restore for other tests
    assert csv.stat().st_mtime_ns != mtime


def test_changed_input_corpus_redoes_its_stage(tmp_path, glm):
    glm.save(tmp_path / "tokenizer")
    recipe = parse_recipe({"corpus": [{"name": "minimind_sft", "reader": "jsonl", "paths": ["x"], "role": "sft",
                                       "stage": "general"}]}, tmp_path)
    records = [{**r, "corpus": "minimind_sft"} for r in general_sft()]
    write_parts(records[:3], tmp_path / "dedup" / "minimind_sft")
    first = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["sft"]["general"]
    write_parts(records, tmp_path / "dedup" / "minimind_sft")
    second = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["sft"]["general"]
    assert first["train"] + first["val"] == 3 and second["train"] + second["val"] == 5


def test_failure_mid_stage_leaves_no_partial_output(tmp_path, glm):
    write_parts([{**r, "corpus": "minimind_sft"} for r in general_sft()], tmp_path / "dedup" / "minimind_sft")
    (tmp_path / "dedup" / "medical_finetune").mkdir()
    (tmp_path / "dedup" / "medical_finetune" / "part-00000.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    glm.save(tmp_path / "tokenizer")
    recipe = parse_recipe({"corpus": [
        {"name": "minimind_sft", "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": "medical"},
        {"name": "medical_finetune", "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": "medical"}]},
        tmp_path)
    with pytest.raises(Exception):
        run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")
    left = sorted(p.name for p in (tmp_path / "data" / "sft").iterdir())
    assert "medical.csv" not in left and "medical.manifest.json" not in left
    assert not [n for n in left if "tmp" in n]
    # a kill -9 leaves temporary files behind; the next run removes them and finishes
    (tmp_path / "data" / "sft" / ".medical.csv.tmp-99999").write_text("half a row,", encoding="utf-8")
    write_parts([{**r, "corpus": "medical_finetune"} for r in medical_sft()[:20]], tmp_path / "dedup" / "medical_finetune")
    summary = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["sft"]["medical"]
    assert summary["train"] + summary["val"] + sum(summary["rejected"].values()) == len(general_sft()) + 20
    assert not [p for p in (tmp_path / "data" / "sft").iterdir() if "tmp" in p.name]


def test_sft_corpus_with_unknown_stage_is_an_error(tmp_path, glm):
    glm.save(tmp_path / "tokenizer")
    recipe = parse_recipe({"corpus": [{"name": "x", "reader": "jsonl", "paths": ["x"], "role": "sft",
                                       "stage": "medicla"}]}, tmp_path)
    with pytest.raises(ValueError, match="medicla"):
        run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")


# ---------------------------------------------------------------- cut conversations, empty and missing stages (#14)

def one_stage_recipe(root, corpora, kind="sft", stage="general", **sft):
    return parse_recipe({"corpus": [{"name": c, "reader": "jsonl", "paths": ["x"], "role": kind, "stage": stage}
                                    for c in corpora], "sft": {"val_fraction": 0.0, "stages": ["general", "medical"],
                                                               **sft}}, root)


def test_an_empty_or_zero_width_turn_keeps_the_complete_pairs_before_it(tmp_path, glm):
    pairs = [[{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": f"第{i}个回答"}] for i in range(14)]
    turns = [m for p in pairs for m in p]                         # 28 turns
    zero_width = [dict(m) for m in turns]
    zero_width[9]["content"] = "\u200b"                           # the 5th reply is one zero-width space
    blank_user = [dict(m) for m in turns]
    blank_user[4]["content"] = "  "
    first_blank = [dict(m) for m in turns]
    first_blank[1]["content"] = "\u200b\u200d"
    records = [conv(i, m) for i, m in enumerate([zero_width, blank_user, first_blank, turns])]
    write_parts([{**r, "corpus": "sharegpt"} for r in records], tmp_path / "dedup" / "sharegpt")
    glm.save(tmp_path / "tokenizer")
    counts = run(one_stage_recipe(tmp_path, ["sharegpt"]), tmp_path / "dedup", tmp_path / "tokenizer",
                 tmp_path / "data")["sft"]["general"]
    rows = {r["id"]: row_messages(r) for _, r in read_sft_csv(tmp_path / "data" / "sft" / "general.csv").iterrows()}
    assert rows["sharegpt:f.jsonl:0"] == turns[:8] and rows["sharegpt:f.jsonl:1"] == turns[:4]
    assert rows["sharegpt:f.jsonl:3"] == turns and "sharegpt:f.jsonl:2" not in rows
    assert counts["rejected"] == {"empty_turn": 1}
    assert counts["truncated"] == {"empty_turn": 2} and counts["turns_cut"] == {"empty_turn": 20 + 24}


def test_a_conversation_over_the_token_limit_is_cut_at_the_last_complete_pair_that_fits(tmp_path, glm):
    # real medical dialogues chained into long multi-turn conversations
    singles = [messages_of(o["conversations"]) for o in jsonl(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl")]
    singles = [m for m in singles if len(m) == 2][:120]
    long_convs = [[{"role": "system", "content": "你是一名医生。"}] + [t for m in singles[i:i + 12] for t in m]
                  for i in range(0, 120, 12)]
    first_too_long = [{"role": "user", "content": "长" * 3000}, {"role": "assistant", "content": "答"}] + singles[0]
    records = [conv(i, m) for i, m in enumerate(long_convs + [first_too_long])]
    write_parts([{**r, "corpus": "sharegpt"} for r in records], tmp_path / "dedup" / "sharegpt")
    glm.save(tmp_path / "tokenizer")
    max_tokens = 600
    counts = run(one_stage_recipe(tmp_path, ["sharegpt"], max_tokens=max_tokens), tmp_path / "dedup",
                 tmp_path / "tokenizer", tmp_path / "data")["sft"]["general"]
    df = read_sft_csv(tmp_path / "data" / "sft" / "general.csv")
    assert counts["rejected"] == {"too_long": 1} and len(df) == len(long_convs)
    cut = 0
    for (_, row), full in zip(df.iterrows(), long_convs):
        kept = row_messages(row)
        k = len(kept)
        assert kept == full[:k] and k % 2 == 1 and kept[-1]["role"] == "assistant"
        assert row["n_tokens"] == len(glm.render_chat(kept).ids) <= max_tokens
        if k < len(full):   # the next complete pair would not have fitted
            assert len(glm.render_chat(full[:k + 2]).ids) > max_tokens
        cut += len(full) - k
    assert counts["truncated"] == {"too_long": sum(1 for _, r in df.iterrows() if len(row_messages(r)) < 25)}
    assert counts["turns_cut"] == {"too_long": cut} and cut > 0


def test_an_empty_stage_writes_no_output_and_warns_naming_the_corpus_and_reason(tmp_path, glm, capsys):
    pairs = [{"id": f"p.jsonl:{i}", "corpus": "dpo_x", "kind": "pref", "prompt": [{"role": "user", "content": "同"}],
              "chosen": "一样", "rejected": "一样"} for i in range(3)]
    write_parts(pairs, tmp_path / "dedup" / "dpo_x")
    (tmp_path / "dedup" / "dpo_none").mkdir(parents=True)            # read but gave nothing
    (tmp_path / "data" / "clean" / "dpo_none").mkdir(parents=True)
    (tmp_path / "data" / "clean" / "dpo_none" / "manifest.json").write_text(json.dumps(
        {"counts": {"files": 1, "read": 4, "kept": 0, "rejected_by_reason": {"wrong_type": 4}}}))
    glm.save(tmp_path / "tokenizer")
    recipe = one_stage_recipe(tmp_path, ["dpo_x", "dpo_none"], kind="dpo", stage="pairs")
    dpo_dir = tmp_path / "data" / "dpo"
    dpo_dir.mkdir(parents=True)
    (dpo_dir / "pairs.jsonl").write_text('{"stale": 1}\n')             # from an earlier run: must not survive
    counts = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["dpo"]["pairs"]
    assert not (dpo_dir / "pairs.jsonl").exists() and not (dpo_dir / "pairs.val.jsonl").exists()
    assert counts["empty"] == [
        "dpo_x: all 3 record(s) rejected here (chosen_equals_rejected 3)",
        f"dpo_none: no records in {tmp_path / 'dedup' / 'dpo_none'} (read step: all 4 rejected: wrong_type 4; see "
        f"{tmp_path / 'data' / 'rejects' / 'dpo_none.jsonl'})"]
    out = capsys.readouterr().out
    assert "warning: stage dpo/pairs is empty, no dpo/pairs.jsonl written: dpo_x: all 3" in out
    assert "rejected: chosen_equals_rejected 3" in out and "rejected: none" not in out
    again = run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")["dpo"]["pairs"]
    out = capsys.readouterr().out
    assert "dpo/pairs is up to date" in out and "warning: stage dpo/pairs is empty" in out
    assert again["empty"] == counts["empty"]
    # the general/medical SFT stages no corpus feeds: skipped, nothing written
    assert "stage: sft/general: no corpus in the recipe feeds it, skipped" in out
    assert not (tmp_path / "data" / "sft" / "general.csv").exists()


def test_a_stage_with_no_input_at_all_is_an_error_naming_the_step_to_run(tmp_path, glm):
    glm.save(tmp_path / "tokenizer")
    write_parts([{**r, "corpus": "here"} for r in general_sft()], tmp_path / "dedup" / "here")
    recipe = parse_recipe({"corpus": [
        {"name": "here", "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": "general"},
        {"name": "gone", "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": "medical"},
        {"name": "gone_too", "reader": "jsonl", "paths": ["x"], "role": "dpo", "stage": ""}]}, tmp_path)
    with pytest.raises(StageInputError, match=r"sft/medical \(corpora \['gone'\]\), dpo/gone_too .*--steps read,dedup"):
        run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")
    assert not (tmp_path / "data" / "sft" / "general.csv").exists()   # checked before anything is written


def test_a_truncated_or_altered_staged_file_is_redone_not_trusted(tmp_path, glm, capsys):
    write_parts([{**r, "corpus": "minimind_sft"} for r in general_sft()], tmp_path / "dedup" / "minimind_sft")
    glm.save(tmp_path / "tokenizer")
    recipe = one_stage_recipe(tmp_path, ["minimind_sft"])
    run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")
    csv = tmp_path / "data" / "sft" / "general.csv"
    good = csv.read_bytes()
    for damage in (good[: len(good) // 2], good.replace("多轮".encode(), "多伦".encode(), 1)):   # cut; same size
        csv.write_bytes(damage)
        capsys.readouterr()
        run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")
        out = capsys.readouterr().out
        assert "staging again" in out and "up to date" not in out
        assert csv.read_bytes() == good
    run(recipe, tmp_path / "dedup", tmp_path / "tokenizer", tmp_path / "data")
    assert "sft/general is up to date" in capsys.readouterr().out
