"""Sampling: generate text from any checkpoint with a KV cache.

    python sample.py checkpoint=out/pretrain prompt="def fibonacci(n):"
    python sample.py checkpoint=out/sft chat=true                 # multi-turn chat in the terminal
    echo "len('abc') = ?" | python sample.py checkpoint=out/dpo chat=true   # works with piped stdin
    python sample.py checkpoint=out/pretrain prompt="import" num_samples=4 temperature=0.8 top_p=0.9
    python sample.py checkpoint=out/pretrain prompt="class" stop='["\\n\\n"]' seed=7
    python sample.py --help

How generation works (what `generate` does):
1. Prompts of different lengths are left-padded into one batch, with an attention mask, so every
   row's next token sits in the same column. The model counts positions over real tokens only, so a
   padded row computes what it would alone (tests/test_sample.py checks batch == one by one).
2. Prefill: one forward over the whole prompt fills the KV cache with every layer's keys and values.
3. Decode: each step feeds only the newest token; attention reads the cached keys/values, so a
   step costs O(T) instead of re-running the O(T^2) prompt (benchmarks/bench_sample.py measures it).
4. The next token is drawn from the last position's logits after, in this order: repetition
   penalty (Keskar et al. 2019, CTRL), temperature, top-k, top-p (nucleus, Holtzman et al. 2019).
   temperature=0 means greedy (argmax).
5. A row stops at a stop id (EOS, the chat end marker <|end|>), at a stop string, or after
   max_new_tokens. Stop strings are found in the decoded text, because a string such as "\\n\\n" may
   be one token or several; the returned ids may run past it and the caller cuts the text
   (`cut_at_stop`). Streaming holds back any tail that could still grow into a stop string, so the
   terminal never shows text the final answer does not contain (`TextStream`).

The checkpoint can be ours (pretrain/SFT/DPO), a LoRA adapter dir (loaded on its base and merged), or
an HF Llama / Mixtral dir: `Transformer.from_pretrained` reads them all. A tokenizer that is not ours
(an HF checkpoint's) is read through transformers' AutoTokenizer behind the same small interface.

Shape legend: B batch (prompts), T time, V vocabulary.
"""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------- stop strings and streaming


def cut_at_stop(text: str, stop_strings) -> tuple[str, bool]:
    """Text up to (not including) the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def unsafe_tail(text: str, stop_strings) -> int:
    """How many trailing characters a stream must hold back: the longest tail that is the start of a stop
    string (it may still complete one), and a trailing U+FFFD (half of a multi-byte character whose other
    bytes are still to come as byte-fallback tokens)."""
    hold = max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    stripped = text.rstrip("\ufffd")
    return max(hold, len(text) - len(stripped))


def continuation(decode, prompt: list[int], new: list[int]) -> str:
    """Text of `new` as it reads after `prompt`. Decoding `new` alone would lose the leading space that
    SentencePiece folds into a word's first piece ("▁world"), so decode both and drop the prompt's text."""
    return decode(list(prompt) + list(new))[len(decode(list(prompt))) :]


class TextStream:
    """Turns generated ids into printable text pieces for streaming; never shows text past a stop string.

    feed(token_id) -> the text that is now safe to print (maybe ""); finish() -> the rest, cut at the stop
    string. The pieces printed, concatenated, equal cut_at_stop(continuation(...), stop_strings)[0].
    """

    def __init__(self, decode, prompt: list[int], stop_strings=()):
        self.decode, self.prompt, self.stops = decode, list(prompt), [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.shown = 0  # characters already handed out
        self.stopped = False

    def _text(self) -> str:
        text, self.stopped = cut_at_stop(continuation(self.decode, self.prompt, self.ids), self.stops)
        return text

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._text()
        safe = len(text) if self.stopped else len(text) - unsafe_tail(text, self.stops)
        piece, self.shown = text[self.shown : max(safe, self.shown)], max(safe, self.shown)
        return piece

    def finish(self) -> str:
        text = self._text()
        piece, self.shown = text[self.shown :], len(text)
        return piece


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
    """Continue each prompt; returns the new ids per prompt (a stop id is not included; a stop string is,
    the caller cuts the text with `cut_at_stop`).

    use_cache=False recomputes the whole sequence every step: the slow reference that the KV cache
    must match (tests) and beat (benchmark).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS)")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode= (ids -> text) to be found")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    max_len = longest + max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context "
            f"({model.config.max_position_embeddings} tokens)"
        )
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):  # left-pad: the last prompt token of every row is in the last column
        idx[row, longest - len(p) :] = torch.tensor(p, device=device)
        mask[row, longest - len(p) :] = 1
    padded = bool((mask == 0).any())
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)  # (B, V) for the penalty
    seen.scatter_(1, idx, mask.bool())
    stop_ids = {int(i) for i in stop_ids}
    prompt_text = [decode(p) for p in prompts] if stop_strings else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    cache = model.make_kv_cache(B, max_len) if use_cache else None
    logits = model(idx, kv_cache=cache, start_pos=0, attention_mask=mask if padded else None)[:, -1]  # (B, V)
    seq, seq_mask = idx, mask
    for t in range(max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        for row, tok in enumerate(nxt.tolist()):  # one device->host copy per step, not one per row
            if done[row]:
                continue
            if tok in stop_ids:
                done[row] = True
                continue
            out[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
            if stop_strings:  # search only text after the prompt: the prompt may contain a stop string itself
                text = decode(prompts[row] + out[row])[len(prompt_text[row]) :]
                done[row] = cut_at_stop(text, stop_strings)[1]
        if all(done) or t == max_new_tokens - 1:
            break
        seen[torch.arange(B, device=device), nxt] = True  # finished rows keep decoding junk nobody reads
        nxt = nxt[:, None]  # (B, 1)
        if use_cache:
            logits = model(nxt, kv_cache=cache, start_pos=longest + t)[:, -1]  # the cache remembers the pads
        else:  # the reference: recompute everything seen so far
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)  # (B, T+1)
            logits = model(seq, attention_mask=seq_mask if padded else None)[:, -1]
    return out


# ----------------------------------------------------------------------------- loading a checkpoint


class HFTokenizer:
    """transformers' tokenizer behind the part of tokenizer.Tokenizer that sampling and eval use, for HF
    checkpoints whose tokenizer was not trained by tokenizer.py (no <|end|> marker; chat via its template)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # lazy: only HF checkpoints need it

        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size, self.bos_id, self.eos_id = len(self.tok), self.tok.bos_token_id, self.tok.eos_token_id
        self.sha256 = None

    def special_id(self, name: str) -> int:
        raise ValueError(f"this tokenizer has no special token {name!r}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template")
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return ids, [0] * len(ids)


def _tokenizer_dir(checkpoint: str) -> str:
    """Where the tokenizer lives: the checkpoint itself, or for a LoRA adapter dir its base model."""
    if os.path.isfile(os.path.join(checkpoint, "tokenizer.model")):
        return checkpoint
    cfg_path = os.path.join(checkpoint, "adapter_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as fh:
            base = json.load(fh).get("base_model_name_or_path") or ""
        for cand in (base, os.path.join(checkpoint, base)):  # the same lookup as Transformer.from_pretrained
            if base and os.path.isdir(cand):
                return cand
    return checkpoint


def load_tokenizer(checkpoint: str):
    """Our Tokenizer when the dir holds one of ours, else transformers' (HF checkpoints); UserError if none."""
    from tokenizer import Tokenizer

    path = _tokenizer_dir(checkpoint)
    ours_error = None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        try:
            return Tokenizer(path)
        except ValueError as e:  # a SentencePiece model without our special tokens, e.g. Llama 2's
            ours_error = str(e)
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        try:
            return HFTokenizer(path)
        except Exception as e:  # transformers raises many types; all mean "cannot read this tokenizer"
            raise UserError(f"{checkpoint}: cannot load the tokenizer ({ours_error or e})") from None
    raise UserError(f"{checkpoint}: no tokenizer.model or tokenizer.json (a tokenizer is needed to sample)")


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, tokenizer) from a checkpoint dir. Anything wrong with the dir (missing, not a
    checkpoint, truncated weights, a tokenizer larger than the model's vocabulary) is a one-line UserError."""
    from safetensors import SafetensorError

    from model import Transformer

    if not os.path.isdir(checkpoint):
        raise UserError(f"checkpoint: no directory at '{checkpoint}'")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise UserError(f"dtype: unknown dtype '{dtype}'")
    try:
        model = Transformer.from_pretrained(checkpoint, dtype=dt, device=dev)
    except (ValueError, OSError, KeyError, SafetensorError) as e:  # SafetensorError: truncated/corrupt file
        raise UserError(f"{checkpoint}: {str(e).splitlines()[0]}") from None
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        import lora

        lora.merge_lora(model)  # inference only: fold B @ A into the weights, one matmul per layer again
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{checkpoint}: vocabulary mismatch: the tokenizer has {tokenizer.vocab_size} tokens but the "
            f"model only {model.config.vocab_size}"
        )
    model.eval()
    return model, tokenizer


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    """EOS, and the chat end marker when the tokenizer has one (an SFT/DPO model ends its turn with it)."""
    ids = [tokenizer.eos_id]
    try:
        ids.append(tokenizer.special_id("<|end|>"))
    except ValueError:
        pass
    return tuple(i for i in ids if i is not None)


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
    stop: list[str] = field(default_factory=list)  # stop strings, comma-separated; JSON escapes: stop='\n\n,###'
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    stream: bool = True  # print tokens as they are generated (single prompt, and chat)
    image: str = ""  # an image file for a VLM checkpoint (train_vlm.py): `prompt` is asked about it

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
    import vlm

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
