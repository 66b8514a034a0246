"""4-bit inference (quantize=nf4) against fp32 and bf16: weight bytes, tokens/s, val loss, task accuracy.

Three ways to load the same checkpoint for inference (generation.load_for_inference):
  fp32   dtype=float32                      every weight 4 bytes
  bf16   dtype=bfloat16                     every weight 2 bytes, bf16 matmuls
  nf4    dtype=float32 quantize=nf4         block linears in NF4 (lora.quantize_nf4: 0.5 byte + one fp32 absmax per
                                            64 values = 0.5625 bytes/param); embedding, lm_head, norms stay fp32
Measured:
  weight MB      parameters + NF4 buffers, as held in memory (a tied embedding counted once)
  tokens/s       greedy generation.generate, --new-tokens after a --prompt-token prompt, batch 1; the variants
                 take turns (interleaved), median of --repeats
  val loss, task acc   from `python eval.py checkpoint=... dtype=... quantize=...` (the user's command), on the
                 checkpoint's data: val shards (--max-val-tokens) and the held-out tasks (--limit rows, greedy)
The change in loss and accuracy against fp32 is the price of the smaller weights. On CPU, nf4 is slower than fp32:
every forward dequantizes each weight in plain PyTorch, where bitsandbytes fuses dequantize + matmul on the GPU.

Run:  python benchmarks/bench_quantize.py [--checkpoint out/sft] [--data data/builtin]
Numbers are printed, never asserted.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from generation import generate, load_for_inference  # noqa: E402

VARIANTS = {"fp32": ("float32", ""), "bf16": ("bfloat16", ""), "nf4": ("float32", "nf4")}


def weight_bytes(model) -> int:
    """Bytes of every parameter (shared ones once) and every NF4 buffer."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".nf4_" in n)


def eval_metrics(args, dtype: str, quantize: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"checkpoint={args.checkpoint}", f"dtype={dtype}",
           f"quantize={quantize}", "device=cpu", f"data={args.data}", f"tasks={args.data}/test.jsonl", "choices=",
           f"max_tokens={args.max_val_tokens}", f"limit={args.limit}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="out/sft")
    ap.add_argument("--data", default="data/builtin", help="prepared data dir: val shards and test.jsonl")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-val-tokens", type=int, default=50_000)
    ap.add_argument("--limit", type=int, default=300, help="task rows (the built-in test set has 300)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for path in (args.checkpoint, args.data):
        if not os.path.isdir(path):
            sys.exit(f"no directory at {path}: run `make sft` (or pass --checkpoint / --data)")
    torch.set_num_threads(args.threads)

    models = {name: load_for_inference(args.checkpoint, "cpu", dt, q)[0] for name, (dt, q) in VARIANTS.items()}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, models["fp32"].config.vocab_size, (args.prompt,), generator=g).tolist()
    times = {name: [] for name in models}
    for m in models.values():  # warm-up
        generate(m, [prompt], 8, temperature=0.0)
    for _ in range(args.repeats):
        for name, m in models.items():  # interleaved: machine noise hits every variant alike
            t0 = time.perf_counter()
            generate(m, [prompt], args.new_tokens, temperature=0.0)  # no stop ids: always new_tokens tokens
            times[name].append(time.perf_counter() - t0)

    rows = {}
    for name, (dt, q) in VARIANTS.items():
        metrics = eval_metrics(args, dt, q)
        rows[name] = {"mb": weight_bytes(models[name]) / 2**20, "tok_s": args.new_tokens / statistics.median(times[name]),
                      "loss": metrics["val_loss"], "acc": metrics["task_acc"]}  # fmt: skip
    base = rows["fp32"]
    print(f"checkpoint {args.checkpoint}; {args.new_tokens} new tokens after {args.prompt}, median of {args.repeats}, "
          f"{args.threads} thread(s); val loss on {args.max_val_tokens} tokens, task accuracy on {args.limit} rows")  # fmt: skip
    print("| variant | weight MB | x fp32 | tokens/s | x fp32 | val loss | Δ loss | task acc | Δ acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['mb']:.2f} | {r['mb'] / base['mb']:.2f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base['tok_s']:.2f} | {r['loss']:.4f} | {r['loss'] - base['loss']:+.4f} | "
              f"{r['acc']:.3f} | {r['acc'] - base['acc']:+.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
