"""Every documented training command still runs: each one is put through its script's dry run (launch.py).

Commands are collected from README.md, README_zh.md, docs/*.md (docs/zh/*.md when present), the module
docstrings of every top-level .py file and the comments of configs/*.yaml: every `python train_*.py ...` and
`torchrun ... train_*.py ...` (continuation lines joined). Each runs in-process as `run_cli(main, Config,
argv + ["dry_run=true"])`, with WORLD_SIZE taken from --nproc_per_node (x --nnodes), in a scratch directory that
holds what the earlier pipeline stages would have written (data/builtin, out/pretrain, out/sft: the tiny
fixtures). Inputs that are not there (a hub model, a GPU cluster's data) are reported by the dry run as "not
checked here"; everything else (keys, types, values, the batch split for that world size, the model size) must
pass. The dry run must not write a single file.

Plus the launch decisions themselves (launch.py): parallel=auto, batch_split and their one-line errors, and one
owner per runtime decision (the device: distributed.pick_device; the kernel, dropout and recompute of init_from).
"""

import ast
import glob
import os
import re
import shlex

import pytest
import torch
from conftest import MICRO_MODEL, ROOT

import distributed
import launch
import train_common as tc
import train_dpo
import train_grpo
import train_pretrain
import train_sft
import train_vlm
from config import UserError, load_yaml, parse_args, run_cli
from model import ModelConfig, Transformer

SCRIPTS = {
    "train_pretrain.py": (train_pretrain.main, train_pretrain.PretrainConfig),
    "train_sft.py": (train_sft.main, train_sft.SFTConfig),
    "train_dpo.py": (train_dpo.main, train_dpo.DPOConfig),
    "train_vlm.py": (train_vlm.main, train_vlm.VLMTrainConfig),
    "train_grpo.py": (train_grpo.main, train_grpo.GRPOConfig),
}
# Commands written to show an error, and the error they must show.
MEANT_TO_FAIL = {"python train_pretrain.py stpes=10": "unknown key 'stpes' (did you mean 'steps'?)"}


# ----------------------------------------------------------------------------- finding the commands


def _texts() -> list[tuple[str, str]]:
    """(where, text) for every place a command may be written."""
    out = []
    pages = [
        "README.md",
        "README_zh.md",
        *glob.glob("docs/*.md", root_dir=ROOT),
        *glob.glob("docs/zh/*.md", root_dir=ROOT),
    ]
    for rel in sorted(pages):
        out.append((rel, open(os.path.join(ROOT, rel), encoding="utf-8").read()))
    for rel in sorted(glob.glob("*.py", root_dir=ROOT)):
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, rel), encoding="utf-8").read()))
        out.append((rel, doc or ""))
    for rel in sorted(glob.glob("configs/*.yaml", root_dir=ROOT)):
        lines = open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines()
        out.append((rel, "\n".join(line.lstrip("# ") for line in lines if line.startswith("#"))))
    return out


COMMAND = re.compile(r"(?:WORLD_SIZE=\d+\s+)?(?:\btorchrun\b[^`#|;\n]*?|\bpython3?\s+)(train_\w+\.py)\b([^`#|;\n]*)")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every training command, deduplicated, in a stable order."""
    seen = {}
    for where, text in _texts():
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        for m in COMMAND.finditer(text):
            cmd = re.split(r":\s", m.group(0))[0].strip()  # "make pretrain  # python X.py CONFIG: what it does"
            cmd = cmd.rstrip(".,)")
            if re.search(r"\b[A-Z][A-Z_]+\.(yaml|py)\b|\bCONFIG\b|\.\.\.", cmd):  # CONFIG.yaml: a placeholder
                continue
            seen.setdefault(cmd, where)
    return sorted((where, cmd) for cmd, where in seen.items())


def world_size_of(tokens: list[str]) -> int:
    """torchrun's --nproc_per_node x --nnodes, or a WORLD_SIZE=N written before `python` (a dry run's way)."""
    opts = dict(re.findall(r"(?:--)?(nproc_per_node|nnodes|WORLD_SIZE)[= ](\d+)", " ".join(tokens)))
    return int(opts.get("WORLD_SIZE", 1)) * int(opts.get("nproc_per_node", 1)) * int(opts.get("nnodes", 1))


def test_the_extractor_finds_the_commands_the_issue_names():
    found = {cmd for _, cmd in documented_commands()}
    assert "torchrun --standalone --nproc_per_node 8 train_pretrain.py configs/pretrain_0.5B.yaml" in found
    assert any(c.startswith("torchrun --nnodes=2 --nproc_per_node=8") for c in found)  # joined continuation
    assert any("train_vlm.py configs/vlm_tiny.yaml caption_data=data/vlm" in c for c in found)  # vlm_data.py
    assert "python train_pretrain.py configs/pretrain_tiny.yaml" in found  # `make pretrain  # python ...: text`
    assert world_size_of(shlex.split("torchrun --nnodes=2 --nproc_per_node=8 train_pretrain.py")) == 16
    assert world_size_of(shlex.split("torchrun --nproc_per_node 2 train_sft.py")) == 2
    assert world_size_of(shlex.split("WORLD_SIZE=8 python train_pretrain.py dry_run=true")) == 8


# ----------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def sandbox(tiny_data_dir, tmp_path_factory):
    """A directory laid out as after `make demo`: data/builtin, out/pretrain, out/sft (tiny stand-ins)."""
    root = tmp_path_factory.mktemp("docs_world")
    os.symlink(os.path.join(ROOT, "configs"), root / "configs")
    (root / "data").mkdir()
    os.symlink(tiny_data_dir, root / "data" / "builtin")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL)))
    for rel in ("out/pretrain", "out/sft"):
        model.save_pretrained(str(root / rel), tokenizer_dir=tiny_data_dir)
    return root


def listing(root) -> dict[str, float]:
    return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(root, "**"), recursive=True)}


def dry_run(argv: list[str], script: str, world: int, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `script argv dry_run=true` as rank 0 of `world` processes."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    main, cls = SCRIPTS[script]
    code = 0
    try:
        run_cli(main, cls, argv=[*argv, "dry_run=true"], show_config=False)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_documented_command_passes_its_dry_run(sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    before = listing(sandbox)
    commands = documented_commands()
    assert len(commands) >= 15, commands
    problems, report = [], []
    for where, cmd in commands:
        tokens = shlex.split(cmd)
        script = next(t for t in tokens if t.endswith(".py"))
        argv = tokens[tokens.index(script) + 1 :]
        world = world_size_of(tokens)
        code, out, err = dry_run(argv, script, world, monkeypatch, capsys)
        if cmd in MEANT_TO_FAIL:
            if code != 2 or MEANT_TO_FAIL[cmd] not in err:
                problems.append(f"{where}: `{cmd}` should fail with {MEANT_TO_FAIL[cmd]!r}, got {code}: {err}")
            continue
        if code != 0:
            problems.append(f"{where}: `{cmd}` (world size {world}): {err.strip() or out[-300:]}")
            continue
        if "--help" in argv:
            continue
        split = re.search(r"(\d+) \w+ per step = micro (\d+) x accum (\d+) x world (\d+)", out)
        assert split, out
        batch, micro, accum, w = map(int, split.groups())
        assert micro * accum * w == batch and w == world, (cmd, out)
        report.append(f"{cmd}: micro {micro} x accum {accum} x world {w}")
    assert not problems, "\n".join(problems)
    assert listing(sandbox) == before, "a dry run wrote or touched files"
    print("\n".join(report))


def test_dry_run_prints_the_plan_and_writes_nothing(sandbox, monkeypatch, capsys):
    """The README's 2-rank command: the plan for 2 processes, checked paths, and an out_dir that stays absent."""
    monkeypatch.chdir(sandbox)
    argv = ["configs/pretrain_tiny.yaml", "out_dir=out/never"]
    code, out, err = dry_run(argv, "train_pretrain.py", 2, monkeypatch, capsys)
    assert code == 0, err
    assert "parallel=ddp (auto: torchrun)" in out and "micro 8 x accum 1 x world 2" in out
    assert "16 x 256 = 4,096 tokens per step" in out and "not checked" not in out  # data/builtin is there
    tiny = ModelConfig(**load_yaml(os.path.join(ROOT, "configs", "model", "tiny.yaml")))
    with torch.device("meta"):
        n = Transformer(tiny).num_parameters()
    assert f"{n / 1e6:,.2f}M parameters" in out  # the preset's 4096 rows cover the fixture's 512-token tokenizer
    assert not os.path.exists(sandbox / "out" / "never")
    run_cli(train_pretrain.main, train_pretrain.PretrainConfig, argv=[*argv, "--dry-run"], show_config=False)
    assert capsys.readouterr().out == out  # --dry-run is the same switch
    # A GPU recipe on this machine: arithmetic for 8 ranks, the missing data named, not an error.
    code, out, err = dry_run(["configs/pretrain_0.5B.yaml"], "train_pretrain.py", 8, monkeypatch, capsys)
    assert code == 0 and "micro 8 x accum 4 x world 8" in out and "parallel=fsdp" in out
    assert "not checked here: data_dir" in out and "memory:" in out
    # A base model that is not on this machine: checked as far as keys and arithmetic go.
    argv = ["configs/sft_tinyllama_qlora.yaml", "base=/nowhere/TinyLlama"]
    code, out, err = dry_run(argv, "train_sft.py", 1, monkeypatch, capsys)
    assert code == 0 and "not checked here: base: no checkpoint directory at '/nowhere/TinyLlama'" in out
    assert "tokenizer" not in out.split("not checked here:", 1)[1]  # the tokenizer follows base=


def test_dry_run_refuses_what_a_real_run_would(sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    argv = ["configs/pretrain_tiny.yaml", "batch_size=15"]
    code, _, err = dry_run(argv, "train_pretrain.py", 2, monkeypatch, capsys)
    assert code == 2 and "batch_size 15 is not divisible by the 2 processes" in err and "batch_size=16" in err
    code, _, err = dry_run(["configs/pretrain_tiny.yaml", "parallel=none"], "train_pretrain.py", 2, monkeypatch, capsys)
    assert code == 2 and "parallel=none with 2 processes" in err and "parallel=auto" in err
    assert err.strip().count("\n") == 0
    argv = ["configs/sft_tiny.yaml", "finetune=lora", "optimizer=adamw", "parallel=fsdp"]
    code, _, err = dry_run(argv, "train_sft.py", 2, monkeypatch, capsys)
    assert code == 2 and "parallel=fsdp with finetune=lora is not supported; use parallel=ddp" in err
    code, _, err = dry_run(["configs/sft_tiny.yaml", "parallel=fsdp"], "train_sft.py", 2, monkeypatch, capsys)
    assert code == 2 and "optimizer=muon needs whole weight matrices on each rank: use parallel=ddp" in err
    code, _, err = dry_run(["configs/sft_tiny.yaml", "finetune=lora"], "train_sft.py", 1, monkeypatch, capsys)
    assert code == 2 and "optimizer=muon trains whole weight matrices, finetune=lora trains adapters" in err
    assert err.strip().count("\n") == 0


# ----------------------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize(
    "batch, micro, world, want",
    [
        (16, 16, 1, (16, 1)),  # the README's tiny preset in one process
        (16, 16, 2, (8, 1)),  # ... and on 2 ranks: was an error before
        (256, 8, 8, (8, 4)),  # configs/pretrain_0.5B.yaml
        (12, 8, 1, (6, 2)),  # 8 does not divide 12: the largest micro <= 8 that does
        (14, 4, 2, (1, 7)),  # 7 per rank is prime
        (6, 4, 3, (2, 1)),
    ],
)
def test_batch_split(batch, micro, world, want):
    cfg = launch.TrainConfig(batch_size=batch, micro_batch_size=micro)
    got = launch.batch_split(cfg, world)
    assert got == want and got[0] * got[1] * world == batch


def test_batch_split_errors_say_what_works():
    with pytest.raises(UserError, match=r"batch_size 15 is not divisible by the 2 processes.*14 or batch_size=16"):
        launch.batch_split(launch.TrainConfig(batch_size=15), 2)
    with pytest.raises(UserError, match=r"batch_size 4 is not divisible by the 8 processes.*batch_size=8$"):
        launch.batch_split(launch.TrainConfig(batch_size=4), 8)


def test_parallel_auto():
    assert launch.resolve_parallel(launch.TrainConfig(), 1) == "none"
    assert launch.resolve_parallel(launch.TrainConfig(), 4) == "ddp"
    assert launch.resolve_parallel(launch.TrainConfig(parallel="fsdp"), 4) == "fsdp"
    assert launch.resolve_parallel(launch.TrainConfig(parallel="none"), 1) == "none"
    with pytest.raises(UserError, match="parallel=none with 4 processes"):
        launch.resolve_parallel(launch.TrainConfig(parallel="none"), 4)


# ----------------------------------------------------------------------------- one owner per runtime decision


def test_device_is_decided_once(monkeypatch):
    """device=cpu on a CUDA machine: the process group (gloo), the model and the batches all use the CPU. Before,
    init_distributed bound cuda:LOCAL_RANK and picked NCCL whatever the config said, while batches went to cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend: a GPU machine

    def no_gpu(*args):
        raise AssertionError("device=cpu must not bind a GPU")

    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    for key in ("MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.pick_device("auto", local_rank=1) == torch.device("cuda:1")
    assert distributed.pick_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    run = tc.Run(launch.TrainConfig(device="cpu", batch_size=8, micro_batch_size=8), "test")
    try:
        assert run.device == run.dist.device == torch.device("cpu") and run.dist.backend == "gloo"
        assert run.dtype == torch.float32 and (run.micro, run.accum, run.parallel) == (8, 1, "none")
    finally:
        run.stop.restore()
        distributed.cleanup()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda but CUDA is not available"):
        distributed.pick_device("cuda")


def test_init_from_keeps_this_runs_kernel_dropout_and_recompute(sandbox, monkeypatch):
    """config.json stores the architecture only: init_from must not drop attn_impl, dropout, gradient_checkpointing."""
    seen = {}

    class Built(Exception):
        pass

    def stop_after_build(run, raw_model):
        seen.update(vars(raw_model.config))
        raise Built

    monkeypatch.setattr(tc.Run, "prepare", stop_after_build)
    argv = [f"data_dir={sandbox}/data/builtin", f"init_from={sandbox}/out/pretrain", "attn_impl=naive", "dropout=0.1",
            "gradient_checkpointing=true", "device=cpu", "batch_size=4", "micro_batch_size=4", "seq_len=32",
            f"out_dir={sandbox}/never", "progress=false"]  # fmt: skip
    with pytest.raises(Built):
        train_pretrain.main(parse_args(train_pretrain.PretrainConfig, argv))
    assert (seen["attn_impl"], seen["dropout"], seen["gradient_checkpointing"]) == ("naive", 0.1, True)
    assert not os.path.exists(sandbox / "never")
