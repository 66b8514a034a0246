"""Fault suite: user mistakes across the scripts, and kill -9 at random moments during training.

ARCHITECTURE.md contract 1, taken literally, for every script a user runs: a bad input stops the
run with a non-zero exit and exactly one line on stderr that names the key, file or line at fault,
with no traceback, and nothing that already exists is changed (every file under the fixture's
directories is hashed before and after). Each case is a real `python SCRIPT.py ...` process,
because "no traceback" and "one line" are properties of the process, not of a function.

Some inputs are not mistakes and must be handled rather than refused: a stray byte that is not
UTF-8 in a plain-text corpus is replaced (U+FFFD) and counted, and a 10 MB single-line document is
filtered as too long, in bounded memory, by prepare_data.py.

The kill test sends SIGKILL (no handler can run) to train_pretrain.py at seeded random moments,
some of them while a checkpoint is being written, then reruns with resume=auto until the run
finishes: the final weights and every logged loss must equal an uninterrupted run's bit for bit.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MICRO_MODEL, ROOT, synthetic_corpus

from config import load_yaml
from model import ModelConfig, Transformer


def run_script(script, argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def tree_hash(*roots) -> dict[str, str]:
    """{path: sha256} of every file under the roots: the "nothing existing was touched" check."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- the world the cases break


@pytest.fixture(scope="module")
def world(tiny_data_dir, tmp_path_factory):
    """Checkpoints, data and files, good and broken, plus an existing finished-looking out_dir."""
    root = tmp_path_factory.mktemp("faults")
    w = {"root": str(root), "data": tiny_data_dir}
    torch.manual_seed(0)
    micro = load_yaml(MICRO_MODEL)
    base = Transformer(ModelConfig(**micro))
    base.init_weights()
    w["base"] = str(root / "base")
    base.save_pretrained(w["base"], tokenizer_dir=tiny_data_dir)
    small = Transformer(ModelConfig(**{**micro, "vocab_size": 256}))  # smaller than the 512-token tokenizer
    small.init_weights()
    w["small_vocab"] = str(root / "small_vocab")
    small.save_pretrained(w["small_vocab"], tokenizer_dir=tiny_data_dir)
    w["trunc_model"] = str(root / "trunc_model")
    shutil.copytree(w["base"], w["trunc_model"])
    weights = os.path.join(w["trunc_model"], "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    w["trunc_data"] = str(root / "trunc_data")
    shutil.copytree(tiny_data_dir, w["trunc_data"])
    shard = os.path.join(w["trunc_data"], "train_000.bin")
    os.truncate(shard, os.path.getsize(shard) - 100)
    # An out_dir that holds a previous run's results: failing runs pointed at it must leave it as it is.
    w["prev"] = str(root / "prev_run")
    shutil.copytree(w["base"], w["prev"])
    (root / "prev_run" / "log.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (root / "prev_run" / "train_config.json").write_text("{}\n")
    (root / "empty_corpus").mkdir()
    (root / "empty_corpus" / "a.txt").write_text("")
    (root / "empty_corpus" / "b.txt").write_text("   \n\n")
    (root / "bad.yaml").write_text("steps: [1, 2\nlr: 3e-4\n")
    (root / "wrong_type.yaml").write_text("beta: high\n")

    good = json.dumps({"messages": [{"role": "user", "content": "1 + 1 = ?"}, {"role": "assistant", "content": "2"}]})
    pair = json.dumps({"prompt": "max(3, 8) = ?", "chosen": "8", "rejected": "3"})
    files = {
        "sft_bad_json.jsonl": f"{good}\n{good}\n{{not json\n".encode(),
        "sft_no_answer.jsonl": f"{good}\n{json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]})}\n".encode(),
        "sft_bad_utf8.jsonl": f"{good}\n".encode() + good.replace('"2"', '"\xff"').encode("latin-1") + b"\n",
        "dpo_bad_json.jsonl": f'{pair}\n{{"prompt": "q", "chosen": "a"\n'.encode(),
        "dpo_same.jsonl": f"{pair}\n{pair}\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n",
        "corpus_bad_utf8.jsonl": b'{"text": "fine text here"}\n{"text": "one bad \xff byte in it"}\n',
    }
    for name, content in files.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        w[name] = str(root / name)
    return w


def pretrain_args(w, **kw):
    args = dict(data_dir=w["data"], model=MICRO_MODEL, out_dir=w["prev"], steps=2, warmup_steps=1, batch_size=4,
                micro_batch_size=4, seq_len=32, device="cpu", progress=False)  # fmt: skip
    return [f"{k}={v}" for k, v in {**args, **kw}.items()]


def sft_args(w, **kw):
    args = dict(base=w["base"], data=f"{w['data']}/sft_train.jsonl", val_data="", eval_tasks="", out_dir=w["prev"],
                steps=2, warmup_steps=1, batch_size=4, micro_batch_size=4, seq_len=64, device="cpu",
                progress=False)  # fmt: skip
    return [f"{k}={v}" for k, v in {**args, **kw}.items()]


def dpo_args(w, **kw):
    args = dict(base=w["base"], data=f"{w['data']}/dpo_train.jsonl", eval_tasks="", out_dir=w["prev"], steps=2,
                warmup_steps=1, batch_size=4, micro_batch_size=4, device="cpu", progress=False)  # fmt: skip
    return [f"{k}={v}" for k, v in {**args, **kw}.items()]


def eval_args(w, **kw):
    args = dict(checkpoint=w["base"], data=w["data"], tasks="", choices="", max_tokens=64)
    return [f"{k}={v}" for k, v in {**args, **kw}.items()]


# (id, script, argv builder, substrings the one error line must contain)
CASES = [
    ("malformed_yaml", "train_pretrain.py", lambda w: [f"{w['root']}/bad.yaml", *pretrain_args(w)],
     ["bad.yaml: line 2 is not valid YAML"]),
    ("unknown_key", "train_sft.py", lambda w: [*sft_args(w), "lora_rnak=4"],
     ["unknown key 'lora_rnak'", "did you mean 'lora_r'?"]),
    ("wrong_type", "train_dpo.py", lambda w: [f"{w['root']}/wrong_type.yaml", *dpo_args(w)],
     ["wrong_type.yaml: 'beta' expected a number, got 'high'"]),
    ("missing_data_dir", "train_pretrain.py", lambda w: pretrain_args(w, data_dir=f"{w['root']}/nowhere"),
     ["data_dir: no prepared data at", "nowhere"]),
    ("missing_base", "train_dpo.py", lambda w: dpo_args(w, base=f"{w['root']}/nowhere"),
     ["base: no checkpoint directory at", "nowhere"]),
    ("empty_corpus", "prepare_data.py",
     lambda w: [f"source={w['root']}/empty_corpus/*.txt", f"out_dir={w['root']}/never_written", "num_proc=1"],
     ["empty_corpus/*.txt", "no documents left after filtering"]),
    ("existing_data_dir", "prepare_data.py",
     lambda w: [f"source={w['root']}/empty_corpus/*.txt", f"out_dir={w['data']}", "num_proc=1"],
     ["already exists with other settings", "overwrite=true"]),
    ("corpus_jsonl_bad_utf8", "prepare_data.py",
     lambda w: [f"source={w['corpus_bad_utf8.jsonl']}", f"out_dir={w['root']}/never_written", "num_proc=1"],
     ["corpus_bad_utf8.jsonl line 2: not UTF-8 text"]),
    ("sft_bad_utf8", "train_sft.py", lambda w: sft_args(w, data=w["sft_bad_utf8.jsonl"]),
     ["sft_bad_utf8.jsonl line 2: not UTF-8 text"]),
    ("sft_malformed_line", "train_sft.py", lambda w: sft_args(w, data=w["sft_bad_json.jsonl"]),
     ["sft_bad_json.jsonl line 3: invalid JSON"]),
    ("sft_no_assistant", "train_sft.py", lambda w: sft_args(w, data=w["sft_no_answer.jsonl"]),
     ["sft_no_answer.jsonl line 2: conversation has no assistant turn"]),
    ("dpo_malformed_line", "train_dpo.py", lambda w: dpo_args(w, data=w["dpo_bad_json.jsonl"]),
     ["dpo_bad_json.jsonl line 2: invalid JSON"]),
    ("dpo_chosen_equals_rejected", "train_dpo.py", lambda w: dpo_args(w, data=w["dpo_same.jsonl"]),
     ["dpo_same.jsonl line 3: chosen and rejected are identical"]),
    ("vocab_mismatch_sample", "sample.py", lambda w: [f"checkpoint={w['small_vocab']}", "prompt=hi"],
     ["small_vocab", "the tokenizer has 512 tokens but the model only 256"]),
    ("vocab_mismatch_sft", "train_sft.py", lambda w: sft_args(w, base=w["small_vocab"]),
     ["tokenizer has 512 tokens", "only 256"]),
    ("truncated_safetensors_eval", "eval.py", lambda w: eval_args(w, checkpoint=w["trunc_model"]),
     ["trunc_model/model.safetensors", "truncated or corrupted"]),
    ("truncated_safetensors_dpo", "train_dpo.py", lambda w: dpo_args(w, base=w["trunc_model"]),
     ["base:", "trunc_model/model.safetensors", "truncated or corrupted"]),
    ("truncated_shard", "train_pretrain.py", lambda w: pretrain_args(w, data_dir=w["trunc_data"]),
     ["trunc_data/train_000.bin: truncated"]),
]  # fmt: skip


@pytest.mark.parametrize("script,make_argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, script, make_argv, expected):
    before = tree_hash(world["root"], world["data"])
    proc = run_script(script, make_argv(world))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert tree_hash(world["root"], world["data"]) == before  # nothing existing changed, nothing new appeared


def test_bad_bytes_and_a_10mb_line_are_handled_in_a_corpus(world, tmp_path):
    """Plain text: a byte that is not UTF-8 becomes U+FFFD and is counted; a 10 MB one-line document is
    dropped as too long (max_chars), not a crash; the other documents come through."""
    src = tmp_path / "corpus"
    src.mkdir()
    docs = synthetic_corpus(n_docs=20, seed=1)
    for i, doc in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_text(doc + "\n")
    (src / "bad_byte.txt").write_bytes(b"A line with a stray \xff byte, " + docs[0].encode() + b"\n")
    (src / "huge_line.txt").write_text("word " * 2_000_000 + "\n")  # 10 MB, no newline inside
    out = tmp_path / "prepared"
    argv = [f"source={src}/*.txt", f"out_dir={out}", f"tokenizer={world['data']}", "tasks=false", "num_proc=1",
            "min_chars=32", "val_fraction=0.1"]  # fmt: skip
    proc = run_script("prepare_data.py", argv)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    meta = json.load(open(out / "meta.json"))
    assert meta["bad_utf8_docs"] == 1 and meta["removed"]["too_long"] == 1
    assert meta["removed"]["kept"] == len(docs) + 1
    assert "1 kept documents had bytes that are not UTF-8" in proc.stdout


# ----------------------------------------------------------------------------- kill -9, then resume=auto


def kill_args(data_dir, out_dir):
    args = dict(data_dir=data_dir, out_dir=out_dir, model=MICRO_MODEL, steps=24, batch_size=8, micro_batch_size=4,
                seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=12, eval_batches=2, log_every=1,
                save_every=2, keep_last=2, dropout=0.1, progress=False, seed=0, device="cpu",
                resume="auto")  # fmt: skip
    return [f"{k}={v}" for k, v in args.items()]


def logged_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def n_lines(path):
    try:
        with open(path) as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def saving_now(out_dir):
    ckpts = os.path.join(out_dir, "checkpoints")
    return os.path.isdir(ckpts) and any(name.endswith(".tmp") for name in os.listdir(ckpts))


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_data_dir, tmp_path):
    """SIGKILL lands mid-step, mid-log or mid-save (a `.tmp` checkpoint folder is seen); each rerun with
    resume=auto picks up from the newest complete checkpoint. dropout > 0 makes the restored RNG matter."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert run_script("train_pretrain.py", kill_args(tiny_data_dir, ref)).returncode == 0
    rng = random.Random(1234)  # the kill moments are seeded; where they land still depends on the machine's speed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train_pretrain.py"), *kill_args(tiny_data_dir, out)]
    log = os.path.join(out, "log.jsonl")
    kills = []
    for attempt in range(12):
        if os.path.exists(os.path.join(out, "DONE")):
            break
        # Trigger: the log grew by a random number of lines (mid-step), or a checkpoint save is under way.
        during_save = attempt % 2 == 1
        grow, delay = rng.randint(1, 5), rng.uniform(0.0, 0.05)
        start_lines = n_lines(log)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if saving_now(out) if during_save else n_lines(log) >= start_lines + grow:
                break
            time.sleep(0.002)
        if not during_save:
            time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(("save" if during_save else f"+{grow} lines", saving_now(out)))
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        if len(kills) >= 5:  # enough interruptions: let the last run finish
            proc = run_script("train_pretrain.py", kill_args(tiny_data_dir, out))
            assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "DONE")) and len(kills) >= 3, kills
    assert logged_losses(out) == logged_losses(ref)  # exact floats, every step, and the val losses
    a = open(os.path.join(ref, "model.safetensors"), "rb").read()
    b = open(os.path.join(out, "model.safetensors"), "rb").read()
    assert a == b  # bit-identical final weights
