"""What a launch decides, in one place: the parallel mode, the batch split, the device, dtype and attention kernel.

A run is started as `python train_X.py CONFIG [key=value ...]` (one process) or under `torchrun --nproc_per_node=N`
(N processes; torchrun sets WORLD_SIZE). From the config and that world size alone, before any process group exists:

- `resolve_parallel`: parallel=auto means none in one process and ddp under torchrun; parallel=none on several
  processes would train N unsynchronized copies on different data, so it stops with one line instead.
- `batch_split`: batch_size is the global batch, the number the user wrote, at any world size; micro_batch_size is
  only an upper bound per forward (it is about memory). Each rank takes batch_size / world examples per step in
  `accum` micro-batches of `micro`, the largest size up to micro_batch_size that divides its share. So the same
  config gives the same optimizer steps on 1 or 8 processes: only the summation order of the gradients differs.
- `resolve_device` / `resolve_dtype`: the device comes from distributed.pick_device, the one owner of that decision
  (init_distributed uses it too, so the process group and the batches agree), and the autocast dtype follows it.
- `resolve_attn_impl`: attn_impl=auto means the Triton kernel on CUDA, PyTorch's sdpa elsewhere.
- `is_sharded`: whether a parallel mode splits weights and optimizer state over ranks (fsdp, torch_fsdp2), which
  decides how checkpoints are saved and read, and whether one rank can generate text on its own.
`dry_run=true` on any training script prints all of these decisions with planner.py's memory estimate
(planner.dry_run) and exits without a process group, a download or a write.
"""

from __future__ import annotations

import torch

import distributed
from config import UserError
from model import ATTN_IMPLS

SHARDED_MODES = ("fsdp", "torch_fsdp2")  # weights, gradients and optimizer state split over ranks (ZeRO-3)


def is_sharded(parallel: str) -> bool:
    """True for the parallel modes whose ranks each hold a slice of the weights: such a run saves one optimizer
    file per rank, gathers the weights to write them, and cannot sample text on one rank."""
    return parallel in SHARDED_MODES


def attn_impl_errors(cfg) -> list[str]:
    """cfg.attn_impl is auto or one of model.ATTN_IMPLS."""
    if cfg.attn_impl not in ("auto", *ATTN_IMPLS):
        return [f"attn_impl must be auto or one of {', '.join(ATTN_IMPLS)}, not '{cfg.attn_impl}'"]
    return []


def resolve_attn_impl(cfg, device: torch.device) -> str:
    """attn_impl=auto -> triton on CUDA (flash_attention.py, fused and O(T) memory), sdpa elsewhere (the Triton
    kernel only runs on CPU in the slow interpreter). Decided here once; the model configs receive the result."""
    if cfg.attn_impl != "auto":
        return cfg.attn_impl
    return "triton" if device.type == "cuda" else "sdpa"


def resolve_parallel(cfg, world_size: int) -> str:
    """parallel=auto -> none in one process, ddp under torchrun. parallel=none on several processes would train
    world_size unsynchronized copies on different data and save rank 0's: refused."""
    if cfg.parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if cfg.parallel == "none" and world_size > 1:
        raise UserError(
            f"parallel=none with {world_size} processes would train {world_size} unsynchronized copies; "
            "pass parallel=auto (or ddp, fsdp, torch_ddp, torch_fsdp2), or run without torchrun"
        )
    return cfg.parallel


def batch_split(cfg, world_size: int) -> tuple[int, int]:
    """(micro, accum): each rank runs `accum` micro-batches of `micro` examples, batch_size = micro x accum x world.

    batch_size is the global batch the user wrote and stays so at any world size; micro_batch_size is an upper
    bound (memory), so micro is the largest size not above it that divides this rank's share, batch_size / world.
    """
    per_rank, rest = divmod(cfg.batch_size, world_size)
    if rest or per_rank == 0:
        lower = cfg.batch_size - rest if cfg.batch_size >= world_size else world_size
        works = sorted({lower, cfg.batch_size + world_size - rest} - {0})
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}, e.g. batch_size={' or batch_size='.join(map(str, works))}"
        )
    micro = max(m for m in range(1, min(cfg.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def resolve_device(cfg, local_rank: int = 0) -> torch.device:
    """cfg.device resolved by distributed.pick_device (the one owner of that decision); a bad choice is one line."""
    try:
        return distributed.pick_device(cfg.device, local_rank)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_dtype(cfg, device: torch.device) -> torch.dtype:
    """The autocast dtype. fp32 on CPU: CPU bf16 autocast is slow and would hide numeric bugs."""
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)
