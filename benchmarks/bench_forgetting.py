"""Why does SFT forget? Short SFT runs that change one thing each, and what they do to the pretraining text.

    python prepare_data.py configs/data_builtin.yaml && python train_pretrain.py configs/pretrain_tiny.yaml
    python benchmarks/bench_forgetting.py                                  # every variant, 300 steps each
    python benchmarks/bench_forgetting.py --steps 100 --only demo,lr_1e-3  # a quick look at two of them
    python benchmarks/bench_forgetting.py --no-train                       # score the runs already in out/

Each variant is `python train_sft.py configs/sft_tiny.yaml` with a few keys changed (VARIANTS below), from
the same base (out/pretrain), in its own out dir (out/bench_forgetting/NAME). Then, for the merged model:
- val_loss      nats per token on the pretraining val shards in whole windows of the model's context (eval.py
                also scores the last partial window, so its number differs in the second decimal);
- no_chat       the same loss with the four chat markers removed from the softmax: if forgetting were the
                model putting probability on `<|end|>` inside plain text, this would fall back to the base;
- chat_mass     the mean probability the model gives the chat markers at a plain-text position;
- loss<256 / loss>=256  the loss at positions the base was pretrained on (seq_len 256) and beyond them;
- task_acc      held-out exact match on 300 built-in tasks (train_sft's final evaluation);
- dW/W          how far fine-tuning moved the weights: ||W_merged - W_base|| / ||W_base|| (Frobenius), the mean
                over the matrices that changed. LoRA updates in real fine-tunes are a few percent of the weights.
The forgetting is val_loss minus the base's; a fix must cut it without cutting task_acc.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import load_file  # noqa: E402

from generation import load_for_inference  # noqa: E402
from shards import read_shard  # noqa: E402
from tokenizer import CHAT_MARKERS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTENTION = "[q_proj,k_proj,v_proj,o_proj]"
# name -> train_sft.py keys changed from configs/sft_tiny.yaml (the demo recipe before the fix)
VARIANTS = {
    "demo": [],  # lr 3e-3 -> 3e-4 cosine, LoRA r 16 alpha 32 (scaling 2) on all 7 linear layers
    "lr_1e-3": ["lr=1e-3", "min_lr=1e-4"],
    "lr_3e-4": ["lr=3e-4", "min_lr=3e-5"],
    "alpha_8": ["lora_alpha=8"],  # scaling 0.5: the same adapters, a quarter of the step in weight space
    "attention_only": [f"lora_targets={ATTENTION}"],
    "replay": ["replay_data=data/builtin"],  # 2 rows of pretraining text in every micro-batch, weight 1
    "replay_lr_1e-3": ["replay_data=data/builtin", "lr=1e-3", "min_lr=1e-4"],
}


@torch.no_grad()
def text_metrics(checkpoint: str, data_dir: str, max_tokens: int) -> dict:
    """val_loss, no_chat, chat_mass, loss<256, loss>=256 of a checkpoint on data_dir's val shards."""
    model, tok = load_for_inference(checkpoint, "cpu", "float32")
    T = model.config.max_position_embeddings
    chat = [tok.special_id(m) for m in CHAT_MARKERS]
    seq = np.concatenate(
        [np.asarray(read_shard(p), dtype=np.int64) for p in sorted(glob.glob(f"{data_dir}/val_*.bin"))]
    )
    windows = [seq[s : s + T + 1] for s in range(0, min(len(seq), max_tokens) - T, T)]  # whole windows only
    nll, no_chat, mass = [], [], []
    for i in range(0, len(windows), 4):
        chunk = torch.from_numpy(np.stack(windows[i : i + 4]))  # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x).float()  # (B, T, V)
        logp = logits.log_softmax(-1)
        nll.append(-logp.gather(-1, y[..., None])[..., 0])  # (B, T)
        mass.append(logp[..., chat].exp().sum(-1))
        logits[..., chat] = float("-inf")  # the text never holds a marker: only the other tokens compete
        no_chat.append(-logits.log_softmax(-1).gather(-1, y[..., None])[..., 0])
    nll, no_chat, mass = torch.cat(nll), torch.cat(no_chat), torch.cat(mass)  # (N, T) each
    return {"val_loss": nll.mean().item(), "no_chat": no_chat.mean().item(), "chat_mass": mass.mean().item(),
            "loss<256": nll[:, :256].mean().item(), "loss>=256": nll[:, 256:].mean().item()}  # fmt: skip


def relative_update(base: str, merged: str) -> float:
    """Mean over the weight matrices that changed of ||W_merged - W_base|| / ||W_base||."""
    a, b = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(merged, "model.safetensors"))
    ratios = [float((b[k] - a[k]).norm() / a[k].norm()) for k in a if a[k].dim() == 2 and not torch.equal(a[k], b[k])]
    return sum(ratios) / max(len(ratios), 1)


def run_variant(name: str, keys: list[str], base: str, steps: int) -> tuple[str, dict, float]:
    """Train one variant; (merged checkpoint dir, its last task-accuracy record, seconds)."""
    out = os.path.join("out/bench_forgetting", name)
    cmd = [sys.executable, "train_sft.py", "configs/sft_tiny.yaml", f"base={base}", f"out_dir={out}", f"steps={steps}",
           f"warmup_steps={min(20, steps // 10)}", "eval_at_start=false", "eval_every=0", f"save_every={steps}",
           "progress=false", "resume=never", "overwrite=true", *keys]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: train_sft failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(os.path.join(ROOT, out, "log.jsonl")) as fh:
        acc = [r for r in map(json.loads, fh) if "task_acc" in r][-1]
    return os.path.join(out, "merged"), acc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="out/pretrain")
    ap.add_argument("--data", default="data/builtin")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--max-tokens", type=int, default=1 << 30, help="val tokens to score (default: all)")
    ap.add_argument("--no-train", action="store_true", help="score the variants' existing out dirs, train nothing")
    args = ap.parse_args()
    os.chdir(ROOT)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--only: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    print(f"threads {torch.get_num_threads()}, {args.steps} SFT steps per variant, base {args.base}")
    print(f"{'variant':<16}{'val_loss':>9}{'no_chat':>9}{'chat_mass':>10}{'loss<256':>9}{'loss>=256':>10}{'task_acc':>9}"
          f"{'dW/W':>7}")  # fmt: skip
    rows = [("base", text_metrics(args.base, args.data, args.max_tokens), None)]
    print(f"{'base':<16}" + "".join(f"{v:>9.4f}" for v in rows[0][1].values()), flush=True)
    for name in names:
        if args.no_train:
            merged, seconds = os.path.join("out/bench_forgetting", name, "merged"), 0.0
            with open(os.path.join("out/bench_forgetting", name, "log.jsonl")) as fh:
                acc = [r for r in map(json.loads, fh) if "task_acc" in r][-1]
        else:
            merged, acc, seconds = run_variant(name, VARIANTS[name], args.base, args.steps)
        m = text_metrics(merged, args.data, args.max_tokens) | {"dW/W": relative_update(args.base, merged)}
        rows.append((name, m, acc))
        cells = f"{m['val_loss']:>9.4f}{m['no_chat']:>9.4f}{m['chat_mass']:>10.4f}{m['loss<256']:>9.4f}"
        cells += f"{m['loss>=256']:>10.4f}{acc['task_acc']:>9.3f}{m['dW/W']:>7.3f}"
        print(f"{name:<16}{cells}   ({seconds:.0f} s)", flush=True)
    print(json.dumps([{"variant": n, **m, **({"task_acc": a["task_acc"]} if a else {})} for n, m, a in rows]))


if __name__ == "__main__":
    main()
