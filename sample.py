"""Sampling: generate text from any checkpoint with a KV cache.

    python sample.py checkpoint=out/pretrain prompt="def fibonacci(n):"
    python sample.py checkpoint=out/sft chat=true                 # multi-turn chat in the terminal
    echo "len('abc') = ?" | python sample.py checkpoint=out/dpo chat=true   # works with piped stdin
    python sample.py checkpoint=out/pretrain prompt="import" num_samples=4 temperature=0.8 top_p=0.9

How generation works (what `generate` does):
1. Prompts of different lengths are left-padded into one batch, with an attention mask, so every
   row's next token sits in the same column.
2. Prefill: one forward over the whole prompt fills the KV cache with every layer's keys and values.
3. Decode: each step feeds only the newest token; attention reads the cached keys/values, so a
   step costs O(T) instead of re-running the O(T^2) prompt (the benchmark measures the speed-up).
4. The next token is drawn from the last position's logits after, in this order: repetition
   penalty (Keskar et al. 2019, CTRL), temperature, top-k, top-p (nucleus, Holtzman et al. 2019).
   temperature=0 means greedy (argmax).
5. A row stops at EOS (or the chat end marker), at a stop string, or after max_new_tokens.

The checkpoint can be ours (pretrain/SFT/DPO), a LoRA adapter dir (loaded on its base), or an HF
Llama / Mixtral dir: `Transformer.from_pretrained` reads them all.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from config import UserError, run_cli

# ----------------------------------------------------------------------------- the sampling math


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. CTRL's rule: shrink positive logits, grow negative ones."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), the rest -inf. logits (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p. logits (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p  # once the mass before a token reaches p, the set is complete
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """Text up to (not including) the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


# ----------------------------------------------------------------------------- generation with the KV cache


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    stop_strings: tuple[str, ...] = (),
    decode=None,  # ids -> text, needed for stop strings
    generator: torch.Generator | None = None,
    on_token=None,  # callback(row, token_id) for streaming
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns the new ids per prompt (stop id excluded, stop string cut by the caller).

    use_cache=False recomputes the whole sequence every step: the slow reference that the KV cache
    must match (tests) and beat (benchmark).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS)")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    max_len = longest + max_new_tokens
    if max_len > model.config.max_position_embeddings and use_cache:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model context "
            f"{model.config.max_position_embeddings}"
        )
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):  # left-pad: the last prompt token of every row is in the last column
        idx[row, longest - len(p) :] = torch.tensor(p, device=device)
        mask[row, longest - len(p) :] = 1
    V = model.config.vocab_size
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    seen.scatter_(1, idx, mask.bool())
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)

    cache = model.make_kv_cache(B, max_len) if use_cache else None
    logits = model(idx, kv_cache=cache, start_pos=0, attention_mask=mask)[:, -1]  # prefill: (B, V)
    seq, seq_mask = idx, mask
    for t in range(max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        for row in range(B):
            if done[row]:
                continue
            tok = int(nxt[row])
            if tok in stop_ids:
                done[row] = True
                continue
            out[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
            if stop_strings and decode is not None and cut_at_stop(decode(out[row]), list(stop_strings))[1]:
                done[row] = True
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        seen[torch.arange(B, device=device), nxt] = True
        ones = torch.ones(B, 1, dtype=torch.long, device=device)
        if use_cache:
            pos = longest + t
            logits = model(nxt[:, None], kv_cache=cache, start_pos=pos, attention_mask=ones)[:, -1]
        else:  # the reference: recompute everything seen so far
            seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, ones], 1)
            logits = model(seq, attention_mask=seq_mask)[:, -1]
    return out


# ----------------------------------------------------------------------------- the command line


@dataclass
class SampleConfig:
    checkpoint: str = "out/pretrain"  # checkpoint dir: ours, a LoRA adapter dir, or an HF Llama/Mixtral dir
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
    stop: list[str] = field(default_factory=list)  # stop strings, e.g. stop=["\n\n"]
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    stream: bool = True  # print tokens as they are generated (single prompt)

    def validate(self) -> list[str]:
        errors = []
        if not os.path.isdir(self.checkpoint):
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
        return errors


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, tokenizer) from a checkpoint dir; clear errors for a dir we cannot read."""
    from model import Transformer
    from tokenizer import Tokenizer

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    try:
        model = Transformer.from_pretrained(checkpoint, dtype=dt, device=dev)
    except (ValueError, OSError) as e:
        raise UserError(f"{checkpoint}: {e}") from None
    tok_dir = checkpoint
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        import json

        cfg_path = os.path.join(checkpoint, "adapter_config.json")  # an adapter dir: the tokenizer is the base's
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                tok_dir = json.load(fh).get("base_model_name_or_path", checkpoint)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        raise UserError(f"{checkpoint}: no tokenizer.model (a SentencePiece tokenizer is needed to sample)")
    tokenizer = Tokenizer(tok_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{checkpoint}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    model.eval()
    return model, tokenizer


def chat_loop(cfg: SampleConfig, model, tokenizer, gen) -> None:
    """Read user turns (terminal or piped stdin), answer each with the whole conversation as context."""
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    end_id = tokenizer.special_id("<|end|>")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        print("assistant> ", end="", flush=True)
        new = generate(
            model,
            [ids],
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            cfg.repetition_penalty,
            stop_ids=(end_id, tokenizer.eos_id),
            generator=gen,
        )[0]
        reply, _ = cut_at_stop(tokenizer.decode(new), cfg.stop)
        print(reply.strip(), flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


def main(cfg: SampleConfig) -> None:
    model, tokenizer = load_for_inference(cfg.checkpoint, cfg.device, cfg.dtype)
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
    if streaming:
        print(texts[0], end="", flush=True)
    pieces: list[int] = []

    def on_token(row, tok):  # decode the whole tail each time: a byte-fallback character may span tokens
        nonlocal pieces
        before = tokenizer.decode(pieces)
        pieces.append(tok)
        print(tokenizer.decode(pieces)[len(before) :], end="", flush=True)

    t0 = time.perf_counter()
    outs = generate(
        model,
        prompts,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.repetition_penalty,
        stop_ids=(tokenizer.eos_id,),
        stop_strings=tuple(cfg.stop),
        decode=tokenizer.decode,
        generator=gen,
        on_token=on_token if streaming else None,
    )
    dt = time.perf_counter() - t0
    n_new = sum(len(o) for o in outs)
    if streaming:
        print()
    else:
        for text, new in zip(texts, outs):
            body, _ = cut_at_stop(tokenizer.decode(new), cfg.stop)
            print("-" * 40 + "\n" + text + body)
    print(f"[{n_new} tokens in {dt:.2f}s: {n_new / dt:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, SampleConfig, __doc__, show_config=False)
