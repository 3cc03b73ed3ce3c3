"""The pipeline's tokenizer step: train a SentencePiece BPE model on a bounded, streamed sample of the cleaned
pretraining documents, or prepare an existing model (`[tokenizer] model`), and write data/tokenizer/.

    from data_process.train_tokenizer import train_tokenizer
    train_tokenizer(recipe, docs_root=Path("data/dedup"), out_dir=Path("data/tokenizer"))

The runtime side (loading, encoding, the chat template) is the root `tokenizer.py`; this module only makes the
model file it loads.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from data_process.executor import on_ray
from data_process.records import corpus_fingerprint, iter_records
from fileio import file_sha256
from tokenizer import MAX_VOCAB, META_FILE, MODEL_FILE, SPECIAL_PIECES, Tokenizer

# Default vocabulary size: 12,288 (a multiple of 128 for the GPU's output-layer matmul), chosen by
# bench/bench_tokenizer.py's sweep of 6,400..32,768 on real held-out general and medical text: the most Chinese
# characters per training FLOP for the 26m preset (figures: bench/results.md, "tokenizer compression").
DEFAULT_VOCAB_SIZE = 12_288

# SentencePiece trainer settings for Chinese (+ English, code). Why each:
TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.9995,          # rare CJK characters fall back to bytes instead of bloating the vocabulary
    byte_fallback=True,                 # nothing ever becomes <unk>
    split_digits=True,                  # numbers tokenize digit by digit (doses, dates, lab values)
    normalization_rule_name="identity", # clean.py already NFKC-normalizes (keeping full-width Chinese punctuation);
    remove_extra_whitespaces=False,     #   the tokenizer must not change text again, so decode(encode(x)) == x
    add_dummy_prefix=False,             # no "▁" glued to every segment (chat template pieces, Chinese text)
    allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single pieces
    max_sentence_length=16384,          # bytes; lines are cut to SAMPLE_LINE_CHARS characters first
    unk_id=0, bos_id=-1, eos_id=1, pad_id=2,
    eos_piece=SPECIAL_PIECES["eot"], pad_piece=SPECIAL_PIECES["pad"],
    control_symbols=[SPECIAL_PIECES[k] for k in SPECIAL_PIECES if k not in ("eot", "pad")],
    input_sentence_size=0, shuffle_input_sentence=False,   # use the whole (already bounded) sample, in order
    hard_vocab_limit=False,             # a small sample (tests, tiny corpora) may not support the full size
)
SAMPLE_LINE_CHARS = 4000


def sample_lines(corpus_dirs: list[Path], sample_chars: int, counts: dict | None = None) -> Iterator[str]:
    """Lines of pretraining documents, taken round-robin one document per corpus at a time (so a huge web corpus
    cannot crowd out the medical ones), until `sample_chars` characters. Streams: nothing is held but one document
    per corpus. Lines are the sentences SentencePiece sees, so no piece ever contains a newline (which keeps
    template rendering segment-by-segment equal to whole-text encoding); long lines are cut into chunks.
    The documents are each corpus's first ones in record order (reading a whole corpus to draw a random sample
    would cost a full pass over hundreds of GB); cleaned web corpora have no meaningful order to bias it."""
    iters = {d.name: iter_records(d) for d in corpus_dirs}
    counts = counts if counts is not None else {}
    total = 0
    while iters and total < sample_chars:
        for name in list(iters):
            record = next(iters[name], None)
            if record is None:
                del iters[name]
                continue
            text = record.get("text")
            if record.get("kind", "doc") != "doc" or not isinstance(text, str):
                continue
            c = counts.setdefault(name, {"docs": 0, "chars": 0})
            c["docs"] += 1
            for line in text.split("\n"):
                for start in range(0, len(line), SAMPLE_LINE_CHARS):
                    chunk = line[start:start + SAMPLE_LINE_CHARS]
                    if chunk.strip():
                        c["chars"] += len(chunk)
                        total += len(chunk)
                        yield chunk
            if total >= sample_chars:
                return


def train_sentencepiece(lines: Iterable[str], vocab_size: int, num_threads: int = 1) -> bytes:
    """Train a BPE model on `lines` with TRAINER_SETTINGS; returns the model bytes.

    Deterministic for a given num_threads, but SentencePiece's BPE gives a (slightly) different model for a
    different thread count, so the pipeline always trains with one thread: the same recipe then makes the same
    tokenizer on every machine (training time: bench/bench_tokenizer.py)."""
    if not 300 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} must be in [300, {MAX_VOCAB}] (256 byte pieces + specials, uint16)")
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                       num_threads=max(1, num_threads), minloglevel=2, **TRAINER_SETTINGS)
    except RuntimeError as e:
        if "required_chars" in str(e):  # more distinct characters at this coverage than the vocabulary holds
            raise ValueError(f"vocab_size {vocab_size} is too small for the characters of this sample at "
                             f"character_coverage {TRAINER_SETTINGS['character_coverage']}: {e}") from None
        raise
    return buf.getvalue()




def _train_unit(unit: tuple) -> tuple[bytes, dict]:
    """The step's one work unit: (corpus dirs, sample_chars, vocab_size) -> (model bytes, sample counts)."""
    dirs, sample_chars, vocab_size = unit
    counts: dict = {}
    return train_sentencepiece(sample_lines([Path(d) for d in dirs], sample_chars, counts), vocab_size), counts


def train_tokenizer(recipe, docs_root, out_dir, executor=None) -> Path:
    """The pipeline's tokenizer step: train on the pretraining corpora under `docs_root`, or prepare the existing
    model named by `recipe.tokenizer.model`; writes out_dir/tokenizer.model + tokenizer_meta.json, returns out_dir.
    On a Ray `executor` the training (the sample and SentencePiece's memory) is one Ray task; SentencePiece trains
    on one thread wherever it runs, so every machine makes the same model.

    Re-runnable: when out_dir already holds a tokenizer made from the same inputs and settings it is kept.
    """
    docs_root, out_dir = Path(docs_root), Path(out_dir)
    cfg = recipe.tokenizer
    if cfg.model:
        source = Path(cfg.model)
        source = source if source.is_absolute() else recipe.root / source
        if not source.is_file():
            raise FileNotFoundError(f"[tokenizer] model = {cfg.model!r}: no such file ({source})")
        fingerprint = {"source_model": str(source), "source_sha256": file_sha256(source)}
    else:
        corpora = [c.name for c in recipe.corpora if c.role == "pretrain"]
        dirs = [docs_root / name for name in corpora if (docs_root / name).is_dir()]
        if not dirs:
            raise FileNotFoundError(f"no pretraining corpus under {docs_root} to train a tokenizer on "
                                    f"(expected one of {corpora}); run the read/dedup steps first")
        inputs = {d.name: corpus_fingerprint(d) for d in dirs}
        fingerprint = {"vocab_size": cfg.vocab_size, "sample_chars": cfg.sample_chars, "inputs": inputs,
                       "trainer": {k: v for k, v in TRAINER_SETTINGS.items()}, "line_chars": SAMPLE_LINE_CHARS}
    meta_path = out_dir / META_FILE
    if meta_path.is_file() and (out_dir / MODEL_FILE).is_file():
        try:
            old = Tokenizer.load(out_dir)
            if old.meta.get("fingerprint") == fingerprint:
                print(f"tokenizer: {out_dir} is up to date (sha256 {old.sha256[:12]}), kept", flush=True)
                return out_dir
        except ValueError:
            pass   # a damaged or foreign tokenizer: make it again
    t0 = time.time()
    if cfg.model:
        tok = Tokenizer(source.read_bytes(), {"fingerprint": fingerprint, "source": "existing model"})
        print(f"tokenizer: prepared {source} ({tok.vocab_size} pieces; {'; '.join(tok.changes) or 'unchanged'})",
              flush=True)
    else:
        unit = ([str(d) for d in dirs], cfg.sample_chars, cfg.vocab_size)
        if on_ray(executor):
            [(model, counts)] = executor.map(_train_unit, [unit], describe=lambda u: "tokenizer training")
        else:
            model, counts = _train_unit(unit)
        seconds = time.time() - t0
        tok = Tokenizer(model, {"fingerprint": fingerprint, "source": "trained",
                                "sample": counts, "train_seconds": round(seconds, 1)})
        n_chars = sum(c["chars"] for c in counts.values())
        sources = ", ".join(f"{name} ({c['docs']} docs)" for name, c in counts.items())
        print(f"tokenizer: trained BPE vocab {tok.vocab_size} on {n_chars:,} chars from {sources} in {seconds:.1f}s",
              flush=True)
    tok.save(out_dir)
    return out_dir
