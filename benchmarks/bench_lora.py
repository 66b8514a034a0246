"""Benchmark lora.py: NF4 storage and error, and the time cost of LoRA / QLoRA layers vs a dense nn.Linear.

What it prints
--------------
1. NF4 bytes per parameter (codes + absmax constants) with and without double quantization, the
   quantization mean absolute error on randn weights, and the size ratio vs fp32 / bf16.
2. Forward and forward+backward time of one linear layer (C x C, x (B, T, C)), measured interleaved
   in the same run, median of repeats, as a ratio to a plain nn.Linear:
     dense   nn.Linear (the reference)
     lora    frozen dense base + r=16 adapter (unmerged)
     merged  the same after merge_lora (should be ~1.0: one matmul)
     qlora   NF4 base (dequantized on the fly, again in backward) + adapter
Nothing is asserted; the numbers depend on the machine.

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_lora.py [--C 1024] [--T 256] [--repeats 15]`
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import LoRALinear, merge_lora, nf4_bytes_per_param, nf4_dequantize, nf4_quantize  # noqa: E402


def bench_storage(C):
    torch.manual_seed(0)
    w = torch.randn(C, C)
    print(f"# NF4 storage, randn({C}, {C}), block 64")
    print(f"{'variant':<14}{'bytes/param':>12}{'vs fp32':>9}{'vs bf16':>9}{'mean abs err':>14}")
    for dq in (False, True):
        s = nf4_quantize(w, 64, double_quant=dq)
        b = nf4_bytes_per_param(s, w.numel())
        err = (w - nf4_dequantize(s, w.shape, 64)).abs().mean().item()
        print(f"{'nf4+dq' if dq else 'nf4':<14}{b:>12.4f}{b / 4:>9.3f}{b / 2:>9.3f}{err:>14.5f}")


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_speed(C, B, T, r, repeats):
    torch.manual_seed(0)
    dense = nn.Linear(C, C, bias=False).requires_grad_(False)
    layers = {
        "dense": dense,
        "lora": LoRALinear(copy.deepcopy(dense), r=r, alpha=2 * r),
        "merged": merge_lora(nn.ModuleDict({"m": LoRALinear(copy.deepcopy(dense), r=r, alpha=2 * r)}))["m"],
        "qlora": LoRALinear(copy.deepcopy(dense), r=r, alpha=2 * r, quantize="nf4"),
    }
    x = torch.randn(B, T, C, requires_grad=True)  # requires grad: as inside a network, dx is needed

    def fwd(m):
        with torch.no_grad():
            m(x)

    def fwd_bwd(m):
        m(x).sum().backward()

    print(f"\n# one linear layer C={C}, x ({B}, {T}, {C}), r={r}; median of {repeats}, interleaved")
    print(f"{'layer':<10}{'fwd ms':>10}{'ratio':>8}{'fwd+bwd ms':>12}{'ratio':>8}")
    times = {name: {"f": [], "fb": []} for name in layers}
    for _ in range(2):  # warm up
        for m in layers.values():
            fwd(m), fwd_bwd(m)
    for _ in range(repeats):
        for name, m in layers.items():  # interleaved: machine noise hits every variant alike
            times[name]["f"].append(timed(lambda m=m: fwd(m)))
            times[name]["fb"].append(timed(lambda m=m: fwd_bwd(m)))
    ref_f = statistics.median(times["dense"]["f"])
    ref_fb = statistics.median(times["dense"]["fb"])
    for name in layers:
        f, fb = statistics.median(times[name]["f"]), statistics.median(times[name]["fb"])
        print(f"{name:<10}{f * 1e3:>10.2f}{f / ref_f:>8.2f}{fb * 1e3:>12.2f}{fb / ref_fb:>8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--C", type=int, default=1024, help="layer width (square C x C weight)")
    ap.add_argument("--B", type=int, default=4, help="batch")
    ap.add_argument("--T", type=int, default=256, help="sequence length")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median reported)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_storage(args.C)
    bench_speed(args.C, args.B, args.T, args.r, args.repeats)


if __name__ == "__main__":
    main()
