"""Every recipe in configs/ parses with its script's config class, and every model preset builds.

A recipe can only fail here on paths that do not exist on this machine (hub data, a base
checkpoint trained earlier): any other message (unknown key, wrong type, impossible value) is a bug
in the recipe, and would otherwise surface only on a GPU cluster hours after submission.
"""

import glob
import os

import pytest
import torch
from conftest import ROOT

from config import ConfigError, load_yaml, parse_args

# Messages that only say a path is not there yet (data not prepared, base not trained).
MISSING = (
    "no prepared data",
    "no checkpoint directory",
    "not found",
    "does not exist",
    "no directory",
    "no file",
    "no tokenizer.model",
)


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


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_parses(path):
    cls = script_config(os.path.basename(path))
    assert cls is not None, f"no script claims {path}: name recipes after their script"
    try:
        parse_args(cls, [path])
    except ConfigError as e:
        problems = [p for p in str(e).replace(" (+", "; ").split("; ") if not any(m in p for m in MISSING)]
        assert not problems, str(e)


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "model", "*.yaml")))


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_model_preset_builds_on_meta(path):
    from model import ModelConfig, Transformer

    cfg = ModelConfig(**load_yaml(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() > 0
