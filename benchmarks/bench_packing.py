"""SFT packing vs padding: step time on the built-in chat examples, the same micro-batches both ways.

    python prepare_data.py configs/data_builtin.yaml          # once: the tokenizer and sft_train.jsonl
    OMP_NUM_THREADS=2 python benchmarks/bench_packing.py      # ~1 min on 2 cores
    python benchmarks/bench_packing.py --model 48M --seq 256 --batch 16

What is measured
- The share of computed tokens that are padding, for right-padding each micro-batch to its longest
  example (finetune.collate) and for packing it into seq_len rows (finetune.pack).
- Step time (forward, backward, AdamW) of full fine-tuning on the same micro-batches, padded and packed,
  interleaved round by round so that machine load hits both alike; the median over rounds and the ratio.
  Both give the same loss (tests/test_train_sft.py::test_packing_trains_like_padding checks it); only the
  padding work differs. Packed rows carry a block-diagonal mask, so attention runs SDPA's masked path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import finetune  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHAPES = {
    "tiny": "tiny",  # the demo's 4M preset
    # ~48M parameters: 10 layers x 640 wide, GQA 10/5 heads, SwiGLU 1728 (as in bench_sft.py)
    "48M": dict(
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=10,
        num_attention_heads=10,
        num_key_value_heads=5,
        tie_word_embeddings=True,
    ),
}


def build(shape: str, vocab: int, seq: int):
    torch.manual_seed(0)
    if SHAPES[shape] == "tiny":
        cfg = ModelConfig.from_preset("tiny")
        cfg.vocab_size, cfg.attn_impl = vocab, "sdpa"
    else:
        cfg = ModelConfig(vocab_size=vocab, max_position_embeddings=max(seq, 512), attn_impl="sdpa", **SHAPES[shape])
    model = Transformer(cfg)
    model.init_weights()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def step(model, opt, x, y, doc) -> float:
    t0 = time.perf_counter()
    loss = model(x, y, loss_reduction="sum", document_ids=doc) / max(int((y != -1).sum()), 1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/builtin", help="prepared data dir with tokenizer.model, sft_train.jsonl")
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, default=32, help="examples per micro-batch (sft_tiny: 32)")
    ap.add_argument("--seq", type=int, default=128, help="seq_len (sft_tiny: 128)")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()

    tok = Tokenizer(args.data)
    rows = [json.loads(line) for line in open(os.path.join(args.data, "sft_train.jsonl"))]
    examples = [finetune.render_example(tok, r["messages"], args.seq) for r in rows]
    chunks = [examples[i : i + args.batch] for i in range(0, args.batch * args.rounds, args.batch)]
    padded = [(*finetune.collate(c, tok.pad_id), None) for c in chunks]
    packed = [finetune.pack(c, tok.pad_id, args.seq) for c in chunks]
    real = sum(len(x) for c in chunks for x, _ in c)
    pad_cells, pack_cells = sum(b[0].numel() for b in padded), sum(b[0].numel() for b in packed)
    print(f"{len(chunks)} micro-batches of {args.batch} examples, seq_len {args.seq}, {real:,} real tokens")
    print(f"padding share: padded {1 - real / pad_cells:.1%} of {pad_cells:,} tokens, "
          f"packed {1 - real / pack_cells:.1%} of {pack_cells:,} "
          f"(rows per micro-batch {statistics.mean(b[0].shape[0] for b in packed):.1f})")  # fmt: skip

    model, opt = build(args.model, tok.vocab_size, args.seq)
    times = {"padded": [], "packed": []}
    step(model, opt, *padded[0]), step(model, opt, *packed[0])  # warm-up
    for i in range(len(chunks)):  # interleaved: both see the same load
        times["padded"].append(step(model, opt, *padded[i]))
        times["packed"].append(step(model, opt, *packed[i]))
    med = {k: statistics.median(v) for k, v in times.items()}
    threads = torch.get_num_threads()
    print(f"model {args.model}, {threads} threads: step median padded {med['padded'] * 1e3:.1f} ms, "
          f"packed {med['packed'] * 1e3:.1f} ms -> packed/padded time {med['packed'] / med['padded']:.2f}x, "
          f"examples/s {args.batch / med['padded']:.0f} -> {args.batch / med['packed']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
