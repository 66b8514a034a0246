"""SFT step time and memory: full fine-tuning vs LoRA vs QLoRA on a ~50M-parameter model, on CPU.

    OMP_NUM_THREADS=2 python benchmarks/bench_sft.py                   # ~2 min on 2 cores
    python benchmarks/bench_sft.py --steps 5 --batch 2 --seq 64          # quicker
    python benchmarks/bench_sft.py --log out/sft                         # also task accuracy before/after

What is measured
- Step time: one SFT optimizer step (forward, backward over assistant-masked targets, AdamW) for the
  three set-ups, interleaved round by round in one process so that machine load hits them alike;
  the median of the rounds, and the ratio to full fine-tuning.
- Training-state bytes, counted from the tensors: weights as stored (fp32, or NF4 codes + constants),
  gradients (only trainable parameters get one) and AdamW's two moments per trainable parameter.
  This is the part LoRA and QLoRA shrink; activations are about the same for all three (the backward
  still runs through every layer to reach the lowest adapters).
- Peak RSS of a fresh process that builds the model and runs the steps for one set-up alone
  (ru_maxrss of the child): what the operating system actually had to give, activations included.
  For QLoRA this peak still includes the fp32 model built before quantization (as when loading an
  fp32 checkpoint); the training-state bytes show the steady state.
- With --log DIR: the first and last held-out task accuracy in DIR/log.jsonl (an SFT run such as
  `python train_sft.py configs/sft_tiny.yaml`), i.e. the base model before SFT and the result after.

Expect on CPU: LoRA saves the weight-gradient matmuls of the frozen layers (about a third of the
step's FLOPs) and most optimizer work; QLoRA pays for dequantizing NF4 weights in every forward and
again in backward, so it is slower than LoRA on CPU while holding the base in ~0.56 bytes/param.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

# ~48M parameters: 10 layers x 640 wide, GQA 10/5 heads, SwiGLU 1728, vocab 4096 (tied).
SHAPE = dict(vocab_size=4096, hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
             num_key_value_heads=5, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
MODES = ("full", "lora", "qlora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # QLoRA: all linear layers


def build(mode: str):
    """(model, AdamW) for one set-up; the same base weights for all three (seed 0)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE, attn_impl="sdpa"))
    model.init_weights()
    if mode != "full":
        lora.apply_lora(model, TARGETS, r=16, alpha=32, quantize="nf4" if mode == "qlora" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def batch(B: int, T: int):
    """Token ids (B, T) and targets with the first half of every row masked (-1), like a user turn."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, SHAPE["vocab_size"], (B, T), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, : T // 2] = -1
    return x, y


def step(model, opt, x, y) -> float:
    t0 = time.perf_counter()
    loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def state_bytes(model, opt) -> dict:
    """Weights as stored, gradients of trainable parameters, AdamW moments (after a step: they exist)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".nf4_" in f".{n}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    return {"weights": weights, "grads": grads, "adam": moments, "total": weights + grads + moments}


def child(mode: str, steps: int, B: int, T: int) -> None:
    """Run one set-up alone and print its peak RSS (MiB) as JSON: the memory the OS really gave."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, opt = build(mode)
    x, y = batch(B, T)
    for _ in range(steps):
        step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"mode": mode, "peak_rss_mib": peak / 1024, "import_rss_mib": before / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (median), after one warm-up step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--log", default="", help="an SFT out_dir whose log.jsonl has task accuracy")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, 2, args.batch, args.seq)

    # Peak RSS first, while this process is still small: a forked child starts with its parent's ru_maxrss.
    rss = {}
    for mode in MODES:  # a fresh process each, one at a time
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(args.batch),
               "--seq", str(args.seq)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rss[mode] = json.loads(out)

    x, y = batch(args.batch, args.seq)
    runs = {mode: build(mode) for mode in MODES}
    print(f"model: {runs['full'][0].num_parameters() / 1e6:.1f}M parameters; batch {args.batch} x {args.seq} tokens; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(lora.trainable_report(runs["qlora"][0]))
    times = {mode: [] for mode in MODES}
    for mode in MODES:
        step(*runs[mode], x, y)  # warm-up: allocator, optimizer state
    for _ in range(args.steps):  # interleaved rounds: load changes hit all three alike
        for mode in MODES:
            times[mode].append(step(*runs[mode], x, y))
    mem = {mode: state_bytes(*runs[mode]) for mode in MODES}
    del runs

    full_t, full_m, full_r = statistics.median(times["full"]), mem["full"]["total"], rss["full"]["peak_rss_mib"]
    mib = 2**20
    print(f"\n{'mode':6} {'step ms':>8} {'x full':>7} | {'weights':>8} {'grads':>7} {'adam':>7} {'state MiB':>9} "
          f"{'x full':>7} | {'peak RSS MiB':>12} {'x full':>7}")  # fmt: skip
    for mode in MODES:
        t, m, r = statistics.median(times[mode]), mem[mode], rss[mode]["peak_rss_mib"]
        print(f"{mode:6} {t * 1e3:8.0f} {t / full_t:7.2f} | {m['weights'] / mib:8.1f} {m['grads'] / mib:7.1f} "
              f"{m['adam'] / mib:7.1f} {m['total'] / mib:9.1f} {m['total'] / full_m:7.3f} | {r:12.0f} {r / full_r:7.2f}")  # fmt: skip

    if args.log:
        with open(os.path.join(args.log, "log.jsonl")) as fh:
            rows = [r for r in map(json.loads, fh) if "task_acc" in r]
        if rows:
            first, last = rows[0], rows[-1]
            fams = sorted(k for k in last if k.startswith("task_acc/"))
            print(f"\ntask accuracy in {args.log}: step {first['step']} {first['task_acc']:.3f} -> "
                  f"step {last['step']} {last['task_acc']:.3f}  (" +
                  ", ".join(f"{k[9:]} {first.get(k, 0):.2f}->{last[k]:.2f}" for k in fams) + ")")  # fmt: skip
        else:
            print(f"\nno task accuracy in {args.log}/log.jsonl")


if __name__ == "__main__":
    main()
