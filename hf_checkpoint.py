"""Hugging Face-compatible checkpoints: our Transformer <-> config.json + model.safetensors.

Because model.py's module tree mirrors transformers' LlamaForCausalLM, the tensor names need no
mapping: saving is `state_dict()` minus a tied lm_head, written as safetensors with
`{"format": "pt"}` metadata; the only conversions are
  * config: ModelConfig <-> LlamaConfig / MixtralConfig keys (`config_to_hf`, `config_fields_from_hf`), writing
    both transformers 4.x (`rope_scaling`) and 5.x (`rope_parameters`) spellings;
  * MoE experts: our stacked (E, F, C) tensors <-> Mixtral's per-expert keys (`experts_to_hf` / `experts_from_hf`, below).
    MoE variants Mixtral's code would compute differently (shared experts, some dense layers, the sigmoid
    router, capacity drops) keep that layout but get model_type "zts_moe", which transformers refuses loudly
    instead of loading them with randomly filled weights.
`load` reads our dirs and HF Llama / Mixtral dirs (one file or shards with model.safetensors.index.json); `adapter_base`
names the base of a LoRA adapter dir (Transformer.from_pretrained loads it, then lora.load_adapter). Nothing is unpickled:
a dir with only pytorch_model.bin is refused. Files are written under a temporary name and renamed.
`resolve_checkpoint` turns a hub id (`hf:ORG/NAME`) into a local snapshot dir of huggingface_hub's cache.

Used through `Transformer.save_pretrained` / `Transformer.from_pretrained` (model.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def save(model, path: str, tokenizer_dir: str | None = None, dtype=None, state_dict=None) -> None:
    """Write config.json (LlamaConfig keys, MixtralConfig keys for MoE) and model.safetensors (HF tensor
    names, format=pt metadata, a tied lm_head left out as HF does); copy tokenizer files from tokenizer_dir.
    dtype casts floating tensors on the way out (e.g. torch.bfloat16); None keeps the model's dtype.
    state_dict replaces model.state_dict() (e.g. full weights gathered from FSDP shards)."""
    os.makedirs(path, exist_ok=True)
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # transformers re-ties it from embed_tokens on load
    if model.config.n_experts > 0:
        sd = experts_to_hf(sd)  # stacked (E, F, C) experts -> Mixtral's experts.{j}.w1.weight
    tensors, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        ptr = v.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (e.g. expert slices of one stacked tensor): copy those.
        v = v.clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
        tensors[k] = v
    w_dtype = next(iter(tensors.values())).dtype
    _atomic_write(os.path.join(path, "model.safetensors"), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    hf = config_to_hf(model.config, w_dtype)
    _atomic_write(os.path.join(path, "config.json"), lambda f: _write_json(hf, f))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(src: str, dst: str) -> None:
    """Copy the tokenizer files that src has (TOKENIZER_FILES) into dst: every checkpoint carries its tokenizer."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def adapter_base(path: str) -> str | None:
    """The base checkpoint dir a LoRA adapter dir names (base_model_name_or_path, absolute or relative to the
    adapter dir); None when path is not an adapter dir. ValueError when the named base is not a local dir."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return None
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    candidates = [base, os.path.join(path, base)] if base else []
    base_dir = next((c for c in candidates if os.path.isdir(c)), None)
    if base_dir is None:
        raise ValueError(f"adapter in {path!r} names base model {base!r}, which is not a local directory")
    return base_dir


def load(cls, config_cls, path: str, dtype=None, device="cpu", **overrides):
    """Load our checkpoint dir or an HF Llama / Mixtral dir (single or sharded safetensors) as a `cls` built from
    a `config_cls` (model.py passes Transformer and ModelConfig: this file sits below model.py). A LoRA adapter dir
    is handled one level up, in Transformer.from_pretrained: its base is loaded here, then lora.load_adapter.

    dtype: None = float32, "auto" = as stored, or a torch dtype / its name. overrides: ModelConfig fields that
    are not architecture (attn_impl, dropout, gradient_checkpointing, ...). Never unpickles anything.
    """
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} has no config.json (not a checkpoint directory)")
    with open(config_path) as f:
        hf = json.load(f)
    config = config_cls(**config_fields_from_hf(hf, **overrides))
    if dtype == "auto":
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else (dtype or torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise ValueError("dtype must be None, 'auto', a torch dtype or its name such as 'bfloat16'")
    sd = _read_safetensors(path, dtype, device)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF checkpoints store it
    if config.n_experts > 0:
        sd = experts_from_hf(sd)
    with torch.device("meta"):
        model = cls(config)
    required = {k for k, _ in model.named_parameters()}  # tied lm_head is not listed: it is embed_tokens
    allowed = set(model.state_dict()) | required  # + persistent buffers (sigmoid router bias), may be absent
    missing, unexpected = sorted(required - set(sd)), sorted(set(sd) - allowed)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False, assign=True)  # assign: adopt the loaded tensors, no copy
    model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # RoPE tables, MoE router state (Mixtral files have none): materialize as zeros
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.zeros_like(buf, device=device))
    model.init_rope()
    return model


# ---------------------------------------------------------------------------------------------------------------------
# base models by hub id: hf:ORG/NAME -> a snapshot dir in huggingface_hub's cache
# ---------------------------------------------------------------------------------------------------------------------
HUB_PREFIX = "hf:"
# What a checkpoint needs, and never pickles (*.bin, *.pth): a repo's other files are not downloaded.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def resolve_checkpoint(spec: str) -> str:
    """A local directory for a checkpoint name. A path comes back unchanged; `hf:ORG/NAME` (or
    `hf:ORG/NAME@REVISION`) is fetched with huggingface_hub.snapshot_download into its cache (HF_HUB_CACHE,
    ~/.cache/huggingface/hub by default) and the snapshot dir is returned, so a second run reads the cache.
    Offline (HF_HUB_OFFLINE=1, or no network) a cached snapshot is used as is; a model that is not cached
    raises ValueError with the one command to run on a connected machine. Used by generation.load_for_inference
    (sample, eval, serve) and finetune.load_base (SFT, DPO, GRPO)."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    repo, _, revision = spec[len(HUB_PREFIX) :].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"'{spec}' is not a hub id: write hf:ORG/NAME, e.g. hf:TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    import huggingface_hub  # lazy: only hub ids need it (it comes with datasets)
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:  # not cached, and offline or the hub unreachable
        get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise ValueError(
            f"'{spec}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached "
            f"(offline): on a connected machine run `{get}`, then copy that cache folder here"
        ) from None
    except Exception as e:  # repo not found, gated, bad revision, ...: huggingface_hub has many error types
        raise ValueError(f"'{spec}': {type(e).__name__}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint helpers: config.json <-> ModelConfig, safetensors files
# ---------------------------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Fields whose name and meaning are the same in LlamaConfig / MixtralConfig and here.
HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
)  # fmt: skip
# MoE fields Mixtral cannot express: stored as extra config.json keys, which transformers keeps and ignores.
MOE_EXTRA_KEYS = ("n_shared_experts", "moe_layers", "router", "z_loss_coef", "capacity_factor", "bias_update_rate")
# model_type of MoE variants that Mixtral's code would compute differently (shared experts, dense layers, the
# sigmoid router, dropped tokens). transformers refuses an unknown model_type with a clear error, which beats
# loading a "mixtral" whose missing weights it fills with random numbers. Only our loader reads this type.
OWN_MOE_TYPE = "zts_moe"


def mixtral_differences(c) -> list[str]:
    """Why MixtralForCausalLM would not compute what this MoE config computes ([] = it would)."""
    every_layer = c.moe_layers is None or sorted(set(c.moe_layers)) == list(range(c.num_hidden_layers))
    checks = [
        (c.n_shared_experts == 0, f"n_shared_experts={c.n_shared_experts}"),
        (every_layer, f"moe_layers={c.moe_layers} (Mixtral: every layer)"),
        (c.router == "softmax", f"router={c.router} (Mixtral: softmax)"),
        (c.capacity_factor == 0, f"capacity_factor={c.capacity_factor} (Mixtral is dropless)"),
    ]
    return [why for ok, why in checks if not ok]


# transformers' LlamaConfig defaults, used when a key is absent from an HF config.json.
HF_DEFAULTS = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_dropout": 0.0}


def config_to_hf(c, dtype=torch.float32) -> dict:
    """ModelConfig -> config.json dict that transformers' AutoConfig reads (4.x and 5.x key styles)."""
    d = {k: getattr(c, k) for k in HF_KEYS}
    scaling = dict(c.rope_scaling) if c.rope_scaling else None
    if scaling is not None:
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
    # transformers 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling. Write both, they agree.
    d["rope_scaling"] = scaling
    d["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": c.rope_theta}
    d.update(head_dim=c.head_dim, hidden_act="silu", attention_bias=False, mlp_bias=False, use_cache=True)
    d["dtype"] = str(dtype).removeprefix("torch.")
    if c.n_experts == 0:
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", intermediate_size=c.intermediate_size)
        return d
    mixtral = not mixtral_differences(c)
    d.update(
        architectures=["MixtralForCausalLM" if mixtral else "ZeroToScratchMoEForCausalLM"],
        model_type="mixtral" if mixtral else OWN_MOE_TYPE,
        intermediate_size=c.moe_intermediate_size or c.intermediate_size,  # Mixtral: the width of one expert
        dense_intermediate_size=c.intermediate_size,  # ours: dense layers of a mixed model
        num_local_experts=c.n_experts,
        num_experts_per_tok=c.top_k,
        router_aux_loss_coef=c.aux_loss_coef,
        router_jitter_noise=c.router_noise,
        output_router_logits=False,
        sliding_window=None,
    )
    d.update({k: getattr(c, k) for k in MOE_EXTRA_KEYS})
    return d


def read_config_fields(path: str, **overrides) -> dict:
    """The ModelConfig fields of a checkpoint dir (of an adapter dir: its base's) from config.json alone, no weights
    read: what a dry run needs to size a model it will not load (model.ModelConfig.from_checkpoint)."""
    path = adapter_base(path) or path
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} has no config.json (not a checkpoint directory)")
    with open(config_path) as f:
        return config_fields_from_hf(json.load(f), **overrides)


def config_fields_from_hf(d: dict, **overrides) -> dict:
    """config.json dict (ours or transformers') -> ModelConfig fields (model.ModelConfig.from_hf builds the config);
    unsupported architectures raise ValueError."""
    model_type = d.get("model_type")
    if model_type not in ("llama", "mixtral", OWN_MOE_TYPE):
        raise ValueError(
            f"unsupported architecture {d.get('architectures') or model_type}: only Llama and Mixtral load"
        )
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("unsupported Llama variant: needs hidden_act=silu and no attention/mlp biases")
    if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
        raise ValueError(f"unsupported head_dim={d['head_dim']}: must equal hidden_size / num_attention_heads")
    kw = {k: d.get(k, HF_DEFAULTS.get(k)) for k in HF_KEYS if k in d or k in HF_DEFAULTS}
    kw.setdefault("num_key_value_heads", d["num_attention_heads"])
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = d["num_attention_heads"]
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]  # Llama 3 lists several; we stop on the first
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kw["rope_theta"] = rope.pop("rope_theta", kw.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    kw["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    kw["intermediate_size"] = d.get("intermediate_size", 11008)
    if model_type in ("mixtral", OWN_MOE_TYPE):
        if d.get("sliding_window") and d["sliding_window"] < kw["max_position_embeddings"]:
            raise ValueError(f"unsupported Mixtral sliding_window={d['sliding_window']}")
        kw["intermediate_size"] = d.get("dense_intermediate_size", d["intermediate_size"])
        kw.update(
            n_experts=d["num_local_experts"],
            top_k=d["num_experts_per_tok"],
            moe_intermediate_size=d["intermediate_size"],
            aux_loss_coef=d.get("router_aux_loss_coef", 0.01),
            router_noise=d.get("router_jitter_noise") or 0.0,
        )
        kw.update({k: d[k] for k in MOE_EXTRA_KEYS if k in d})
    kw.update(overrides)
    return kw


# ---- MoE experts: our stacked tensors <-> Mixtral's per-expert keys ----
_STACKED = re.compile(r"^(.*)\.block_sparse_moe\.(w1|w2|w3)$")
_PER_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers v5 in memory


def experts_to_hf(state_dict):
    """Stacked `...block_sparse_moe.w1` (E,F,C) -> Mixtral's `...block_sparse_moe.experts.{j}.w1.weight` (F,C).

    Returns a new dict; every other key (router `gate.weight`, attention, norms) passes through.
    """
    out = {}
    for key, value in state_dict.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, name = m.groups()
        for j, w in enumerate(value.unbind(0)):
            out[f"{prefix}.block_sparse_moe.experts.{j}.{name}.weight"] = w.contiguous()
    return out


def experts_from_hf(state_dict):
    """Mixtral per-expert keys (or transformers v5's fused `mlp.experts.gate_up_proj`) -> stacked w1/w2/w3.

    Returns a new dict; other keys pass through. Raises ValueError when a layer's experts are incomplete.
    """
    out, groups = {}, {}  # groups[(prefix, name)][j] = tensor
    fused_layers = set()
    for key, value in state_dict.items():
        m = _PER_EXPERT.match(key)
        if m is not None:
            prefix, j, name = m.groups()
            groups.setdefault((prefix, name), {})[int(j)] = value
            continue
        m = _FUSED.match(key)
        if m is not None:
            prefix, name = m.groups()
            fused_layers.add(prefix)
            if name == "gate_up_proj":  # (E,2F,C): gate rows first, then up rows
                out[f"{prefix}.block_sparse_moe.w1"], out[f"{prefix}.block_sparse_moe.w3"] = value.chunk(2, dim=1)
            else:  # down_proj (E,C,F)
                out[f"{prefix}.block_sparse_moe.w2"] = value
            continue
        out[key] = value
    for (prefix, name), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"{prefix}.block_sparse_moe: expert indices for {name} are not 0..E-1: {sorted(experts)}")
        out[f"{prefix}.block_sparse_moe.{name}"] = torch.stack([experts[j] for j in range(len(experts))])
    for prefix in fused_layers:  # v5 names the whole block `mlp`; its router is `mlp.gate.weight`
        gate = out.pop(f"{prefix}.mlp.gate.weight", None)
        if gate is not None:
            out[f"{prefix}.block_sparse_moe.gate.weight"] = gate
    for prefix in {p for p, _ in groups} | fused_layers:
        missing = [n for n in ("w1", "w2", "w3") if f"{prefix}.block_sparse_moe.{n}" not in out]
        if missing:
            raise ValueError(f"{prefix}.block_sparse_moe: missing expert weights {missing}")
    return out


def _safetensors_files(path: str) -> list[str]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        raise ValueError(f"{path!r} has only pickle weights (pytorch_model.bin); convert them to safetensors first")
    raise ValueError(f"{path!r} has no model.safetensors or model.safetensors.index.json")


def _read_safetensors(path: str, dtype, device) -> dict:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json, cast one by one."""
    files = _safetensors_files(path)
    sd = {}
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"shard {file!r} listed in the index is missing")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    sd[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    return sd


class LazyStateDict(Mapping):
    """A checkpoint dir's weights under our model's names, each read from disk only when looked up.

    For sharded loading: FSDP.load_full_state_dict takes one tensor at a time and keeps only its slice, so no
    rank ever holds the whole checkpoint (a 70B model's fp32 state dict is 280 GB). Mixtral's per-expert tensors
    are stacked into our (E, F, C) layout on access. A tied head has no entry: it is the embedding."""

    def __init__(self, path: str):
        self._file, self._parts = {}, {}  # file key -> file; our key -> file keys (several: stacked experts)
        for file in _safetensors_files(path):
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    self._file.update(dict.fromkeys(f.keys(), file))
            except (SafetensorError, FileNotFoundError) as e:
                raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
        experts = {}
        for key in self._file:
            m = _PER_EXPERT.match(key)
            if m is not None:
                prefix, j, name = m.groups()
                experts.setdefault(f"{prefix}.block_sparse_moe.{name}", {})[int(j)] = key
            elif not key.endswith("rotary_emb.inv_freq"):
                self._parts[key] = key
        for key, by_index in experts.items():
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"{key}: expert indices are not 0..E-1: {sorted(by_index)}")
            self._parts[key] = [by_index[j] for j in range(len(by_index))]

    def _read(self, key: str) -> torch.Tensor:
        with safe_open(self._file[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = self._parts[key]
        return self._read(parts) if isinstance(parts, str) else torch.stack([self._read(k) for k in parts])

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor to find out
        return key in self._parts

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _atomic_write(path: str, write):
    """write(tmp_path), then rename over path: a crash mid-save never leaves a half-written file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
