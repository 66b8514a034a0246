"""Training throughput on this machine: tokens/s and MFU of a full training step (forward, backward,
AdamW) for the tiny preset and a ~50M-parameter model, measured in the same run.

    python benchmarks/bench_train.py [--steps 6] [--threads 2]

MFU = estimate_flops_per_token() x tokens/s / peak FLOP/s, with the peak from
train_common.guess_peak_flops (on CPU: cores x 2.5 GHz x 32 fp32 FLOP/cycle, a yardstick, not a spec).
Prints one row per model; the numbers belong in the README's results table. Nothing is asserted.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from train_common import TrainConfig, guess_peak_flops, make_optimizer  # noqa: E402

# ~50M parameters: 8 layers x 512 wide with a 32k vocabulary (the embedding is 16M of it).
MID_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip


def measure(config: ModelConfig, batch: int, seq_len: int, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, config.vocab_size, (batch, seq_len))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    tok_s = batch * seq_len / statistics.median(times)
    mfu = model.estimate_flops_per_token(seq_len) * tok_s / guess_peak_flops(torch.device("cpu"), torch.float32)
    return model.num_parameters() / 1e6, tok_s, mfu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':<10} {'params':>9} {'batch x T':>10} {'tokens/s':>10} {'MFU':>7}")
    for name, cfg, batch, T in [
        ("tiny", ModelConfig.from_preset("tiny"), 16, 256),
        ("50M", ModelConfig(**MID_50M), 8, 256),
    ]:
        n, tok_s, mfu = measure(cfg, batch, T, args.steps)
        print(f"{name:<10} {n:>8.1f}M {f'{batch}x{T}':>10} {tok_s:>10.0f} {mfu:>7.1%}")


if __name__ == "__main__":
    main()
