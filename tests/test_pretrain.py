"""pretrain.py: the staged curriculum end to end on real sample text, the LR curve across phases, exact resume
after kill -9, DDP on CPU, the mixture loader and per-corpus validation.

Shards are made by the real pipeline pieces: a small SentencePiece model trained on the samples
(tokenizer.train_sentencepiece), records written with data_process.records.write_parts and tokenized with
data_process.tokenize_docs.tokenize_corpus into data/pretrain/<corpus>/ with its manifest."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SAMPLES

import pretrain
import checkpoint
import train_loop

# the phase corpora the samples stand in for; baidubaike, wudao, skypile are absent on purpose (a user
# without them): the shipped mixtures name them, so the tests run a copy with `allow_missing = true`
CHARS = 24_000


def _take(texts, limit=CHARS):
    out, n = [], 0
    for t in texts:
        t = t.strip()
        if t and n < limit:
            out.append(t[:3000])
            n += len(out[-1])
    return out


def _jsonl(path, key=None):
    for line in open(path, encoding="utf-8"):
        if line.strip():
            obj = json.loads(line)
            yield obj if key is None else obj[key]


def _paragraphs(path, per_doc=5):
    lines = [l.strip() for l in open(path, encoding="utf-8") if l.strip()]
    return ["\n".join(lines[i:i + per_doc]) for i in range(0, len(lines), per_doc)]


def sample_docs() -> dict:
    s = SAMPLES
    return {
        "wiki_zh": _take(_jsonl(s / "skywork-zh-web/zh_general.jsonl", "text")),
        "c4_zh": _take(_jsonl(s / "firefly/dummy_pretrain.jsonl", "text")),
        "medical_pretrain": _take(o["问"] + "\n" + o["答"] for o in _jsonl(s / "medicalgpt/rag/medical_corpus.txt")),
        "minimind_pretrain": _take(_jsonl(s / "minimind-format-tiny/tiny_pretrain.jsonl", "text")),
        "medical_books": _take(_paragraphs(s / "medicalgpt/pretrain/fever.txt")),
        "guidelines": _take(open(s / "llamafactory-demo/wiki_demo.txt", encoding="utf-8")),
    }


def sample_conversations(limit=CHARS) -> list:
    convs, n = [], 0
    for obj in _jsonl(SAMPLES / "medicalgpt/sft/medical_sft_1K_format.jsonl"):
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"][:1500]}
                for t in obj["conversations"]]
        if n >= limit or not msgs or msgs[-1]["role"] != "assistant":
            continue
        convs.append(msgs)
        n += sum(len(m["content"]) for m in msgs)
    return convs


def build_data(root: Path) -> dict:
    """tokenizer + data/pretrain/<corpus>/ for the sample corpora, through the real pipeline pieces."""
    from data_process.records import write_parts
    from data_process.tokenize_docs import Settings, tokenize_corpus
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    docs = sample_docs()
    convs = sample_conversations()
    lines = [l for texts in docs.values() for t in texts[:4] for l in t.split("\n") if l.strip()]
    lines += [m["content"] for c in convs[:4] for m in c]
    tok = Tokenizer(train_sentencepiece(lines, 3000))
    tok_dir = tok.save(root / "tokenizer")
    docs_root, out_root = root / "dedup", root / "pretrain"
    jobs = [(name, [{"id": f"{name}:{i}", "corpus": name, "kind": "doc", "text": t} for i, t in enumerate(texts)],
             "doc") for name, texts in docs.items()]
    jobs.append(("sft_medical", [{"id": f"sft:{i}", "corpus": "medical_finetune", "kind": "conv", "messages": m}
                                 for i, m in enumerate(convs)], "conv"))
    for name, records, kind in jobs:
        parts = write_parts(records, docs_root / name)
        tokenize_corpus(name, parts, docs_root, tok, tok_dir, out_root / name,
                        Settings(val_fraction=0.15, shard_tokens=8000, kind=kind), workers=1, progress=False)
    return {"tokenizer": tok_dir, "data": out_root, "tok": tok}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP with 2 threads under contention is 10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("pretrain_data"))


TINY = ["--preset", "tiny", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--no-progress",
        "--val-windows", "4"]


def _args(data, out, *extra, config_dir=None):
    return ["--data-dir", str(data["data"]), "--tokenizer", str(data["tokenizer"]), "--out-dir", str(out),
            "--config-dir", str(config_dir or ROOT / "config/pretrain"), *TINY, *extra]


def _metrics(path):
    return [r for r in train_loop.read_jsonl(path) if "loss" in r]


def shipped_config_allowing_missing(d: Path) -> Path:
    """config/pretrain/ as shipped, each phase with `allow_missing = true` (the user's explicit choice)."""
    d.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "config/pretrain").glob("*.toml"):
        text = f.read_text()
        (d / f.name).write_text(text if f.name == "schedule.toml" else "allow_missing = true\n" + text)
    return d


def _write_config(d: Path, phases: dict, total_tokens: int, schedule_extra: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "schedule.toml").write_text(
        f'phases = {json.dumps(list(phases))}\n[model]\npreset = "tiny"\n[schedule]\ntotal_tokens = {total_tokens}\n'
        f'peak_lr = 3e-3\nmin_lr = 3e-4\nwarmup_fraction = 0.1\ndecay_fraction = 0.2\ndecay = "exp"\n{schedule_extra}')
    for name, body in phases.items():
        (d / f"{name}.toml").write_text(body)
    return d


# ----------------------------------------------------------------------------- the curriculum

def test_shipped_curriculum_decays_over_the_anneal_and_converge_phases():
    schedule = pretrain.load_schedule(ROOT / "config/pretrain")
    phases = [pretrain.load_phase(ROOT / "config/pretrain", p) for p in schedule.phases]
    assert schedule.phases == ["warmup", "stable", "anneal", "converge"]
    plan = pretrain.plan_curriculum(schedule, phases, 65_536)
    assert plan.bounds["warmup"][1] == plan.warmup_steps          # warmup phase = the LR warmup
    assert plan.bounds["anneal"][0] == plan.warmup_steps + plan.stable_steps   # decay starts with anneal
    assert plan.bounds["converge"][1] == plan.total_steps == plan.warmup_steps + plan.stable_steps + plan.decay_steps
    assert abs(plan.decay_steps / plan.total_steps - 0.10) < 0.01
    assert set(phases[2].mixture) >= {"medical_books", "medical_pretrain", "sft_medical"}
    assert set(phases[3].mixture) == {"guidelines", "medical_books"}


@pytest.mark.slow
def test_every_phase_end_to_end_and_phase_by_phase_equals_all(data, tmp_path, capsys):
    # 40 steps over the shipped phase fractions: warmup 1, stable 35, anneal 3, converge 1
    tokens = 40 * 4 * 2 * 32
    common = ["--total-tokens", str(tokens), "--eval-interval", "20", "--save-interval", "30"]
    cfg = shipped_config_allowing_missing(tmp_path / "cfg")
    t0 = time.time()
    assert pretrain.main(_args(data, tmp_path / "all", "--all", *common, config_dir=cfg)) == 0
    err = capsys.readouterr().err
    assert "allow_missing: dropped ['baidubaike', 'wudao', 'skypile']" in err and "renormalized" in err
    for phase in ["warmup", "stable", "anneal", "converge"]:
        assert pretrain.main(_args(data, tmp_path / "each", "--phase", phase, *common, config_dir=cfg)) == 0
    assert time.time() - t0 < 60

    schedule = pretrain.load_schedule(ROOT / "config/pretrain")
    schedule.total_tokens = tokens
    plan = pretrain.plan_curriculum(schedule, [pretrain.load_phase(ROOT / "config/pretrain", p)
                                               for p in schedule.phases], 4 * 2 * 32)
    expected_lr = pretrain.lr_curve(schedule, plan)
    runs = {}
    for run in ("all", "each"):
        records = []
        for phase in schedule.phases:
            phase_records = _metrics(tmp_path / run / phase / "metrics.jsonl")
            assert [r["step"] for r in phase_records] == list(range(*plan.bounds[phase]))
            records += phase_records
            model, tok, meta = checkpoint.load_checkpoint(tmp_path / run / phase / "final")
            assert meta["phase"] == phase and meta["kind"] == "base" and meta["step"] == plan.bounds[phase][1]
            assert tok.sha256 == data["tok"].sha256 and model.config.vocab_size == tok.vocab_size
            vals = [r for r in train_loop.read_jsonl(tmp_path / run / phase / "metrics.jsonl") if r.get("kind") == "val"]
            assert vals and all(math.isfinite(v) for v in vals[-1].values() if isinstance(v, float))
            assert (tmp_path / run / phase / "metrics.png").stat().st_size > 0
        lrs = [r["lr"] for r in records]
        assert lrs == pytest.approx(expected_lr, rel=1e-12, abs=0)   # one continuous WSD curve
        runs[run] = [r["loss"] for r in records]
    # continuing from each phase's final checkpoint is the same computation as one --all call
    assert runs["all"] == runs["each"]
    assert expected_lr[-1] == pytest.approx(schedule.min_lr)
    anneal_val = [r for r in train_loop.read_jsonl(tmp_path / "all/anneal/metrics.jsonl") if r.get("kind") == "val"][-1]
    for corpus in ("medical_books", "medical_pretrain", "sft_medical", "wiki_zh"):
        assert anneal_val[f"val/{corpus}/bpc"] > 0
    # a finished phase run again does nothing and keeps its checkpoint
    before = (tmp_path / "all/converge/final/meta.json").read_text()
    assert pretrain.main(_args(data, tmp_path / "all", "--phase", "converge", *common, config_dir=cfg)) == 0
    assert (tmp_path / "all/converge/final/meta.json").read_text() == before


def test_phase_refuses_to_start_without_the_previous_phase(data, tmp_path, capsys):
    assert pretrain.main(_args(data, tmp_path, "--phase", "anneal", "--total-tokens", "20000")) == 1
    assert "run `sh script/pretrain.sh stable` first" in capsys.readouterr().err


def test_phase_with_none_of_its_corpora_is_a_clear_error(data, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg", {"only": 'allow_missing = true\nfraction = 1.0\n[mixture]\n'
                                                   'baidubaike = 1.0\nwudao = 2.0\n'}, 2000)
    assert pretrain.main(_args(data, tmp_path / "out", "--phase", "only", config_dir=cfg)) == 1
    err = capsys.readouterr().err
    assert "none of its corpora" in err and "baidubaike" in err


def test_a_typo_in_a_mixture_is_an_error_naming_the_file_and_key_unless_missing_corpora_are_allowed(
        data, tmp_path, capsys):
    body = 'fraction = 1.0\n[mixture]\nwiki_zh = 1.0\nmedical_bookz = 1.0\n'
    cfg = _write_config(tmp_path / "cfg", {"p": body}, 2000)
    assert pretrain.main(_args(data, tmp_path / "out", "--phase", "p", config_dir=cfg)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {cfg / 'p.toml'}: mixture 'medical_bookz': not in {data['data']}")
    assert "'medical_books'" in err and "allow_missing = true" in err   # what is there, and the way out
    assert not (tmp_path / "out/p").exists() or not list((tmp_path / "out/p").glob("step-*"))
    # allowed explicitly: dropped with a warning, the rest renormalized
    cfg = _write_config(tmp_path / "cfg2", {"p": "allow_missing = true\n" + body}, 2000)
    assert pretrain.main(_args(data, tmp_path / "out2", "--phase", "p", "--max-steps", "1", config_dir=cfg)) == 0
    assert "allow_missing: dropped ['medical_bookz']; mixture renormalized over the corpora present: wiki_zh " \
           "1.000" in capsys.readouterr().err
    assert checkpoint.verify_checkpoint(tmp_path / "out2/p/final")["train_config"]["extra"]["mixture"] == \
        {"wiki_zh": 1.0}


@pytest.mark.parametrize("body, key, why", [
    ('fraction = -0.01\n[mixture]\nwiki_zh = 1.0\n', "fraction", "out of range (must be >= 0)"),
    ('fraction = 1.5\n[mixture]\nwiki_zh = 1.0\n', "fraction", "out of range (must be <= 1)"),
    ('fraction = 1.0\n[mixture]\nwiki_zh = -1.0\n', "mixture", "out of range (must be >= 0)"),
    ('fraction = 1.0\n[mixture]\nwiki_zh = "1.0"\n', "mixture.wiki_zh", "expected a number, got '1.0'"),
    ('fraction = 1.0\nallow_missing = "yes"\n[mixture]\nwiki_zh = 1.0\n', "allow_missing", "true or false"),
])
def test_out_of_range_or_mistyped_phase_values_are_one_line_errors_naming_file_and_key(
        data, tmp_path, capsys, body, key, why):
    cfg = _write_config(tmp_path / "cfg", {"p": body}, 2000)
    assert pretrain.main(_args(data, tmp_path / "out", "--phase", "p", config_dir=cfg)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {cfg / 'p.toml'}.{key}") and why in err


def test_seq_len_longer_than_the_preset_context_is_an_error_unless_the_context_is_raised_explicitly(
        data, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg", {"p": 'fraction = 1.0\n[mixture]\nwiki_zh = 1.0\n'}, 100_000)
    args = _args(data, tmp_path / "out", "--phase", "p", "--max-steps", "1", config_dir=cfg)
    args[args.index("--seq-len") + 1] = "300"   # the tiny preset's context is 256
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--seq-len 300 is longer than the model's context 256 (preset 'tiny')" in err
    assert "[model] max_seq_len" in err and not (tmp_path / "out/p/final").exists()
    assert pretrain.main(args + ["--set", "model.max_seq_len=300"]) == 0   # explicit: a longer context
    meta = checkpoint.verify_checkpoint(tmp_path / "out/p/final")
    assert json.loads((tmp_path / "out/p/final/config.json").read_text())["max_seq_len"] == 300
    assert meta["train_config"]["extra"]["mixture"] == {"wiki_zh": 1.0}   # nothing dropped from the mixture


def test_shards_of_another_tokenizer_are_refused(data, tmp_path, capsys):
    other = SAMPLES / "chatglm2-tokenizer/tokenizer.model"
    args = _args(data, tmp_path, "--phase", "warmup", "--total-tokens", "20000")
    args[args.index("--tokenizer") + 1] = str(other)
    assert pretrain.main(args) == 1
    assert "made with tokenizer" in capsys.readouterr().err


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = _write_config(tmp_path, {"p": 'fraction = 1.0\nmixtrue = 1\n[mixture]\nwiki_zh = 1.0\n'}, 1000)
    with pytest.raises(ValueError, match="mixtrue"):
        pretrain.load_phase(cfg, "p")


# ----------------------------------------------------------------------------- loader and validation

def _mixture(data, names, weights, seq_len=32):
    corpora = [pretrain.open_corpus(data["data"], n, data["tok"].sha256, seq_len + 1) for n in names]
    return corpora, np.array(weights) / sum(weights)


def test_loader_is_deterministic_in_step_micro_step_and_rank_and_reads_real_windows(data):
    corpora, w = _mixture(data, ["wiki_zh", "medical_books"], [3, 1])
    a = pretrain.MixtureLoader(corpora, w, 8, 32, seed=7, rank=0)
    b = pretrain.MixtureLoader(corpora, w, 8, 32, seed=7, rank=0)
    c = pretrain.MixtureLoader(corpora, w, 8, 32, seed=7, rank=1)
    b.next_batch(5, 0)   # the order of calls does not matter, only (seed, step, micro_step, rank)
    x = a.next_batch(3, 1)
    assert torch.equal(x["input_ids"], b.next_batch(3, 1)["input_ids"])
    assert not torch.equal(x["input_ids"], c.next_batch(3, 1)["input_ids"])
    assert not torch.equal(x["input_ids"], a.next_batch(3, 0)["input_ids"])
    assert torch.equal(x["input_ids"][:, 1:], x["targets"][:, :-1])
    streams = [np.asarray(ds.tokens) for cp in corpora for ds in cp.train]
    for row in torch.cat([x["input_ids"], x["targets"][:, -1:]], 1).numpy():   # every row is a window of a shard
        assert any(np.any(np.all(np.lib.stride_tricks.sliding_window_view(s, 33) == row, axis=1)) for s in streams)
    counts = np.zeros(2)
    for step in range(150):
        a.next_batch(step, 0)
    drawn = a.state_dict()["windows_drawn"]
    counts[:] = drawn["wiki_zh"], drawn["medical_books"]
    assert abs(counts[0] / counts.sum() - 0.75) < 0.05


def test_a_corpus_smaller_than_one_window_is_trained_on_padded_not_dropped(data, capsys):
    manifest = json.loads((data["data"] / "guidelines/manifest.json").read_text())
    shards = {k: v["tokens"] for k, v in manifest["shard_info"].items() if k.startswith("train")}
    seq_len = max(shards.values()) + 20
    corpus = pretrain.open_corpus(data["data"], "guidelines", data["tok"].sha256, seq_len + 1)
    assert "its windows are shorter than --seq-len, padded" in capsys.readouterr().err
    loader = pretrain.MixtureLoader([corpus], [1.0], 6, seq_len, seed=3, pad_id=data["tok"].pad_id)
    batch = loader.next_batch(0, 0)
    streams = {tuple(np.asarray(ds.tokens)) for ds in corpus.train}
    for x, y in zip(batch["input_ids"], batch["targets"]):
        n = int((y != -100).sum())
        assert tuple(x[:n].tolist()) + (int(y[n - 1]),) in streams   # a whole shard, then padding
        assert (x[n:] == data["tok"].pad_id).all() and (y[n:] == -100).all()


def test_within_document_windows_never_cross_a_document_end(data):
    corpora, w = _mixture(data, ["medical_pretrain"], [1])
    loader = pretrain.MixtureLoader(corpora, w, 16, 32, seed=1, pack=False, pad_id=data["tok"].pad_id)
    eos = data["tok"].eos_id
    for step in range(10):
        batch = loader.next_batch(step, 0)
        for x, y in zip(batch["input_ids"], batch["targets"]):
            real = y[y != -100]
            assert len(real) > 0 and (real[:-1] != eos).all()   # an end-of-text only as the last target
            assert (x[len(real):] == data["tok"].pad_id).all()
    packed = pretrain.MixtureLoader(corpora, w, 16, 32, seed=1, pack=True)
    assert any((b == eos).any() for b in packed.next_batch(0, 0)["input_ids"][:, :-1])   # packing crosses them


def _by_hand(model, tok, windows):
    """Loss and bits per character recomputed from full logits in float64: bits per character over the targets
    that are not special tokens, characters of exactly those tokens decoded by the tokenizer."""
    specials = set(tok.special.values()) | {tok.eos_id, tok.pad_id}
    nll = text_nll = 0.0
    n = chars = 0
    for w_ in windows:
        logp = torch.log_softmax(model(torch.tensor(w_[None, :-1])).logits[0].double(), -1)
        per = -logp[torch.arange(len(w_) - 1), torch.tensor(w_[1:])]
        text = torch.tensor([int(t) not in specials for t in w_[1:]])
        nll, n, text_nll = nll + per.sum().item(), n + len(per), text_nll + per[text].sum().item()
        chars += len(tok.decode(w_[1:], skip_special=True))
    return nll / n, text_nll / math.log(2) / chars


def test_val_loss_and_bits_per_char_match_a_direct_computation(data):
    from model import Transformer, make_config
    torch.manual_seed(0)
    tok = data["tok"]
    model = Transformer(make_config("tiny", tok.vocab_size)).eval()
    corpora, _ = _mixture(data, ["wiki_zh", "guidelines", "sft_medical"], [1, 1, 1])
    val_fn = pretrain.make_val_fn(corpora, 32, 5, 2, "cpu", tok)
    with torch.no_grad():
        got = val_fn(model)
        for c in corpora:
            windows = pretrain.val_windows(c, 32, 5)
            assert len(windows) == 5 and all(len(w_) == 33 for w_ in windows)
            loss, bits = _by_hand(model, tok, windows)
            assert got[f"val/{c.name}/loss"] == pytest.approx(loss, rel=1e-5)
            assert got[f"val/{c.name}/bpc"] == pytest.approx(bits, rel=1e-5)
    # the chat-rendered corpus: template tokens are scored in the loss but never charged against characters
    sft = np.concatenate([w_[1:] for w_ in pretrain.val_windows(corpora[2], 32, 5)])
    assert np.isin(sft, list(tok.special.values())).any()
    assert set(got) == {f"val/{c}/{k}" for c in ("wiki_zh", "guidelines", "sft_medical") for k in ("loss", "bpc")} \
        | {"val/loss"}
    assert val_fn(model) == got   # fixed windows


def test_every_corpus_with_val_tokens_is_validated_even_when_its_val_split_is_shorter_than_a_window(data):
    from model import Transformer, make_config
    manifest = json.loads((data["data"] / "guidelines/manifest.json").read_text())
    val_tokens = manifest["splits"]["val"]["tokens"]
    longest_train = max(v["tokens"] for k, v in manifest["shard_info"].items() if k.startswith("train"))
    seq_len = val_tokens + 10   # one window is longer than the whole val split, shorter than a train shard
    assert seq_len + 1 <= longest_train
    corpus = pretrain.open_corpus(data["data"], "guidelines", data["tok"].sha256, seq_len + 1)
    assert corpus.val and sum(ds.num_tokens for ds in corpus.val) == val_tokens
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", data["tok"].vocab_size, max_seq_len=seq_len)).eval()
    with torch.no_grad():
        got = pretrain.make_val_fn([corpus], seq_len, 4, 2, "cpu", data["tok"])(model)
        loss, bits = _by_hand(model, data["tok"], pretrain.val_windows(corpus, seq_len, 4))
    assert got["val/guidelines/loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val/guidelines/bpc"] == pytest.approx(bits, rel=1e-5)


def test_val_split_shorter_than_a_window_is_scored_whole(data):
    corpora, _ = _mixture(data, ["guidelines"], [1])
    c = corpora[0]
    total = sum(ds.num_tokens for ds in c.val)
    windows = pretrain.val_windows(c, total + 50, 5)   # a context longer than the whole val split
    assert len(windows) == 1 and len(windows[0]) == total
    assert np.array_equal(windows[0], np.concatenate([np.asarray(ds.tokens) for ds in c.val]))


# ----------------------------------------------------------------------------- kill -9, DDP

def _one_phase_config(tmp_path, steps, tokens_per_step=4 * 2 * 32):
    return _write_config(tmp_path / "cfg", {"main": 'fraction = 1.0\n[mixture]\nwiki_zh = 2.0\nmedical_books = 1.0\n'
                                                     'c4_zh = 1.0\n'}, steps * tokens_per_step)


def _cmd(data, out, cfg, *extra):
    return [sys.executable, str(ROOT / "pretrain.py"), *_args(data, out, "--phase", "main", *extra, config_dir=cfg)]


@pytest.mark.slow
def test_resume_after_kill_9_gives_identical_losses(data, tmp_path):
    cfg = _one_phase_config(tmp_path, 60)
    extra = ["--save-interval", "5", "--eval-interval", "25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted reference, in this process (one thread, as the subprocesses)
    assert pretrain.main(_cmd(data, tmp_path / "ref", cfg, *extra)[2:]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, out, cfg, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        steps = [r["step"] for r in _metrics(out / "main/metrics.jsonl")]
        if steps and steps[-1] >= 12 and (out / "main/step-000010").is_dir():
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in _metrics(out / "main/metrics.jsonl"))
    assert 12 <= killed_at < 59, "the kill must land mid-phase"
    resumed = subprocess.run(_cmd(data, out, cfg, *extra), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    ref_losses = [(r["step"], r["loss"]) for r in _metrics(tmp_path / "ref/main/metrics.jsonl")]
    got = [(r["step"], r["loss"]) for r in _metrics(out / "main/metrics.jsonl")]
    assert got == ref_losses and len(got) == 60
    a = checkpoint.verify_checkpoint(tmp_path / "ref/main/final")
    b = checkpoint.verify_checkpoint(out / "main/final")
    assert a["param_sha256"] == b["param_sha256"]
    assert not list((out / "main").glob(".tmp-*"))


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_train_identical_replicas_and_save_once(data, tmp_path):
    cfg = _one_phase_config(tmp_path, 12, tokens_per_step=4 * 2 * 32 * 2)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "pretrain.py"), *_args(data, out, "--phase", "main", "--save-interval", "5",
                                             "--eval-interval", "6", config_dir=cfg)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("phase main done") == 1          # only rank 0 reports
    records = _metrics(out / "main/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(12))   # logged once per step, not per rank
    assert records[0]["tokens"] == 4 * 2 * 32 * 2
    meta = checkpoint.verify_checkpoint(out / "main/final")
    assert meta["world_size"] == 2 and meta["step"] == 12
    state = checkpoint.load_train_state(out / "main/final")
    assert len(state["rng"]) == 2                               # each rank's RNG, for exact resume
    assert sorted(p.name for p in (out / "main").iterdir() if p.is_dir()) == ["final", "step-000005", "step-000010"]
    # the loop all-gathers a parameter digest at every save and stops if the replicas differ; it saved
    model, _, _ = checkpoint.load_checkpoint(out / "main/final")
    assert checkpoint.param_digest(model) == meta["param_sha256"]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
