"""Pretraining recipes side by side: the old CPU demo recipe against configs/pretrain_tiny.yaml as it is now.

    python benchmarks/bench_recipe.py                    # both recipes at once, one thread each, ~10 min on 2 cores
    python benchmarks/bench_recipe.py --candidate configs/pretrain_tiny.yaml lr=4e-3   # try other settings

The baseline is the demo's recipe before issue 19: AdamW (lr 3e-3, cosine to 3e-4, 20 warmup steps), 300 steps
of 16 x 256 tokens, written below as key=value overrides on the same YAML so that the comparison survives later
edits of the YAML. The candidate is the YAML as it stands (Muon on the hidden matrices, see muon.py).

Both trainings run at the same time, each in its own process with OMP_NUM_THREADS=1 on this machine's cores:
whatever else the machine is doing slows both alike, so the ratio of their wall times is fair even when the
absolute times are not. (The demo itself runs one training with 2 threads; per-step cost ratios carry over.)
Each finished model is then scored by eval.py on the whole val split at the model's full context (1024), as the
README's results table does: val loss (nats/token) and bits per byte (total nats / ln 2 / UTF-8 bytes of the
val text), the same measure for both. Both recipes train at seq_len 256, so 3/4 of each 1024-token window asks
the model about positions it never trained at (RoPE past its training length: the loss climbs with position).
The last column scores the same models in 256-token windows (`eval.py seq_len=256`), the context they trained
at. The bits/byte goal of issue 19 was set on the 1024-token measure.
Prints one table row per recipe; nothing is asserted.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = "configs/pretrain_tiny.yaml"
# The recipe of configs/pretrain_tiny.yaml before issue 19 (eval.py: val loss 3.7587, 1.78 bits/byte).
BASELINE = ["optimizer=adamw", "steps=300", "batch_size=16", "micro_batch_size=16", "seq_len=256", "lr=3e-3",
            "min_lr=3e-4", "warmup_steps=20", "schedule=cosine", "weight_decay=0.1", "grad_clip=1.0"]  # fmt: skip
# The same side work for both: one final eval of 10 batches, no samples, one save at the end.
QUIET = ["progress=false", "sample_every=0", "eval_every=0", "eval_batches=10", "save_every=100000",
         "resume=never", "overwrite=true"]  # fmt: skip


def start(name: str, overrides: list[str], out: str, threads: int) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "train_pretrain.py", YAML, *QUIET, *overrides, f"out_dir={out}/{name}"]
    log = open(os.path.join(out, f"{name}.txt"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def score(checkpoint: str, threads: int, seq_len: int = 0) -> dict:
    """eval.py's language-model metrics on the whole val split (last stdout line is its JSON); seq_len 0 = the
    model's full context."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "eval.py",
        f"checkpoint={checkpoint}",
        "data=data/builtin",
        "tasks=",
        "choices=",
        "device=cpu",
        f"seq_len={seq_len}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidate", nargs="*", default=[], help="key=value overrides for the candidate recipe")
    ap.add_argument("--threads", type=int, default=1, help="threads per training (both run at once)")
    ap.add_argument("--out", default="", help="where the two runs go (default: a temporary directory)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_recipe_")
    os.makedirs(out, exist_ok=True)
    recipes = {"baseline (AdamW, old yaml)": BASELINE, f"candidate ({YAML})": args.candidate}
    print(f"{len(recipes)} trainings at once, OMP_NUM_THREADS={args.threads} each, {os.cpu_count()} cores; in {out}")
    runs = {name: start(f"run{i}", overrides, out, args.threads) for i, (name, overrides) in enumerate(recipes.items())}
    seconds = {}
    while len(seconds) < len(runs):  # poll, so each run's own finishing time is known
        for name, (proc, t0) in runs.items():
            if name not in seconds and proc.poll() is not None:
                if proc.returncode != 0:
                    sys.exit(f"{name} failed (exit {proc.returncode}); see {out}")
                seconds[name] = time.perf_counter() - t0
        time.sleep(0.5)
    rows = []
    for i, name in enumerate(recipes):
        with open(os.path.join(out, f"run{i}", "train_config.json")) as fh:
            trained = json.load(fh)
        full = score(os.path.join(out, f"run{i}"), 2 * args.threads)  # alone now: both threads
        short = score(os.path.join(out, f"run{i}"), 2 * args.threads, trained["seq_len"])
        rows.append((name, trained["steps"], seconds[name], full["val_loss"], full["val_bpb"], short["val_bpb"]))
    print(
        f"\n| recipe | steps | s/step | wall s | wall ratio | val loss | bits/byte | bits/byte, trained context |\n|{'---|' * 8}"
    )
    for name, steps, secs, loss, bpb, bpb_short in rows:
        print(
            f"| {name} | {steps} | {secs / steps:.2f} | {secs:.0f} | {secs / rows[0][2]:.2f} | {loss:.4f} | {bpb:.3f} "
            f"| {bpb_short:.3f} |"
        )
    print("(eval.py on the whole val split, full context, then in windows of the trained seq_len; wall time includes")
    print(" start-up and the final save)")


if __name__ == "__main__":
    main()
