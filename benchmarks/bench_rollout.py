"""GRPO rollout throughput: new tokens per second with vs without the KV cache, batched vs one at a time.

A GRPO step samples G completions for each of P prompts (train_grpo.rollout). This measures the four ways
to do that with generation.generate, on the same prompts, interleaved (A, B, C, D, A, ...) so machine noise
hits all alike, median of repeats:
  * batched + cache   one generate call with the P*G rows (what train_grpo does);
  * batched, no cache the same call with use_cache=False: every step re-runs the whole sequence;
  * single + cache    P*G calls of one row each;
  * single, no cache  P*G calls of one row, recomputing.
Every row samples exactly --new-tokens tokens (no stop id), so every way generates the same number of tokens.
Batching turns P*G matrix-vector products into matrix-matrix products; the cache turns each step's cost from a
forward over the whole sequence into one token's. Expect batched + cache fastest by a wide margin on CPU too.

Run:  python benchmarks/bench_rollout.py [--prompts 8] [--group 8] [--new-tokens 16] [--repeats 3] [--threads 1]
      python benchmarks/bench_rollout.py --checkpoint out/sft      # the demo's model and real prompts
Numbers are printed, never asserted.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_sample import interleaved  # noqa: E402  (the same interleaved medians as the generation benchmark)

from generation import generate, load_for_inference  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="a model dir (default: the tiny preset, random weights)")
    ap.add_argument("--tasks", default="data/builtin/test.jsonl", help="prompts when --checkpoint is given")
    ap.add_argument("--prompts", type=int, default=8, help="P: prompts per rollout batch")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        model, tok = load_for_inference(args.checkpoint, device="cpu", dtype="float32")
        with open(args.tasks) as fh:
            rows = [json.loads(line) for line in fh][: args.prompts]
        prompts = [tok.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
                   for r in rows]  # fmt: skip
    else:
        model = Transformer(ModelConfig.from_preset("tiny")).eval()
        prompts = [torch.randint(4, model.config.vocab_size, (12 + i % 5,)).tolist() for i in range(args.prompts)]
    rows = [p for p in prompts for _ in range(args.group)]  # (P*G) prompts, as train_grpo.rollout repeats them
    n = args.new_tokens
    total = len(rows) * n
    print(f"{args.checkpoint or 'tiny preset (random weights)'}: {model.num_parameters() / 1e6:.2f}M params, "
          f"{args.prompts} prompts x {args.group} completions x {n} new tokens = {total} tokens, temperature 1, "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    def sample(batch, use_cache):
        g = torch.Generator().manual_seed(0)
        return generate(model, batch, n, temperature=1.0, generator=g, use_cache=use_cache)

    t = interleaved(
        {
            "batched + cache": lambda: sample(rows, True),
            "batched, no cache": lambda: sample(rows, False),
            "single + cache": lambda: [sample([r], True) for r in rows],
            "single, no cache": lambda: [sample([r], False) for r in rows],
        },
        args.repeats,
    )
    best = t["batched + cache"]
    for name, seconds in t.items():
        print(f"{name:18s} {total / seconds:9.1f} tok/s  ({seconds / best:5.1f}x the time of batched + cache)")
    print(f"KV cache speed-up (batched): {t['batched, no cache'] / best:.2f}x; "
          f"batching speed-up (with cache): {t['single + cache'] / best:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
