"""Rank logic for multi-process training: the torchrun environment, a hand-written DDP, and the one place that wraps a
model for data parallelism.

What lives here (and only here, so training scripts never look at ranks themselves):

- `init_distributed(device)` reads the variables `torchrun` sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT),
  picks the device (`pick_device`, the only place that decides it) and joins the process group: NCCL on GPUs, gloo
  on CPU. Run without torchrun it builds a one-process group in memory, so the
  single-process path is the same code with world_size 1 (every collective is then a no-op copy).
- `print0`, `is_master`, `cleanup`, `all_gather_objects`, and `split_batch` for data.
- `DDP`: data parallelism written out. Rank 0's parameters and buffers are broadcast when wrapping, so every rank
  starts identical whatever it was seeded with. During backward, `Tensor.register_post_accumulate_grad_hook` tells us
  the moment each parameter's gradient is final; the gradient is copied into a flat bucket, and a full bucket is
  all-reduced asynchronously right away, so communication overlaps the rest of the backward (Li et al. 2020,
  "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", https://arxiv.org/abs/2006.15704).
  Buckets are launched strictly in index order (collectives must be issued in the same order on every rank) and are
  re-built once, after the first backward, in the order rank 0 saw the gradients arrive. A callback queued on the
  autograd engine runs when the backward ends: it fills in parameters that got no gradient, launches what is left,
  waits for everything and writes the averaged gradient back to `p.grad`, so `optimizer.step()` sees synced grads.
  `no_sync()` skips all of that for gradient-accumulation micro-steps.
- `wrap_model(model, parallel, dist_info, **opts)` for parallel in none | ddp | fsdp | torch_ddp | torch_fsdp2. Our
  FSDP (ZeRO-3, optionally ZeRO-2) lives in fsdp.py; torch_ddp / torch_fsdp2 are PyTorch's own
  DistributedDataParallel and `fully_shard` (FSDP2), the production path and our reference in tests.
- Checkpoints: `full_state_dict` (gathered, HF keys, loadable by `Transformer.load_state_dict` at any world size) and
  `load_full_state_dict` (each rank keeps its slice); the files themselves are written by checkpoint.py.

How to run on several processes: `torchrun --standalone --nproc_per_node=2 train_pretrain.py CONFIG.yaml`
(parallel=auto: ddp on several processes) (see the README for multi-node and SLURM).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import fsdp as fsdp_lib

PARALLEL_MODES = ("none", "ddp", "fsdp", "torch_ddp", "torch_fsdp2")


# ---------------------------------------------------------------------------------------------------------------------
# the torchrun environment
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int  # global rank of this process, 0 .. world_size-1
    local_rank: int  # rank on this node; picks the GPU
    world_size: int  # total number of processes
    device: torch.device  # where this rank's model and batches live
    backend: str  # "nccl" or "gloo"

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The one place a training run's device is decided: auto (this rank's GPU if there is one, else the CPU) | cpu |
    cuda (cuda:LOCAL_RANK) | cuda:N. Pure: no process group, no CUDA calls beyond asking whether CUDA exists."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={requested} but CUDA is not available on this machine")
    return torch.device(requested if requested.startswith("cuda:") else f"cuda:{local_rank}")


def launch_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) for a plain `python script.py`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (or a one-process group without torchrun).

    device: auto | cpu | cuda | cuda:N, resolved by pick_device. The backend follows the device (NCCL for GPUs, gloo
    for the CPU), so device=cpu on a CUDA machine trains on the CPU with gloo rather than splitting model and batches.
    """
    rank, local_rank, world_size = launch_env()
    where = pick_device(device, local_rank)
    backend = "nccl" if where.type == "cuda" else "gloo"
    if where.type == "cuda":
        torch.cuda.set_device(where)  # before the group exists, so NCCL binds this rank to its own GPU
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # torchrun (or a test) set up a rendezvous
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:  # plain `python script.py`: an in-memory store is enough for a group of one
            if world_size != 1:
                raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), where, backend)


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_master() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, so logs are not repeated world_size times."""
    if is_master():
        print(*args, **kwargs)


def cleanup():
    """Leave the process group (call once at the end of a script; safe when none exists)."""
    if dist.is_initialized():
        dist.barrier()  # nobody tears down while a peer still has a collective in flight
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank, for small picklable Python values (e.g. judged samples);
    [obj] without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_batch(x: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (B, ...) -> (B / world_size, ...)."""
    if x.shape[0] % dist_info.world_size != 0:
        raise ValueError(f"global batch size {x.shape[0]} is not divisible by world_size={dist_info.world_size}")
    b = x.shape[0] // dist_info.world_size
    return x[dist_info.rank * b : (dist_info.rank + 1) * b]


# ---------------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------------
class _Bucket:
    """A flat buffer holding the gradients of a few parameters, all-reduced as one message."""

    def __init__(self, indices: list[int], params: list[nn.Parameter]):
        self.indices = indices
        sizes = [params[i].numel() for i in indices]
        self.offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        self.buffer = torch.zeros(sum(sizes), dtype=params[indices[0]].dtype, device=params[indices[0]].device)
        self.n_ready = 0
        self.handle = None  # the async all-reduce once launched

    def slot(self, j: int, p: torch.Tensor) -> torch.Tensor:
        return self.buffer[self.offsets[j] : self.offsets[j] + p.numel()].view_as(p)


class DDP(nn.Module):
    """Data parallel wrapper: same model on every rank, gradients averaged across ranks before the optimizer step.

    bucket_mb: size of one all-reduce message; find_unused_parameters: one extra all-reduce per step so a parameter
    that got no gradient on any rank keeps grad None (as in single-process training) instead of a zero gradient;
    broadcast_buffers: re-broadcast rank 0's buffers at every forward, as torch DDP does, except the non-persistent
    ones (`state_buffers`).
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, find_unused_parameters: bool = False,
                 broadcast_buffers: bool = True):  # fmt: skip
        super().__init__()
        if not dist.is_initialized():
            raise ValueError("DDP needs a process group; call init_distributed() first")
        self.module = module
        self.world_size = dist.get_world_size()
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self.params = [p for p in module.parameters() if p.requires_grad]  # deduplicated: tied weights appear once
        self.require_sync = True
        self._broadcast_from_rank0(list(module.parameters()) + list(module.buffers()))
        # Before the first backward we guess the ready order: backward visits layers in reverse, so reverse the
        # registration order (the same guess torch DDP starts from).
        self._build_buckets(list(reversed(range(len(self.params)))))
        self._ready_order = None  # filled during the first synced backward, then used to re-build the buckets
        self._reset()
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(self._make_hook(i))

    @staticmethod
    @torch.no_grad()
    def _broadcast_from_rank0(tensors):
        for t in tensors:
            dist.broadcast(t, src=0)

    def _build_buckets(self, order: list[int]):
        """Cut the parameters, in `order`, into buckets of about bucket_bytes (a new bucket also when dtype changes)."""
        self.buckets, current, size = [], [], 0
        for i in order:
            p = self.params[i]
            if current and (size >= self.bucket_bytes or p.dtype != self.params[current[0]].dtype):
                self.buckets.append(_Bucket(current, self.params))
                current, size = [], 0
            current.append(i)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current, self.params))
        self.where = {}  # param index -> (bucket, position in bucket)
        for b in self.buckets:
            for j, i in enumerate(b.indices):
                self.where[i] = (b, j)

    def _reset(self):
        self._ready = [False] * len(self.params)
        self._next_bucket = 0  # buckets are launched strictly in order: collectives must match across ranks
        self._callback_queued = False
        for b in self.buckets:
            b.n_ready, b.handle = 0, None

    def _make_hook(self, i: int):
        def hook(p: torch.Tensor):
            if not self.require_sync:
                return  # no_sync(): the gradient just accumulates locally in p.grad
            if not self._callback_queued:
                # Runs once the whole backward has finished: the place to wait for the all-reduces.
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
                self._callback_queued = True
                self._seen = []
            self._seen.append(i)
            self._mark_ready(i, p.grad)

        return hook

    def _mark_ready(self, i: int, grad: torch.Tensor | None):
        b, j = self.where[i]
        slot = b.slot(j, self.params[i])
        if grad is not None:
            slot.copy_(grad)
        else:
            slot.zero_()
        self._ready[i] = True
        b.n_ready += 1
        while self._next_bucket < len(self.buckets):
            nb = self.buckets[self._next_bucket]
            if nb.n_ready < len(nb.indices):
                break
            nb.buffer.div_(self.world_size)  # average = sum of (g / world); dividing first keeps fp16 sums in range
            nb.handle = dist.all_reduce(nb.buffer, async_op=True)
            self._next_bucket += 1

    @torch.no_grad()
    def _finish_backward(self):
        missing = [i for i, r in enumerate(self._ready) if not r]
        used_anywhere = None
        if self.find_unused_parameters:
            used = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32)
            dist.all_reduce(used)
            used_anywhere = used.tolist()
        # A parameter without a gradient this backward still takes part: its slot holds what .grad accumulated under
        # no_sync(), or zeros. Every rank therefore launches every bucket, in the same order.
        for i in missing:
            self._mark_ready(i, self.params[i].grad)
        for b in self.buckets:
            b.handle.wait()
            for j, i in enumerate(b.indices):
                p = self.params[i]
                if used_anywhere is not None and used_anywhere[i] == 0:
                    continue  # unused on every rank: leave grad None, as single-process training would
                if p.grad is None:
                    p.grad = b.slot(j, p).clone()
                else:
                    p.grad.copy_(b.slot(j, p))
        if self._ready_order is None:
            # Re-bucket once in the order gradients really arrived. Ranks may see different orders (e.g. unused
            # experts), so all follow rank 0's order.
            order = torch.tensor(self._seen + [i for i in range(len(self.params)) if i not in set(self._seen)])
            dist.broadcast(order, src=0)
            self._ready_order = order.tolist()
            self._build_buckets(self._ready_order)
        self._reset()

    @contextmanager
    def no_sync(self):
        """Gradient accumulation: backward passes inside only add into p.grad; the next one outside syncs the sum."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.world_size > 1:
            self._broadcast_from_rank0(state_buffers(self.module))
        return self.module(*args, **kwargs)


def state_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The buffers that are model state (persistent: in the state dict), which DDP re-broadcasts at each forward.
    The others are derived tables every rank computes alike (RoPE), or per-rank statistics that are summed over ranks
    at the step (the MoE load counts, in update_moe_bias): broadcasting rank 0's copy at each forward would overwrite
    the other ranks' counts of the earlier micro-batches of a step under gradient accumulation."""
    return [b for m in module.modules() for n, b in m._buffers.items()
            if b is not None and n not in m._non_persistent_buffers_set]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# one entry point for every parallel mode
# ---------------------------------------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of a model: `model.blocks()` if it has one, else `model.model.layers`."""
    if hasattr(model, "blocks"):
        return list(model.blocks())
    return list(model.model.layers)


def wrap_model(model: nn.Module, parallel: str, dist_info: DistInfo, **opts) -> nn.Module:
    """Move the model to this rank's device and wrap it for `parallel` (none | ddp | fsdp | torch_ddp | torch_fsdp2).
    A model built on the meta device is initialized here (model.init_weights / init_parameter), in fsdp unit by unit.

    ddp opts: bucket_mb, find_unused_parameters, broadcast_buffers. fsdp opts: mixed_precision (bf16 compute, fp32
    master shard), prefetch, zero2 (keep gathered parameters from forward to backward). torch_fsdp2 opts:
    mixed_precision.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL_MODES}")
    if parallel != "none":
        check_same_model(model)
    meta = any(p.is_meta for p in model.parameters())
    if meta and parallel != "torch_fsdp2":
        # Built on the meta device (shapes only): initialize here. fsdp materializes one unit at a time, so no
        # rank ever holds the whole model (torch_fsdp2 below shards first, then fills its shards); ddp needs it
        # whole anyway. The same weights every way.
        if parallel == "fsdp":
            for m in model.modules():
                for key, buf in m._buffers.items():
                    if buf is not None and buf.is_meta:
                        m._buffers[key] = torch.empty_like(buf, device=dist_info.device)
            model.init_non_parameters()  # RoPE tables, MoE router state, the tied head
            return fsdp_lib.FSDP(model, transformer_blocks(model), device=dist_info.device,
                                 init_parameter=model.init_parameter, **opts)  # fmt: skip
        model.to_empty(device=dist_info.device)
        model.init_weights()
    if not meta:
        model = model.to(dist_info.device)
    if parallel == "none":
        return model
    if parallel == "ddp":
        return DDP(model, **opts)
    if parallel == "fsdp":
        return fsdp_lib.FSDP(model, transformer_blocks(model), **opts)
    if parallel == "torch_ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **opts)
    # torch_fsdp2: rank 0's weights first (fully_shard slices what each rank holds), then one unit per block + root.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not meta:
        DDP._broadcast_from_rank0(list(model.parameters()) + list(model.buffers()))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if opts.pop("mixed_precision", False) else {}
    for block in transformer_blocks(model):
        fully_shard(block, **kw, **opts)
    fully_shard(model, **kw, **opts)
    if meta:
        _init_fully_sharded(model, dist_info.device)
    return model


class ModelMismatchError(ValueError):
    """The ranks built different models: a launch mistake, reported as one line (Run.prepare)."""


def check_same_model(model: nn.Module) -> None:
    """Stop when the ranks built different models (e.g. each read a config file another was rewriting): wrapping
    would broadcast rank 0's tensors into differently shaped ones and die inside the backend with a size mismatch,
    or worse. Like torch DDP's shape check at wrap time, but one all-gather of three numbers per rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    digest = int.from_bytes(hashlib.sha256(repr(shapes).encode()).digest()[:7], "little")  # < 2**56: fits int64
    mine = torch.tensor([len(shapes), sum(p.numel() for p in model.parameters()), digest], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            n0, w0, _ = everyone[0].tolist()
            n, w, _ = theirs.tolist()
            raise ModelMismatchError(f"rank {rank} built a different model from rank 0 ({n} tensors, {w:,} weights vs {n0}, "
                             f"{w0:,}): every rank must read the same model config")  # fmt: skip


@torch.no_grad()
def _init_fully_sharded(model: nn.Module, device: torch.device) -> None:
    """Fill a meta model that fully_shard has sharded: to_empty() allocates only this rank's shards (PyTorch's
    meta-device recipe for FSDP2), then each parameter is drawn whole, one at a time, in init_weights' order, from
    rank 0, and each rank keeps its shard. One parameter is ever whole; the weights equal a single process's."""
    from torch.distributed.tensor import distribute_tensor

    model.to_empty(device=device)
    model.init_non_parameters()  # RoPE tables, MoE router state, the tied head
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype, device=device)
        model.init_parameter(name, full)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=0))


def maybe_no_sync(model: nn.Module, skip_sync: bool):
    """The context for one gradient-accumulation micro-step: model.no_sync() when skip_sync and the wrapper has one
    (ddp, fsdp, torch_ddp); otherwise nothing, and that wrapper simply syncs every micro-step (torch_fsdp2)."""
    return model.no_sync() if skip_sync and hasattr(model, "no_sync") else nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under any wrapper (fully_shard modifies in place, so it is its own bare model)."""
    return model.module if isinstance(model, (DDP, fsdp_lib.FSDP, nn.parallel.DistributedDataParallel)) else model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm: across shards for FSDP (each rank only holds its slice of the gradient)."""
    if isinstance(model, fsdp_lib.FSDP):
        return model.clip_grad_norm_(max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # torch_fsdp2 returns a DTensor


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict with the bare model's keys (HF keys for Transformer), as CPU tensors, on every
    rank, or with rank0_only on rank 0 alone ({} elsewhere: what a checkpoint save needs, one host copy instead of
    one per rank). Collective under fsdp / torch_fsdp2: call it on all ranks."""
    if isinstance(model, fsdp_lib.FSDP):
        return model.full_state_dict(rank0_only=rank0_only)
    if _is_fully_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload with full_state_dict: PyTorch gives the tensors to rank 0 only, the rest get {}.
        options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only, broadcast_from_rank0=False)
        sd = get_model_state_dict(model, options=options)
        return {k: v.detach().cpu() for k, v in sd.items()}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state_dict):
    """Load a full (gathered) state dict into any wrapped model; each FSDP rank keeps only its slice. Under fsdp and
    torch_fsdp2 any mapping works, read one tensor at a time (hf_checkpoint.LazyStateDict: never the whole model)."""
    if isinstance(model, fsdp_lib.FSDP):
        return model.load_full_state_dict(state_dict)
    if _is_fully_sharded(model):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import distribute_tensor

        for m in model.modules():  # after a forward the root keeps its full parameters; put the shards back first
            if isinstance(m, FSDPModule):
                m.reshard()
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied head appears once, as the embedding
                if name not in state_dict:
                    raise ValueError(f"state dict has no parameter {name!r}")
                full = state_dict[name].to(device=p.device, dtype=p.dtype)
                if full.shape != p.shape:
                    raise ValueError(
                        f"{name}: the state dict has shape {tuple(full.shape)}, the model {tuple(p.shape)}"
                    )
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
            for name, buf in model.named_buffers():  # persistent buffers (the sigmoid router's bias) are not sharded
                if name in state_dict:
                    buf.copy_(state_dict[name])
        return None
    unwrap(model).load_state_dict(state_dict)


def _is_fully_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())
