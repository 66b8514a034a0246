"""Every recipe in configs/ parses with its script's config class, and every model preset builds with the parameter
count an independent reference gives.

A recipe may fail to parse here only because a path it names does not exist on this machine yet: a data dir that
prepare_data.py writes, a checkpoint an earlier stage trains, a model the user downloads (under data/, out/ or
models/). Each such message must name a path key, and the path the recipe gives for it, and that path must really be
missing; any other message (unknown key, wrong type, impossible value, a typo in a file that ships with the repo) is
a bug in the recipe, which would otherwise surface only on a GPU cluster hours after submission.
"""

import dataclasses
import glob
import os
import re

import pytest
import torch
from conftest import ROOT

from config import ConfigError, load_yaml, parse_args

# "KEY: no prepared data at 'PATH' ...", "KEY: no file at 'PATH'", "KEY: no tokenizer.model in 'PATH'", ...
MISSING_PATH = re.compile(r"^([\w.]+): no [\w .()]+? (?:at|in) '([^']+)'")  # "KEY: no WHAT at 'PATH'"
MADE_LATER = ("data/", "out/", "models/")  # written by an earlier stage, or downloaded by the user


def script_config(name: str):
    if name.startswith("pretrain"):
        from train_pretrain import PretrainConfig as cls
    elif name.startswith("sft"):
        from train_sft import SFTConfig as cls
    elif name.startswith("dpo"):
        from train_dpo import DPOConfig as cls
    elif name.startswith("grpo"):
        from train_grpo import GRPOConfig as cls
    elif name.startswith("data"):
        from prepare_data import DataConfig as cls
    elif name.startswith("vlm"):
        from train_vlm import VLMTrainConfig as cls
    else:
        return None
    return cls


RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def problems_of(error: ConfigError) -> list[str]:
    """The messages inside one ConfigError: "first (+N more: second; third)"."""
    text = str(error)
    first, sep, rest = text.partition(" (+")
    return [first] + (rest[rest.index(": ") + 2 : -1].split("; ") if sep else [])


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_parses(path):
    cls = script_config(os.path.basename(path))
    assert cls is not None, f"no script claims {path}: name recipes after their script"
    values = {f.name: f.default for f in dataclasses.fields(cls)} | load_yaml(path)
    try:
        parse_args(cls, [path])
    except ConfigError as e:
        for problem in problems_of(e):
            m = MISSING_PATH.match(problem)
            assert m, f"{os.path.basename(path)}: {problem}"
            key, missing = m.groups()
            # The missing path is the recipe's value for that key, or a file inside it (data_dir/meta.json, ...).
            inside = str(values.get(key)).rstrip("/") + "/"
            assert values.get(key) == missing or missing.startswith(inside), (
                f"{problem}: the recipe's {key} is {values.get(key)!r}"
            )
            assert missing.startswith(MADE_LATER), f"{problem}: a path the repo ships with should exist"
            assert not os.path.exists(os.path.join(ROOT, missing)) and not os.path.exists(missing), problem
    if "model" in values and cls.__name__ == "PretrainConfig":  # a preset name or a model YAML: resolved at run time
        from model import ModelConfig

        model = values["model"]
        if model.endswith((".yaml", ".yml")):
            assert os.path.isfile(os.path.join(ROOT, model)), f"{path}: model file {model} is not in the repo"
        else:
            ModelConfig.from_preset(model)  # raises on an unknown preset or key


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "model", "*.yaml")))


def hand_count(c) -> int:
    """Parameters of a Llama / Mixtral-style model from its shapes alone: embeddings (+ an untied head), per layer two
    RMSNorm gains, q/k/v/o and a SwiGLU MLP (or a router, E SwiGLU experts and the shared ones), a final norm."""
    D = c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * D * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o: H heads; k, v: H_kv
    total = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    for i in range(c.num_hidden_layers):
        moe = c.n_experts > 0 and (c.moe_layers is None or i in c.moe_layers)
        F = c.moe_intermediate_size or c.intermediate_size
        mlp = 3 * c.hidden_size * c.intermediate_size
        if moe:
            mlp = c.hidden_size * c.n_experts + 3 * c.hidden_size * F * (c.n_experts + c.n_shared_experts)
        total += 2 * c.hidden_size + attn + mlp
    return total


def transformers_count(c) -> int | None:
    """The same model built by transformers (Llama or Mixtral) on the meta device; None for what neither expresses."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  tie_word_embeddings=c.tie_word_embeddings)  # fmt: skip
    if c.n_experts == 0:
        hf_cfg, cls = transformers.LlamaConfig(intermediate_size=c.intermediate_size, **common), "LlamaForCausalLM"
    elif c.n_shared_experts == 0 and c.moe_layers is None and c.router == "softmax":
        F = c.moe_intermediate_size or c.intermediate_size
        hf_cfg = transformers.MixtralConfig(intermediate_size=F, num_local_experts=c.n_experts,
                                            num_experts_per_tok=c.top_k, **common)  # fmt: skip
        cls = "MixtralForCausalLM"
    else:
        return None
    with torch.device("meta"):
        model = getattr(transformers, cls)(hf_cfg)
    return sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter, counted once


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_model_preset_builds_on_meta_with_the_reference_parameter_count(path):
    from model import ModelConfig, Transformer

    cfg = ModelConfig(**load_yaml(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == hand_count(cfg)
    hf = transformers_count(cfg)
    assert hf is None or model.num_parameters() == hf, (model.num_parameters(), hf)
