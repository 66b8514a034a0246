"""train_pretrain.py + train_common.py: schedule, accumulation, exact resume, faults, golden curve, learning.

Runs use the micro model (tests/fixtures/model_micro.yaml) on the synthetic corpus prepared once by
the `tiny_data_dir` fixture (conftest.py). "A new process resumes" is taken literally: interrupted
runs and their resumptions are separate Python processes.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import MICRO_MODEL, ROOT
from safetensors.torch import load_file

import checkpoint
import launch
import train_common as tc
import train_pretrain
from config import UserError, parse_args

GOLDEN = os.path.join(ROOT, "tests", "golden", "pretrain_micro_loss.json")


def base_args(data_dir, out_dir, **kw):
    args = dict(
        data_dir=data_dir, out_dir=out_dir, model=MICRO_MODEL, steps=12, batch_size=8, micro_batch_size=4,
        seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, eval_batches=2, log_every=1,
        save_every=4, keep_last=5, progress=False, seed=0, device="cpu",
    )  # fmt: skip
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def run_inprocess(argv):
    train_pretrain.main(parse_args(train_pretrain.PretrainConfig, argv))


def run_subprocess(argv, **popen):
    cmd = [sys.executable, os.path.join(ROOT, "train_pretrain.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **popen)


def train_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, "model.safetensors"))


# ----------------------------------------------------------------------------- pure pieces


def test_lr_schedule_values():
    cfg = launch.TrainConfig(steps=101, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert tc.lr_at(0, cfg) == pytest.approx(0.1)  # warmup: (step+1)/warmup * lr
    assert tc.lr_at(9, cfg) == pytest.approx(1.0)
    assert tc.lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    # halfway through the decay (steps 10..100): min + (max-min)/2
    assert tc.lr_at(55, cfg) == pytest.approx(0.55)
    assert tc.lr_at(100, cfg) == pytest.approx(0.1)
    wsd = launch.TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_frac=0.2)
    assert tc.lr_at(50, wsd) == 1.0 and tc.lr_at(80, wsd) == 1.0  # stable until the last 20 steps
    assert tc.lr_at(99, wsd) == pytest.approx(0.0)
    assert tc.lr_at(89, wsd) == pytest.approx(1.0 - 9 / 19)  # linear decay over steps 80..99
    const = launch.TrainConfig(steps=50, lr=0.5, min_lr=0.0, warmup_steps=0, schedule="constant")
    assert all(tc.lr_at(s, const) == 0.5 for s in range(50))


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = tc.param_groups(model, 0.1)
    assert {p.dim() for p in decay["params"]} == {2} and decay["weight_decay"] == 0.1
    assert {p.dim() for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    flat = torch.nn.Parameter(torch.zeros(8))
    flat.decay = True  # an FSDP flat shard holding matrices says so itself
    assert tc.param_groups(torch.nn.ParameterList([flat]), 0.1)[0]["params"] == [flat]


def test_muon_groups_and_fsdp_refusal(tiny_data_dir, tmp_path):
    """optimizer=muon: the block matrices go to Muon, the embedding and norms to AdamW; FSDP stops at start-up."""
    model = train_pretrain.Transformer(train_pretrain.build_model_config(
        parse_args(train_pretrain.PretrainConfig, base_args(tiny_data_dir, str(tmp_path))), 0, "sdpa"))  # fmt: skip
    opt = tc.make_optimizer(model, launch.TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    muon, decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "layers." in names[id(p)] for p in muon["params"]) and muon["lr_scale"] == 20.0
    assert [names[id(p)] for p in decay["params"]] == ["model.embed_tokens.weight"]
    assert {p.dim() for p in no_decay["params"]} == {1}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    proc = run_subprocess(base_args(tiny_data_dir, str(tmp_path / "o"), optimizer="muon", parallel="fsdp"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "optimizer=muon" in proc.stderr


def test_bad_config_is_one_line(tiny_data_dir, tmp_path):
    proc = run_subprocess(base_args(tiny_data_dir, str(tmp_path / "o"), batch_size=0, lr=-1, modle=1))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'model'" in proc.stderr
    assert "lr must be > 0" in proc.stderr and "batch_size must be > 0" in proc.stderr


# ----------------------------------------------------------------------------- the loop


def test_accumulation_equals_one_big_batch(tiny_data_dir, tmp_path):
    """4 micro-batches of 2 with loss/accum == one batch of 8 (fp32; only summation order differs)."""
    run_inprocess(base_args(tiny_data_dir, str(tmp_path / "big"), steps=3, micro_batch_size=8))
    run_inprocess(base_args(tiny_data_dir, str(tmp_path / "acc"), steps=3, micro_batch_size=2))
    big, acc = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    # Adam divides by sqrt(v): summation-order noise in a near-zero gradient is amplified, so atol is
    # 1e-5. A real accumulation bug (a missing / accum, a dropped micro-batch) moves weights by ~lr = 3e-3.
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-5)
    lb, la = train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")
    assert lb.keys() == la.keys() and all(abs(lb[s] - la[s]) < 1e-5 for s in lb)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_in_a_new_process(tiny_data_dir, tmp_path, optimizer):
    """12 steps straight == 5 steps, exit, a new process resumes to 12: bit-identical losses and weights.
    dropout > 0 makes the restored RNG state matter; the data position must be restored exactly too.
    With Muon the momentum buffers and the AdamW moments of the other tensors come back from one safetensors file."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = dict(dropout=0.1, save_every=100, optimizer=optimizer)
    assert run_subprocess(base_args(tiny_data_dir, straight, **common)).returncode == 0
    first = run_subprocess(base_args(tiny_data_dir, split, stop_after_steps=5, **common))
    assert first.returncode == 0 and "saved step 5" in first.stdout
    assert not os.path.exists(os.path.join(split, "model.safetensors"))  # not finished: no final export yet
    second = run_subprocess(base_args(tiny_data_dir, split, **common))
    assert second.returncode == 0 and "resumed from" in second.stdout
    assert train_losses(straight) == train_losses(split)  # exact float equality, every step
    a, b = final_weights(straight), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resume_continues_the_same_curve(tiny_data_dir, tmp_path):
    out, ref = str(tmp_path / "term"), str(tmp_path / "ref")
    argv = base_args(tiny_data_dir, out, steps=400, save_every=1000, warmup_steps=10)
    run_inprocess(base_args(tiny_data_dir, ref, steps=400, save_every=1000, warmup_steps=10))
    cmd = [sys.executable, os.path.join(ROOT, "train_pretrain.py"), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(log) or len(open(log).readlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: saved step" in stdout
    stopped_at = checkpoint.list_checkpoints(out)[-1]
    assert checkpoint.verify_checkpoint(stopped_at) is None and int(stopped_at.rsplit("_", 1)[1]) < 400
    assert run_subprocess(argv).returncode == 0
    assert train_losses(out) == train_losses(ref)
    a, b = final_weights(out), final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_save_leaves_previous_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "crash")
    run_inprocess(base_args(tiny_data_dir, out, steps=8, stop_after_steps=4))
    good = checkpoint.list_checkpoints(out)
    assert [os.path.basename(p) for p in good] == ["step_000004"]

    from model import Transformer

    real_save = Transformer.save_pretrained

    def dying_save(self, path, **kw):
        real_save(self, path, **kw)
        with open(os.path.join(path, "model.safetensors"), "r+b") as fh:
            fh.truncate(100)  # the power goes out halfway through the file
        raise OSError("simulated crash during save")

    monkeypatch.setattr(Transformer, "save_pretrained", dying_save)
    with pytest.raises(OSError, match="simulated crash"):
        run_inprocess(base_args(tiny_data_dir, out, steps=8))
    monkeypatch.undo()
    assert checkpoint.list_checkpoints(out) == good and checkpoint.verify_checkpoint(good[0]) is None
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_000008.tmp"))  # the wreck, ignored by resume
    cfg = parse_args(train_pretrain.PretrainConfig, base_args(tiny_data_dir, out, steps=8))
    assert checkpoint.find_resume_checkpoint(cfg) == good[0]
    run_inprocess(base_args(tiny_data_dir, out, steps=8))  # and the run completes from there
    assert max(train_losses(out)) == 8


def test_corrupted_checkpoint_is_refused_with_the_previous_one_offered(tiny_data_dir, tmp_path):
    out = str(tmp_path / "corrupt")
    run_inprocess(base_args(tiny_data_dir, out, steps=8, save_every=4))
    newest = checkpoint.list_checkpoints(out)[-1]
    path = os.path.join(newest, "model.safetensors")
    with open(path, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")  # flipped bytes, same size
    cfg = parse_args(train_pretrain.PretrainConfig, base_args(tiny_data_dir, out, steps=12))
    with pytest.raises(UserError) as e:
        checkpoint.find_resume_checkpoint(cfg)
    assert "model.safetensors is corrupted" in str(e.value) and "step_000004" in str(e.value)
    with open(path, "r+b") as fh:
        fh.truncate(50)
    proc = run_subprocess(base_args(tiny_data_dir, out, steps=12))
    assert proc.returncode == 2 and "truncated" in proc.stderr and "resume=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_run_per_out_dir(tiny_data_dir, tmp_path):
    """A second run cannot share a live run's out_dir, and resume=never does not mix with an old run's checkpoints."""
    out = str(tmp_path / "shared")
    run_inprocess(base_args(tiny_data_dir, out, steps=8, save_every=4))
    old = train_losses(out)
    tree = {p: os.path.getmtime(p) for p in checkpoint.list_checkpoints(out)}

    checkpoint.lock_out_dir(out)  # this process plays the live run; the subprocess is the second one
    try:
        proc = run_subprocess(base_args(tiny_data_dir, out, steps=12))
    finally:
        checkpoint.unlock_out_dir(out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "is in use by another training run" in proc.stderr, proc.stderr

    # Without overwrite=true a fresh start refuses; pruning would otherwise keep the old run's higher steps.
    with pytest.raises(UserError, match="holds 2 checkpoint.*step_000008.*overwrite=true"):
        run_inprocess(base_args(tiny_data_dir, out, steps=3, save_every=1, resume="never"))
    assert {p: os.path.getmtime(p) for p in checkpoint.list_checkpoints(out)} == tree and train_losses(out) == old

    # Continuing another run's checkpoint here is a new run in this out_dir too.
    other = str(tmp_path / "other")
    run_inprocess(base_args(tiny_data_dir, other, steps=2, save_every=2))
    with pytest.raises(UserError, match="holds 2 checkpoint.*overwrite=true"):
        run_inprocess(base_args(tiny_data_dir, out, steps=3, resume=checkpoint.list_checkpoints(other)[-1]))
    assert {p: os.path.getmtime(p) for p in checkpoint.list_checkpoints(out)} == tree and train_losses(out) == old

    # With it, the old checkpoints go and only the new run's remain; its log starts afresh.
    run_inprocess(base_args(tiny_data_dir, out, steps=3, save_every=1, seed=1, resume="never", overwrite="true"))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(out)] == [
        "step_000001",
        "step_000002",
        "step_000003",
    ]
    new = train_losses(out)
    assert sorted(new) == [1, 2, 3] and new[1] != old[1]  # seed 1: a different run, not the old lines kept


def test_out_dir_lock_degrades_on_filesystems_without_flock(tmp_path, monkeypatch, capsys):
    """Lustre without its flock mount option answers ENOSYS: training must go on (with a note), not crash."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    checkpoint.lock_out_dir(str(tmp_path))
    assert "cannot lock" in capsys.readouterr().out and os.path.realpath(tmp_path) not in checkpoint._LOCKED


def test_nan_steps_are_skipped_then_the_run_stops(tiny_data_dir, tmp_path):
    out = str(tmp_path / "nan")
    run_inprocess(base_args(tiny_data_dir, out, steps=6, inject_nan_steps="[3]"))  # one bad step: skipped
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())

    out2 = str(tmp_path / "nan2")
    with pytest.raises(UserError, match="3 non-finite steps in a row at step 7"):
        run_inprocess(base_args(tiny_data_dir, out2, steps=12, save_every=4, max_bad_steps=3,
                                inject_nan_steps="[5,6,7]"))  # fmt: skip
    good = checkpoint.list_checkpoints(out2)
    assert [os.path.basename(p) for p in good] == ["step_000004"] and checkpoint.verify_checkpoint(good[0]) is None


# ----------------------------------------------------------------------------- what training achieves


def test_golden_loss_curve(tiny_data_dir, tmp_path):
    """The micro config reproduces a checked-in curve. Regenerate deliberately with UPDATE_GOLDEN=1."""
    out = str(tmp_path / "golden")
    run_inprocess(base_args(tiny_data_dir, out, steps=20, save_every=100))
    losses = [train_losses(out)[s] for s in range(1, 21)]
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        json.dump({"steps": list(range(1, 21)), "loss": losses}, open(GOLDEN, "w"), indent=1)
    golden = json.load(open(GOLDEN))["loss"]
    # Tolerance: BLAS kernels may sum in another order on another CPU; a real change moves losses by >1e-2.
    np.testing.assert_allclose(losses, golden, rtol=2e-3, atol=2e-3)


def test_validation_loss_falls_well_below_unigram_entropy(tiny_data_dir, tmp_path):
    from shards import read_shard

    tokens = np.asarray(read_shard(os.path.join(tiny_data_dir, "train_000.bin")))
    p = np.bincount(tokens).astype(np.float64)
    p = p[p > 0] / p.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats/token of the best context-free model
    out = str(tmp_path / "learn")
    run_inprocess(base_args(tiny_data_dir, out, steps=120, warmup_steps=10, eval_every=120, save_every=1000))
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    val = [r for r in rows if "val_loss" in r][-1]
    assert val["val_loss"] < 0.6 * unigram_entropy, (val, unigram_entropy)
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / val_bytes_per_token(tiny_data_dir))
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))


def val_bytes_per_token(data_dir):
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    return meta["splits"]["val"]["text_bytes"] / meta["splits"]["val"]["tokens"]


def test_fsdp_two_ranks_with_resume_matches_one_process(tiny_data_dir, tmp_path):
    """torchrun, 2 ranks, our FSDP: 4 steps, exit, resume to 8 (sharded optimizer state per rank) ==
    the same global batch in one process, within fp32 reduction-order tolerance."""
    single, sharded = str(tmp_path / "single"), str(tmp_path / "fsdp")
    args = dict(steps=8, micro_batch_size=2, save_every=100)
    run_inprocess(base_args(tiny_data_dir, single, **args))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["stop_after_steps=4"], []):
        argv = [*launch, os.path.join(ROOT, "train_pretrain.py"), *base_args(tiny_data_dir, sharded, **args)]
        proc = subprocess.run([*argv, "parallel=fsdp", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = train_losses(single), train_losses(sharded)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 for s in a)
    wa, wb = final_weights(single), final_weights(sharded)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
