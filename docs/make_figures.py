"""The tutorial's figures, drawn by one script so that they are re-made, not hand-edited.

    python docs/make_figures.py                          # every figure into docs/img/, loss curves from out/
    python docs/make_figures.py out_dir=/path/to/out     # the loss curves of another run's out/ directory
    make figures                                         # the same as the first line

What each PNG shows, and where its numbers come from:
  pipeline.png      the life cycle, script by script (drawn)
  blocks.png        a dense pre-norm block next to an MoE block (drawn)
  rope.png          RoPE: one channel pair rotated by position, cos(m theta_i) for fast and slow pairs, and the
                    wavelengths under linear / dynamic-NTK / Llama-3 scaling, computed by model.rope_inv_freq
  flash_tiling.png  which (query tile, key tile) pairs the Triton forward runs unmasked, masked or skips, computed
                    with the kernel's own bounds (full_hi = start_m, hi = start_m + BLOCK_M; packed rows from lo)
  ddp_fsdp.png      DDP bucket all-reduces overlapping the backward; FSDP's gather / free / reduce-scatter (drawn)
  lora.png          y = W x + (alpha / r) B A x with the shapes to scale (drawn)
  packed_mask.png   the causal mask next to model.document_mask on a real packed row, with the restarted positions
  vlm.png           a built-in vlm_data scene cut into patches, the vision tower, the projector and the prompt slots
  loss_curves.png   pretrain / SFT / DPO from OUT/{pretrain,sft,dpo}/log.jsonl (what `make demo` writes)
  vlm_curves.png    both LLaVA stages from OUT/vlm/stage1/log.jsonl and OUT/vlm/log.jsonl (`make demo-vlm`)
A curve figure whose logs are missing is skipped with a message; the drawn ones never need a run.

PNG at dpi 100 keeps each file well under 150 KB (tests/test_figures.py runs this on a synthetic out dir).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display: the same output on a laptop, a server and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

# docs/ sits one floor below the repo root, whose library files these figures are computed from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import UserError, run_cli  # noqa: E402
from model import ModelConfig, document_mask, document_starts, rope_inv_freq  # noqa: E402
from vlm_data import caption_of, make_scene  # noqa: E402

# One palette for every figure: compute, communication, frozen, trainable, masked, skipped.
BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#4c72b0", "#dd8452", "#55a868", "#b0b0b0", "#c44e52", "#8172b2"
LIGHT = {"blue": "#dbe4f3", "orange": "#f7e0cf", "green": "#d9eedd", "grey": "#eeeeee", "purple": "#e3def0"}


@dataclass
class FiguresConfig:
    out_dir: str = "out"  # run directory holding pretrain/, sft/, dpo/, vlm/ with their log.jsonl (for the curves)
    img_dir: str = "docs/img"  # where the PNGs are written
    dpi: int = 100  # resolution; 100 keeps every PNG under 150 KB
    only: str = ""  # comma-separated figure names without .png (e.g. rope,lora) to redo just those; "" = all


# ----------------------------------------------------------------------------- drawing helpers


def box(ax, x, y, w, h, text, face="white", edge="black", size=9, weight="normal"):
    """A rounded box with centred text; (x, y) is the lower-left corner in data coordinates."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=face, ec=edge, lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, x0, y0, x1, y1, color="black", style="-|>", text=None):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle=style, color=color, lw=1.2))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, fontsize=7, ha="center", va="bottom", color=color)


def blank(ax, xlim, ylim):
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")


def save(fig, cfg: FiguresConfig, name: str) -> str:
    path = os.path.join(cfg.img_dir, name)
    fig.savefig(path, dpi=cfg.dpi, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)} ({os.path.getsize(path) // 1024} KB)")
    return path


# ----------------------------------------------------------------------------- drawn diagrams


def fig_pipeline(cfg):
    fig, ax = plt.subplots(figsize=(11, 3.3))
    blank(ax, (0, 11), (0, 3.3))
    top = [("text source\nstdlib / hub / .txt", LIGHT["grey"]), ("prepare_data.py\nclean, dedup, tokenize", LIGHT["blue"]),
           ("shards\nuint16 + header", LIGHT["grey"]), ("train_pretrain.py\ndense or MoE", LIGHT["orange"]),
           ("checkpoint dir\nHF Llama layout", LIGHT["grey"])]  # fmt: skip
    bottom = [("train_sft.py\nfull / LoRA / QLoRA", LIGHT["orange"]), ("train_dpo.py\npreferences", LIGHT["orange"]),
              ("sample.py / eval.py\nserve.py", LIGHT["green"]), ("transformers / PEFT\nlm-eval", LIGHT["green"])]  # fmt: skip
    for i, (t, c) in enumerate(top):
        box(ax, 0.1 + i * 2.2, 2.1, 1.9, 0.9, t, c, size=8.5)
        if i:
            arrow(ax, i * 2.2, 2.55, 0.1 + i * 2.2, 2.55)
    box(ax, 2.3, 0.95, 1.9, 0.7, "tokenizer.py\nSentencePiece BPE", LIGHT["blue"], size=8.5)
    arrow(ax, 3.25, 2.1, 3.25, 1.65, style="<|-|>")
    for i, (t, c) in enumerate(bottom):
        box(ax, 2.3 + i * 2.2, 0.1, 1.9, 0.7, t, c, size=8.5)
        if i:
            arrow(ax, 2.2 + i * 2.2, 0.45, 2.3 + i * 2.2, 0.45)
    arrow(ax, 9.9, 2.1, 3.25, 0.8, color=GREY)  # the checkpoint feeds SFT
    ax.text(0.1, 0.3, "each arrow is a directory\nanother script reads", fontsize=8, style="italic", color="#555555")
    ax.text(9.95, 1.7, "train_vlm.py reuses\nthe LM + a ViT", fontsize=7.5, color=PURPLE, ha="center")
    return save(fig, cfg, "pipeline.png")


def _block_column(ax, x0, title, moe):
    """One pre-norm block drawn bottom-up at x offset x0; the FFN is a dense SwiGLU or routed experts."""
    ax.text(x0 + 1.5, 9.6, title, ha="center", fontsize=11, weight="bold")
    box(ax, x0 + 0.75, 0.2, 1.5, 0.5, "x  (B, T, C)", LIGHT["grey"])
    box(ax, x0 + 0.75, 1.3, 1.5, 0.5, "RMSNorm", LIGHT["blue"])
    box(ax, x0 + 0.5, 2.3, 2.0, 0.9, "attention\nGQA + RoPE", LIGHT["orange"])
    ax.text(x0 + 1.5, 3.75, "+", ha="center", va="center", fontsize=16)
    box(ax, x0 + 0.75, 4.4, 1.5, 0.5, "RMSNorm", LIGHT["blue"])
    for y0, y1 in ((0.7, 1.3), (1.8, 2.3), (3.2, 3.55), (3.95, 4.4)):
        arrow(ax, x0 + 1.5, y0, x0 + 1.5, y1)
    if not moe:
        box(ax, x0 + 0.35, 5.5, 2.3, 1.3, "SwiGLU MLP\ndown(silu(gate x)\n * up x)", LIGHT["green"])
        arrow(ax, x0 + 1.5, 4.9, x0 + 1.5, 5.5)
        ffn_top = 6.8
    else:
        box(ax, x0 + 0.75, 5.3, 1.5, 0.45, "router  top-k", LIGHT["purple"], size=8)
        ax.text(x0 + 2.35, 5.52, "K=2 of E=4", fontsize=7, va="center", color=PURPLE)
        arrow(ax, x0 + 1.5, 4.9, x0 + 1.5, 5.3)
        for e in range(4):
            chosen = e in (1, 3)
            box(ax, x0 + 0.05 + e * 0.74, 6.1, 0.64, 0.6, f"E{e}", LIGHT["green"] if chosen else "white",
                edge="black" if chosen else GREY, size=8)  # fmt: skip
            arrow(ax, x0 + 1.5, 5.75, x0 + 0.37 + e * 0.74, 6.1, color="black" if chosen else GREY)
            if chosen:
                arrow(ax, x0 + 0.37 + e * 0.74, 6.7, x0 + 1.5, 7.0)
        box(ax, x0 + 0.35, 7.0, 2.3, 0.4, "sum of p_e * E_e(x)", LIGHT["purple"], size=8)
        ffn_top = 7.4
    ax.text(x0 + 1.5, ffn_top + 0.55, "+", ha="center", va="center", fontsize=16)
    arrow(ax, x0 + 1.5, ffn_top, x0 + 1.5, ffn_top + 0.35)
    # The residual stream: taps the stem below each norm and rejoins at the "+" above its branch.
    for y0, y1 in ((1.0, 3.75), (4.15, ffn_top + 0.55)):
        ax.plot([x0 + 1.5, x0 + 0.1, x0 + 0.1, x0 + 1.3], [y0, y0, y1, y1], color=GREY, lw=1.5)
    arrow(ax, x0 + 1.5, ffn_top + 0.75, x0 + 1.5, 9.3, text="")
    ax.text(x0 + 1.6, 9.0, "next block", fontsize=7, color="#555555")


def fig_blocks(cfg):
    fig, ax = plt.subplots(figsize=(7, 6))
    blank(ax, (0, 7), (-0.6, 10))
    _block_column(ax, 0.2, "dense block (model.Block)", moe=False)
    _block_column(ax, 3.8, "MoE block (moe.MoEFeedForward)", moe=True)
    ax.text(3.5, -0.4, "grey lines: the residual stream, a plain sum of branch outputs", fontsize=8, ha="center",
            color="#555555")  # fmt: skip
    return save(fig, cfg, "blocks.png")


def fig_ddp_fsdp(cfg):
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
    for ax, title in ((a1, "DDP (distributed.DDP): bucket all-reduce overlaps the rest of the backward"),
                      (a2, "FSDP (fsdp.py): gather before use, free after, reduce-scatter the gradient")):  # fmt: skip
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_yticks([0.5, 1.5], ["comm", "compute"])
        ax.set_ylim(0, 2.1)
        ax.spines[["top", "right"]].set_visible(False)

    def bar(ax, row, x, w, text, color):
        ax.broken_barh([(x, w)], (row + 0.1, 0.8), facecolors=color, edgecolors="black", lw=0.6)
        ax.text(x + w / 2, row + 0.5, text, ha="center", va="center", fontsize=7.5)

    # DDP: forward F1..F4, backward B4..B1 (gradients arrive last layer first); bucket 0 holds layers 4 and 3.
    for i in range(4):
        bar(a1, 1, i, 1, f"F{i + 1}", LIGHT["blue"])
        bar(a1, 1, 4 + 1.5 * i, 1.5, f"B{4 - i}", LIGHT["orange"])
    bar(a1, 0, 7.0, 2.0, "all-reduce bucket 0\n(grads of layers 4, 3)", LIGHT["green"])
    bar(a1, 0, 10.0, 1.0, "bucket 1\n(2, 1)", LIGHT["green"])
    bar(a1, 1, 11.2, 0.9, "step", LIGHT["purple"])
    a1.axvline(7.0, color=GREY, ls=":")
    a1.text(7.05, 1.95, "bucket 0 full: launched at once", fontsize=7, color="#555555")

    # FSDP with prefetch: AG = all-gather a unit's shards, RS = reduce-scatter its gradient; "free" after each use.
    # (row, start, width, label, colour): the comm row runs one collective at a time, in the same order on every rank.
    timeline = [(0, 0.0, 0.55, "AG1", LIGHT["green"])]
    for i in range(4):
        timeline.append((1, 0.6 + i, 1.0, f"F{i + 1}\n-> free", LIGHT["blue"]))
        if i < 3:  # the next unit's gather overlaps this unit's forward
            timeline.append((0, 0.7 + i, 0.55, f"AG{i + 2}", LIGHT["green"]))
    timeline.append((0, 4.65, 0.5, "AG4", LIGHT["green"]))  # re-gather for the backward
    for j, i in enumerate(range(4, 0, -1)):
        t = 5.2 + 1.5 * j
        timeline.append((1, t, 1.5, f"B{i}\n-> free", LIGHT["orange"]))
        if j:  # the previous unit's reduce-scatter, then the next unit's gather, while this unit's backward runs
            timeline.append((0, t, 0.55, f"RS{i + 1}", "#f2c6c7"))
        if i > 1:
            timeline.append((0, t + (0.6 if j else 0.05), 0.55, f"AG{i - 1}", LIGHT["green"]))
    timeline.append((0, 11.2, 0.55, "RS1", "#f2c6c7"))
    timeline.append((1, 11.85, 0.9, "step\n(shards)", LIGHT["purple"]))
    for row, t, w, label, color in timeline:
        bar(a2, row, t, w, label, color)
    a2.set_xlabel("time (schematic)")
    a2.set_xticks([])
    fig.tight_layout()
    return save(fig, cfg, "ddp_fsdp.png")


def fig_lora(cfg):
    fig, ax = plt.subplots(figsize=(9, 4.2))
    blank(ax, (0, 11), (-0.6, 6.4))
    d, r = 2.6, 0.45  # in = out = d and the rank r, drawn to one scale: a matrix is (rows = out, cols = in)
    ax.add_patch(Rectangle((0.3, 1.0), 0.3, d, fc=LIGHT["grey"], ec="black"))
    ax.text(0.45, 0.8, "x (in)", ha="center", va="top", fontsize=9)
    ax.add_patch(Rectangle((2.0, 3.3), d, d, fc=LIGHT["blue"], ec="black", hatch="//"))  # W: (out, in)
    ax.text(2.0 + d / 2, 4.6, "W (out, in)\nfrozen", ha="center", va="center", fontsize=10, bbox=dict(fc="white"))
    ax.add_patch(Rectangle((2.0, 1.0), d, r, fc=LIGHT["orange"], ec="black"))  # A: (r, in)
    ax.text(2.0 + d / 2, 0.75, "A (r, in): Kaiming-uniform init", ha="center", va="top", fontsize=9)
    ax.add_patch(Rectangle((5.6, 0.0), r, d, fc=LIGHT["green"], ec="black"))  # B: (out, r)
    ax.text(6.2, 0.6, "B (out, r)\nzeros at init", ha="left", va="center", fontsize=9)
    arrow(ax, 0.65, 3.45, 1.95, 3.45)
    arrow(ax, 0.65, 1.22, 1.95, 1.22)
    arrow(ax, 4.65, 1.22, 5.55, 1.22, text="A x (r)")
    ax.add_patch(matplotlib.patches.Circle((8.3, 3.0), 0.3, fc="white", ec="black"))
    ax.text(8.3, 3.0, "+", ha="center", va="center", fontsize=14)
    arrow(ax, 4.65, 4.6, 8.1, 3.25, text="W x")
    arrow(ax, 6.1, 1.3, 8.05, 2.8, text="x alpha / r")
    ax.add_patch(Rectangle((9.3, 1.7), 0.3, d, fc=LIGHT["purple"], ec="black"))
    arrow(ax, 8.6, 3.0, 9.25, 3.0)
    ax.text(9.45, 1.5, "y (out)", ha="center", va="top", fontsize=9)
    ax.text(5.5, 6.15, "y = W x + (alpha / r) B A x      (lora.LoRALinear.forward)", ha="center", fontsize=10)
    ax.text(5.5, -0.5, "r << in, out: B A has rank <= r and r (in + out) trainable numbers instead of in * out; "
            "B = 0 makes step 0 the base model", fontsize=8, ha="center", color="#555555")  # fmt: skip
    return save(fig, cfg, "lora.png")


# ----------------------------------------------------------------------------- computed from the code


def fig_rope(cfg):
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.7))
    # (a) one channel pair (x_i, x_{i+D/2}) at positions m = 0..7, rotated by m * theta.
    theta, v = 0.45, np.array([1.0, 0.25])
    for m in range(8):
        c, s = np.cos(m * theta), np.sin(m * theta)
        w = np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])
        a1.annotate("", xy=w, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=BLUE if m not in (2, 6) else RED))
        a1.text(*(w * 1.13), f"m={m}", fontsize=7.5, ha="center", va="center")
    a1.add_patch(matplotlib.patches.Arc((0, 0), 0.7, 0.7, theta1=np.degrees(2 * theta + 0.245),
                                        theta2=np.degrees(6 * theta + 0.245), color=RED))  # fmt: skip
    a1.text(-0.05, 0.45, "(6-2) theta", color=RED, fontsize=8)
    a1.set_aspect("equal")
    a1.set_xlim(-1.35, 1.35)
    a1.set_ylim(-1.35, 1.35)
    a1.set_title("(a) one pair rotated by m * theta_i", fontsize=10)
    a1.axhline(0, color=GREY, lw=0.5)
    a1.axvline(0, color=GREY, lw=0.5)

    # (b) cos(m theta_i) for a fast, a middle and a slow pair of a head of D = 64.
    small = ModelConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8)  # D = 64
    inv = rope_inv_freq(small).numpy()
    m = np.arange(0, 97)
    for i, color in ((0, BLUE), (6, ORANGE), (14, GREEN)):
        a2.plot(m, np.cos(m * inv[i]), color=color, lw=1.2, label=f"i={i}: wavelength {2 * np.pi / inv[i]:.0f}")
    a2.set_xlabel("position m")
    a2.set_title("(b) cos(m * theta_i), theta_i = 10000^(-2i/64)", fontsize=10)
    a2.legend(fontsize=7, loc="lower left")

    # (c) wavelength 2 pi / theta_i of every pair under each scaling, from model.rope_inv_freq (Llama-3-like head).
    base = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, rope_theta=500000.0,
                max_position_embeddings=8192)  # fmt: skip
    variants = {
        "default": (None, None),
        "linear x8": ({"rope_type": "linear", "factor": 8.0}, None),
        "dynamic NTK x8 at T=32768": ({"rope_type": "dynamic", "factor": 8.0}, 32768),
        "llama3 x8": (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            None,
        ),  # fmt: skip
    }
    for (name, (scaling, seq_len)), color, ls in zip(variants.items(), (BLUE, ORANGE, GREEN, RED),
                                                     ("-", "--", "-.", ":"), strict=True):  # fmt: skip
        inv = rope_inv_freq(ModelConfig(**base, rope_scaling=scaling), seq_len)
        a3.plot(2 * np.pi / inv.numpy(), color=color, ls=ls, lw=1.6, label=name)
    a3.axhline(8192, color=GREY, lw=0.8)
    a3.text(1, 8192 * 1.3, "trained context 8192", fontsize=7, color="#555555")
    a3.set_yscale("log")
    a3.set_xlabel("pair index i (D = 128, base 500000)")
    a3.set_ylabel("wavelength 2 pi / theta_i (tokens)")
    a3.set_title("(c) scaling variants (model.rope_inv_freq)", fontsize=10)
    a3.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save(fig, cfg, "rope.png")


def _tile_kinds(T, BM, BN, starts=None):
    """(query tile, key tile) -> 'full' | 'masked' | 'skip', by the forward kernel's loop bounds."""
    kinds = {}
    for pm in range((T + BM - 1) // BM):
        start_m = pm * BM
        hi = min(start_m + BM, T)
        if starts is None:  # causal: keys [0, start_m) unmasked, the diagonal band [start_m, hi) masked
            lo, full_hi = 0, start_m
        else:  # packed rows: every tile from the earliest document start of the tile's queries is masked
            lo, full_hi = (int(starts[start_m:hi].min()) // BN) * BN, None
        for j in range((T + BN - 1) // BN):
            start_n = j * BN
            if start_n < lo or start_n >= hi:
                kinds[pm, j] = "skip"
            elif full_hi is not None and start_n < full_hi:
                kinds[pm, j] = "full"
            else:
                kinds[pm, j] = "masked"
    return kinds


def fig_flash_tiling(cfg):
    T, BM, BN = 512, 128, 64  # the compiled forward's first config: BLOCK_M 128, BLOCK_N 64
    ids = torch.tensor([[0] * 150 + [1] * 170 + [2] * 110 + [3] * 82])  # a packed row of four documents
    starts = document_starts(ids)[0].numpy()
    visible = document_mask(ids)[0, 0].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    colors = {"full": LIGHT["blue"], "masked": LIGHT["orange"], "skip": "white"}
    for ax, (title, kinds, seen) in zip(axes, (
        ("causal: tiles left of the diagonal run unmasked", _tile_kinds(T, BM, BN), np.tril(np.ones((T, T)))),
        ("packed documents: tiles before a tile's first document skipped", _tile_kinds(T, BM, BN, starts), visible),
    ), strict=True):  # fmt: skip
        ax.imshow(np.where(seen > 0, 0.35, 0.0), cmap="Greys", vmin=0, vmax=1, extent=(0, T, T, 0))
        for (pm, j), kind in kinds.items():
            ax.add_patch(Rectangle((j * BN, pm * BM), BN, BM, fc=colors[kind], ec="black", lw=0.6, alpha=0.55))
        n = {k: sum(v == k for v in kinds.values()) for k in colors}
        ax.set_title(f"{title}\nunmasked {n['full']}, masked {n['masked']}, skipped {n['skip']} of {len(kinds)}",
                     fontsize=9.5)  # fmt: skip
        ax.set_xlabel(f"key position n (tiles of BLOCK_N = {BN})")
        ax.set_ylabel(f"query position m (tiles of BLOCK_M = {BM})")
        swept = [j for (pm, j), kind in kinds.items() if pm == 3 and kind != "skip"]  # the last query tile's loop
        y = 3 * BM + BM / 2
        ax.annotate("", xy=((max(swept) + 1) * BN - 6, y), xytext=(min(swept) * BN + 6, y),
                    arrowprops=dict(arrowstyle="-|>", color=RED, lw=1.5))  # fmt: skip
        ax.text(min(swept) * BN + 8, y - 8, "one program's sweep\n(online softmax)", fontsize=7.5, color=RED)
    handles = [Rectangle((0, 0), 1, 1, fc=colors[k], ec="black", alpha=0.55) for k in colors]
    handles.append(Rectangle((0, 0), 1, 1, fc="#a6a6a6"))
    fig.legend(handles, ["run without a mask", "run with the mask", "never loaded", "scores that are kept"],
               loc="lower center", ncol=4, fontsize=8.5)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save(fig, cfg, "flash_tiling.png")


def fig_packed_mask(cfg):
    ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]])  # four documents packed in one row
    T = ids.shape[1]
    mask = document_mask(ids)[0, 0].numpy()  # (T, T) bool, the function attention() uses
    positions = (torch.arange(T) - document_starts(ids))[0].tolist()  # what RoPE sees: restarts per document
    doc = ids[0].numpy()
    palette = np.array([[0.30, 0.45, 0.69], [0.87, 0.52, 0.32], [0.33, 0.66, 0.41], [0.51, 0.45, 0.70]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.9))
    causal = np.tril(np.ones((T, T), dtype=bool))
    for ax, (title, m, pos) in zip(axes, (("causal mask (one long sequence)", causal, list(range(T))),
                                          ("model.document_mask(document_ids)", mask, positions)), strict=True):  # fmt: skip
        img = np.ones((T, T, 3))
        img[m] = palette[doc][np.nonzero(m)[0]] if m is mask else 0.55
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks(range(T), [str(d) for d in doc], fontsize=7)
        ax.set_yticks(range(T), [f"{d} | {p}" for d, p in zip(doc, pos, strict=True)], fontsize=7)
        ax.hlines(np.arange(-0.5, T), -0.5, T - 0.5, color="white", lw=0.5)  # cell borders
        ax.vlines(np.arange(-0.5, T), -0.5, T - 0.5, color="white", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key: document id")
        ax.set_ylabel("query: document id | RoPE position")
    fig.suptitle(f"document_ids = {ids[0].tolist()}", fontsize=9, family="monospace")
    fig.tight_layout()
    return save(fig, cfg, "packed_mask.png")


def fig_vlm(cfg):
    image, attrs = make_scene(np.random.default_rng(3), 32)  # a real built-in scene (vlm_data.py)
    fig = plt.figure(figsize=(11, 3.6))
    ax_img = fig.add_axes((0.01, 0.22, 0.2, 0.62))
    ax_img.imshow(image, interpolation="nearest")
    for k in range(1, 4):  # the 8 x 8 patches: 16 image tokens
        ax_img.axhline(k * 8 - 0.5, color="white", lw=1)
        ax_img.axvline(k * 8 - 0.5, color="white", lw=1)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    ax_img.set_title("32x32 scene, 4x4 patches of 8x8", fontsize=8.5)
    ax = fig.add_axes((0.22, 0.0, 0.78, 1.0))
    blank(ax, (0, 10), (0, 4))
    box(ax, 0.1, 1.8, 1.7, 1.2, "VisionEncoder\nconv patchify\n+ 2 ViT blocks", LIGHT["blue"], size=8.5)
    box(ax, 2.3, 1.8, 1.6, 1.2, "Projector\nLinear-GELU\n-Linear", LIGHT["orange"], size=8.5)
    arrow(ax, -0.1, 2.4, 0.1, 2.4)
    arrow(ax, 1.8, 2.4, 2.3, 2.4, text="(16, 128)")
    arrow(ax, 3.9, 2.4, 4.5, 2.4, text="(16, C)")
    tokens = (
        ["<s>", "<|user|>"] + ["img"] * 16 + ["What", "colour", "...?", "<|end|>", "<|assistant|>", attrs["colour"]]
    )
    x = 4.45
    for t in tokens:  # the prompt as render_with_image lays it out: image slots inside the user turn
        w = 0.14 if t == "img" else 0.36
        face = LIGHT["orange"] if t == "img" else (LIGHT["green"] if t == attrs["colour"] else LIGHT["grey"])
        ax.add_patch(Rectangle((x, 1.95), w, 0.95, fc=face, ec="black", lw=0.5))
        if t != "img":
            ax.text(x + w / 2, 2.42, t, fontsize=6.5, ha="center", va="center", rotation=90)
        x += w + 0.01
    ax.text(6.0, 3.05, "16 <pad> slots get the image features (vlm.VLM._splice)", fontsize=7.5, ha="center")
    ax.text(9.5, 1.75, "answer", fontsize=7, ha="center", color=GREEN)
    box(ax, 5.3, 0.2, 3.4, 0.9, "model.Transformer (tiny LM)\nloss on the answer tokens only", LIGHT["green"], size=8.5)
    arrow(ax, 7.0, 1.95, 7.0, 1.1)
    ax.text(0.1, 3.6, f"stage 1: '<image>Describe the image.' -> '{caption_of(attrs)}', LM frozen;   "
            f"stage 2: questions -> '{attrs['colour']}', the LM trains too", fontsize=8.5, color=PURPLE)  # fmt: skip
    return save(fig, cfg, "vlm.png")


# ----------------------------------------------------------------------------- loss curves from log.jsonl


def read_log(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} from a log.jsonl; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[int(row["step"])] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def _panel(ax, log, title, right=None):
    """Training loss (line) and validation loss (dots) on the left axis; one extra metric on a right axis."""
    for key, style in (("loss", dict(color=BLUE, lw=1.2, label="train loss")),
                       ("val_loss", dict(color=ORANGE, marker="o", ms=4, label="val loss"))):  # fmt: skip
        if key in log:
            ax.plot(*log[key], **style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if right and right[0] in log:
        twin = ax.twinx()
        twin.plot(*log[right[0]], color=GREEN, marker="s", ms=3, lw=1, label=right[1])
        prefix = right[0].split("_")[0] + "/"  # per-family accuracies, e.g. vqa/colour or task_acc/easy
        prefix = "task_acc/" if right[0] == "task_acc" else prefix
        for key, color in zip(
            sorted(k for k in log if k.startswith(prefix)), (RED, PURPLE, ORANGE, GREY), strict=False
        ):
            twin.plot(*log[key], color=color, ls="--", lw=0.9, label=key.split("/")[1])
        twin.set_ylim(-0.02, 1.02)
        twin.tick_params(labelsize=8)
        more = twin.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, fontsize=7.5, loc="best")  # few points: "best" is cheap here


def fig_curves(cfg, name, panels):
    """One figure of loss panels; panels = [(log path, title, (right-axis metric, label) | None)]."""
    found = [(p, t, r) for p, t, r in panels if os.path.isfile(p)]
    missing = [p for p, _, _ in panels if not os.path.isfile(p)]
    if not found:
        print(f"skip {name}: no {', '.join(missing)} (run the demo, or pass out_dir=)")
        return None
    if missing:
        print(f"{name}: no {', '.join(missing)}; drawing the other panels")
    fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.4), squeeze=False)
    for ax, (path, title, right) in zip(axes[0], found, strict=True):
        _panel(ax, read_log(path), title, right)
    axes[0][0].set_ylabel("loss (nats per token)")
    fig.tight_layout()
    return save(fig, cfg, name)


def main(cfg: FiguresConfig) -> list[str]:
    os.makedirs(cfg.img_dir, exist_ok=True)
    out = cfg.out_dir
    figures = {
        "pipeline": fig_pipeline, "blocks": fig_blocks, "rope": fig_rope, "flash_tiling": fig_flash_tiling,
        "ddp_fsdp": fig_ddp_fsdp, "lora": fig_lora, "packed_mask": fig_packed_mask, "vlm": fig_vlm,
        "loss_curves": lambda c: fig_curves(c, "loss_curves.png", [
            (os.path.join(out, "pretrain", "log.jsonl"), "pretrain (train_pretrain.py)", None),
            (os.path.join(out, "sft", "log.jsonl"), "SFT, full fine-tuning (train_sft.py)", ("task_acc", "task accuracy")),
            (os.path.join(out, "dpo", "log.jsonl"), "DPO + NLL, rpo_alpha 1 (train_dpo.py)", ("rewards/accuracy", "reward accuracy")),
        ]),
        "vlm_curves": lambda c: fig_curves(c, "vlm_curves.png", [
            (os.path.join(out, "vlm", "stage1", "log.jsonl"), "VLM stage 1: captions", ("caption_acc", "caption acc")),
            (os.path.join(out, "vlm", "log.jsonl"), "VLM stage 2: questions", ("vqa_acc", "VQA accuracy")),
        ]),
    }  # fmt: skip
    names = [n.strip() for n in cfg.only.split(",") if n.strip()] or list(figures)
    unknown = [n for n in names if n not in figures]
    if unknown:
        raise UserError(f"only: unknown figure(s) {unknown}; known: {list(figures)}")
    return [path for path in (figures[n](cfg) for n in names) if path]


if __name__ == "__main__":
    run_cli(main, FiguresConfig, __doc__)
