"""Memory and throughput planner: how many bytes each GPU holds under DDP, ZeRO-2 and FSDP (ZeRO-3), with and without
activation checkpointing, and how many tokens/s a given MFU means.

    python planner.py configs/model/llama2-7b.yaml world_size=8 [seq_len=4096] [micro_batch=1]
        [mixed_precision=true] [mfu=0.4] [peak_tflops=989]

`dry_run(cfg, ...)` is the same plan for one training launch: `dry_run=true` (or `--dry-run`) on any train_*.py
prints what launch.py decides for it (parallel mode, batch split, device, dtype), the model's size and this
memory estimate, then exits without a process group, a download or a write. WORLD_SIZE=N in the environment shows
what N processes would run. tests/test_dry_run.py puts every documented training command through it.

Parameter and FLOP counts come from model.py itself (the model is built on the meta device, so a 70B plan allocates
nothing): `num_parameters()` and `estimate_flops_per_token()` (6N + 12 L H D T, PaLM appendix B).

Bytes per parameter, as our wrappers really store them (Rajbhandari et al. 2020, "ZeRO", section 3, gives the
same 16 bytes per parameter for mixed-precision Adam):

    mode     params          grads          optimizer (Adam m, v)   gathered while computing (bf16)
    ddp      4               4              8                       2 N_all (autocast's bf16 weight copies)
    zero2    4 / world       4 / world      8 / world               2 N_all (kept from forward to backward)
    fsdp     4 / world       4 / world      8 / world               2 (root + 2 blocks: current and prefetched)

The fp32 master weights are the "params" column; with mixed_precision=false nothing is gathered in bf16 and FSDP's
gathered units are fp32. `tests/test_distributed.py` checks params + grads + optimizer against bytes measured on a
small model at world size 2.

Activations are counted from what autograd saves per token and layer in our Transformer, in one of three regimes:
fp32; bf16 autocast over fp32 weights (ddp: the residual stream stays fp32, and autocast casts a Linear's input once
per Linear that reads it); bf16 weights (our fsdp/zero2 with mixed precision gather bf16, so the stream is bf16).
Per layer: two RMSNorms keep their fp32 input and rstd plus the normalized output; q, k, v after RoPE, the attention
output and its fp32 log-sum-exp per head; the inputs of q/k/v and gate/up (one copy each, or one per Linear under
autocast); SwiGLU's gate, up, silu(gate) and product (4F). MoE layers keep, per routed slot, the gathered token,
4 F_e expert activations and the expert output before and after weighting (3C + 4F_e), plus int64 slot indices
and the fp32 router outputs; shared
experts add a SwiGLU. The head keeps the final norm, the head input and the fp32 log-softmax (4 V bytes per token).
Activation checkpointing keeps each block's input (the stream dtype) plus one block's full set during its recompute
(Chen et al. 2016). tests/test_distributed.py::test_planner_activations_match_what_autograd_saves measures all of
it with saved-tensor hooks on CPU.
"""

from __future__ import annotations

import sys

import torch
import yaml

import distributed
from launch import batch_split, is_sharded, resolve_device, resolve_dtype, resolve_parallel
from model import ModelConfig, Transformer

MODES = ("ddp", "zero2", "fsdp")


def _load_config(path_or_cfg):
    if isinstance(path_or_cfg, ModelConfig):
        return path_or_cfg
    with open(path_or_cfg) as f:
        values = yaml.safe_load(f) or {}
    values = values.get("model", values)  # a training recipe nests the model under `model:` ...
    if isinstance(values, str):  # ... or names a preset (`model: tiny`)
        values = ModelConfig.preset_values(values)
    return ModelConfig(**values)


def _regime(mode: str, mixed_precision: bool) -> tuple[int, int, bool]:
    """(compute bytes, residual-stream bytes, autocast casts each Linear input) for one parallel mode."""
    if not mixed_precision:
        return 4, 4, False
    return (2, 4, True) if mode == "ddp" else (2, 2, False)  # ddp: autocast over fp32; fsdp/zero2: bf16 weights


def activation_bytes_per_token_layer(cfg, layer: int, dtype_bytes: int, stream_bytes: int | None = None,
                                     casts: bool = False) -> float:  # fmt: skip
    """Bytes autograd keeps for one token in block `layer` (see the module docstring for the list)."""
    c, r = dtype_bytes, stream_bytes or dtype_bytes
    C, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    C_kv = cfg.num_key_value_heads * cfg.head_dim
    norms = 2 * (4 * C + 4 + r * C)  # fp32 input + rstd, normalized output in the stream dtype
    attn = (3 if casts else 1) * c * C + c * (2 * C + 2 * C_kv) + 4 * H  # inputs; q, k, v, output; log-sum-exp
    if cfg.is_moe_layer(layer):
        K, E = cfg.top_k, cfg.n_experts
        F_e = cfg.moe_intermediate_size or F
        ffn = (2 if casts else 1) * c * C + c * K * (4 * F_e + 3 * C) + 16 * K + 12 * E  # + indices, router
        if cfg.n_shared_experts:
            ffn += (2 if casts else 0) * c * C + 4 * c * cfg.n_shared_experts * F_e
    else:
        ffn = (2 if casts else 1) * c * C + 4 * c * F
    return norms + attn + ffn


def head_bytes_per_token(cfg, dtype_bytes: int, stream_bytes: int | None = None) -> float:
    """Final norm, the head's input, the fp32 log-softmax of the logits, token ids and targets."""
    C, r = cfg.hidden_size, stream_bytes or dtype_bytes
    return 4 * C + 4 + r * C + dtype_bytes * C + 4 * cfg.vocab_size + 16


def plan(cfg, world_size: int, seq_len: int | None = None, micro_batch: int = 1, mixed_precision: bool = True,
         mfu: float = 0.4, peak_tflops: float = 989.0) -> dict:  # fmt: skip
    """Per-GPU bytes for every mode, parameter count, FLOPs per token and tokens/s at `mfu` of `peak_tflops`.

    Returns {"params", "active_params", "flops_per_token", "tokens_per_s", "memory": {mode: {params, grads,
    optimizer, gathered, activations, total}}} with modes ddp, zero2, fsdp and the same with "+ckpt".
    """
    cfg = _load_config(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    T = seq_len or cfg.max_position_embeddings
    n = model.num_parameters()
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in model.blocks()]
    root = n - sum(block_sizes)
    flops = model.estimate_flops_per_token(T)
    w = world_size
    compute_bytes = 2 if mixed_precision else 4
    tokens = micro_batch * T

    def activations(mode: str) -> tuple[float, float]:
        """(without, with activation checkpointing) for one micro-batch."""
        c, r, casts = _regime(mode, mixed_precision)
        per_layer = [activation_bytes_per_token_layer(cfg, i, c, r, casts) for i in range(cfg.num_hidden_layers)]
        head = head_bytes_per_token(cfg, c, r)
        full = tokens * (sum(per_layer) + head)
        ckpt = tokens * (cfg.num_hidden_layers * cfg.hidden_size * r + max(per_layer) + head)
        return full, ckpt

    # What is gathered (full, in compute dtype) while a step runs, beyond the persistent state.
    largest_block = max(block_sizes) if block_sizes else 0
    gathered = {
        "ddp": n * compute_bytes if mixed_precision else 0,
        "zero2": n * compute_bytes,
        "fsdp": (root + 2 * largest_block) * compute_bytes,
    }
    memory = {}
    for mode in MODES:
        shard = 1 if mode == "ddp" else w
        state = {"params": 4 * n / shard, "grads": 4 * n / shard, "optimizer": 8 * n / shard}
        # A sharded mode still holds one unit's full gradient before the reduce-scatter.
        state["gathered"] = gathered[mode] + (0 if mode == "ddp" else largest_block * compute_bytes)
        for suffix, act in zip(("", "+ckpt"), activations(mode), strict=True):
            entry = dict(state, activations=act)
            entry["total"] = sum(entry.values())
            memory[mode + suffix] = entry
    tokens_per_s = mfu * peak_tflops * 1e12 * w / flops
    return {"params": n, "active_params": model.num_active_parameters(), "flops_per_token": flops,
            "tokens_per_s": tokens_per_s, "memory": memory}  # fmt: skip


def format_plan(p: dict, name: str, world_size: int, gib: float = 2**30) -> str:
    lines = [
        f"{name}: {p['params'] / 1e9:.2f}B parameters ({p['active_params'] / 1e9:.2f}B active), "
        f"{p['flops_per_token'] / 1e9:.1f} GFLOPs/token (training), world_size={world_size}, "
        f"{p['tokens_per_s']:,.0f} tokens/s in total at the given MFU",
        f"{'mode':<12}{'params':>10}{'grads':>10}{'optim':>10}{'gathered':>10}{'activ.':>10}{'total GiB':>11}",
    ]
    for mode, m in p["memory"].items():
        cols = [m[k] / gib for k in ("params", "grads", "optimizer", "gathered", "activations", "total")]
        lines.append(f"{mode:<12}" + "".join(f"{c:>10.2f}" for c in cols[:-1]) + f"{cols[-1]:>11.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the dry run


def dry_run(cfg, script: str, model_cfg=None, unit: str = "sequences", per_example: int = 1,
            ragged: bool = False, notes: tuple[str, ...] = ()) -> None:  # fmt: skip
    """`dry_run=true`: everything this launch would decide, printed, then return without a process group, a
    download or a write. The world size is torchrun's WORLD_SIZE (1 without torchrun), so
    `WORLD_SIZE=8 python train_pretrain.py CONFIG dry_run=true` shows what 8 GPUs would run.

    model_cfg: the ModelConfig the run would build (None when its base is not on this machine). per_example:
    sequences per example (2 for a DPO pair). ragged: examples may be shorter than seq_len, so token counts are
    upper bounds. Memory is plan()'s per-device estimate for full training."""
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
        p = plan(model_cfg, world, seq_len=cfg.seq_len, micro_batch=micro * per_example, mixed_precision=mixed)
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


def main(argv: list[str]):
    """CLI: CONFIG.yaml then key=value overrides for plan()'s keyword arguments."""
    if not argv or "=" in argv[0]:
        sys.exit("usage: python planner.py configs/model/NAME.yaml world_size=8 [seq_len=..] [mfu=..]")
    kinds = {"world_size": int, "seq_len": int, "micro_batch": int, "mfu": float, "peak_tflops": float,
             "mixed_precision": lambda s: s.lower() in ("1", "true", "yes")}  # fmt: skip
    opts = {"world_size": 8}
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key not in kinds:
            sys.exit(f"error: unknown key {key!r}; known: {sorted(kinds)}")
        try:
            opts[key] = kinds[key](value)
        except ValueError:
            sys.exit(f"error: {key}={value!r} is not a valid {kinds[key].__name__}")
    try:
        p = plan(argv[0], **opts)
    except (OSError, TypeError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(format_plan(p, argv[0], opts["world_size"]))


if __name__ == "__main__":
    main(sys.argv[1:])
