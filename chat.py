"""Chat with a checkpoint in the terminal, the reply streamed as it is generated.

    python chat.py out/sft/medical/final                          # interactive, multi-turn
    python chat.py out/sft/medical/final --prompt "感冒了怎么办？"   # one question, one answer, exit
    python chat.py out/pretrain/stable/final                      # a base model continues your text

A chat checkpoint (meta.json "chat": true, i.e. SFT/DPO) gets the project's chat template (tokenizer.render_chat)
with the whole conversation so far; a base checkpoint continues each line you type. `--lora` merges a LoRA
adapter (lora.py, peft's format) into the model first. Output is UTF-8 and never holds half a character:
tokens go through tokenizer.StreamDecoder, which keeps the bytes of a split Chinese character until it is whole.
Prompts and notices go to stderr, so stdout holds only the model's text.
Commands: /reset (forget the conversation), /quit (or end of input).

Loading a checkpoint (and a LoRA adapter) is `inference.load_model`, shared with serve.py and export.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from inference import Sampling, device_error, load_model
from tokenizer import StreamDecoder


def chat_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], list[dict]]:
    """Ids of the conversation + generation prompt, dropping the oldest exchanges until it fits.
    -> (ids, the messages kept). Raises ValueError when even the last message alone is too long."""
    messages = list(messages)
    while True:
        ids = tokenizer.render_chat(messages, add_generation_prompt=True).ids
        if len(ids) <= max_prompt_tokens:
            return ids, messages
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the message is {len(ids)} tokens; at most {max_prompt_tokens} fit")
        del messages[first:first + 2]   # the oldest user turn and its answer


def base_prompt(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """A base model continues the text. Pretraining shards put end-of-text between documents (no BOS), so a
    document start is what follows it; a long text keeps its end."""
    return [tokenizer.eos_id] + tokenizer.encode(text)[-(max_prompt_tokens - 1):]


def stream_reply(model, tokenizer, prompt_ids: list[int], sampling: Sampling, out) -> str:
    """Generate, writing each complete character to `out` as soon as it exists; -> the whole reply."""
    decoder = StreamDecoder(tokenizer)
    parts = []
    ids = sampling.generate(model, prompt_ids, tokenizer.stop_ids())
    try:
        for token in ids:
            text = decoder.push(token)
            if text:
                parts.append(text)
                out.write(text)
                out.flush()
    finally:
        ids.close()
    return "".join(parts)


class Session:
    """One conversation: the history (chat models) and how each turn becomes a prompt."""

    def __init__(self, model, tokenizer, chat: bool, sampling: Sampling, system: str | None = None):
        self.model, self.tokenizer, self.chat, self.sampling = model, tokenizer, chat, sampling
        self.system = system
        self.max_prompt_tokens = model.config.max_seq_len - min(sampling.max_new_tokens, model.config.max_seq_len // 2)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str, out) -> str:
        if not self.chat:
            return stream_reply(self.model, self.tokenizer, base_prompt(self.tokenizer, text, self.max_prompt_tokens),
                                self.sampling, out)
        ids, kept = chat_prompt(self.tokenizer, self.messages + [{"role": "user", "content": text}],
                                self.max_prompt_tokens)
        reply = stream_reply(self.model, self.tokenizer, ids, self.sampling, out)
        self.messages = kept + [{"role": "assistant", "content": reply}]
        return reply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat with a checkpoint (streamed, multi-turn); --prompt for one answer.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (model.safetensors, config.json, tokenizer)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA adapter directory (lora.py) merged into the model")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (non-interactive)")
    p.add_argument("--mode", choices=["auto", "chat", "base"], default="auto",
                   help="chat template or plain continuation (auto: meta.json 'chat')")
    p.add_argument("--system", default=None, help="system message for chat mode")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 \
            or args.repetition_penalty <= 0:
        p.error("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1, "
                "--repetition-penalty > 0")
    if device_error(args.device):
        p.error(device_error(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model, tokenizer, meta = load_model(args.checkpoint, lora_dir=args.lora, dtype=args.dtype,
                                           device=args.device)
    except (OSError, ValueError, RuntimeError) as e:   # missing, corrupted or mismatched checkpoint
        print(f"chat.py: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    # UTF-8 whatever the locale; undecodable input bytes become U+FFFD instead of an exception
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    chat = meta.get("chat", False) if args.mode == "auto" else args.mode == "chat"
    sampling = Sampling(max_new_tokens=min(args.max_new_tokens, model.config.max_seq_len - 1),
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = Session(model, tokenizer, chat, sampling, system=args.system)

    def answer(text: str) -> bool:
        try:
            session.turn(text, sys.stdout)
        except ValueError as e:   # too long for the context
            print(f"[{e}]", file=sys.stderr)
            return False
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print(" [interrupted]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return True

    if args.prompt is not None:
        return 0 if answer(args.prompt) else 1

    print(f"{args.checkpoint} ({'chat' if chat else 'base: continues your text'}); /reset, /quit",
          file=sys.stderr)
    while True:
        sys.stderr.write("> " if chat else "text> ")
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:   # end of input
            break
        text = line.rstrip("\r\n")
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text.strip():
            answer(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
