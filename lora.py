"""LoRA and QLoRA: low-rank adapters on frozen linear layers, PEFT-compatible files, NF4 4-bit bases.

What this file implements
-------------------------
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained
weight W (out, in) and learns a low-rank update instead:

    y = x W^T + b + scaling * dropout(x) A^T B^T        A: (r, in), B: (out, r), r << min(in, out)

A starts Kaiming-uniform (as PEFT does) and B starts at zero, so at step 0 the model is exactly the
base model. `scaling` is alpha / r (the paper) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"), which keeps the update's size
stable as r grows. Dropout touches only the LoRA input; the frozen path sees x unchanged.

`apply_lora(model, targets=...)` swaps every `nn.Linear` whose module name ends in one of `targets`
(`q_proj` matches `model.layers.3.self_attn.q_proj`, the same rule PEFT uses for a list) for a
`LoRALinear`, and freezes every other parameter of the model. `LoRALinear` keeps the base as
`weight`/`bias`, so the model's state_dict keys for the base stay the Hugging Face ones.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen base
in 4 bits with the NormalFloat (NF4) data type, written here in plain PyTorch:
  - the 16 NF4 values are quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (paper eq. 4);
  - the weight is cut into blocks of 64 values, each divided by its absmax, and each value replaced
    by the index of the nearest NF4 value: two 4-bit indices are packed per uint8;
  - double quantization (paper section 3) quantizes the fp32 absmax constants again: subtract their
    mean (they are all positive, so this centres them for a symmetric code), then 8 bits per value
    in blocks of 256 with one fp32 scale per block. The paper uses 8-bit floats there; we use a
    linear int8 code, simpler to read and as accurate for this narrow, centred distribution;
  - the base is dequantized on the fly in every forward, and again in backward (the weight is not
    saved for backward), so only the packed form stays in memory.
Bytes per parameter: 0.5 (codes) + 4/64 (absmax) = 0.5625, or 0.5 + 1/64 + 4/(64*256) ≈ 0.516 with
double quantization (`nf4_bytes_per_param`).

Adapter files follow PEFT's layout, so PEFT loads ours and we load PEFT's:
  adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, base_model_name_or_path, ...
  adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  (r, in)
                             base_model.model.<module path>.lora_B.weight  (out, r)
                             base_model.model.<module path>.weight         (modules_to_save, below)

New tokens (modules_to_save): a tokenizer extended with chat markers (tokenizer.extend_with_chat_tokens)
needs new embedding rows, which frozen LoRA could never train. `grow_vocab` appends them (mean-initialised,
Hewitt 2021) and `train_modules(model, ["model.embed_tokens", "lm_head"])` makes those whole modules
trainable; save_adapter then stores their full weights as PEFT's `modules_to_save` does (config lists
"embed_tokens", "lm_head"; keys without PEFT's ".modules_to_save.default" infix), and load_adapter grows
the base to the saved vocabulary before copying them. PEFT itself needs the base resized first
(`model.resize_token_embeddings(n)`) before it loads such an adapter.

How to use
----------
    model = Transformer.from_pretrained("ckpt/base")
    apply_lora(model, r=16, alpha=32, quantize="nf4")       # QLoRA; drop quantize for plain LoRA
    opt = torch.optim.AdamW(lora_parameters(model), lr=2e-4)
    print(trainable_report(model))
    save_adapter(model, "ckpt/sft", base_model_name_or_path="ckpt/base")
    with disable_adapters(model): ref_logits = model(idx)    # the base model, e.g. DPO's reference
    quantize_nf4(merge_lora(model))                          # 4-bit inference (NF4Linear), no adapters

Tests: `python -m pytest -q tests/test_lora.py` (PEFT parity, NF4 against bitsandbytes' numbers).
Benchmark: `python benchmarks/bench_lora.py`.
"""

import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice: PeftModel.base_model (LoraModel).model

# ----------------------------------------------------------------------------------------------------
# NF4: the code book, blockwise quantization, packing, double quantization


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values (float32, sorted, -1 .. 1, exact 0), QLoRA paper eq. 4.

    Take 8 quantiles of N(0,1) for the positive half and 7 for the negative half (an asymmetric
    split, so that 0 is one of the 16 values and zero padding / zero weights stay exact), then scale
    so the largest is 1. The outermost probability `offset` = mean of 1 - 1/(2*15) and 1 - 1/(2*16)
    keeps the end quantiles finite. Done in the same float precision steps as bitsandbytes'
    create_normal_map, which makes the result bit-identical to its published table.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # 7 values < 0
    values = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return values / values.max()


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(N,) uint8 values in 0..15, N even -> (N/2,) uint8; the first of each pair in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N/2,) uint8 -> (N,) uint8 codes, inverse of _pack."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten()


def _absmax_quantize(absmax: torch.Tensor, block: int = 256) -> dict:
    """Double quantization of the per-block absmax constants: mean-subtract, int8 in blocks of 256."""
    n = absmax.numel()
    mean = absmax.mean()
    c = F.pad(absmax - mean, (0, (-n) % block)).view(-1, block)  # (nb2, 256)
    scale = c.abs().amax(dim=1) / 127.0  # (nb2,) one fp32 scale per 256 constants
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-equal block: any scale works
    q = torch.round(c / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"absmax_q": q.flatten()[:n], "absmax_scale": scale, "absmax_mean": mean}


def _absmax_dequantize(state: dict, block: int = 256) -> torch.Tensor:
    q = state["absmax_q"]
    scale = state["absmax_scale"].repeat_interleave(block)[: q.numel()]
    return q.float() * scale + state["absmax_mean"]


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> dict:
    """Quantize any-shaped w to NF4. Returns a dict of tensors: `codes` (ceil(N/2),) uint8 packed
    indices, and either `absmax` (nblocks,) fp32 or its double-quantized form (absmax_q int8,
    absmax_scale fp32, absmax_mean fp32 scalar). Shape and dtype are kept by the caller."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"nf4 block_size must be a positive even number, got {block_size}")
    flat = w.detach().float().flatten()
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)  # (nblocks, 64), zero-padded
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # an all-zero block maps to code 0.0
    normed = (blocks / safe[:, None]).flatten()[:n]  # (N,) in [-1, 1]
    code = nf4_codebook().to(w.device)
    # nearest code value = which interval between midpoints of neighbouring codes the value falls in
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # (N,) 0..15
    state = {"codes": _pack(F.pad(idx, (0, n % 2)))}
    if double_quant:
        state.update(_absmax_quantize(absmax))
    else:
        state["absmax"] = absmax
    return state


def nf4_dequantize(state: dict, shape, block_size: int = 64, dtype=torch.float32) -> torch.Tensor:
    """Inverse of nf4_quantize: code book value of each index times its block's absmax, in `dtype`."""
    n = math.prod(shape)
    absmax = state["absmax"] if "absmax" in state else _absmax_dequantize(state)
    codes = _unpack(state["codes"])[:n].long()  # (N,)
    values = nf4_codebook().to(absmax.device)[codes]  # (N,) in [-1, 1]
    scale = absmax.repeat_interleave(block_size)[:n]  # (N,) each value's block absmax
    return (values * scale).view(shape).to(dtype)


def nf4_bytes_per_param(state: dict, numel: int) -> float:
    """Storage of a quantized weight (codes + constants) divided by its number of values."""
    return sum(t.numel() * t.element_size() for t in state.values()) / numel


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in forward and again in backward.

    Saving the dequantized W for backward would keep a full-precision copy of every quantized layer
    alive through the step, which is what QLoRA exists to avoid; re-dequantizing costs a little time.
    W and b are frozen, so only x gets a gradient.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantized_weight(grad_out.dtype)  # (out, in)
        return grad_out @ w, None  # (..., out) @ (out, in) -> (..., in)


# ----------------------------------------------------------------------------------------------------
# The LoRA layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear (dense, or packed NF4 buffers) plus a trainable low-rank update.

    forward x (..., in) -> (..., out). Parameters: `weight` (out, in) and `bias` frozen (absent when
    quantized: then buffers `nf4_*`), `lora_A.weight` (r, in), `lora_B.weight` (out, r).
    """

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, use_rslora=False, quantize=None, double_quant=False,
                 block_size=64):  # fmt: skip
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.quantize, self.block_size = quantize, block_size
        self.merged = False
        self.disabled = False
        dtype, device = base.weight.dtype, base.weight.device
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if quantize == "nf4":
            self.weight_dtype = dtype
            # not persistent: the packed base is rebuilt from the base checkpoint, never saved
            for name, t in nf4_quantize(base.weight, block_size, double_quant).items():
                self.register_buffer("nf4_" + name, t, persistent=False)
        else:
            self.weight = base.weight
            self.weight.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # PEFT's default init: A Kaiming-uniform with a=sqrt(5) (bound 1/sqrt(in)), B zeros, so B A = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def nf4_state(self) -> dict:
        return {name[4:]: buf for name, buf in self.named_buffers() if name.startswith("nf4_")}

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        """The base weight (out, in) in `dtype`: dequantized from NF4, or the dense weight."""
        if self.quantize is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        shape = (self.out_features, self.in_features)
        return nf4_dequantize(self.nf4_state(), shape, self.block_size, dtype or self.weight_dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, the (out, in) update that merging adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x):
        if self.quantize is None:
            y = F.linear(x, self.weight, self.bias)  # the same op as nn.Linear: exact base output
        else:
            y = _NF4Linear.apply(x, self)
        if self.disabled or self.merged:
            return y
        a = self.lora_A.weight
        h = self.lora_dropout(x.to(a.dtype))  # dropout on the LoRA input only
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)  # (..., in) -> (..., r) -> (..., out)

    def merge(self):
        if self.quantize is not None:
            raise ValueError("merge_lora: cannot merge into an NF4-quantized base; load the base unquantized")
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        q = f", quantize={self.quantize}, block_size={self.block_size}" if self.quantize else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{q}"


# ----------------------------------------------------------------------------------------------------
# Model-level helpers: inject, merge, disable, report


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a regex on the full module name; a list matches by name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict:
    """{module path: LoRALinear} for every LoRA layer in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0, use_rslora=False,
               quantize=None, double_quant=False, block_size=64):  # fmt: skip
    """Replace each nn.Linear whose name matches `targets` by a LoRALinear, in place, and freeze
    every non-LoRA parameter. Returns the model. `quantize="nf4"` stores those bases in NF4 (QLoRA)."""
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    if isinstance(targets, (list, tuple)) and not targets:
        raise ValueError("apply_lora: targets is empty")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(name, m) for name, m in model.named_modules() if name and _matches(name, targets)]
    if not chosen:
        raise ValueError(f"apply_lora: no module name matches targets {targets!r}")
    for name, m in chosen:
        if not isinstance(m, nn.Linear):
            raise ValueError(f"apply_lora: {name} matches {targets!r} but is {type(m).__name__}, not nn.Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(m, r, alpha, dropout, use_rslora, quantize, double_quant, block_size))
    model.lora_config = {"targets": targets, "r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora}
    return model


def lora_parameters(model) -> list:
    """The trainable LoRA parameters (every lora_A / lora_B weight), for the optimizer."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model):
    """Fold scaling * B A into each base weight (dense bases only); forward then skips the LoRA path."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    """Subtract the update merged by merge_lora (the base comes back up to float rounding)."""
    for m in lora_layers(model).values():
        m.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """Inside the block the model is the base model: every LoRA layer returns its frozen path only.

    For an unmerged model (the normal state in training) the output is bit-identical to the base
    model's, which DPO relies on for its reference log-probs. A merged model is unmerged for the
    block and merged again after it (equal to the base up to float rounding).
    """
    layers = list(lora_layers(model).values())
    remerge = [m for m in layers if m.merged]
    for m in remerge:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False
        for m in remerge:
            m.merge()


def merged_state_dict(model) -> dict:
    """The model's state_dict with every LoRA update folded into its base weight and no lora_* keys:
    the plain Hugging Face layout, for writing a merged checkpoint. The model itself is not changed."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            base = m.dequantized_weight().detach()
            sd[name + ".weight"] = base if m.merged else base + m.delta_weight().to(base.dtype)
    return sd


def trainable_report(model) -> str:
    """One line per kind of parameter: trainable (LoRA), frozen, and the NF4 storage if any."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    layers = lora_layers(model)
    quant = [m for m in layers.values() if m.quantize]
    nf4_params = sum(m.in_features * m.out_features for m in quant)
    nf4_bytes = sum(b.numel() * b.element_size() for m in quant for b in m.nf4_state().values())
    total += nf4_params  # quantized bases are buffers, not parameters, but they are still weights
    lines = [f"lora layers: {len(layers)}, trainable params: {trainable:,} || all params: {total:,} || "
             f"trainable%: {100 * trainable / max(total, 1):.4f}"]  # fmt: skip
    if quant:
        lines.append(
            f"nf4 base: {nf4_params:,} params in {nf4_bytes:,} bytes = {nf4_bytes / nf4_params:.4f} bytes/param"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# 4-bit inference: the same NF4 storage, without adapters (sample.py / eval.py / serve.py quantize=nf4)


class NF4Linear(nn.Module):
    """An inference-only linear layer stored in NF4: x (..., in) -> (..., out). The QLoRA base above without
    the adapter. The weight is dequantized in every forward, so only the packed codes stay in memory; that
    costs time here (plain PyTorch; bitsandbytes fuses dequantize and matmul in one CUDA kernel)."""

    def __init__(self, weight: torch.Tensor, bias, block_size: int = 64, double_quant: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for name, t in nf4_quantize(weight, block_size, double_quant).items():
            self.register_buffer("nf4_" + name, t, persistent=False)  # never saved: rebuilt from the checkpoint

    def forward(self, x):
        state = {name[4:]: buf for name, buf in self.named_buffers() if name.startswith("nf4_")}
        w = nf4_dequantize(state, (self.out_features, self.in_features), self.block_size, x.dtype)  # (out, in)
        return F.linear(x, w, self.bias)


def quantize_nf4(model, block_size: int = 64, double_quant: bool = False) -> int:
    """Store every linear layer of the transformer blocks in NF4, in place, for inference; returns how many.
    lm_head, the embedding and the norms keep their dtype (transformers' bitsandbytes path also skips lm_head:
    the logits are the most sensitive output), as do MoE experts (stacked tensors, not nn.Linear). LoRA layers
    must be merged first (generation.load_for_inference merges an adapter before quantizing)."""
    n = 0
    for name, m in list(model.named_modules()):
        if name.endswith("lm_head") or ".lora_" in name or not isinstance(m, (nn.Linear, LoRALinear)):
            continue
        if isinstance(m, LoRALinear) and (m.quantize or not m.merged):
            raise ValueError(f"quantize_nf4: {name} is an unmerged or already quantized LoRA layer; merge_lora first")
        parent, _, child = name.rpartition(".")
        with torch.no_grad():
            setattr(model.get_submodule(parent), child, NF4Linear(m.weight, m.bias, block_size, double_quant))
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# New tokens: a larger vocabulary and fully trained modules (PEFT's modules_to_save)


def grow_vocab(model, vocab_size: int) -> int:
    """Append rows to model.embed_tokens and an untied lm_head up to vocab_size; returns how many were added.

    Each new row (input and output) is the mean of the existing rows: Hewitt 2021, "Initializing New Word
    Embeddings for Pretrained Language Models". A mean output row gives the new tokens the average logit,
    so the model's next-token distribution barely moves (a random row could dominate it), and a mean input
    row looks like an average token to every layer. config.vocab_size is updated, so checkpoints match.
    """
    emb = model.model.embed_tokens
    added = vocab_size - emb.weight.shape[0]
    if added <= 0:
        return 0

    def grown(w):  # (V, C) -> (vocab_size, C)
        mean = w.detach().float().mean(dim=0, keepdim=True).to(w.dtype)  # (1, C)
        return nn.Parameter(torch.cat([w.detach(), mean.expand(added, -1)]), requires_grad=w.requires_grad)

    with torch.no_grad():
        emb.weight = grown(emb.weight)
        emb.num_embeddings = vocab_size
        if not model.config.tie_word_embeddings:
            model.lm_head.weight = grown(model.lm_head.weight)
        model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size
    model.tie_weights()  # tied: lm_head shares the grown embedding
    return added


def train_modules(model, paths) -> list:
    """Make whole modules trainable next to the adapters (fp32 weights, like the adapters: Adam needs the
    precision) and remember them for save_adapter. paths: module paths such as "model.embed_tokens"."""
    params = []
    for path in paths:
        w = model.get_submodule(path).weight
        if w.dtype != torch.float32:
            w.data = w.data.float()
        params.append(w.requires_grad_(True))
    model.modules_to_save = list(paths)
    model.tie_weights()  # a tied lm_head points at the embedding again after the cast
    return params


# ----------------------------------------------------------------------------------------------------
# PEFT-compatible adapter files


def save_adapter(model, dir, base_model_name_or_path):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout into `dir`, with the full
    weights of the modules train_modules() made trainable (PEFT's modules_to_save), if any.
    Each file goes to a temporary name first and is renamed into place (a crash never leaves half a file)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    cfg = getattr(model, "lora_config", None) or {}
    first = next(iter(layers.values()))
    save_paths = getattr(model, "modules_to_save", [])
    targets = cfg.get("targets") or sorted({name.rpartition(".")[2] for name in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": cfg.get("dropout", 0.0),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "use_rslora": first.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": [p.rpartition(".")[2] for p in save_paths] or None,  # PEFT: names, e.g. "lm_head"
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    for path in save_paths:  # clone: a tied lm_head shares memory with embed_tokens, which safetensors refuses
        tensors[f"{PEFT_PREFIX}{path}.weight"] = model.get_submodule(path).weight.detach().cpu().clone()
    os.makedirs(dir, exist_ok=True)
    tmp = os.path.join(dir, ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(dir, ADAPTER_WEIGHTS))
    tmp = os.path.join(dir, ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(dir, ADAPTER_CONFIG))


def read_adapter_config(dir) -> dict:
    """adapter_config.json of `dir`, checked for the LoRA features this file implements."""
    path = os.path.join(dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"no {ADAPTER_CONFIG} in {dir}")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    unsupported = {
        "bias": cfg.get("bias", "none") != "none",
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "exclude_modules": bool(cfg.get("exclude_modules")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {bad}")
    return cfg


def load_adapter(model, dir, quantize=None, double_quant=False, block_size=64):
    """Apply LoRA to `model` as adapter_config.json in `dir` says (unless the model already has LoRA
    layers, e.g. when resuming) and load adapter_model.safetensors into it. Works for files written
    by save_adapter or by PEFT. Returns the model."""
    cfg = read_adapter_config(dir)
    tensors = load_file(os.path.join(dir, ADAPTER_WEIGHTS))
    names = cfg.get("modules_to_save") or []
    save_paths = [n for n, _ in model.named_modules() if n and _matches(n, names)] if names else []
    if len(save_paths) != len(names):
        raise ValueError(f"load_adapter: modules_to_save {names} do not each name one module of the model")
    emb_key = f"{PEFT_PREFIX}model.embed_tokens.weight"
    if "model.embed_tokens" in save_paths and emb_key in tensors:
        grow_vocab(model, tensors[emb_key].shape[0])  # the adapter was trained with added tokens
    if not lora_layers(model):
        targets = cfg["target_modules"]
        targets = targets if isinstance(targets, str) else tuple(targets)
        apply_lora(model, targets, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                   cfg.get("use_rslora", False), quantize, double_quant, block_size)  # fmt: skip
    layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError("load_adapter: the model's LoRA layers are merged; unmerge_lora(model) first")
    if save_paths:
        train_modules(model, save_paths)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": (n, ab) for n in layers for ab in "AB"}
    expected.update({f"{PEFT_PREFIX}{p}.weight": (p, None) for p in save_paths})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"load_adapter: {dir} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, (name, ab) in expected.items():
            p = model.get_submodule(name).weight if ab is None else getattr(layers[name], "lora_" + ab).weight
            if tensors[key].shape != p.shape:
                raise ValueError(
                    f"load_adapter: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[key])
    return model
