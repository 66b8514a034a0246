"""The settings every training run has (`TrainConfig`), and what a launch decides from them, in one place: the parallel
mode, the batch split, the device, dtype and attention kernel.

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

import os
from dataclasses import dataclass

import torch

import distributed
from config import UserError
from model import ATTN_IMPLS

# ----------------------------------------------------------------------------- the settings every training run has


@dataclass
class TrainConfig:
    out_dir: str = "out/run"  # where checkpoints, log.jsonl and the final model go
    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 32  # sequences per optimizer step in total (the global batch): the same under torchrun
    micro_batch_size: int = 8  # at most this many sequences per forward/backward on one rank (accumulation is derived)
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd only: fraction of the steps spent decaying at the end
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    optimizer: str = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on embeddings, head, norms; muon.py)
    muon_lr: float = 0.02  # optimizer=muon: peak lr of the hidden matrices (on lr's schedule, times muon_lr / lr)
    muon_momentum: float = 0.95  # optimizer=muon: momentum of the hidden matrices (Nesterov)
    muon_weight_decay: float = 0.0  # optimizer=muon: decoupled weight decay of the hidden matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    seed: int = 1337  # seed for init, dropout and data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU if supported, else fp32) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model (the uncompiled weights are what gets saved)
    parallel: str = (
        "auto"  # auto (none in one process, ddp under torchrun) | none | ddp | fsdp | torch_ddp | torch_fsdp2
    )
    fsdp_mixed_precision: bool = (
        True  # fsdp/torch_fsdp2 with dtype bf16: gather and compute in bf16, fp32 master shards
    )
    fsdp_prefetch: bool = True  # fsdp: start the next unit's all-gather while this one computes
    zero2: bool = (
        False  # fsdp: keep gathered weights from forward to backward (ZeRO-2: less communication, more memory)
    )
    eval_every: int = 100  # steps between validation passes (0 = only at the end)
    eval_batches: int = 20  # batches per validation pass
    log_every: int = 10  # steps between log.jsonl lines
    sample_every: int = 0  # steps between printed sample texts (0 = only at the end)
    save_every: int = 200  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # complete checkpoints kept on disk
    resume: str = "auto"  # auto (newest complete checkpoint in out_dir) | never | PATH to a checkpoint
    overwrite: bool = False  # with resume=never or resume=PATH elsewhere: delete an earlier run's checkpoints here
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    stop_after_steps: int = 0  # save and exit after this many steps in this process (0 = off): for time-limited jobs
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0 = guess from the device)
    wandb_project: str = ""  # log to Weights & Biases when set
    wandb_mode: str = "online"  # online | offline | disabled
    progress: bool = True  # show a tqdm progress bar on the master rank
    dry_run: bool = False  # check the config, print the plan for this launch (batch split, memory) and exit

    def validate(self) -> list[str]:
        errors = []
        for key in ["steps", "batch_size", "micro_batch_size", "seq_len", "keep_last", "max_bad_steps"]:
            if getattr(self, key) <= 0:
                errors.append(f"{key} must be > 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            errors.append("lr must be > 0 and 0 <= min_lr <= lr")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            errors.append("warmup_steps must be in [0, steps]")
        if self.schedule not in ("cosine", "wsd", "constant"):
            errors.append(f"schedule must be cosine, wsd or constant, not '{self.schedule}'")
        if not 0.0 < self.decay_frac <= 1.0:
            errors.append("decay_frac must be in (0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            errors.append("weight_decay and grad_clip must be >= 0")
        if self.optimizer not in ("adamw", "muon"):
            errors.append(f"optimizer must be adamw or muon, not '{self.optimizer}'")
        if self.optimizer == "muon" and self.parallel in SHARDED_MODES:
            # Muon orthogonalizes whole matrices; FSDP gives each rank a slice. Gathering first is not written here.
            errors.append(
                f"optimizer=muon needs whole weight matrices on each rank: use parallel=ddp, not {self.parallel}"
            )
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1 or self.muon_weight_decay < 0:
            errors.append("muon_lr must be > 0, muon_momentum in [0, 1) and muon_weight_decay >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            errors.append("beta1 and beta2 must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            errors.append(f"device must be auto, cpu or cuda, not '{self.device}'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            errors.append(f"dtype must be auto, float32, bfloat16 or float16, not '{self.dtype}'")
        if self.parallel not in ("auto", "none", "ddp", "fsdp", "torch_ddp", "torch_fsdp2"):
            errors.append(f"parallel must be auto, none, ddp, fsdp, torch_ddp or torch_fsdp2, not '{self.parallel}'")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            errors.append("wandb_mode must be online, offline or disabled")
        if self.resume not in ("auto", "never"):
            self.check_path(errors, "resume", self.resume, "checkpoint directory")
        return errors

    def check_path(self, errors: list[str], key: str, path: str, what: str = "directory", hint: str = "",
                   probe: str = "") -> bool:  # fmt: skip
        """Does input `path` exist (a dir, or a file when `what` ends in "file"; or the file `probe` in it)? If not,
        an error naming `key`; in a dry run only a note (`self.unchecked`): a documented command may name a hub
        download, a GPU machine's data or an earlier stage's output that this machine does not have."""
        found = os.path.isfile(probe or path) if probe or what.endswith("file") else os.path.isdir(path)
        if not found:
            message = f"{key}: no {what} at '{path}'{hint}"
            if self.dry_run:
                self.__dict__.setdefault("unchecked", []).append(message)  # not a field: never a config key
            else:
                errors.append(message)
        return found


# ----------------------------------------------------------------------------- what a launch makes of them

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
