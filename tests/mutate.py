"""Mutation check: does the test suite catch realistic bugs? Each mutant is one small edit a person could plausibly
make (a boundary, a missing factor, a dropped term, a wrong order); the suite should fail on every one of them.

    python tests/mutate.py                    # every mutant, then a table and a score
    python tests/mutate.py top_p_tie ddp_sum  # only these
    python tests/mutate.py --list             # names and what each breaks
    make mutate

For each mutant the repository (the files git tracks plus untracked ones it does not ignore) is copied to a fresh
temporary directory, the edit is applied there (its `old` text must occur exactly once, so a mutant that no longer
applies is reported, not silently skipped), and the test selection named for it runs with `pytest -x` under a
timeout. The working tree is never modified. caught = the tests failed; missed = they passed; a timeout counts as
caught but is marked, since a hang is a bug of its own. Before the mutants, each distinct test selection runs once
on an unmutated copy: a selection that fails there would make every verdict meaningless, so the run stops.

Not collected by pytest (no test_ prefix) and not part of `make test`: it takes ~15-25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420  # seconds per pytest run


@dataclass
class Mutant:
    name: str
    file: str  # path relative to the repository root
    old: str  # text that must occur exactly once in the file
    new: str  # what it becomes
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    bug: str  # what a person would have broken


GEN, SAMPLE = "tests/test_generation.py", "tests/test_sample.py"
MUTANTS = [
    # ---- sampling ----
    Mutant("top_p_tie", "generation.py", "drop_sorted = before >= p", "drop_sorted = before > p", (GEN, "-k", "top_p"),
           "top-p keeps the token whose preceding mass equals p exactly"),
    Mutant("generate_ignores_top_p", "generation.py", "nxt = sample_next(logits, temperature, top_k, top_p, generator)",
           "nxt = sample_next(logits, temperature, top_k, 1.0, generator)", (GEN,), "generate() drops its top_p"),
    Mutant("top_p_before_temperature", "generation.py",
           "logits = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)",
           "logits = filter_top_p(filter_top_k(logits.float(), top_k), top_p) / temperature", (GEN,),
           "the nucleus is taken on the untempered distribution"),
    Mutant("repetition_penalty_inverted", "generation.py", "logits > 0, logits / penalty, logits * penalty",
           "logits > 0, logits * penalty, logits / penalty", (GEN, "-k", "repetition"),
           "the penalty boosts seen tokens"),
    Mutant("penalty_ignores_generated", "generation.py", "seen[torch.arange(B, device=device), nxt] = True",
           "seen = seen", (GEN, "-k", "repetition"), "generated tokens never count as seen"),
    Mutant("stop_ids_ignored", "generation.py", "if tok in stop_ids:", "if tok in stop_ids and t < 0:",
           (GEN, "-k", "stop"), "generation runs through a stop id"),
    # ---- MoE and the pretraining loop ----
    Mutant("moe_aux_not_in_backward", "train_pretrain.py", "run.scaler.scale((loss + aux) / run.accum).backward()",
           "run.scaler.scale(loss / run.accum).backward()", ("tests/test_moe_training.py", "-k", "one_rank"),
           "the pretraining loop drops the MoE auxiliary loss from backward"),
    Mutant("moe_counts_not_all_reduced", "train_common.py", "torch.distributed.all_reduce(module.load_counts)",
           "pass", ("tests/test_moe_training.py", "-k", "two_ranks"),
           "each rank updates the expert bias from its own loads"),
    Mutant("ddp_broadcasts_load_counts", "distributed.py", "self._broadcast_from_rank0(state_buffers(self.module))",
           "self._broadcast_from_rank0(list(self.module.buffers()))", ("tests/test_moe_training.py", "-k", "two_ranks"),
           "DDP overwrites rank 1's MoE load counts with rank 0's at every forward (the bug fixed with issue 17)"),
    Mutant("moe_bias_sign_flipped", "moe.py", "torch.sign(self.load_counts.mean() - self.load_counts)",
           "torch.sign(self.load_counts - self.load_counts.mean())", ("tests/test_moe_training.py", "-k", "one_rank"),
           "the bias favours the busiest experts"),
    Mutant("moe_bf16_routed_dropped", "moe.py", "out = out + self.shared_experts(x)",
           "out = (out if x.dtype == torch.float32 else 0 * out) + self.shared_experts(x)",
           ("tests/test_moe.py", "-k", "bf16"), "in bf16 only the shared expert's output survives"),
    # ---- distributed ----
    Mutant("ddp_sum_not_mean", "distributed.py", "nb.buffer.div_(self.world_size)", "nb.buffer.div_(1)",
           ("tests/test_grad_parity.py",), "DDP sums gradients instead of averaging them"),
    Mutant("fsdp_reduce_scatter_no_mean", "fsdp.py", "g = grad_full.to(torch.float32) / self.world",
           "g = grad_full.to(torch.float32)", ("tests/test_grad_parity.py",), "FSDP's reduce-scatter misses 1/world"),
    Mutant("fsdp_clip_local_norm", "fsdp.py", "        dist.all_reduce(sq)\n", "",
           ("tests/test_distributed.py", "-k", "fsdp_matches"), "FSDP clips by this rank's shard norm only"),
    # ---- losses and optimizer ----
    Mutant("dpo_beta_dropped", "train_dpo.py",
           "losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)",
           "losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)",
           ("tests/test_train_dpo.py", "-k", "known_values or gradients"), "DPO's sigmoid loss forgets beta"),
    Mutant("dpo_reference_ignored", "train_dpo.py", "chosen_ratio = policy_chosen_logps - ref_chosen_logps",
           "chosen_ratio = policy_chosen_logps", ("tests/test_train_dpo.py", "-k", "known_values or gradients"),
           "the chosen answer's reference log-prob is not subtracted"),
    Mutant("lora_scaling_alpha", "lora.py", "alpha / math.sqrt(r) if use_rslora else alpha / r",
           "alpha / math.sqrt(r) if use_rslora else alpha", ("tests/test_lora.py", "-k", "formula or peft"),
           "LoRA scales by alpha instead of alpha / r"),
    Mutant("decay_on_norms", "train_common.py", '(decay if getattr(p, "decay", p.dim() >= 2) else no_decay).append(p)',
           "decay.append(p)", ("tests/test_train_sft.py", "-k", "hand_written"),
           "weight decay on norm gains too (caught by the rewritten full fine-tuning test)"),
    Mutant("warmup_off_by_one", "train_common.py", "return cfg.lr * (step + 1) / cfg.warmup_steps",
           "return cfg.lr * step / cfg.warmup_steps", ("tests/test_train_sft.py", "-k", "hand_written"),
           "the first step runs at lr 0"),
    Mutant("sft_mean_per_micro_batch", "train_sft.py",
           'loss = step_model(x, y, loss_reduction="sum", document_ids=doc) / denom',
           "loss = step_model(x, y, document_ids=doc) / run.accum", ("tests/test_train_sft.py", "-k", "hand_written"),
           "SFT averages per micro-batch instead of per assistant token of the step"),
    # ---- checkpoints ----
    Mutant("rng_not_restored", "checkpoint.py", "set_rng_state(load_file(rng_path), json.load(fh))",
           "json.load(fh)", ("tests/test_train_sft.py", "-k", "exact_resume"),
           "resume continues with a fresh RNG (dropout masks differ)"),
    Mutant("data_position_not_restored", "train_common.py", 'data.load_state_dict(state["data"])', "pass",
           ("tests/test_train_pretrain.py", "-k", "exact_resume"), "resume re-reads the data from the start"),
    # ---- eval, presets, recipes ----
    Mutant("eval_acc_norm_per_token", "eval.py", "int(np.argmax(logp / n_bytes))", "int(np.argmax(logp / n_tokens))",
           ("tests/test_eval.py", "-k", "cli_metrics"), "acc_norm divides by tokens, not bytes"),
    Mutant("num_parameters_counts_tied_twice", "model.py", "n = sum(p.numel() for p in self.parameters())",
           "n = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))", ("tests/test_recipes.py", "-k", "preset"),
           "a tied embedding is counted twice"),
    Mutant("recipe_preset_typo", "configs/pretrain_0.5B.yaml", "model: 0.5B", "model: 0.5b",
           ("tests/test_recipes.py", "-k", "parses"), "a recipe names a preset that does not exist"),
]  # fmt: skip


def copy_repo(dest: str) -> None:
    """The files git tracks plus untracked ones it does not ignore, copied under dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def apply(m: Mutant, root: str) -> None:
    path = os.path.join(root, m.file)
    with open(path) as fh:
        text = fh.read()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}, not once")
    with open(path, "w") as fh:
        fh.write(text.replace(m.old, m.new))


def run_tests(root: str, tests: tuple[str, ...]) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, the last lines of the output) of pytest -x on a selection."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return ("pass" if proc.returncode == 0 else "fail"), time.perf_counter() - t0, tail


def in_scratch_copy(fn):
    with tempfile.TemporaryDirectory(prefix="mutate_") as tmp:
        copy_repo(tmp)
        return fn(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.file:28} {m.bug}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"error: unknown mutant(s) {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]

    if not args.no_baseline:
        for tests in dict.fromkeys(m.tests for m in chosen):  # each distinct selection once, in order
            status, seconds, tail = in_scratch_copy(lambda root, tests=tests: run_tests(root, tests))
            print(f"baseline {' '.join(tests)}: {status} ({seconds:.0f} s)", flush=True)
            if status != "pass":
                print(f"error: the unmutated tests do not pass, verdicts would mean nothing\n{tail}", file=sys.stderr)
                return 1

    rows = []
    for m in chosen:

        def one(root, m=m):
            apply(m, root)
            return run_tests(root, m.tests)

        status, seconds, _ = in_scratch_copy(one)
        verdict = {"fail": "caught", "pass": "MISSED", "timeout": "caught (timeout: a hang)"}[status]
        rows.append((m, verdict, seconds))
        print(f"{m.name:34} {verdict:24} {seconds:5.0f} s  {' '.join(m.tests)}", flush=True)

    caught = sum(v.startswith("caught") for _, v, _ in rows)
    print("\n| mutant | file | bug | tests | verdict |\n|---|---|---|---|---|")
    for m, verdict, _ in rows:
        print(f"| {m.name} | {m.file} | {m.bug} | `{' '.join(m.tests)}` | {verdict} |")
    print(f"\nscore: {caught}/{len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
