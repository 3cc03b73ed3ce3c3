"""SFT data and stages: assistant-only loss mask, chat template, reasoning tag weights, bucketed batches,
bad rows, and a stage end to end through train_loop with the real tokenizer and real SFT samples."""
import json

import numpy as np
import pandas as pd
import pytest

import sft
from data_process.stage import read_sft_conversations
from test_sft_fixtures import (FAST_TRAIN, MEDICAL_SFT, MINIMIND_SFT, SAMPLES, base_checkpoint, read_records,
                               real_tokenizer, stage, write_toml)


def multi_turn_records(n=6):
    """Real medical Q/A pairs joined two by two into system + two-turn conversations."""
    single = read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=200)
    single = [r for r in single if len(r["messages"]) == 2 and len(r["messages"][1]["content"]) < 60][:2 * n]
    out = []
    for i in range(0, len(single) - 1, 2):
        messages = [{"role": "system", "content": "你是一名耐心的医生。"}] + single[i]["messages"] + \
            single[i + 1]["messages"]
        out.append({"id": f"mt{i}", "corpus": "medical_sft", "kind": "conv", "messages": messages})
    return out


def full_ids(batch, row):
    """The rendered ids of a batch row: inputs (up to the padding) plus the last target."""
    n = int((batch["loss_weights"][row] > 0).nonzero().max()) + 1
    return batch["input_ids"][row, :n].tolist() + [int(batch["targets"][row, n - 1])]


def weighted_spans(batch, row):
    """Runs of consecutive target ids that carry loss."""
    targets, weights = batch["targets"][row].tolist(), batch["loss_weights"][row].tolist()
    spans, current = [], []
    for t, w in zip(targets, weights):
        if w > 0:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_loss_mask_covers_exactly_the_assistant_spans_and_their_end_tokens(tmp_path):
    tok = real_tokenizer()
    records = multi_turn_records()
    csv = stage(tmp_path, records, "medical", max_tokens=200)
    data = sft.load_sft_set(tok, csv, max_tokens=200)
    assert len(data) == len(records)
    batches = sft.SFTBatches(data, batch_size=len(data), pad_id=tok.pad_id)
    batch = batches.collate(np.arange(len(data)))
    conversations, _ = read_sft_conversations(csv)
    im_end = tok.special["im_end"]
    for row, messages in enumerate(conversations):
        expected = [tok.encode(m["content"]) + [im_end] for m in messages if m["role"] == "assistant"]
        assert len(expected) == 2
        assert weighted_spans(batch, row) == expected
        # targets are the inputs shifted by one; nothing outside the spans counts
        ids = full_ids(batch, row)
        targets = batch["targets"][row].tolist()
        weights = batch["loss_weights"][row].tolist()
        for t in range(len(ids) - 1):
            assert targets[t] in (ids[t + 1], sft.IGNORE)
            assert (targets[t] != sft.IGNORE) == (weights[t] > 0)
        pad = batch["input_ids"][row, len(ids) - 1:]
        assert (pad == tok.pad_id).all()
        assert (batch["loss_weights"][row, len(ids) - 1:] == 0).all()
        assert (batch["targets"][row, len(ids) - 1:] == sft.IGNORE).all()


def test_system_prompt_and_multi_turn_render_as_the_template_says(tmp_path):
    tok = real_tokenizer()
    records = multi_turn_records(3)
    csv = stage(tmp_path, records, "medical", max_tokens=200)
    data = sft.load_sft_set(tok, csv, max_tokens=200)
    batch = sft.SFTBatches(data, batch_size=len(data), pad_id=tok.pad_id).collate(np.arange(len(data)))
    for row, record in enumerate(records):
        m = record["messages"]
        text = "".join(f"<|im_start|>{x['role']}\n{x['content']}<|im_end|>" for x in m)   # CHAT_FORMAT, by hand
        assert m[0]["role"] == "system" and len(m) == 5
        assert tok.decode(full_ids(batch, row)) == text


def test_reasoning_tag_weight_falls_only_on_the_tag_tokens(tmp_path):
    tok = real_tokenizer()
    base = read_records("minimind_sft_jsonl", MINIMIND_SFT, "minimind_r1")
    records = []
    for i, r in enumerate(base):   # r1_mix-style answers: <think>...</think><answer>...</answer>
        m = [dict(x) for x in r["messages"]]
        m[-1]["content"] = f"<think>先想一想：{m[-2]['content']}</think><answer>{m[-1]['content']}</answer>"
        records.append({**r, "id": f"r1:{i}", "messages": m})
    csv = stage(tmp_path, records, "reasoning", max_tokens=200)
    data = sft.load_sft_set(tok, csv, max_tokens=200, tag_weight=4.0)
    batch = sft.SFTBatches(data, batch_size=len(data), pad_id=tok.pad_id).collate(np.arange(len(data)))
    tag_ids = {tok.special[k] for k in ("think_start", "think_end", "answer_start", "answer_end")}
    targets, weights = batch["targets"].numpy(), batch["loss_weights"].numpy()
    is_tag = np.isin(targets, list(tag_ids))
    assert is_tag.sum() == 4 * len(records)                   # each tag once per answer, as a single token
    assert (weights[is_tag] == 4.0).all()
    assert set(np.unique(weights[~is_tag])) <= {0.0, 1.0}     # everything else: ordinary weight or none
    assert (weights[targets == tok.special["im_end"]] == 1.0).all()


def test_bucketed_batches_keep_padding_under_10_percent_on_the_medical_dialogue_sample():
    tok = real_tokenizer()
    csv_path = next((SAMPLES / "toyhom-medical-dialogue").glob("*.csv"))
    records = read_records("medical_dialogue_csv", csv_path, "medical_dialogue")
    assert len(records) > 7000
    data = sft.tokenize_conversations(tok, [r["messages"] for r in records], max_tokens=512)
    batches = sft.SFTBatches(data, batch_size=16, pad_id=tok.pad_id)
    padding = batches.padding_fraction()
    lengths = batches.lengths
    naive = 1 - lengths.sum() / (len(lengths) * lengths.max())     # pad every example to the longest
    assert padding < 0.10
    assert naive > 0.5
    # what padding_fraction reports is what collate produces
    b = batches.next_batch(3, 0)
    assert b["input_ids"].shape[1] == sft.pad_length(int(lengths[batches.indices(3, 0)].max()), 8)


def test_batches_are_a_function_of_the_step_and_see_each_example_once_per_epoch(tmp_path):
    tok = real_tokenizer()
    records = read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=120)
    data = sft.tokenize_conversations(tok, [r["messages"] for r in records], max_tokens=256)
    a = sft.SFTBatches(data, batch_size=4, pad_id=tok.pad_id, seed=3, grad_accum=2)
    b = sft.SFTBatches(data, batch_size=4, pad_id=tok.pad_id, seed=3, grad_accum=2)
    for step, micro in [(5, 1), (0, 0), (17, 0)]:   # any order: no hidden iterator state
        x, y = a.next_batch(step, micro), b.next_batch(step, micro)
        assert all((x[k] == y[k]).all() for k in x)
    seen = np.concatenate([a.indices(g // 2, g % 2) for g in range(a.batches_per_epoch)])
    assert len(seen) == len(set(seen.tolist())) == (len(data) // 4) * 4
    other = sft.SFTBatches(data, batch_size=4, pad_id=tok.pad_id, seed=4, grad_accum=2)
    assert not np.array_equal(other.indices(0, 0), a.indices(0, 0))
    with pytest.raises(ValueError, match="different SFT data or seed"):
        other.load_state_dict(a.state_dict())


def test_bad_rows_are_counted_and_logged_not_fatal(tmp_path, caplog):
    good = json.dumps([{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}],
                      ensure_ascii=False)
    rows = [{"id": "a", "source": "s", "system": "", "conversation": good, "answer": "", "n_tokens": 0},
            {"id": "b", "source": "s", "system": "", "conversation": "[{not json", "answer": "", "n_tokens": 0},
            {"id": "c", "source": "s", "system": "",
             "conversation": json.dumps([{"role": "user", "content": "只有问题"}], ensure_ascii=False),
             "answer": "", "n_tokens": 0}]
    path = tmp_path / "x.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    conversations, rejects = read_sft_conversations(path)
    assert len(conversations) == 1 and rejects == {"bad_json": 1, "malformed": 1}
    assert "row id b rejected" in caplog.text
    data = sft.tokenize_conversations(real_tokenizer(), conversations * 2 + [[{"role": "user", "content": "x"},
                                      {"role": "assistant", "content": "很长" * 300}]], max_tokens=64,
                                      rejects=rejects)
    assert len(data) == 2 and data.rejects["too_long"] == 1
    pd.DataFrame([{"id": "a", "text": "x"}]).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(ValueError, match="missing columns"):
        read_sft_conversations(tmp_path / "wrong.csv")
    with pytest.raises(FileNotFoundError, match="data_process.py"):
        read_sft_conversations(tmp_path / "absent.csv")


@pytest.mark.slow
def test_sft_stage_trains_through_the_loop_and_writes_a_chat_checkpoint(tmp_path, capsys):
    from checkpoint import load_checkpoint
    from train_loop import read_jsonl
    base = base_checkpoint(tmp_path / "base")
    csv = stage(tmp_path, read_records("sharegpt_jsonl", MEDICAL_SFT, "medical_sft", limit=80), "medical", max_tokens=96)
    val = tmp_path / "data" / "sft" / "medical.val.csv"
    pd.read_csv(csv, dtype=str, keep_default_na=False).head(8).to_csv(val, index=False)
    config = write_toml(tmp_path / "medical.toml",
                        {"data": str(csv), "val_data": str(val), "init_from": str(base),
                         "out_dir": str(tmp_path / "out" / "medical")}, FAST_TRAIN)
    assert sft.main([str(config), "--steps", "3"]) == 0
    model, tok, meta = load_checkpoint(tmp_path / "out" / "medical" / "final")
    assert meta["kind"] == "sft" and meta["chat"] is True and meta["stage"] == "medical" and meta["step"] == 3
    assert meta["train_config"]["extra"]["padding_fraction"] < 0.2
    records = read_jsonl(tmp_path / "out" / "medical" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any("medical/loss" in r for r in records if r.get("kind") == "val")
    # running the finished stage again trains nothing
    capsys.readouterr()
    assert sft.main([str(config), "--steps", "3"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_stage_configs_parse_and_chain_in_curriculum_order():
    from train_loop import TrainConfig
    order = ["general", "medical", "medical_dialogue", "reasoning"]
    previous = "out/pretrain/converge/final"
    for name in order:
        cfg = sft.load_stage_config(name)
        assert cfg.stage == name and cfg.init_from == previous and cfg.data == f"data/sft/{name}.csv"
        previous = f"{cfg.out_dir}/final"
        tc = sft.make_train_config(cfg.train, cfg.out_dir, 100, cfg.warmup_fraction, cfg.decay_fraction, {})
        assert isinstance(tc, TrainConfig)
        assert tc.warmup_steps + tc.stable_steps + tc.decay_steps == 100
    assert sft.load_stage_config("medical_dialogue").lora is not None
    assert sft.load_stage_config("reasoning").tag_weight > 1
    with pytest.raises(ValueError, match=r"unknown key\(s\)"):       # typos are errors, not silently ignored
        sft.load_stage_config("general", overrides=["epoch=3"])
    with pytest.raises(ValueError, match=r"unknown key\(s\)"):
        sft.make_train_config({"learning_rate": 1}, "x", 10, 0, 0, {})
