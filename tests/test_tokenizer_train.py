"""Tokenizer training (the pipeline's tokenizer step) on real cleaned-text samples: bounded streamed sample, Chinese
settings, specials as single ids, determinism, re-run keeps the result, an existing model is prepared instead."""
import functools
import json
import os

import pytest

from conftest import SAMPLES
from data_process.recipe import parse_recipe
from data_process.records import write_parts
from data_process.train_tokenizer import sample_lines, train_tokenizer
from tokenizer import SPECIAL_PIECES, Tokenizer

CHATGLM2 = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"


def jsonl_texts(path, key="text"):
    return [json.loads(line)[key] for line in path.open(encoding="utf-8") if line.strip()]


def make_docs(root):
    """Three pretraining corpora (Chinese web, medical textbook, English C4) as dedup-step record parts."""
    web = jsonl_texts(SAMPLES / "skywork-zh-web/zh_general.jsonl")
    fever = (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").split("\n\n")
    c4 = jsonl_texts(SAMPLES / "llamafactory-demo/c4_demo.jsonl")
    for name, texts in (("web", web), ("medical", fever), ("c4", c4)):
        write_parts(({"id": f"{name}:{i}", "corpus": name, "kind": "doc", "text": t} for i, t in enumerate(texts)),
                    root / name)
    # an SFT corpus must not be sampled
    write_parts([{"id": "s:0", "corpus": "sft", "kind": "conv",
                  "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                root / "sft")


def recipe_for(tmp_path, **tokenizer):
    raw = {
        "corpus": [{"name": n, "reader": "jsonl", "paths": ["x"], "role": "pretrain"} for n in ("web", "medical", "c4")]
        + [{"name": "sft", "reader": "jsonl", "paths": ["x"], "role": "sft", "stage": "general"}],
        "tokenizer": {"vocab_size": 4000, "sample_chars": 400_000, **tokenizer},
    }
    return parse_recipe(raw, tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_docs(root / "dedup")
    out = train_tokenizer(recipe_for(root), root / "dedup", root / "tokenizer")
    return root, out, Tokenizer.load(out)


N_HELD_OUT = 42   # a constant, so collecting this module reads no sample file


@functools.cache
def held_out_texts():
    medical = [json.loads(line) for line in (SAMPLES / "medicalgpt/rag/medical_corpus.txt").open(encoding="utf-8")]
    firefly = jsonl_texts(SAMPLES / "firefly/dummy_pretrain.jsonl")
    texts = [m["问"] + "\n" + m["答"] for m in medical[:30]] + firefly[:10] + [
        "患者，男，65岁，BP 160/95 mmHg，HbA1c 7.8%。\n\n  处方：阿司匹林 100mg qd\n", "罕见字𠀀𪚥😀\t\tend"]
    assert len(texts) == N_HELD_OUT
    return texts


def test_trained_tokenizer_has_single_token_specials_and_small_ids(trained):
    _, out, tok = trained
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_meta.json").is_file()
    assert tok.vocab_size == 4000
    assert tok.special["eot"] == tok.eos_id == 1 and tok.special["pad"] == tok.pad_id == 2 and tok.bos_id is None
    assert sorted(tok.special.values()) == list(range(1, 1 + len(SPECIAL_PIECES)))
    for name, piece in SPECIAL_PIECES.items():
        assert tok.id_to_piece(tok.special[name]) == piece
    assert tok.changes == []   # trained with the right settings: nothing to prepare


@pytest.mark.parametrize("i", range(N_HELD_OUT))
def test_trained_tokenizer_round_trips_held_out_text_without_unk(trained, i):
    _, _, tok = trained
    text = held_out_texts()[i]
    ids = tok.encode(text)
    assert 0 not in ids                      # byte fallback: never <unk>
    assert tok.decode(ids) == text


def test_no_piece_spans_a_newline_and_digits_are_split(trained):
    _, _, tok = trained
    assert not any("\n" in tok.id_to_piece(i) for i in range(tok.vocab_size))
    assert all(len(tok.decode([i])) == 1 for i in tok.encode("1234567890"))


def test_sample_is_bounded_round_robin_and_skips_non_docs(trained):
    root = trained[0]
    counts = {}
    dirs = [root / "dedup" / n for n in ("web", "medical", "c4", "sft")]
    lines = list(sample_lines(dirs, 50_000, counts))
    chars = sum(map(len, lines))
    assert 50_000 <= chars < 50_000 + 20_000   # stops after the document that crosses the budget
    assert set(counts) == {"web", "medical", "c4"}
    assert all(c["docs"] > 0 for c in counts.values())
    assert not any("\n" in line for line in lines)
    meta = json.loads((trained[1] / "tokenizer_meta.json").read_text(encoding="utf-8"))
    assert set(meta["sample"]) == {"web", "medical", "c4"}


def test_training_is_deterministic_and_rerun_keeps_result(trained, tmp_path):
    root, out, tok = trained
    mtime = (out / "tokenizer.model").stat().st_mtime_ns
    assert train_tokenizer(recipe_for(root), root / "dedup", out) == out
    assert (out / "tokenizer.model").stat().st_mtime_ns == mtime            # kept, not retrained
    again = train_tokenizer(recipe_for(root), root / "dedup", tmp_path / "again")
    assert Tokenizer.load(again).sha256 == tok.sha256                        # same inputs -> same model
    other = train_tokenizer(recipe_for(root, vocab_size=3500), root / "dedup", out)
    assert Tokenizer.load(other).vocab_size == 3500                          # settings changed -> retrained


def test_input_change_retrains_but_a_new_timing_in_the_manifest_does_not(trained, tmp_path):
    root = trained[0]
    docs = tmp_path / "dedup"
    make_docs(docs)
    manifest = {"corpus": "web", "parts": ["part-00000.jsonl.zst"], "counts": {"kept": 240}, "seconds": 1.5}
    (docs / "web" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    out = train_tokenizer(recipe_for(root), docs, tmp_path / "tok")
    mtime = (out / "tokenizer.model").stat().st_mtime_ns
    (docs / "web" / "manifest.json").write_text(json.dumps({**manifest, "seconds": 9.9}), encoding="utf-8")
    train_tokenizer(recipe_for(root), docs, out)
    assert (out / "tokenizer.model").stat().st_mtime_ns == mtime
    (docs / "web" / "manifest.json").write_text(json.dumps({**manifest, "counts": {"kept": 239}}), encoding="utf-8")
    train_tokenizer(recipe_for(root), docs, out)
    assert (out / "tokenizer.model").stat().st_mtime_ns != mtime


def test_existing_model_in_recipe_is_prepared_not_trained(tmp_path):
    recipe = recipe_for(tmp_path, model=os.path.relpath(CHATGLM2, tmp_path))
    out = train_tokenizer(recipe, tmp_path / "nothing-here", tmp_path / "tokenizer")
    tok = Tokenizer.load(out)
    assert tok.sha256 == Tokenizer.load(CHATGLM2).sha256 and tok.vocab_size == 64796
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer(recipe_for(tmp_path, model="missing.model"), tmp_path, tmp_path / "t2")


def test_vocab_smaller_than_the_character_set_is_a_clear_error(trained, tmp_path):
    root = trained[0]
    with pytest.raises(ValueError, match="too small for the characters"):
        train_tokenizer(recipe_for(root, vocab_size=1000), root / "dedup", tmp_path / "small")


def test_no_pretraining_docs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretraining corpus"):
        train_tokenizer(recipe_for(tmp_path), tmp_path / "empty", tmp_path / "tokenizer")


def test_chat_template_and_stream_decoder_hold_for_a_trained_model(trained):
    import jinja2

    from tokenizer import CHAT_TEMPLATE_JINJA, TAGS, StreamDecoder
    _, _, tok = trained
    msgs = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "发烧怎么办？\n38.5度"},
            {"role": "assistant", "content": "<think>\n中度发热。\n</think>\n<answer>\n多喝水，必要时就医。\n</answer>"}]
    chat = tok.render_chat(msgs, tag_weight=0.2)
    text = jinja2.Environment().from_string(CHAT_TEMPLATE_JINJA).render(messages=msgs, add_generation_prompt=False)
    assert tok.encode(text, allow_special=True) == chat.ids
    weighted = [i for i, w in zip(chat.ids, chat.weights) if w > 0]
    assert tok.decode(weighted) == msgs[-1]["content"] + "<|im_end|>"
    assert [w for i, w in zip(chat.ids, chat.weights) if i in {tok.special[t] for t in TAGS}] == [0.2] * 4
    for text in held_out_texts():
        ids = tok.encode(text)
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in ids]
        assert "\ufffd" not in "".join(pieces) and "".join(pieces) + dec.flush() == text
