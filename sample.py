"""Sampling: generate text from any checkpoint with a KV cache.

    python sample.py checkpoint=out/pretrain prompt="def fibonacci(n):"
    python sample.py checkpoint=out/sft chat=true                 # multi-turn chat in the terminal
    echo "len('abc') = ?" | python sample.py checkpoint=out/dpo chat=true   # works with piped stdin
    python sample.py checkpoint=out/pretrain prompt="import" num_samples=4 temperature=0.8 top_p=0.9
    python sample.py checkpoint=out/pretrain prompt="class" stop='["\\n\\n"]' seed=7
    python sample.py --help

How generation works is told in generation.py, which holds `generate` and the loading;
this file is its command line: one-shot prompts, batches from a file, a terminal chat, an image question.

Shape legend: B batch (prompts), T time, V vocabulary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import vlm
from config import UserError, run_cli
from generation import TextStream, continuation, cut_at_stop, generate, load_for_inference, load_tokenizer, stop_ids_of

# ----------------------------------------------------------------------------- the command line


@dataclass
class SampleConfig:
    checkpoint: str = "out/pretrain"  # checkpoint dir (ours, a LoRA adapter, HF Llama/Mixtral) or hf:ORG/NAME
    prompt: str = ""  # text to continue (ignored with chat=true)
    prompts_file: str = ""  # a file with one prompt per line, generated as one batch
    chat: bool = False  # multi-turn chat with the chat template (reads stdin when it is piped)
    system: str = ""  # system message for chat mode
    num_samples: int = 1  # samples per prompt
    max_new_tokens: int = 128  # tokens to generate per sample
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # keep the k most likely tokens (0 = off)
    top_p: float = 0.95  # nucleus sampling threshold (1 = off)
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens already in the text
    stop: list[str] = field(default_factory=list)  # stop strings, comma-separated; JSON escapes: stop='\n\n,###'
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    quantize: str = ""  # nf4: block linears stored in 4 bits (lora.quantize_nf4); "" = as loaded
    stream: bool = True  # print tokens as they are generated (single prompt, and chat)
    image: str = ""  # an image file for a VLM checkpoint (train_vlm.py): `prompt` is asked about it

    def validate(self) -> list[str]:
        errors = []
        if not self.checkpoint.startswith("hf:") and not os.path.isdir(self.checkpoint):
            errors.append(f"checkpoint: no directory at '{self.checkpoint}'")
        if self.prompts_file and not os.path.isfile(self.prompts_file):
            errors.append(f"prompts_file: no file at '{self.prompts_file}'")
        if self.temperature < 0:
            errors.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            errors.append("top_p must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens <= 0 or self.num_samples <= 0:
            errors.append("top_k must be >= 0, max_new_tokens and num_samples > 0")
        if self.repetition_penalty <= 0:
            errors.append("repetition_penalty must be > 0")
        if self.quantize not in ("", "nf4"):
            errors.append(f"quantize must be '' or nf4, not '{self.quantize}'")
        return errors


def parse_stop(text: str) -> str:
    """A stop string as typed on the command line: surrounding quotes dropped, JSON escapes read, so that
    stop='["\\n\\n"]' means two newlines (YAML lists arrive already parsed and pass through unchanged)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if "\\" not in text:
        return text
    try:
        return json.loads('"' + text.replace('"', '\\"') + '"')
    except json.JSONDecodeError:
        return text


def _sampling(cfg: SampleConfig, tokenizer, gen) -> dict:
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                repetition_penalty=cfg.repetition_penalty, stop_ids=stop_ids_of(tokenizer),
                stop_strings=tuple(cfg.stop), decode=tokenizer.decode, generator=gen)  # fmt: skip


def answer_about_image(cfg: SampleConfig) -> list[str]:
    """image=PATH: a VLM checkpoint (vlm.py) answers `prompt` about the image."""
    if not vlm.is_vlm_checkpoint(cfg.checkpoint):
        raise UserError(f"image= needs a VLM checkpoint (written by train_vlm.py); {cfg.checkpoint} is not one")
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    try:
        model = vlm.VLM.from_pretrained(cfg.checkpoint, device=device)
    except (ValueError, OSError) as e:
        raise UserError(f"{cfg.checkpoint}: {e}") from None
    tokenizer = load_tokenizer(cfg.checkpoint)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    answer = vlm.generate_answer(model, tokenizer, [cfg.image], [cfg.prompt], cfg.max_new_tokens,
                                 **_sampling(cfg, tokenizer, gen))[0]  # fmt: skip
    print(answer)
    return [answer]


def _report_speed(n_new: int, seconds: float) -> None:
    print(f"[{n_new} tokens in {seconds:.2f}s: {n_new / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def chat_loop(cfg: SampleConfig, model, tokenizer, gen) -> None:
    """Read user turns (terminal or piped stdin), answer each with the whole conversation as context.
    The oldest turns are dropped when the conversation no longer fits the model's context."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history: list[dict] = []
    budget = model.config.max_position_embeddings - cfg.max_new_tokens
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids, _ = tokenizer.render_chat(system + history, add_generation_prompt=True)
        while len(ids) > budget and len(history) > 1:  # forget the oldest exchange, keep the system message
            history = history[2:]
            ids, _ = tokenizer.render_chat(system + history, add_generation_prompt=True)
        if len(ids) > budget:
            print(f"(message too long: {len(ids)} tokens, the context leaves {budget})", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        stream = TextStream(tokenizer.decode, ids, cfg.stop)
        on_token = (lambda row, tok, s=stream: print(s.feed(tok), end="", flush=True)) if cfg.stream else None
        t0 = time.perf_counter()
        new = generate(model, [ids], cfg.max_new_tokens, on_token=on_token, **_sampling(cfg, tokenizer, gen))[0]
        seconds = time.perf_counter() - t0
        reply = cut_at_stop(continuation(tokenizer.decode, ids, new), cfg.stop)[0]
        print(stream.finish() if cfg.stream else reply, flush=True)
        _report_speed(len(new), seconds)
        history.append({"role": "assistant", "content": reply.strip()})


def main(cfg: SampleConfig) -> list[str] | None:
    """Print samples (or chat); returns the generated texts (prompt excluded, cut at stop strings)."""
    cfg.stop = [parse_stop(s) for s in cfg.stop]
    if cfg.image:
        return answer_about_image(cfg)
    model, tokenizer = load_for_inference(cfg.checkpoint, cfg.device, cfg.dtype, cfg.quantize)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.chat:
        return chat_loop(cfg, model, tokenizer, gen)
    texts = [cfg.prompt]
    if cfg.prompts_file:
        with open(cfg.prompts_file, encoding="utf-8") as fh:
            texts = [line.rstrip("\n") for line in fh if line.strip()]
    texts = [t for t in texts for _ in range(cfg.num_samples)]
    prompts = [tokenizer.encode(t, bos=True) for t in texts]
    streaming = cfg.stream and len(prompts) == 1
    stream = TextStream(tokenizer.decode, prompts[0], cfg.stop)
    if streaming:
        print(texts[0], end="", flush=True)

    t0 = time.perf_counter()
    try:
        outs = generate(
            model,
            prompts,
            cfg.max_new_tokens,
            on_token=(lambda row, tok: print(stream.feed(tok), end="", flush=True)) if streaming else None,
            **_sampling(cfg, tokenizer, gen),
        )
    except ValueError as e:  # e.g. prompt + max_new_tokens longer than the context
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - t0
    bodies = [
        cut_at_stop(continuation(tokenizer.decode, p, o), cfg.stop)[0] for p, o in zip(prompts, outs, strict=True)
    ]
    if streaming:
        print(stream.finish(), flush=True)
    else:
        for text, body in zip(texts, bodies, strict=True):
            print("-" * 40 + "\n" + text + body, flush=True)
    _report_speed(sum(len(o) for o in outs), seconds)
    return bodies


if __name__ == "__main__":
    run_cli(main, SampleConfig, __doc__, show_config=False)
