"""Training throughput on this machine: tokens/s and MFU of a full training step (forward, backward,
AdamW) for the tiny preset and a ~50M-parameter model (CPU), or the 0.5B preset (GPU), measured in one run.

    python benchmarks/bench_train.py [--steps 6] [--threads 2]                 # CPU, fp32
    python benchmarks/bench_train.py --device cuda [--attn sdpa,triton]        # GPU: bf16 autocast, as training runs

MFU = estimate_flops_per_token() x tokens/s / peak FLOP/s, with the peak from train_common.guess_peak_flops
(on CPU: cores x 2.5 GHz x 32 fp32 FLOP/cycle, a yardstick, not a spec; on GPU the dense bf16 peak of the card).
On GPU every model is run once per attention implementation, interleaved step by step, and the table gives the
ratio to the first one (sdpa): the Triton kernel's effect on a whole training step. Prints one row per model
and implementation; the numbers belong in the README's results table. Nothing is asserted.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import TrainConfig  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from train_common import guess_peak_flops, make_optimizer  # noqa: E402

# ~50M parameters: 8 layers x 512 wide with a 32k vocabulary (the embedding is 16M of it).
MID_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip


def build(config: ModelConfig, device: torch.device):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()
    return model, make_optimizer(model, TrainConfig(), device)


def step_seconds(model, opt, x, device, dtype) -> float:
    """One optimizer step, timed (the GPU synchronized on both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(configs: dict, batch: int, seq_len: int, steps: int, device: torch.device, dtype) -> dict:
    """{name: (params in M, tokens/s, MFU)}; the configs' steps interleaved, the first step of each is warm-up."""
    built = {name: build(cfg, device) for name, cfg in configs.items()}
    x = torch.randint(0, next(iter(configs.values())).vocab_size, (batch, seq_len), device=device)
    times = {name: [] for name in configs}
    for i in range(steps + 1):
        for name, (model, opt) in built.items():
            t = step_seconds(model, opt, x, device, dtype)
            if i:  # the first step warms up allocators, kernels and autotuning
                times[name].append(t)
    out = {}
    for name, (model, _) in built.items():
        tok_s = batch * seq_len / statistics.median(times[name])
        mfu = model.estimate_flops_per_token(seq_len) * tok_s / guess_peak_flops(device, dtype)
        out[name] = (model.num_parameters() / 1e6, tok_s, mfu)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--attn", default="sdpa,triton", help="GPU: attention implementations to compare")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        dtype, impls = torch.float32, ["sdpa"]
        rows = [("tiny", ModelConfig.from_preset("tiny"), 16, 256), ("50M", ModelConfig(**MID_50M), 8, 256)]
    else:
        dtype, impls = torch.bfloat16, args.attn.split(",")
        rows = [("50M", ModelConfig(**MID_50M), 32, 1024), ("0.5B", ModelConfig.from_preset("0.5B"), 8, 2048)]
    print(f"{'model':<8} {'attn':<7} {'params':>9} {'batch x T':>10} {'tokens/s':>11} {'MFU':>7} {'vs first':>9}")
    for name, cfg, batch, T in rows:
        variants = {impl: ModelConfig(**{**cfg.__dict__, "attn_impl": impl}) for impl in impls}
        results = measure(variants, batch, T, args.steps, device, dtype)
        first = results[impls[0]][1]
        for impl, (n, tok_s, mfu) in results.items():
            shape, ratio = f"{batch}x{T}", tok_s / first
            print(f"{name:<8} {impl:<7} {n:>8.1f}M {shape:>10} {tok_s:>11.0f} {mfu:>7.1%} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
