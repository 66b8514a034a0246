"""Raw gradients under data parallelism: after one backward (before any clipping or optimizer step), the gradient
every rank holds equals the single-process gradient of the same global batch, under ddp, fsdp, torch_ddp and
torch_fsdp2, for a dense model and for MoE models with both routers.

Why raw gradients and not weights after training: AdamW's first steps move each weight by about lr * sign(g)
whatever the scale of g, and clipping rescales g anyway, so a DDP that sums instead of averaging, or an FSDP
reduce-scatter missing its 1/world, trains almost the same for a few steps. p.grad shows the factor of 2 at once.

References, computed in each worker from the same seed and global batch:
- LM loss: one forward + backward of the whole global batch in one process.
- MoE auxiliary loss: the trainer adds each rank's own load-balancing loss (computed on its own tokens), so the
  data-parallel gradient of it is the mean over ranks of the per-slice gradients; the reference builds exactly
  that, one slice at a time, in one process.
Our FSDP holds a flat, padded 1/world slice of each unit's gradient: the reference gradients are flattened the
same way (named by the unit's own slot names) and compared slice by slice on each rank.

One spawn runs every mode and model (starting processes is the slow part). Run:
OMP_NUM_THREADS=1 python -m pytest -q tests/test_grad_parity.py
"""

import torch
from conftest import spawn

import distributed
from model import ModelConfig, Transformer

B, T = 4, 16  # global batch (2 sequences per rank), sequence length
MODES = ("ddp", "fsdp", "torch_ddp", "torch_fsdp2")


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)  # fmt: skip
    return ModelConfig(**{**base, **kw})


MOE = dict(n_experts=4, top_k=2, moe_intermediate_size=32, aux_loss_coef=0.1, z_loss_coef=1e-3)
CONFIGS = {
    "dense": config(),
    "moe_softmax": config(**MOE, tie_word_embeddings=False),
    "moe_sigmoid_bias_shared": config(**MOE, router="sigmoid_bias", n_shared_experts=1, moe_layers=[1]),
}


def make_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg)


def reference_grads(cfg: ModelConfig, x: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    """name -> gradient of (LM loss of the global batch + mean over rank slices of each slice's aux loss)."""
    ref = make_model(cfg)
    ref(x[:, :-1], x[:, 1:]).backward()
    if cfg.n_experts:
        for part in x.chunk(world):
            ref(part[:, :-1], part[:, 1:])  # the forward sets each MoE layer's aux loss for these tokens only
            (ref.moe_aux_loss() / world).backward()
    # remove_duplicate=False: a tied matrix answers to both of its names (FSDP's slots may use either).
    return {n: p.grad.clone() for n, p in ref.named_parameters(remove_duplicate=False)}


def local_grads(model, mode: str, want: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, what this rank holds, what it should hold) for every gradient tensor of a wrapped model."""
    if mode == "fsdp":
        out = []
        for i, g in enumerate(model._groups()):  # each flat group: concatenated, zero-padded, this rank's slice
            flat = torch.cat([want[slots[0][2]].reshape(-1) for slots in g.slots] + [torch.zeros(g.pad)])
            shard = slice(g.rank * g.shard_numel, (g.rank + 1) * g.shard_numel)
            out.append((f"group{i}[{g.slots[0][0][2]}...]", g.shard.grad, flat[shard]))
        return out
    bare = distributed.unwrap(model)
    out = []
    for name, p in bare.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # torch_fsdp2: a DTensor
        out.append((name, grad, want[name]))
    return out


def _parity_worker(info):
    for label, cfg in CONFIGS.items():
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(7))
        want = reference_grads(cfg, x, info.world_size)
        for mode in MODES:
            opts = {"find_unused_parameters": True} if mode == "torch_ddp" and cfg.n_experts else {}
            model = distributed.wrap_model(make_model(cfg), mode, info, **opts)
            local = distributed.split_batch(x, info)
            # Two micro-batches of one sequence each, the first under no_sync (accumulation), for the dense model.
            micro = local.chunk(2) if label == "dense" else [local]
            for j, mb in enumerate(micro):
                with distributed.maybe_no_sync(model, skip_sync=j < len(micro) - 1):
                    loss = model(mb[:, :-1], mb[:, 1:]) + distributed.unwrap(model).moe_aux_loss()
                    (loss / len(micro)).backward()
            for name, got, expect in local_grads(model, mode, want):
                assert got is not None, (label, mode, name)
                # fp32; only the order of the sums differs (rank slices, bucket or shard boundaries).
                torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, s=f"{label} {mode} {name}": f"{s}: {m}")  # fmt: skip


def test_raw_gradients_equal_single_process_under_every_parallel_mode():
    spawn(_parity_worker)
