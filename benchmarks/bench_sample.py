"""Generation speed: the KV cache vs recomputing the context, and generation.generate vs transformers' generate.

Two ratios, each measured interleaved (A, B, A, B, ...) so machine noise hits both alike, median of repeats:
  * cache vs recompute: generation.generate(use_cache=True) against use_cache=False, which re-runs the whole
    sequence for every new token. A decode step with the cache costs one token's matmuls plus attention over
    the cached keys; without it a step costs a full forward over everything so far, so the gap grows with
    the number of new tokens (expect >= 5x at 256 new tokens on the tiny preset).
  * ours vs HF: generation.generate (greedy, cache) against LlamaForCausalLM.generate(do_sample=False) on the
    same random weights (our checkpoint dir loaded by transformers), same prompt, same number of tokens.
    Both produce the same tokens; the check below says so.

Run:  python benchmarks/bench_sample.py [--new-tokens 256] [--prompt 32] [--repeats 3] [--threads 1]
Numbers are printed, never asserted.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generation import generate  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: median seconds}; one warmup call each, then the functions take turns."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    ours = Transformer(ModelConfig.from_preset("tiny")).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    hf.eval()
    prompt = torch.randint(3, ours.config.vocab_size, (args.prompt,)).tolist()
    n = args.new_tokens
    print(f"tiny preset ({ours.num_parameters() / 1e6:.2f}M params), prompt {args.prompt}, {n} new tokens, "
          f"batch 1, greedy, CPU, {args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip

    # ---- same tokens first: a speed comparison of different outputs would mean nothing ----
    mine = generate(ours, [prompt], n, temperature=0.0)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(prompt) :].tolist()  # fmt: skip
    same = sum(a == b for a, b in zip(mine, theirs, strict=False))
    print(f"greedy tokens equal to HF's: {same}/{n}")

    # ---- KV cache vs recompute ----
    t = interleaved(
        {
            "cache": lambda: generate(ours, [prompt], n, temperature=0.0),
            "recompute": lambda: generate(ours, [prompt], n, temperature=0.0, use_cache=False),
        },
        args.repeats,
    )
    print(f"KV cache  {n / t['cache']:8.1f} tok/s | recompute {n / t['recompute']:8.1f} tok/s | "
          f"speed-up {t['recompute'] / t['cache']:.1f}x")  # fmt: skip

    # ---- ours vs transformers ----
    def hf_generate():
        with torch.no_grad():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    t = interleaved({"ours": lambda: generate(ours, [prompt], n, temperature=0.0), "hf": hf_generate}, args.repeats)
    print(f"ours      {n / t['ours']:8.1f} tok/s | HF generate {n / t['hf']:8.1f} tok/s | "
          f"ratio {t['hf'] / t['ours']:.2f}x (> 1: ours faster)")  # fmt: skip


if __name__ == "__main__":
    main()
