"""Benchmark of distributed.py: our DDP / FSDP against PyTorch's DDP / fully_shard, 2 processes on CPU (gloo).

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--steps 6] [--repeats 5]

Prints (1) training-step time ratios ours / PyTorch's, measured interleaved in one run (median over repeats, each
repeat a few steps per wrapper in alternation), (2) a per-rank memory table of what each wrapper keeps between
steps (parameters + gradients + AdamW state), and (3) the planner's numbers for 0.5B, 7B and 70B on 8 and 64 GPUs.
Nothing is asserted: CPU timings on a shared machine are noisy, read them as rough ratios.
"""

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distributed  # noqa: E402
import planner  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

PAIRS = [("ddp", "torch_ddp"), ("fsdp", "torch_fsdp2")]
CFG = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
B, T = 8, 128  # global batch, sequence length


def persistent_bytes(model, opt) -> int:
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def step(model, opt, x, info):
    xb = distributed.split_batch(x, info)
    loss = model(xb[:, :-1], xb[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep gradients allocated, so the memory table includes them


def worker(info, steps, repeats, out_path):
    cfg = ModelConfig(**CFG)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ["none"] + [m for pair in PAIRS for m in pair]:
        torch.manual_seed(0)
        model = distributed.wrap_model(Transformer(cfg), mode, info)  # "none": the single-process memory baseline
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step(model, opt, x, info)  # warm-up: allocates gradients and optimizer state, re-buckets DDP
        runs[mode] = (model, opt)
    times = {m: [] for pair in PAIRS for m in pair}
    for _ in range(repeats):
        for pair in PAIRS:
            for mode in pair:  # interleaved: ours then theirs, repeat
                model, opt = runs[mode]
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(model, opt, x, info)
                torch.distributed.barrier()
                times[mode].append((time.perf_counter() - t0) / steps)
    if info.rank == 0:
        lines = ["step time (2 ranks, gloo, CPU), median of %d repeats x %d steps:" % (repeats, steps)]
        for ours, theirs in PAIRS:
            a, b = statistics.median(times[ours]), statistics.median(times[theirs])
            lines.append(f"  {ours:<5} {a * 1e3:8.1f} ms   {theirs:<12} {b * 1e3:8.1f} ms   ours/theirs = {a / b:.2f}")
        base = None
        lines.append("per-rank bytes kept between steps (params + grads + AdamW m, v):")
        for mode, (model, opt) in runs.items():
            n = persistent_bytes(model, opt)
            base = base or n
            lines.append(f"  {mode:<12} {n / 2**20:8.2f} MiB   {n / base:.2f} x single process")
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")


def _launch(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    try:
        worker(info, *args)
    finally:
        distributed.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_distributed_{os.getpid()}.txt"
    mp.spawn(_launch, args=(2, port, (args.steps, args.repeats, out)), nprocs=2, join=True)
    with open(out) as f:
        print(f.read())
    os.remove(out)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("planner (bf16 mixed precision, micro_batch=1, seq_len = context, 40% MFU of 989 TFLOP/s):")
    for name in ("0.5B", "llama2-7b", "llama2-70b"):
        for world in (8, 64):
            p = planner.plan(os.path.join(root, "configs", "model", f"{name}.yaml"), world_size=world)
            print(planner.format_plan(p, name, world))
            print()


if __name__ == "__main__":
    main()
