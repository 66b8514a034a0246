"""A Llama-family decoder-only Transformer whose checkpoints transformers reads unchanged.

What is here, top to bottom:
  ModelConfig  - Hugging Face Llama field names (plus MoE fields used by moe.py), presets in configs/model/*.yaml
  RMSNorm      - root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like HF
  RoPE         - rotary position embedding (Su et al. 2021) in HF's "rotate-half" layout, with linear,
                 dynamic-NTK and Llama-3 frequency scaling
  Attention    - grouped-query attention (Ainslie et al. 2023) with three interchangeable kernels:
                 "naive" (the readable reference), "sdpa" (PyTorch's fused kernel), "triton" (flash_attention.py)
  KVCache      - preallocated keys/values for incremental decoding of a batch of (left-padded) prompts
  (SwiGLU)     - the dense feed-forward is moe.SwiGLU (Shazeer 2020), one definition for it and the shared experts
  Transformer  - embeddings -> N x Block -> norm -> lm_head; MoE layers swap `mlp` for moe.MoEFeedForward

Key choices
  * The module tree mirrors transformers' LlamaForCausalLM, so our state_dict keys ARE the HF keys and
    save/load is a table lookup (`save_pretrained` / `from_pretrained`, implemented in hf_checkpoint.py). q/k/v therefore
    stay separate Linears (no fused qkv) on purpose.
  * Build big models on the meta device, then `to_empty()` + `init_weights()`: no memory is touched until
    the real device is known (torchtitan does the same).
  * Padding: a batch of prompts of different lengths is left-padded and passed with `attention_mask` (B, T),
    1 = real token. Positions are counted per row over real tokens only, so a padded row computes exactly
    what it would alone. The KV cache remembers which slots were padding for later decode steps.

Decoding a batch (what sample.py does):
    cache = model.make_kv_cache(B, max_len)
    logits = model(prompts, kv_cache=cache, start_pos=0, attention_mask=mask)  # prefill, prompts left-padded (B, T)
    logits = model(next_ids, kv_cache=cache, start_pos=T)  # (B, 1): then one token per call, start_pos += 1

Run the tests:  OMP_NUM_THREADS=1 python -m pytest -q tests/test_model.py
Benchmark:      python benchmarks/bench_model.py

Shape legend: B batch, T time (new tokens), S time of keys (cache + new), C channels (hidden_size),
H query heads, H_kv key/value heads (num_key_value_heads), D head dim, F feed-forward width, V vocab, L layers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

import hf_checkpoint
import lora
import moe

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "model")
ATTN_IMPLS = ("naive", "sdpa", "triton")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vocab_size: int = 4096  # V: number of token ids (must cover the tokenizer, padding included)
    hidden_size: int = 256  # C: width of the residual stream
    intermediate_size: int = 704  # F: SwiGLU width of the dense MLP (~8/3 C, rounded to a multiple of 64)
    num_hidden_layers: int = 4  # L: number of Transformer blocks
    num_attention_heads: int = 8  # H: query heads; head dim D = C / H
    num_key_value_heads: int = 4  # H_kv: key/value heads (GQA); H % H_kv == 0; H_kv == H is multi-head
    max_position_embeddings: int = 1024  # longest context the RoPE tables are built for (and trained at)
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # RoPE base; wavelengths range from 2*pi to ~2*pi*theta
    rope_scaling: dict | None = None  # None or HF dict {"rope_type": "linear"|"dynamic"|"llama3", "factor": ...}
    tie_word_embeddings: bool = True  # share the embedding matrix with lm_head (saves V*C params)
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    dropout: float = 0.0  # dropout on the embeddings and on each residual branch (training only; not in HF Llama)
    attn_impl: str = "sdpa"  # attention kernel: naive (reference) | sdpa (PyTorch fused) | triton (flash_attention.py)
    bos_token_id: int = 1  # beginning-of-sequence id (written to config.json)
    eos_token_id: int = 2  # end-of-sequence id; generation stops on it
    pad_token_id: int | None = None  # padding id, if the tokenizer has one
    initializer_range: float = 0.02  # std of the normal init; residual projections get std / sqrt(2 L)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (saves memory)
    # ---- Mixture of Experts (moe.py); n_experts = 0 keeps every layer dense ----
    n_experts: int = 0  # E: routed experts per MoE layer (0 = dense model)
    top_k: int = 2  # K: experts each token is sent to
    n_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeekMoE)
    moe_intermediate_size: int = 0  # F of one expert; 0 = use intermediate_size
    moe_layers: list[int] | None = None  # indices of MoE layers; None = every layer (Mixtral)
    router: str = "softmax"  # softmax (Mixtral top-k) | sigmoid_bias (DeepSeek-V3 aux-loss-free)
    aux_loss_coef: float = 0.01  # Switch-Transformer load-balancing loss coefficient
    z_loss_coef: float = 0.0  # router z-loss coefficient (ST-MoE)
    router_noise: float = 0.0  # multiplicative jitter on router inputs while training (0 = off)
    capacity_factor: float = 0.0  # expert capacity = factor * tokens * K / E; 0 = dropless
    bias_update_rate: float = 0.001  # step size of the sigmoid router's load-balancing bias update

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling rope_type={rope_type!r} is not one of {ROPE_TYPES}")
            needed = {"default": ()}.get(rope_type, ("factor",))
            if rope_type == "llama3":
                needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in needed if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}")
        if self.n_experts < 0 or (self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts):
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.router not in ("softmax", "sigmoid_bias"):
            raise ValueError(f"router={self.router!r} is not one of ('softmax', 'sigmoid_bias')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        """True when block i uses moe.MoEFeedForward instead of the dense MLP."""
        return self.n_experts > 0 and (self.moe_layers is None or i in self.moe_layers)

    @classmethod
    def preset_values(cls, name: str) -> dict:
        """The keys of a preset: configs/model/NAME.yaml, or a model YAML of one's own given by its path. The
        training configs use it for `model=NAME` (config.py); unknown keys are an error."""
        path = name if name.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, f"{name}.yaml")
        if not os.path.isfile(path):
            known = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))
            raise ValueError(f"unknown model preset {name!r}: no file {path} (presets: {', '.join(known)})")
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
        if values is None:  # all defaults is never what an empty file meant (nor a file being rewritten)
            raise ValueError(f"model preset {path} is empty")
        if not isinstance(values, dict):
            raise ValueError(f"model preset {path} is not a mapping of key: value")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in model preset {path}")
        return values

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A preset (see preset_values) with `overrides` winning over the file."""
        return cls(**{**cls.preset_values(name), **overrides})

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> ModelConfig:
        """From a config.json dict (ours or transformers' Llama / Mixtral); see hf_checkpoint.config_fields_from_hf."""
        return cls(**hf_checkpoint.config_fields_from_hf(d, **overrides))

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> ModelConfig:
        """From a checkpoint dir's config.json (an adapter dir: its base's) without reading weights."""
        return cls(**hf_checkpoint.read_config_fields(path, **overrides))


# ---------------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalized in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # F.rms_norm is PyTorch's fused kernel for exactly x * rsqrt(mean(x^2, -1) + eps); one pass, no temporaries.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2, after the configured scaling; (D/2,) fp32.

    linear  - positions divided by `factor` (Chen et al. 2023, "Position Interpolation").
    dynamic - NTK-aware: the base grows with the current length once it exceeds max_position_embeddings
              (bloc97 / emozilla, as in HF). seq_len is the length of the current forward.
    llama3  - long wavelengths divided by `factor`, short ones kept, a smooth ramp between (Llama 3.1 report).
    """
    D = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # wavelengths longer than old_len / low are interpolated, shorter than old_len / high kept, ramp between
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos, sin of positions * inv_freq, duplicated to D (rotate-half layout): (..., T, D) fp32."""
    freqs = positions[..., None].float() * inv_freq  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): dim i and i + D/2 share a frequency
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+D/2}) by angle pos * inv_freq_i. x (B, T, H, D); cos/sin (T, 1, D) or (B, T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # "rotate half": HF's layout, not the interleaved one of Meta's code
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated: k/v (L, B, H_kv, S_max, D).

    `valid` (B, S_max) marks which slots hold real tokens (False for left padding), so later decode steps
    keep ignoring the pads. Slots are addressed by `start_pos`, the model forward's argument.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False  # stays False for equal-length prompts: then no mask is ever needed
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, k, v):
        """Write k/v (B, H_kv, T, D) at slots [start_pos, start_pos + T); return every slot so far (B, H_kv, S, D)."""
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position where each token's document begins, documents being runs of equal ids in packed rows."""
    B, T = document_ids.shape
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T) a document begins here
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    return torch.cummax(torch.where(first, index, 0), dim=1).values


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for packed rows: query m sees key n when its document's start <= n <= m."""
    T = document_ids.shape[1]
    keys = torch.arange(T, device=document_ids.device)
    in_document = keys[None, None, :] >= document_starts(document_ids)[:, :, None]  # (B, T, T)
    mask = in_document & torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # and not future
    return mask[:, None]


def attention(q, k, v, mask, is_causal: bool, impl: str, dropout: float = 0.0):
    """Softmax(q k^T / sqrt(D) + mask) v. q (B, H, T, D), k/v (B, H_kv, S, D), mask None, bool (B|1, 1, T, S), or
    for packed rows the integer document ids (B, T), which the Triton kernel takes as they are."""
    triton_ok = impl == "triton" and q.shape[2] == k.shape[2] and dropout == 0.0
    triton_ok = triton_ok and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if triton_ok and (mask is None and is_causal or mask is not None and mask.dtype != torch.bool):
        from flash_attention import flash_attention  # lazy: importing it imports triton (slow, optional on CPU)

        return flash_attention(q, k, v, causal=True, document_ids=mask)
    if mask is not None and mask.dtype != torch.bool:
        mask, is_causal = document_mask(mask), False  # the dense (T, T) form for the other implementations
    if impl == "naive":
        n_rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D): each kv head serves n_rep query heads
        v = v.repeat_interleave(n_rep, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
        if is_causal:
            T, S = att.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
        att = F.dropout(att, p=dropout, training=dropout > 0)
        return att @ v  # (B, H, T, D)
    # SDPA picks a fused kernel (flash / memory-efficient / CPU flash) and handles GQA without copying k/v.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; parameter names are HF's q_proj/k_proj/v_proj/o_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        C, H, H_kv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.n_head, self.n_kv_head, self.head_dim = layer_idx, H, H_kv, D
        self.impl, self.dropout = config.attn_impl, config.attention_dropout
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, H_kv * D, bias=False)
        self.v_proj = nn.Linear(C, H_kv * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache=None, start_pos=0):
        B, T, _ = x.shape
        # RoPE is applied in the (B, T, H, D) layout the projections produce, before the transpose.
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin)  # (B, T, H, D)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, H or H_kv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # (B, H_kv, S, D)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, is_causal, self.impl, dropout)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is `mlp` or `block_sparse_moe`."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = moe.MoEFeedForward(config)
        else:
            self.mlp = moe.SwiGLU(config.hidden_size, config.intermediate_size)  # the dense feed-forward
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, kv_cache=None, start_pos=0):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, start_pos)
        if self.dropout > 0:  # residual dropout (GPT-2 style); skipped entirely when off
            h = F.dropout(h, self.dropout, self.training)
        x = x + h
        ffn = self.mlp if hasattr(self, "mlp") else self.block_sparse_moe
        h = ffn(self.post_attention_layernorm(x))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return x + h


class Decoder(nn.Module):
    """HF's `LlamaModel`: the part under the `model.` prefix of every key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Decoder-only LM with HF LlamaForCausalLM's module tree (`model.*`, `lm_head`).

    Construct on the meta device for big models:
        with torch.device("meta"): m = Transformer(cfg)
        m.to_empty(device="cuda"); m.init_weights()
    On a real device the constructor initializes the weights itself.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE tables for positions < max_position_embeddings: computed once, sliced per forward. Not saved
        # (persistent=False) because they are a function of the config; init_weights() fills them.
        T_max, D = config.max_position_embeddings, config.head_dim
        self.register_buffer("rope_cos", torch.empty(T_max, D), persistent=False)
        self.register_buffer("rope_sin", torch.empty(T_max, D), persistent=False)
        self.tie_weights()
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def tie_weights(self):
        """Share embed_tokens.weight with lm_head when configured (to_empty() unties them, so init re-ties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_rope(self):
        positions = torch.arange(self.config.max_position_embeddings, device=self.rope_cos.device)
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, device=self.rope_cos.device), positions)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, initializer_range) for matrices, ones for norms; residual output projections (o_proj,
        down_proj, experts' w2) get std / sqrt(2 L) so the residual stream's variance does not grow with depth
        (GPT-2 paper section 2.3; nanoGPT's c_proj init). Also rebuilds RoPE tables and ties weights.

        One parameter at a time in named_parameters() order, each by its name alone: a sharded wrapper
        (fsdp.py) that materializes a meta-device model unit by unit calls init_parameter in the same order
        and so draws exactly these weights without ever holding the whole model."""
        self.init_non_parameters()
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_non_parameters(self):
        """Everything init sets besides the parameters: tied head, RoPE tables, MoE router state (zeros)."""
        self.tie_weights()
        self.init_rope()
        for block in self.model.layers:
            moe_ffn = getattr(block, "block_sparse_moe", None)
            for buf in moe_ffn.buffers() if moe_ffn is not None else ():
                buf.zero_()  # e.g. the sigmoid router's expert_bias starts at 0 (to_empty leaves garbage)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """Initialize one parameter (named as in named_parameters()) in place."""
        std = self.config.initializer_range
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2", ".w2.weight")):
            p.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
        else:
            p.normal_(0.0, std)

    def blocks(self) -> nn.ModuleList:
        """The Transformer blocks, in order (the units FSDP shards and checkpointing recomputes)."""
        return self.model.layers

    # ---- forward ----------------------------------------------------------------------------------------------------
    def _layout(self, B, T, start_pos, attention_mask, kv_cache, device, document_ids=None):
        """Positions, attention mask and causality flag for T new tokens written at slot start_pos.

        Returns (positions, mask, is_causal): positions None (shared start_pos + arange(T)) or (B, T);
        mask None or bool (B|1, 1, T, S), True = may attend.
        """
        if document_ids is not None:  # packed rows: each document restarts at position 0 and sees only itself
            positions = torch.arange(T, device=device) - document_starts(document_ids)  # (B, T)
            return positions, document_ids, False  # attention() turns the ids into a mask, or the kernel uses them
        S = start_pos + T
        padded = attention_mask is not None and not bool(attention_mask.all())
        if kv_cache is not None:
            # Slots may be reused across generations, so every write also rewrites their padding flags.
            kv_cache.valid[:, start_pos:S] = attention_mask.bool() if attention_mask is not None else True
            kv_cache.has_padding = padded or (kv_cache.has_padding and start_pos > 0)
            padded = kv_cache.has_padding
        if not padded:
            if start_pos == 0:
                return None, None, True  # plain causal attention: the fast kernel path
            if T == 1:
                return None, None, False  # one new token sees every cached key
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(start_pos)  # (T, S)
            return None, causal[None, None], False
        valid = kv_cache.valid[:, :S] if kv_cache is not None else attention_mask.bool()  # (B, S)
        # A token's position counts only the real tokens before it, so a left-padded row equals the row alone.
        positions = (valid.long().cumsum(-1)[:, start_pos:] - 1).clamp(min=0)  # (B, T)
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(start_pos)  # (T, S)
        mask = causal[None] & valid[:, None, :]  # (B, T, S)
        # A padding query would see no key at all and softmax over nothing is NaN; let it see itself (its output
        # is never used) so the whole tensor stays finite.
        mask[:, :, start_pos:] |= torch.eye(T, dtype=torch.bool, device=device)
        return positions, mask[:, None], False

    def _rope(self, start_pos, T, positions, dtype):
        """cos/sin for the new tokens, shaped to broadcast over heads: (T, 1, D) or (B, T, 1, D)."""
        end = start_pos + T  # one past the largest position in this forward
        rope_type = (self.config.rope_scaling or {}).get("rope_type", "default")
        if end <= self.config.max_position_embeddings:
            if positions is None:
                cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]  # (T, D)
            else:
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        else:  # beyond the table (or dynamic NTK, whose frequencies depend on the length): compute on the fly
            pos = torch.arange(start_pos, end, device=self.rope_cos.device) if positions is None else positions
            seq_len = int(pos.max()) + 1 if rope_type == "dynamic" else None
            cos, sin = rope_cos_sin(rope_inv_freq(self.config, seq_len, device=pos.device), pos)
        return cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)

    def forward(
        self, idx, targets=None, loss_reduction="mean", kv_cache=None, start_pos=0, attention_mask=None,
        document_ids=None, only_targets=False,
    ):  # fmt: skip
        """idx (B, T) token ids -> logits (B, T, V), or with targets (B, T) the cross-entropy over targets != -1:
        loss_reduction "mean" (scalar), "sum" (scalar) or "none" ((B, T) per-token losses, 0 where ignored).

        kv_cache/start_pos: write this chunk's keys/values at slots [start_pos, start_pos + T) and attend to all
        slots before it (prefill with start_pos=0, then one token at a time). attention_mask (B, T): 1 real,
        0 padding (left-pad prompts of different lengths; the cache remembers the pads).
        document_ids (B, T): several sequences packed into one row, each a run of equal ids; every token then
        sees only earlier tokens of its own run, with positions counted from the run's start, so each packed
        sequence gives exactly the logits it gives alone (training only: not with kv_cache).
        only_targets: with targets, run the final norm, output head and softmax only at positions whose target is
        not -1. Fine-tuning leaves the prompt's positions (and padding) without one: the same losses, about 10%
        less time per step of the SFT demo. Off by default: selecting the positions makes the host wait for the
        device, and in pretraining every position has a target.
        """
        B, T = idx.shape
        if kv_cache is not None and start_pos + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} tokens, asked to write up to {start_pos + T}")
        if document_ids is not None and (kv_cache is not None or attention_mask is not None):
            raise ValueError("document_ids (packed rows) cannot be combined with kv_cache or attention_mask")
        positions, mask, is_causal = self._layout(B, T, start_pos, attention_mask, kv_cache, idx.device, document_ids)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        # Under autocast q/k come out of the Linears in the autocast dtype: make cos/sin match once, not per layer.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self._rope(start_pos, T, positions, dtype)
        if self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, self.training)
        for block in self.model.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block input; recompute its insides in backward (Chen et al. 2016).
                x = checkpoint(block, x, cos, sin, mask, is_causal, kv_cache, start_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, kv_cache, start_pos)
        keep = None
        if only_targets and targets is not None:
            keep = targets != -1  # (B, T)
            x, targets = x[keep][None], targets[keep][None]  # (1, N, C), (1, N): only the N positions with a target
        logits = self.lm_head(self.model.norm(x))  # (B, T, V), or (1, N, V) with only_targets
        if targets is None:
            return logits
        # fp32 log-softmax even for bf16 logits: the loss is a small difference of large numbers.
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        if loss_reduction == "none":
            return losses.view(B, T) if keep is None else losses.new_zeros(B, T).masked_scatter(keep, losses)
        if loss_reduction == "sum":
            return losses.sum()
        if loss_reduction != "mean":
            raise ValueError(f"loss_reduction={loss_reduction!r} is not one of 'mean', 'sum', 'none'")
        return losses.sum() / (targets != -1).sum().clamp(min=1)

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty cache on the model's device and in its dtype, for up to max_len (default the context) tokens."""
        w = self.lm_head.weight
        return KVCache(
            self.config, batch_size, max_len or self.config.max_position_embeddings, w.device, dtype or w.dtype
        )

    # ---- MoE hooks --------------------------------------------------------------------------------------------------
    def _moe_modules(self):
        return [(i, b.block_sparse_moe) for i, b in enumerate(self.model.layers) if hasattr(b, "block_sparse_moe")]

    def moe_aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward (in the graph); 0 for a dense model."""
        losses = [m.aux_loss for _, m in self._moe_modules() if getattr(m, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.lm_head.weight.device)

    def moe_metrics(self) -> dict:
        """{"layer{i}": metrics dict} of every MoE layer after the last forward; {} for a dense model."""
        return {f"layer{i}": m.metrics for i, m in self._moe_modules() if getattr(m, "metrics", None) is not None}

    # ---- sizes ------------------------------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once); exclude_embeddings drops the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all of them for a dense model, top_k of n_experts experts in MoE layers."""
        c = self.config
        F_e = c.moe_intermediate_size or c.intermediate_size
        idle = (c.n_experts - c.top_k) * 3 * c.hidden_size * F_e  # SwiGLU experts: w1, w2, w3
        return self.num_parameters() - idle * len(self._moe_modules())

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) = 6 N + 12 L H D T (Kaplan et al. 2020; PaLM app. B).

        N counts the parameters used in matmuls by one token (lm_head yes, the embedding lookup no; MoE: active
        experts only). The attention term counts the full T x T score matrix, as PaLM's MFU does; a causal
        kernel skips about half of it.
        """
        c = self.config
        T = seq_len or c.max_position_embeddings
        n_matmul = self.num_active_parameters() - sum(p.numel() for p in self.parameters() if p.dim() < 2)
        if not c.tie_word_embeddings:
            n_matmul -= self.model.embed_tokens.weight.numel()
        return 6 * n_matmul + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T

    # ---- Hugging Face-compatible checkpoints (hf_checkpoint.py) --------------------------------------------------
    def save_pretrained(self, path: str, tokenizer_dir: str | None = None, dtype=None, state_dict=None):
        """Write config.json + model.safetensors in the HF Llama (or Mixtral) layout; see hf_checkpoint.save."""
        hf_checkpoint.save(self, path, tokenizer_dir=tokenizer_dir, dtype=dtype, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device="cpu", **overrides) -> Transformer:
        """Our checkpoint dir, an HF Llama / Mixtral dir (see hf_checkpoint.load), or a LoRA adapter dir: its
        adapter_config.json names the base (base_model_name_or_path), which is loaded first, then the adapters."""
        base_dir = hf_checkpoint.adapter_base(path)
        if base_dir is not None:
            model = cls.from_pretrained(base_dir, dtype=dtype, device=device, **overrides)
            lora.load_adapter(model, path)
            return model
        return hf_checkpoint.load(cls, ModelConfig, path, dtype=dtype, device=device, **overrides)
