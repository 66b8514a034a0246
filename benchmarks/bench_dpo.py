"""DPO cost of the reference model: adapters switched off (one network) vs a frozen copy (two networks).

    python benchmarks/bench_dpo.py                       # tiny preset (4M), random weights, CPU
    python benchmarks/bench_dpo.py --model 0.5B --pairs 8 --device cuda
    python benchmarks/bench_dpo.py --accuracy            # + task accuracy SFT -> DPO (micro pipeline, ~1-2 min)

Part 1 times one LoRA DPO optimizer step (policy forward+backward on 2B rows, reference forward on the
same rows, AdamW) both ways, interleaved, median of repeats, and reports the ratio. The policy and the
reference compute the same numbers either way (at init both equal the base), so only time and memory
differ. Memory: bytes of the weights held (unique tensor storages) and, on CUDA, the peak allocated.

Part 2 (--accuracy) SFTs a micro model on the built-in tasks (data/builtin), then runs LoRA DPO from it
and prints held-out greedy task accuracy before and after (from the runs' log.jsonl).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from preference_pairs import read_pairs, tokenize_pair  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_dpo import completion_logps, dpo_loss, make_batch, reference_logps  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weight_bytes(*models) -> int:
    """Bytes of the distinct tensor storages (parameters and buffers) the models hold together."""
    seen, total = set(), 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def dpo_step(policy, ref_model, optimizer, batch, device) -> float:
    """One LoRA DPO step; returns seconds (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    ref_c, ref_r = reference_logps(policy, ref_model, batch).chunk(2)  # (B,) each
    pol_c, pol_r = completion_logps(policy, batch).chunk(2)
    losses, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_reference(args, device) -> None:
    tok = Tokenizer(os.path.join(ROOT, "data", "builtin"))
    rows = read_pairs(os.path.join(ROOT, "data", "builtin", "dpo_train.jsonl"))[: args.pairs]
    batch = make_batch([tokenize_pair(tok, *r, 128) for r in rows], tok.pad_id)
    batch = tuple(t.to(device) if t is not None else None for t in batch)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.model)
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    with torch.device(device):
        base = Transformer(cfg)
    base.init_weights()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    setups = {}
    for name in ("adapters_off", "copy"):
        policy = lora.apply_lora(copy.deepcopy(base), targets, r=16, alpha=32)
        ref = copy.deepcopy(policy).requires_grad_(False).eval() if name == "copy" else None
        opt = torch.optim.AdamW(lora.lora_parameters(policy), lr=1e-4)
        setups[name] = (policy, ref, opt)
    del base
    times = {name: [] for name in setups}
    peak = {}
    for rep in range(args.repeats + 1):  # interleaved; the first round is warm-up
        for name, (policy, ref, opt) in setups.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = dpo_step(policy, ref, opt, batch, device)
            if rep:
                times[name].append(dt)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated()
    med = {name: statistics.median(v) for name, v in times.items()}
    mem = {name: weight_bytes(*(m for m in setups[name][:2] if m is not None)) for name in setups}
    B, T = batch[0].shape
    print(f"model {args.model} ({sum(p.numel() for p in setups['copy'][0].parameters()) / 1e6:.1f}M params with "
          f"LoRA r16 all-linear), {args.pairs} pairs -> x {B}x{T}, {device}, median of {args.repeats}")  # fmt: skip
    print(f"{'reference':<14}{'step ms':>10}{'weights MiB':>14}" + (f"{'peak MiB':>12}" if peak else ""))
    for name in setups:
        line = f"{name:<14}{1e3 * med[name]:>10.1f}{mem[name] / 2**20:>14.1f}"
        print(line + (f"{peak[name] / 2**20:>12.1f}" if peak else ""))
    ratio = f"step time copy/adapters_off {med['copy'] / med['adapters_off']:.3f}x, "
    ratio += f"weight memory copy/adapters_off {mem['copy'] / mem['adapters_off']:.3f}x"
    if peak:
        ratio += f", peak memory copy/adapters_off {peak['copy'] / peak['adapters_off']:.3f}x"
    print(ratio)


def bench_accuracy() -> None:
    """Micro model: full SFT on the built-in tasks, then LoRA DPO (+RPO) from it; task accuracy before/after."""
    import train_dpo
    import train_sft
    from config import load_yaml, parse_args

    data = os.path.join(ROOT, "data", "builtin")
    tmp = tempfile.mkdtemp(prefix="bench_dpo_")
    torch.manual_seed(0)
    cfg = ModelConfig(**load_yaml(os.path.join(ROOT, "tests", "fixtures", "model_micro.yaml")))
    cfg.vocab_size = Tokenizer(data).vocab_size
    base = Transformer(cfg)
    base.init_weights()
    base.save_pretrained(f"{tmp}/base", tokenizer_dir=data)
    common = dict(device="cpu", seed=0, progress=False, eval_tasks=f"{data}/test.jsonl", eval_tasks_n=300)
    sft = dict(base=f"{tmp}/base", out_dir=f"{tmp}/sft", data=f"{data}/sft_train.jsonl", val_data="",
               finetune="full", steps=800, batch_size=16, micro_batch_size=16, seq_len=64, lr=3e-3, min_lr=3e-4,
               warmup_steps=10, eval_every=0, save_every=800, **common)  # fmt: skip
    t = time.perf_counter()
    train_sft.main(parse_args(train_sft.SFTConfig, [f"{k}={v}" for k, v in sft.items()]))
    t_sft = time.perf_counter() - t
    dpo = dict(base=f"{tmp}/sft", out_dir=f"{tmp}/dpo", data=f"{data}/dpo_train.jsonl", steps=80, batch_size=32,
               micro_batch_size=32, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=8, rpo_alpha=1.0,
               lora_targets="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", eval_every=0,
               log_every=10, save_every=80, **common)  # fmt: skip
    t = time.perf_counter()
    train_dpo.main(parse_args(train_dpo.DPOConfig, [f"{k}={v}" for k, v in dpo.items()]))
    t_dpo = time.perf_counter() - t
    rows = [json.loads(line) for line in open(f"{tmp}/dpo/log.jsonl")]
    acc = [r["task_acc"] for r in rows if "task_acc" in r]
    train = [r for r in rows if "rewards/accuracy" in r]
    print(f"\nmicro model ({cfg.vocab_size} vocab): SFT {sft['steps']} steps ({t_sft:.0f} s), "
          f"LoRA DPO {dpo['steps']} steps ({t_dpo:.0f} s)")  # fmt: skip
    print(f"held-out task accuracy (300 tasks, greedy exact match): SFT {acc[0]:.3f} -> DPO {acc[-1]:.3f}")
    print(f"reward accuracy {train[0]['rewards/accuracy']:.2f} -> {train[-1]['rewards/accuracy']:.2f}, "
          f"margin {train[0]['rewards/margin']:.3f} -> {train[-1]['rewards/margin']:.3f}")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model preset (random weights)")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per step (2x rows through the model)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--accuracy", action="store_true", help="also run the SFT -> DPO accuracy comparison")
    args = ap.parse_args()
    bench_reference(args, torch.device(args.device))
    if args.accuracy:
        bench_accuracy()


if __name__ == "__main__":
    main()
