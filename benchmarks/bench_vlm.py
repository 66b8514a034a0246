"""The vision tower's speed on CPU, and held-out VQA accuracy against training steps.

1. Encoder images/s (forward, and forward + backward), interleaved medians over repeats:
     ours-sdpa  - vlm.VisionEncoder, attention through SDPA (the default on CPU)
     ours-naive - the same weights, attention written out (the readable reference path)
     hf-vit     - transformers' ViTModel of the same width, depth, heads and patch size (LayerNorm + GELU MLP,
                  a CLS token; its MLP width is set so both towers have about the same parameter count)
   Ratios > 1 mean ours is faster than the named reference. Printed twice: wall-clock images/s, and images
   per CPU-second of this process (steadier when other jobs share the cores).
2. VQA accuracy vs steps: train_vlm.py runs on the built-in shapes with held-out accuracy logged every
   --eval-every steps of stage 2 (greedy exact match, vlm.vqa_accuracy), three ways: the config's recipe;
   the same without stage 0 (a random tower trained in stages 1 and 2, and 200 stage-2 steps: the recipe before
   stage 0 existed, in about the same wall time); and stage 2 alone (no alignment), so the table shows what the
   pretrained tower and alignment each buy. Each run's wall time is printed under its rows.
   Chance per family: colour 1/4, shape 1/3, count 1/3, position 1/4.

Run:  python benchmarks/bench_vlm.py [--repeats 7] [--batch 64] [--threads 2]
      [--config configs/vlm_tiny.yaml] [--skip-training] [key=value ... passed to train_vlm.py]
      python benchmarks/bench_vlm.py --micro     # a 2x64 LM and a small tower: the curve in about a minute
Numbers are never asserted; they go in the report.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_vlm  # noqa: E402
import vlm  # noqa: E402
from config import parse_args  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier number."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def hf_vit(c: vlm.VisionConfig):
    """transformers' ViT with our tower's shape, or None when transformers is not installed."""
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError:
        return None
    # SwiGLU has 3 matrices of width F, a GELU MLP 2: give ViT 1.5 F so the parameter counts match.
    hc = ViTConfig(image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
                   hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                   num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size * 3 // 2,
                   attn_implementation="sdpa")  # fmt: skip
    return ViTModel(hc, add_pooling_layer=False)


def bench_encoder(c: vlm.VisionConfig, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    models = {"ours-sdpa": vlm.VisionEncoder(c)}
    naive = vlm.VisionEncoder(vlm.VisionConfig(**{**c.__dict__, "attn_impl": "naive"}))
    naive.load_state_dict(models["ours-sdpa"].state_dict())
    models["ours-naive"] = naive
    hf = hf_vit(c)
    if hf is not None:
        models["hf-vit"] = hf
    pixels = torch.randn(batch, c.num_channels, c.image_size, c.image_size)

    def forward(m):
        with torch.no_grad():
            return m(pixels) if isinstance(m, vlm.VisionEncoder) else m(pixel_values=pixels).last_hidden_state

    def train(m):
        out = m(pixels) if isinstance(m, vlm.VisionEncoder) else m(pixel_values=pixels).last_hidden_state
        out.square().mean().backward()
        m.zero_grad(set_to_none=True)

    print(f"encoder: {c.image_size}x{c.image_size} images, {c.num_patches} patches, {c.num_hidden_layers} x "
          f"{c.hidden_size} wide, batch {batch}, {torch.get_num_threads()} threads")  # fmt: skip
    for name, m in models.items():
        print(f"  {name:<11} {sum(p.numel() for p in m.parameters()) / 1e6:.3f}M parameters")
    for label, fn in (("forward", forward), ("fwd+bwd", train)):
        times = {name: [] for name in models}
        for m in models.values():  # warm-up
            fn(m)
        for _ in range(repeats):
            for name, m in models.items():  # interleaved: machine noise hits every model alike
                times[name].append(timed(lambda m=m, fn=fn: fn(m)))
        for clock, i in (("wall", 0), ("cpu", 1)):
            med = {name: statistics.median(t[i] for t in ts) for name, ts in times.items()}
            line = "  ".join(f"{name} {batch / t:7.0f}" for name, t in med.items())
            ratios = "  ".join(f"vs {n} {med[n] / med['ours-sdpa']:.2f}x" for n in med if n != "ours-sdpa")
            unit = "img/s" if clock == "wall" else "img per CPU-s"
            print(f"  {label:<8} {clock:<4} {line}  {unit}   (ours-sdpa {ratios})")


def accuracy_curve(argv: list[str], out_dir: str) -> dict[int, dict]:
    """Run train_vlm with these arguments; {stage-2 step: {"vqa_acc": ..., "vqa/colour": ...}}."""
    cfg = parse_args(train_vlm.VLMTrainConfig, argv + [f"out_dir={out_dir}", "progress=false", "resume=never"])
    t0 = time.perf_counter()
    train_vlm.main(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    curve = {r["step"]: r for r in rows if "vqa_acc" in r}
    curve["seconds"] = time.perf_counter() - t0
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vlm_tiny.yaml"))
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--micro", action="store_true", help="a 2x64 LM and a 1x64 tower: a quick curve")
    ap.add_argument("--skip-training", action="store_true")
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)

    base = [args.config, f"eval_every={args.eval_every}", *overrides]
    if args.micro:
        base += [f"lm_model={os.path.join(ROOT, 'tests', 'fixtures', 'model_micro.yaml')}", "vision.hidden_size=64",
                 "vision.intermediate_size=176", "vision.num_hidden_layers=1", "n_test=100"]  # fmt: skip
    vision = parse_args(train_vlm.VLMTrainConfig, base).vision
    bench_encoder(vision, args.batch, args.repeats)
    if args.skip_training:
        return

    with tempfile.TemporaryDirectory() as tmp:
        no_stage0 = ["stage0_steps=0", "stage1_train_vision=true", "steps=200"]
        curves = {
            "recipe": accuracy_curve(base + ["stage=both"], os.path.join(tmp, "both")),
            "no stage 0": accuracy_curve(base + ["stage=both", *no_stage0], os.path.join(tmp, "no0")),
            "stage 2 only": accuracy_curve(base + ["stage=2"], os.path.join(tmp, "only2")),
        }
    steps = sorted({s for c in curves.values() for s in c if isinstance(s, int)})
    families = sorted({k for c in curves.values() for r in c.values() if isinstance(r, dict) for k in r if "/" in k})
    print("\nheld-out VQA accuracy vs stage-2 steps (greedy exact match)")
    print(f"  {'run':<13} {'step':>5} {'all':>6} " + " ".join(f"{f.split('/')[1]:>9}" for f in families))
    for name, curve in curves.items():
        for s in steps:
            if s in curve:
                r = curve[s]
                print(f"  {name:<13} {s:>5} {r['vqa_acc']:6.3f} " + " ".join(f"{r.get(f, 0):9.3f}" for f in families))
        print(f"  {name:<13} wall time {curve['seconds']:.0f} s (every stage it ran)")


if __name__ == "__main__":
    main()
