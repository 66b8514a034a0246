"""Generation: load any checkpoint for inference and generate from it with a KV cache.

The library under `sample.py`, `eval.py`, `serve.py` and the training loops that sample (pretraining's
preview, GRPO's rollouts, on-policy DPO's pairs, the VLM's answers). The command line lives in sample.py.

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

import os

import torch
from safetensors import SafetensorError

import hf_checkpoint
import lora
from config import UserError
from model import Transformer
from tokenizer import Tokenizer

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
    try:
        return hf_checkpoint.adapter_base(checkpoint) or checkpoint  # the same lookup as Transformer.from_pretrained
    except ValueError:  # an adapter whose base is missing: loading the weights reports it
        return checkpoint


def load_tokenizer(checkpoint: str):
    """Our Tokenizer when the dir holds one of ours, else transformers' (HF checkpoints); UserError if none."""
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


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto", quantize: str = ""):
    """(model in eval mode, tokenizer) from a checkpoint dir or a hub id `hf:ORG/NAME` (downloaded into
    huggingface_hub's cache, hf_checkpoint.resolve_checkpoint). quantize="nf4" stores the block linears in
    4 bits (lora.quantize_nf4). Anything wrong with the dir (missing, not a checkpoint, truncated weights,
    a tokenizer larger than the model's vocabulary) is a one-line UserError."""
    if quantize not in ("", "nf4"):
        raise UserError(f"quantize: '{quantize}' is not one of '', nf4")
    try:
        checkpoint = hf_checkpoint.resolve_checkpoint(checkpoint)
    except ValueError as e:
        raise UserError(f"checkpoint: {e}") from None
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
        lora.merge_lora(model)  # inference only: fold B @ A into the weights, one matmul per layer again
    if quantize == "nf4":  # after the merge: an adapter is folded into the weights that get quantized
        lora.quantize_nf4(model)
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


def chat_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers to one-turn chats, `batch_size` prompts at a time: each prompt is rendered as a user turn
    ending in the assistant marker and decoded until the chat end marker or EOS. tasks.task_accuracy scores them;
    the SFT/DPO/GRPO loops and eval.py all call this pair, so their accuracies come from identical code."""
    was_training = model.training
    model.eval()
    stop, answers = stop_ids_of(tokenizer), []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts[i : i + batch_size]]  # fmt: skip
        outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stop)
        answers += [tokenizer.decode(out) for out in outs]
    model.train(was_training)
    return answers


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float,
                   generator: torch.Generator, rows_per_call: int = 256) -> list[list[str]]:  # fmt: skip
    """k answer texts per prompt (chat prompts ending in <|assistant|>), sampled with the KV cache in batched
    generate calls of at most rows_per_call rows; each stops at <|end|> or EOS. Eval mode: no dropout.
    On-policy DPO judges them into pairs (preference_pairs.py); eval.py samples= scores them as pass@k / maj@k."""
    was_training = model.training
    model.eval()
    repeated = [p for p in prompts for _ in range(k)]  # (P*k) prompts, a prompt's k samples next to each other
    outs = []
    for i in range(0, len(repeated), rows_per_call):
        outs += generate(model, repeated[i : i + rows_per_call], max_new_tokens, temperature=temperature,
                         stop_ids=stop_ids_of(tokenizer), generator=generator)  # fmt: skip
    model.train(was_training)
    texts = [tokenizer.decode(o) for o in outs]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
