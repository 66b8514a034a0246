"""Benchmark: the MoE block's forward+backward time against a dense MLP with the same active parameters.

Three contenders on the same tokens, timed interleaved (one round runs each once, in rotating order)
and reported as the median over rounds:
- dense:  SwiGLU MLP of width K*F, i.e. the same parameters *per token* as K experts of width F
          (the compute a MoE layer would cost if routing and dispatch were free);
- moe:    moe.MoEFeedForward, E experts of width F, top-K, dropless sort-based dispatch;
- masked: the naive way, every expert on every token, outputs multiplied by a routing mask
          (E/K times the FLOPs);
- hf:     transformers' MixtralSparseMoeBlock (per-expert loop with torch.where), when installed.
The ratio moe/dense is the dispatch overhead; the target is <= 1.5x on CPU.

Run: python benchmarks/bench_moe.py [--threads 1] [--tokens 2048] [--hidden 256] [--ffn 512] [--experts 8] [--top-k 2]
"""

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe import MoEFeedForward, SwiGLU  # noqa: E402


def moe_config(args):
    return SimpleNamespace(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        n_experts=args.experts,
        top_k=args.top_k,
        n_shared_experts=0,
        moe_intermediate_size=args.ffn,
        router="softmax",
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        router_noise=0.0,
        capacity_factor=0.0,
        bias_update_rate=0.0,
        initializer_range=0.02,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N = B*T tokens per step")
    parser.add_argument("--hidden", type=int, default=256, help="C")
    parser.add_argument("--ffn", type=int, default=512, help="F, width of one expert")
    parser.add_argument("--experts", type=int, default=8, help="E")
    parser.add_argument("--top-k", type=int, default=2, help="K")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:  # the ratio depends on it: one big dense matmul gains more from threads than many small ones
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C, E, K = args.hidden, args.experts, args.top_k

    moe = MoEFeedForward(moe_config(args)).train()
    dense = SwiGLU(C, K * args.ffn).train()  # same per-token parameters as K experts of width F

    def run_dense(x):
        return dense(x)

    def run_moe(x):
        return moe(x) + 0 * moe.aux_loss  # the aux loss is part of a real step's graph

    def run_masked(x):  # every expert on every token; routing only zeroes the unused outputs
        xf = x.reshape(-1, C)
        idx, w, _, _ = moe.route(xf)  # (N,K)
        mix = torch.zeros(xf.shape[0], E, dtype=x.dtype).scatter(1, idx, w)  # (N,E) dense routing weights
        out = torch.zeros_like(xf)
        for e in range(E):
            y = (F.silu(xf @ moe.w1[e].t()) * (xf @ moe.w3[e].t())) @ moe.w2[e].t()  # (N,C)
            out = out + mix[:, e : e + 1] * y
        return out.reshape(x.shape)

    runs = {"dense": run_dense, "moe": run_moe, "masked": run_masked}
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_cfg = MixtralConfig(hidden_size=C, intermediate_size=args.ffn, num_local_experts=E, num_experts_per_tok=K)
        hf = MixtralSparseMoeBlock(hf_cfg).train()
        with torch.no_grad():
            hf.gate.weight.copy_(moe.gate.weight)
            hf.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
            hf.experts.down_proj.copy_(moe.w2)
        runs["hf"] = hf
    except ImportError:
        pass

    x = torch.randn(1, args.tokens, C, requires_grad=True)
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds + 2):  # 2 warm-up rounds
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order every round
            t0 = time.perf_counter()
            runs[name](x).square().mean().backward()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[name].append(dt)
            x.grad = None
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"N={args.tokens} C={C} F={args.ffn} E={E} K={K}, threads={torch.get_num_threads()}, fwd+bwd median ms")
    for name in names:
        print(f"  {name:7s} {1000 * med[name]:8.2f} ms   {med[name] / med['dense']:5.2f}x dense")
    print(
        f"moe/dense = {med['moe'] / med['dense']:.2f}x (target <= 1.5x), masked/moe = {med['masked'] / med['moe']:.2f}x"
    )


if __name__ == "__main__":
    main()
