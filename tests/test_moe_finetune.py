"""The MoE balancing loss reaches the router in every fine-tuning stage (SFT, DPO, GRPO), as it does in pretraining.

Two MoE bases hold the same weights and differ only in `aux_loss_coef` (0 and 0.5; z-loss off). One full fine-tuning
step from each, on the same batch with the same seed, must leave different router weights: the runs are otherwise
deterministic, so a stage that left the auxiliary loss out (as SFT and GRPO once did) gives bit-identical routers.
The experts of the last MoE layer see the same gradient either way (the balancing loss depends on router logits
only, and nothing after that layer's router feeds back into its experts' inputs), so they stay identical: the
difference is the auxiliary loss, not noise. Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_moe_finetune.py
"""

import os

import pytest
import torch
from conftest import MICRO_MODEL
from safetensors.torch import load_file

import train_dpo
import train_grpo
import train_sft
from config import load_yaml, parse_args
from model import ModelConfig, Transformer

ROUTER = "model.layers.1.block_sparse_moe.gate.weight"  # the last layer's router (Mixtral names)
LAST_EXPERTS = "model.layers.1.block_sparse_moe.experts.0.w1.weight"


@pytest.fixture(scope="module")
def moe_bases(tiny_data_dir, tmp_path_factory):
    """{coef: base dir}: one set of MoE weights saved twice, with aux_loss_coef 0 and 0.5."""
    root = tmp_path_factory.mktemp("moe_bases")
    values = {**load_yaml(MICRO_MODEL), "n_experts": 4, "top_k": 2, "moe_intermediate_size": 32, "z_loss_coef": 0.0}
    torch.manual_seed(0)
    weights = Transformer(ModelConfig(**values, aux_loss_coef=0.0)).state_dict()
    bases = {}
    for coef in (0.0, 0.5):
        model = Transformer(ModelConfig(**values, aux_loss_coef=coef))
        model.load_state_dict(weights)
        bases[coef] = str(root / f"coef_{coef}")
        model.save_pretrained(bases[coef], tokenizer_dir=tiny_data_dir)
    return bases


COMMON = dict(finetune="full", steps=1, warmup_steps=0, lr=1e-3, min_lr=1e-3, grad_clip=0, eval_every=0, log_every=1,
              save_every=100, progress=False, device="cpu", seed=0, eval_at_start=False)  # fmt: skip
# grad_clip=0: a global clip would rescale every gradient by the router's extra norm, and the experts would differ.


def stage_args(stage: str, data_dir: str, base: str, out: str) -> tuple:
    if stage == "sft":
        kw = dict(data=f"{data_dir}/sft_train.jsonl", val_data="", eval_tasks="", batch_size=8, micro_batch_size=4,
                  seq_len=64)  # fmt: skip
        return train_sft.main, train_sft.SFTConfig, kw
    if stage == "dpo":
        kw = dict(data=f"{data_dir}/dpo_train.jsonl", eval_tasks="", batch_size=8, micro_batch_size=4, seq_len=64)
        return train_dpo.main, train_dpo.DPOConfig, kw
    kw = dict(data=f"{data_dir}/test.jsonl", eval_tasks="", group_size=4, max_new_tokens=4, batch_size=16,
              micro_batch_size=8, seq_len=48)  # fmt: skip
    return train_grpo.main, train_grpo.GRPOConfig, kw


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_the_balancing_loss_reaches_the_router(stage, tiny_data_dir, moe_bases, tmp_path):
    after = {}
    for coef, base in moe_bases.items():
        main, cls, kw = stage_args(stage, tiny_data_dir, base, "")
        out = str(tmp_path / f"coef_{coef}")
        main(parse_args(cls, [f"{k}={v}" for k, v in {**COMMON, **kw, "base": base, "out_dir": out}.items()]))
        after[coef] = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(after[0.0][LAST_EXPERTS], after[0.5][LAST_EXPERTS])  # same task gradient
    gap = (after[0.5][ROUTER] - after[0.0][ROUTER]).abs().max().item()
    assert gap > 1e-6, f"{stage}: the router ignores aux_loss_coef (max difference {gap})"
