"""The demo's numbers in one committed file, docs/results/demo.json, so that the README and the chapters quote a file.

    make demo && make results                            # run the pipeline, then collect its numbers
    python docs/make_results.py                          # the same as `make results` (reads out/ and data/builtin/)
    python docs/make_results.py out_dir=/path/to/out     # another run's out/ directory

Every number the README and the chapters quote from the demo carries an invisible marker naming the key it
comes from, `4.17<!-- result: demo pretrain.val_loss -->` (demo = docs/results/demo.json), and a fenced eval table
is preceded by `<!-- results table: demo eval -->`. tests/test_results.py reads this file and checks that
each shown number is the value rounded to the digits shown, and that each table is what eval.py would print.
So when a rerun changes the numbers, `make results` rewrites this file and the test names every stale quote.

Where each part comes from (nothing is measured here; the file only gathers what the runs wrote):
  data      DATA_DIR/meta.json (prepare_data.py): documents read, removed, kept; tokens; bytes per token
  pretrain  OUT/pretrain/log.jsonl: the first and the last logged val loss and bits per byte (the training loop's
            own estimate on 256-token rows; eval.py's numbers below use the full context and differ)
  sft, dpo  OUT/sft/log.jsonl, OUT/dpo/log.jsonl: task accuracy before (step 0) and after, DPO reward accuracy and
            margin at the first logged step and as the mean of the last 10 logged steps; seconds = wall time
            from the previous stage's DONE marker to this one's (meaningful for one uninterrupted `make demo`)
  eval      OUT/eval.json (eval.py compare=... save=..., written by `make eval`), one entry per stage, as printed

Keys are looked up with dots (eval.sft.task_acc); a key with a slash, like task_acc/easy, is one key.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass

# docs/ sits one floor below the repo root, whose config loader this script uses.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import UserError, run_cli  # noqa: E402


@dataclass
class ResultsConfig:
    out_dir: str = "out"  # the demo's run directory: pretrain/, sft/, dpo/ with log.jsonl and DONE, and eval.json
    data_dir: str = "data/builtin"  # the prepared data directory the demo trained on (its meta.json)
    path: str = "docs/results/demo.json"  # the file written (committed: the README and chapters quote it)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"no file at {path}: run `make demo` first (eval.json: `make eval`)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"no file at {path}: run `make demo` first")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _with(rows: list[dict], key: str) -> list[dict]:
    """The log rows that hold a metric, in step order; a step logged twice (a resumed run) keeps its last row."""
    by_step = {r["step"]: r for r in rows if key in r}
    return [by_step[s] for s in sorted(by_step)]


def data_numbers(meta: dict) -> dict:
    removed, splits = meta["removed"], meta["splits"]
    text_bytes = splits["train"]["text_bytes"] + splits["val"]["text_bytes"]
    return {
        "docs_read": removed["read"],
        "docs_kept": removed["kept"],
        "removed_empty": removed["empty"],
        "removed_too_short": removed["too_short"],
        "removed_non_text": removed["non_text"],
        "removed_duplicate": removed["duplicate"],
        "train_docs": splits["train"]["docs"],
        "val_docs": splits["val"]["docs"],
        "text_mb": text_bytes / 1e6,  # MB = 10^6 bytes, as the README writes it
        "train_text_mb": splits["train"]["text_bytes"] / 1e6,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "bytes_per_token": meta["bytes_per_token"],
        "vocab_size": meta["vocab_size"],
    }


def pretrain_numbers(rows: list[dict], config: dict) -> dict:
    val = _with(rows, "val_loss")
    first, last = val[0], val[-1]
    return {
        "steps": config["steps"],
        "tokens_per_step": config["batch_size"] * config["seq_len"],
        "first_val_step": first["step"],
        "first_val_loss": first["val_loss"],
        "first_val_bpb": first["val_bpb"],
        "val_loss": last["val_loss"],
        "val_bpb": last["val_bpb"],
    }


def task_numbers(rows: list[dict]) -> dict:
    """Task accuracy before (the first logged row) and after (the last), overall and per family."""
    acc = _with(rows, "task_acc")
    before, after = acc[0], acc[-1]
    out = {"task_acc_before": before["task_acc"]}
    out |= {k: v for k, v in after.items() if k.startswith("task_acc")}
    return out


def dpo_numbers(rows: list[dict]) -> dict:
    reward = _with(rows, "rewards/accuracy")
    last10 = reward[-10:]
    return {
        "reward_accuracy_first": reward[0]["rewards/accuracy"],
        "reward_accuracy_last10": statistics.mean(r["rewards/accuracy"] for r in last10),
        "margin_first": reward[0]["rewards/margin"],
        "margin_last10": statistics.mean(r["rewards/margin"] for r in last10),
    }


def stage_name(checkpoint: str) -> str:
    """out/sft -> sft: the stage a compare= column belongs to (eval.plot_summary names bars the same way)."""
    return os.path.basename(checkpoint.rstrip("/").removesuffix("/merged")) or checkpoint


def collect(out_dir: str, data_dir: str) -> dict:
    """Everything the README and chapters quote from one demo run, as one JSON-ready dict."""
    done = {s: _read_json(os.path.join(out_dir, s, "DONE")) for s in ("pretrain", "sft", "dpo")}
    config = _read_json(os.path.join(out_dir, "pretrain", "train_config.json"))
    sft_log = _log(os.path.join(out_dir, "sft", "log.jsonl"))
    dpo_log = _log(os.path.join(out_dir, "dpo", "log.jsonl"))
    evaluated = _read_json(os.path.join(out_dir, "eval.json"))
    if "compare" not in evaluated:
        raise UserError(f"{out_dir}/eval.json holds one checkpoint; make eval writes compare=... results")
    return {
        "made_by": "python docs/make_results.py (make results), from out/ and data/builtin/ of one make demo run",
        "data": data_numbers(_read_json(os.path.join(data_dir, "meta.json"))),
        "pretrain": pretrain_numbers(_log(os.path.join(out_dir, "pretrain", "log.jsonl")), config),
        "sft": task_numbers(sft_log) | {"seconds": done["sft"]["time"] - done["pretrain"]["time"]},
        "dpo": task_numbers(dpo_log) | dpo_numbers(dpo_log) | {"seconds": done["dpo"]["time"] - done["sft"]["time"]},
        "eval": {stage_name(r["checkpoint"]): r for r in evaluated["compare"]},
    }


def main(cfg: ResultsConfig) -> dict:
    results = collect(cfg.out_dir, cfg.data_dir)
    os.makedirs(os.path.dirname(cfg.path) or ".", exist_ok=True)
    with open(cfg.path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
        fh.write("\n")
    print(f"wrote {cfg.path}: python -m pytest -q tests/test_results.py now checks the quoted numbers against it")
    return results


if __name__ == "__main__":
    run_cli(main, ResultsConfig, __doc__, show_config=False)
