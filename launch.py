"""What a launch decides, in one place: the parallel mode, the batch split, the device and dtype, and the dry run.

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
- `dry_run`: `dry_run=true` on any training script prints all of the above, the model's size and planner.py's
  memory estimate for this launch, and exits without a process group, a download or a write. WORLD_SIZE=N in
  the environment shows what N processes would run. tests/test_dry_run.py puts every documented command through it.
"""

from __future__ import annotations

import torch

import distributed
import planner
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


# ----------------------------------------------------------------------------- the dry run


def dry_run(cfg, script: str, model_cfg=None, unit: str = "sequences", per_example: int = 1,
            ragged: bool = False, notes: tuple[str, ...] = ()) -> None:  # fmt: skip
    """`dry_run=true`: everything this launch would decide, printed, then return without a process group, a
    download or a write. The world size is torchrun's WORLD_SIZE (1 without torchrun), so
    `WORLD_SIZE=8 python train_pretrain.py CONFIG dry_run=true` shows what 8 GPUs would run.

    model_cfg: the ModelConfig the run would build (None when its base is not on this machine). per_example:
    sequences per example (2 for a DPO pair). ragged: examples may be shorter than seq_len, so token counts are
    upper bounds. Memory is planner.py's per-device estimate for full training."""
    rank, local_rank, world = distributed.launch_env()
    parallel = resolve_parallel(cfg, world)
    micro, accum = batch_split(cfg, world)
    device = resolve_device(cfg, local_rank)
    dtype = resolve_dtype(cfg, device)
    why = f" (auto: {'torchrun' if world > 1 else 'one process'})" if cfg.parallel == "auto" else ""
    seqs, most = cfg.batch_size * per_example, " at most" if ragged else ""
    lines = [
        f"dry run of {script}: nothing is written, out_dir {cfg.out_dir} is not touched",
        f"  launch: world size {world}, parallel={parallel}{why}, device {device}, dtype {str(dtype)[6:]}",
        f"  batch:  {cfg.batch_size} {unit} per step = micro {micro} x accum {accum} x world {world}; "
        f"{seqs} x {cfg.seq_len} = {seqs * cfg.seq_len:,} tokens per step{most}",
        f"  run:    {cfg.steps:,} steps = {cfg.steps * seqs * cfg.seq_len:,} tokens{most}",
    ]
    if model_cfg is not None:
        # The planner's modes: our ddp, torch_ddp and none keep whole replicas; fsdp shards (zero2 keeps gathers).
        mode = ("zero2" if parallel == "fsdp" and cfg.zero2 else "fsdp") if is_sharded(parallel) else "ddp"
        mode += "+ckpt" if getattr(cfg, "gradient_checkpointing", False) else ""
        mixed = dtype != torch.float32 and (mode.startswith("ddp") or cfg.fsdp_mixed_precision)
        p = planner.plan(model_cfg, world, seq_len=cfg.seq_len, micro_batch=micro * per_example, mixed_precision=mixed)
        m, gib = p["memory"][mode], 2**30
        parts = " + ".join(f"{k} {m[k] / gib:.2f}" for k in ("params", "grads", "optimizer", "gathered", "activations"))
        lines += [
            f"  model:  {p['params'] / 1e6:,.2f}M parameters ({p['active_params'] / 1e6:,.2f}M active), "
            f"{p['flops_per_token'] / 1e6:,.1f} MFLOP/token",
            f"  memory: {m['total'] / gib:.2f} GiB per device (planner.py, {mode}, full training: {parts})",
        ]
    lines += [f"  note:   {n}" for n in notes]
    lines += [f"  not checked here: {n}" for n in cfg.__dict__.get("unchecked", [])]
    if rank == 0:  # under torchrun every rank checks the same things; one prints them
        print("\n".join(lines), flush=True)
