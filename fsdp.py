"""Fully sharded data parallelism (ZeRO-3, optionally ZeRO-2), written by hand over torch.distributed.

Every rank keeps only 1/world of each parameter, gradient and optimizer state; the full parameters of one unit exist
only while that unit computes. Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (https://arxiv.org/abs/1910.02054); Zhao et al. 2023, "PyTorch FSDP"
(https://arxiv.org/abs/2304.11277).

Layout. A *unit* is one Transformer block, plus a root unit holding everything else (embeddings, final norm, head).
A unit's parameters are split into two groups, weight-decayed (dim >= 2) and not (norms, biases), because the
optimizer needs one setting per tensor. Each group is flattened into one vector, padded with zeros to a multiple of
world, and rank r keeps the slice [r*S, (r+1)*S) as an nn.Parameter (`p.decay` says which group it is). Those shards
are the only parameters the wrapped model has, so `optimizer = AdamW(model.parameters())` steps on shards only and
Adam's m and v are sharded too. The original parameters are deleted from their modules and put back, during
forward, as plain tensors that are views into the gathered flat vector.

The life of a unit in one training step:

    pre-forward hook   all-gather the shards -> full flat vector (in bf16 with mixed precision); install views
    forward            the block runs unchanged; autograd saves the views it needs for backward
    post-forward hook  free: shrink the full vector's storage to 0 bytes (the saved views now point at nothing) and
                       hook the block's output so we hear when its gradient arrives
    pre-backward hook  (the output's gradient is ready, the block's backward is next) re-grow the storage and
                       all-gather into it again: the saved views see the parameters once more
    backward           the views' gradients flow into the full vector, whose producer is `_GatherFn`; its backward
                       reduce-scatters the full gradient so each rank receives the sum of its own slice, divided by
                       world, and frees the full vector again. Autograd adds it into shard.grad (accumulation works).

The custom autograd Function carries the gradient from the views to the shard; the storage resize (what PyTorch's
own FSDP does) lets us free and re-gather without autograd noticing. With zero2=True the post-forward free and the
re-gather are skipped: parameters stay gathered from forward to backward (ZeRO-2: sharded grads and optimizer state,
one all-gather per step instead of two). Activation checkpointing (torch.utils.checkpoint, use_reentrant=False) works:
its recompute runs the pre-forward hook while the unit is already re-gathered, which then just re-installs views.

With prefetch=True the next unit's all-gather is started asynchronously while the current one computes (the next
block in forward, the previous block in backward). Units run in `blocks` order, as they do in a Transformer.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn


def _all_gather(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in recent PyTorch
    return fn(out, inp, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp)


class _FlatGroup:
    """The parameters of one unit that share a weight-decay setting, flattened, padded and sharded."""

    def __init__(self, params, slots, decay: bool, compute_dtype, master_dtype):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.slots = slots  # per parameter: list of (module, attribute name, full name); tied weights have several
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        total = sum(self.numels)
        self.shard_numel = -(-total // self.world)  # ceil: every rank holds the same size
        self.pad = self.shard_numel * self.world - total
        self.compute_dtype = compute_dtype
        flat = torch.cat([p.detach().reshape(-1).to(master_dtype) for p in params])
        flat = torch.cat([flat, flat.new_zeros(self.pad)])  # (world * S,)
        shard = flat[self.rank * self.shard_numel : (self.rank + 1) * self.shard_numel].clone()  # (S,)
        self.shard = nn.Parameter(shard)
        self.shard.decay = decay  # read by the optimizer groups: 1-D shards cannot say it by their dim
        self.full = None  # (world * S,) gathered parameters while the unit is live
        self.pending = None  # (async work, its input kept alive, its output) of a prefetch in flight

    # ---- communication ----
    def gather(self) -> torch.Tensor:
        """A new full flat vector: the prefetched one if a prefetch is in flight, else gathered now."""
        if self.pending is not None:
            return self.wait()
        full = torch.empty(self.shard_numel * self.world, dtype=self.compute_dtype, device=self.shard.device)
        _all_gather(full, self.shard.detach().to(self.compute_dtype))
        return full

    def prefetch(self):
        full = torch.empty(self.shard_numel * self.world, dtype=self.compute_dtype, device=self.shard.device)
        inp = self.shard.detach().to(self.compute_dtype)
        self.pending = (_all_gather(full, inp, async_op=True), inp, full)

    def wait(self) -> torch.Tensor:
        work, _, full = self.pending
        work.wait()
        self.pending = None
        return full

    def regather(self, full: torch.Tensor, async_op: bool = False):
        """Re-grow the freed storage of `full` and all-gather into it (the views autograd saved come back)."""
        full.untyped_storage().resize_(full.numel() * full.element_size())
        inp = self.shard.detach().to(self.compute_dtype)
        # Write through `.data`: an alias of the same storage with its own version counter, so autograd does not see
        # an in-place change of the tensors it saved (this restores them, it does not modify them).
        work = _all_gather(full.data, inp, async_op=async_op)
        self.pending = (work, inp, full) if async_op else None

    def reduce_grad(self, grad_full: torch.Tensor) -> torch.Tensor:
        """(world * S,) gradient of the full vector -> (S,) mean over ranks of this rank's slice."""
        g = grad_full.to(torch.float32) / self.world  # reduce in fp32 even under bf16 compute
        out = torch.empty(self.shard_numel, dtype=torch.float32, device=g.device)
        _reduce_scatter(out, g.contiguous())
        return out.to(self.shard.dtype)

    # ---- views ----
    def install(self, full: torch.Tensor):
        """Point every original parameter name at its piece of `full` (plain tensors, part of the autograd graph)."""
        pieces = full.split(self.numels + [self.pad])[:-1]  # the padding piece has no parameter
        for piece, shape, slots in zip(pieces, self.shapes, self.slots, strict=True):
            view = piece.view(shape)
            for module, name, _ in slots:
                setattr(module, name, view)

    def free(self):
        if self.full is not None:
            self.full.untyped_storage().resize_(0)


class _GatherFn(torch.autograd.Function):
    """shard (S,) -> full (world*S,): all-gather forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, shard, group: _FlatGroup, unit: _Unit):
        full = group.gather()
        ctx.group, ctx.unit, ctx.full = group, unit, weakref.ref(full)  # weak: a strong ref to an output leaks
        return full

    @staticmethod
    def backward(ctx, grad_full):
        grad_shard = ctx.group.reduce_grad(grad_full)
        # The full gradient is complete, so every use of these parameters in backward is done: free them again.
        full = ctx.full()
        if full is not None:
            full.untyped_storage().resize_(0)
        ctx.unit.live = None  # the unit's backward (and any recompute inside it) is over
        return grad_shard, None, None


class _Unit:
    """One block (or the root): its flat groups and the hooks that gather, free and re-gather them."""

    def __init__(self, module, slots_by_param, compute_dtype, master_dtype, reshard: bool, prefetch: bool):
        self.module = module
        self.reshard = reshard  # free after forward and re-gather in backward (ZeRO-3); False keeps them (ZeRO-2)
        self.prefetch = prefetch
        self.prev = self.next = None  # neighbours in execution order, for prefetch
        self.live = None  # the full vectors of the forward whose backward is running now (for recompute)
        self.recomputing = False
        self.groups = []
        for decay in (True, False):
            chosen = [(p, s) for p, s in slots_by_param if getattr(p, "decay", p.dim() >= 2) == decay]
            if chosen:
                params, slots = zip(*chosen, strict=True)
                self.groups.append(_FlatGroup(params, list(slots), decay, compute_dtype, master_dtype))
        for _, slots in slots_by_param:  # the original parameters leave their modules: only the shards remain
            for m, name, _ in slots:
                m._parameters.pop(name, None)
                setattr(m, name, None)

    def pre_forward(self):
        if self.live is not None:  # activation-checkpoint recompute inside our backward: already re-gathered
            self.recomputing = True
            for g, full in zip(self.groups, self.live, strict=True):
                g.install(full)
            return
        for g in self.groups:
            g.full = _GatherFn.apply(g.shard, g, self)
            g.install(g.full)
        if self.prefetch and self.next is not None:
            for g in self.next.groups:
                if g.pending is None:
                    g.prefetch()

    def post_forward(self, output):
        if self.recomputing:
            self.recomputing = False
            return
        fulls = [g.full for g in self.groups]
        if not torch.is_grad_enabled():  # evaluation: no backward will come for these parameters
            for g in self.groups:
                g.free()
                g.full = None
            return
        if self.reshard:
            for g in self.groups:
                g.free()
        tensors = [t for t in _tensors(output) if t.requires_grad]
        if tensors:  # one output is enough to hear that this unit's backward is about to start
            tensors[0].register_hook(lambda grad: self.pre_backward(fulls))

    def pre_backward(self, fulls):
        self.live = fulls
        for g, full in zip(self.groups, fulls, strict=True):
            if g.pending is not None and g.pending[2] is full:
                g.wait()  # prefetched while the unit after us ran its backward
            elif full.untyped_storage().size() == 0:
                g.regather(full)
        prev = self.prev
        if self.prefetch and prev is not None and prev.reshard:
            for g in prev.groups:
                if g.full is not None and g.pending is None and g.full.untyped_storage().size() == 0:
                    g.regather(g.full, async_op=True)


def _tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


@torch.no_grad()
def _units_from_meta(module, root_slots, block_slots, make_unit, device, init_parameter):
    """Build the block units of a meta-device module without ever holding all of its parameters.

    Parameters are created on `device` and initialized one at a time in named_parameters() order, the order
    Transformer.init_weights uses, so the weights equal an unsharded init from the same seed. Rank 0's values are
    broadcast anyway (ranks' RNGs need not agree). As soon as a block's last parameter is ready the block is
    flattened and sharded, and its full parameters are dropped: at most the root's parameters (embeddings, head)
    and one block are ever whole. Returns (block units, the root's slots with its materialized parameters)."""
    owner = {id(p): i for i, slots in enumerate(block_slots) for p, _ in slots}  # parameter -> its block
    left = [len(slots) for slots in block_slots]  # parameters not yet materialized, per block
    real = {}  # id(meta parameter) -> the materialized one, until its unit takes it
    units = [None] * len(block_slots)
    for name, p in list(module.named_parameters()):  # tied ones appear once, under their first name
        t = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
        init_parameter(name, t)
        dist.broadcast(t, src=0)
        real[id(p)] = t
        i = owner.get(id(p))
        if i is not None:
            left[i] -= 1
            if left[i] == 0:
                units[i] = make_unit(i, [(real.pop(id(q)), slots) for q, slots in block_slots[i]])
    return units, [(real.pop(id(q)), slots) for q, slots in root_slots]


class FSDP(nn.Module):
    """Shard `module` into one unit per entry of `blocks` plus a root unit (see the module docstring).

    mixed_precision: gather and compute in bf16, keep fp32 master shards, reduce gradients in fp32.
    prefetch: overlap the next unit's all-gather with the current unit's compute. zero2: keep gathered parameters from
    forward to backward (ZeRO-2). Rank 0's parameters and buffers are what gets sharded.
    """

    def __init__(self, module: nn.Module, blocks: list[nn.Module], mixed_precision: bool = False,
                 prefetch: bool = True, zero2: bool = False, device=None, init_parameter=None):  # fmt: skip
        super().__init__()
        if not dist.is_initialized():
            raise ValueError("FSDP needs a process group; call init_distributed() first")
        meta = any(p.is_meta for p in module.parameters())
        if meta and (init_parameter is None or device is None):
            raise ValueError("a meta-device module needs device= and init_parameter=(name, tensor) to materialize it")
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if not t.is_meta:
                    dist.broadcast(t, src=0)
        self.module = module
        self.prefetch = prefetch
        master = torch.float32 if mixed_precision else next(module.parameters()).dtype
        compute = torch.bfloat16 if mixed_precision else master
        names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}

        def slots_of(root: nn.Module, skip: set[int]):
            """[(param, [(module, attr, full name), ...])] for parameters under root, not under a module in skip."""
            found: dict[int, tuple] = {}
            stack = [root]
            while stack:
                m = stack.pop()
                if id(m) in skip:
                    continue
                for name, p in m._parameters.items():
                    if p is not None:
                        prefix = names[id(m)]
                        found.setdefault(id(p), (p, []))[1].append((m, name, f"{prefix}.{name}" if prefix else name))
                stack.extend(reversed(list(m._modules.values())))
            return sorted(found.values(), key=lambda item: item[1][0][2])  # a fixed order, the same on every rank

        block_ids = {id(b) for b in blocks}
        root_slots = slots_of(module, block_ids)  # before blocks lose their parameters
        block_slots = [slots_of(b, set()) for b in blocks]

        def make_unit(i, slots):
            return _Unit(blocks[i], slots, compute, master, not zero2, prefetch)

        if meta:  # materialize and initialize unit by unit; each is sharded before the next one exists
            built = _units_from_meta(module, root_slots, block_slots, make_unit, device, init_parameter)
            self.units, root_slots = built
        else:
            self.units = [make_unit(i, slots) for i, slots in enumerate(block_slots)]
        # The root is used at both ends of the forward, so it stays gathered until its backward (as in FSDP2).
        self.root = _Unit(module, root_slots, compute, master, False, prefetch)
        for a, b in zip(self.units, self.units[1:], strict=False):
            a.next, b.prev = b, a
        if self.units:
            self.root.next = self.units[0]
        for u in self.units:
            u.module.register_forward_pre_hook(lambda m, args, u=u: u.pre_forward())
            u.module.register_forward_hook(lambda m, args, out, u=u: u.post_forward(out))
        self.flat_params = nn.ParameterList([g.shard for u in [self.root] + self.units for g in u.groups])

    def forward(self, *args, **kwargs):
        self.root.pre_forward()
        out = self.module(*args, **kwargs)
        self.root.post_forward(out)
        return out

    def no_sync(self):
        """Accepted for a uniform training loop; FSDP reduce-scatters every micro-step (the sum accumulates in the
        sharded .grad), trading communication for never holding a full gradient."""
        return nullcontext()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model: squared norms of the local shards summed over ranks."""
        grads = [p.grad for p in self.flat_params if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(sq)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    # ---- full (gathered) state dict ----
    def _groups(self):
        return [g for u in [self.root] + self.units for g in u.groups]

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Bare-model keys -> full tensors on CPU (a collective: call on all ranks).

        rank0_only: only rank 0 keeps the tensors, the others get {}. A checkpoint needs one copy, and a full
        fp32 copy per rank is 280 GB of host memory each for a 70B model. Each unit is gathered in turn, so
        the device holds at most one unit's full flat parameter on top of the shards."""
        sd = {}
        for g in self._groups():
            full = torch.empty(g.shard_numel * g.world, dtype=g.shard.dtype, device=g.shard.device)
            _all_gather(full, g.shard.detach())
            if rank0_only and g.rank != 0:
                continue
            for piece, shape, slots in zip(full.split(g.numels + [g.pad])[:-1], g.shapes, g.slots, strict=True):
                tensor = piece.view(shape).cpu().clone()
                for _, _, fqn in slots:
                    sd[fqn] = tensor
        if rank0_only and dist.get_rank() != 0:
            return {}
        sd.update({k: v.detach().cpu() for k, v in self.module.state_dict().items()})  # buffers (never sharded)
        return sd

    @torch.no_grad()
    def load_full_state_dict(self, state_dict):
        """Each rank copies its slice out of a full state dict (saved at any world size). Any mapping works: a
        hf_checkpoint.LazyStateDict reads each tensor from disk when asked, so only one unit is ever whole here."""
        param_keys = set()
        for g in self._groups():
            parts = []
            for slots, shape in zip(g.slots, g.shapes, strict=True):
                key = slots[0][2]
                if key not in state_dict:
                    raise ValueError(f"state dict has no parameter {key!r}")
                t = state_dict[key]
                if t.shape != shape:
                    raise ValueError(f"{key}: the state dict has shape {tuple(t.shape)}, the model {tuple(shape)}")
                parts.append(t.reshape(-1).to(g.shard))
                param_keys.update(fqn for _, _, fqn in slots)
            flat = torch.cat(parts + [g.shard.new_zeros(g.pad)])
            g.shard.copy_(flat[g.rank * g.shard_numel : (g.rank + 1) * g.shard_numel])
        self.module.load_state_dict({k: state_dict[k] for k in state_dict.keys() if k not in param_keys})
