"""The whole pipeline in miniature: prepare_data -> train_pretrain -> train_sft -> train_dpo -> eval.py compare.

Each stage must improve the number it exists for, measured by the code users run:
- pretraining lowers validation loss and bits per byte against the same model untrained;
- SFT raises held-out exact-match accuracy on the built-in tasks above the pretrained base's;
- DPO raises reward accuracy and margin above its start (both exactly 0 at step 1, when the policy
  IS the reference) and does not lower held-out task accuracy below the SFT model's;
- `eval.py compare=` reports all three checkpoints in the JSON on its last stdout line.

Setting: the micro model (tests/fixtures/model_micro.yaml, 2 layers x 64) on the synthetic corpus
prepared by the `tiny_data_dir` fixture (prepare_data.py with a 512-token tokenizer and the built-in
tasks), the "easy" task family. Training runs in-process (parse_args + main, as a script would);
eval.py runs as a real process because its contract is what it prints.
"""

import json
import os
import subprocess
import sys

import torch
from conftest import MICRO_MODEL, ROOT

import eval as evaluation
import train_dpo
import train_pretrain
import train_sft
from config import load_yaml, parse_args
from model import ModelConfig, Transformer
from tasks import load_jsonl

SEED = 0  # seeds 0, 1, 2 measured: see the thresholds below


def args(**kw):
    return [f"{k}={v}" for k, v in kw.items()]


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_pipeline_each_stage_improves_its_metric(tiny_data_dir, tmp_path):
    data = tiny_data_dir
    common = dict(device="cpu", progress=False, seed=SEED, log_every=10)

    # ---- untrained: the same micro model at initialization, saved like a checkpoint ----
    untrained = str(tmp_path / "untrained")
    torch.manual_seed(SEED)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL)))
    model.init_weights()
    model.save_pretrained(untrained, tokenizer_dir=data)

    # ---- pretraining ----
    pre = str(tmp_path / "pretrain")
    train_pretrain.main(parse_args(train_pretrain.PretrainConfig, args(
        data_dir=data, out_dir=pre, model=MICRO_MODEL, steps=150, batch_size=8, micro_batch_size=8, seq_len=64,
        lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=0, eval_batches=2, save_every=1000, **common)))  # fmt: skip

    # ---- SFT: full fine-tuning on the easy family ----
    sft = str(tmp_path / "sft")
    train_sft.main(parse_args(train_sft.SFTConfig, args(
        base=pre, out_dir=sft, data=f"{data}/sft_train.jsonl", val_data="", eval_tasks=f"{data}/test.jsonl",
        eval_tasks_n=100, families="[easy]", finetune="full", steps=120, batch_size=32, micro_batch_size=32,
        seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=0, eval_at_start=True, save_every=1000,
        **common)))  # fmt: skip

    # ---- DPO: all-linear LoRA from the SFT model on the easy pairs, with the RPO term that keeps answers
    # likely on a tiny model; beta 0.5 because one- or two-token answers give small log-ratios ----
    dpo = str(tmp_path / "dpo")
    pairs = [r for r in load_jsonl(f"{data}/dpo_train.jsonl", {"prompt": str}) if r["family"] == "easy"]
    (tmp_path / "dpo_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    train_dpo.main(parse_args(train_dpo.DPOConfig, args(
        base=sft, out_dir=dpo, data=tmp_path / "dpo_easy.jsonl", eval_tasks="", max_examples=64, steps=60, beta=0.5,
        batch_size=32, micro_batch_size=16, seq_len=64, lr=3e-3, min_lr=1e-4, warmup_steps=3, rpo_alpha=1.0,
        lora_targets="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", eval_every=0, save_every=1000,
        **{**common, "log_every": 1})))  # fmt: skip

    # ---- eval.py compare, as a user runs it ----
    easy = tmp_path / "easy_test.jsonl"  # the held-out rows of the family SFT and DPO trained on
    rows = [r for r in load_jsonl(f"{data}/test.jsonl", {"prompt": str, "answer": str}) if r["family"] == "easy"]
    easy.write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    checkpoints = [untrained, pre, sft, f"{dpo}/merged"]
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"compare={','.join(checkpoints)}", f"data={data}",
           f"tasks={easy}", "choices=", "seq_len=64", "max_new_tokens=16", "device=cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["compare"]
    assert [r["checkpoint"] for r in results] == checkpoints
    m_init, m_pre, m_sft, m_dpo = results
    print(evaluation.format_table(results))

    # Pretraining: the untrained model is near ln(512) = 6.2 nats/token; the trained one far below.
    assert m_pre["val_loss"] < m_init["val_loss"] - 2.0, (m_init["val_loss"], m_pre["val_loss"])
    assert m_pre["val_bpb"] < 0.6 * m_init["val_bpb"]
    # SFT: greedy exact match on held-out easy tasks rises well above the base's.
    assert m_sft["task_acc"] >= m_pre["task_acc"] + 0.2, (m_pre["task_acc"], m_sft["task_acc"])
    accs = [r["task_acc"] for r in log_rows(sft) if "task_acc" in r]
    assert accs[-1] >= accs[0] + 0.2  # the same story in the SFT run's own log (step 0 vs the end)
    # DPO: preferences learned (from exactly 0 at the first step), task accuracy kept.
    train = [r for r in log_rows(dpo) if "rewards/accuracy" in r]
    assert train[0]["rewards/accuracy"] == 0.0 and train[0]["rewards/margin"] == 0.0
    last = train[-10:]
    # Measured over seeds 0-2 (last 10 steps, 32 pairs each): reward accuracy 0.70-0.80 (chance 0.5),
    # margin 0.17-0.30.
    assert sum(r["rewards/accuracy"] for r in last) / 10 > 0.6
    assert sum(r["rewards/margin"] for r in last) / 10 > 0.1
    # Not below SFT's, up to 3 of 100 answers: greedy decoding flips borderline answers either way
    # (measured DPO - SFT: +0.02, -0.01, -0.01 for seeds 0-2).
    assert m_dpo["task_acc"] >= m_sft["task_acc"] - 0.03, (m_sft["task_acc"], m_dpo["task_acc"])
