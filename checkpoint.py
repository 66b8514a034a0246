"""Checkpoint files of a training run: atomic, verified, exactly resumable (ARCHITECTURE.md contract 2).

    OUT/checkpoints/step_000100/
        config.json, model.safetensors (+ adapter files, tokenizer)   the model, Hugging Face layout
        train_state/state.json             step, data position, config, wandb run id, optimizer hyper-parameters
        train_state/optimizer.safetensors  AdamW moments (optimizer_rank{r} under FSDP: each rank its shard)
        train_state/rng_rank{r}.*          every RNG a step touches, per rank (dropout differs per rank)
        COMPLETE                           manifest: size + sha256 of every file, written last

A checkpoint is written as `step_N.tmp`, the manifest goes in last, then one rename makes it
visible: a crash mid-save leaves only a `.tmp` folder that resume ignores. On resume the newest
complete checkpoint is checked against its manifest; a truncated or corrupted file stops the run
with a message naming it and the previous good checkpoint. Nothing here unpickles: tensors are
safetensors, everything else JSON.

Also here, because they are about what lives in an out_dir: `lock_out_dir` (one run per out_dir at a time)
and the model files of a fine-tuning checkpoint (`write_finetuned` / `read_finetuned` / `write_merged`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import time

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import distributed
import lora
from config import UserError
from hf_checkpoint import copy_tokenizer_files
from model import Transformer

# ----------------------------------------------------------------------------- RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator a step touches: torch CPU/CUDA as tensors, Python/numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------- optimizer state as safetensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON (hyper-parameters)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                value = value.to_local() if hasattr(value, "to_local") else value  # FSDP2: this rank's shard
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the order state ids refer to
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        p = params[int(idx)]
        if hasattr(p, "device_mesh") and value.shape == p.to_local().shape:  # FSDP2: re-wrap the local shard
            from torch.distributed.tensor import DTensor  # only FSDP2 runs reach here

            value = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- checkpoints

MARKER = "COMPLETE"  # written last: its presence (and matching file sizes) makes a checkpoint complete


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: str) -> None:
    files = {}
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "**", "*"), recursive=True)):
        if os.path.isfile(path) and os.path.basename(path) != MARKER:
            rel = os.path.relpath(path, ckpt_dir)
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(ckpt_dir, MARKER), "w") as fh:
        json.dump({"files": files, "time": time.time()}, fh, indent=1)


def verify_checkpoint(ckpt_dir: str) -> str | None:
    """None when every file matches the manifest; otherwise a reason naming the bad file."""
    marker = os.path.join(ckpt_dir, MARKER)
    if not os.path.isfile(marker):
        return f"{ckpt_dir} has no {MARKER} marker (an interrupted save)"
    try:
        with open(marker) as fh:
            files = json.load(fh)["files"]
    except (ValueError, KeyError):
        return f"{marker} is unreadable"
    for rel, info in files.items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != info["bytes"]:
            return f"{path} is truncated ({os.path.getsize(path)} of {info['bytes']} bytes)"
        if _sha256(path) != info["sha256"]:
            return f"{path} is corrupted (sha256 mismatch)"
    return None


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint dirs that finished saving (marker present), oldest first."""
    found = glob.glob(os.path.join(out_dir, "checkpoints", "step_*"))
    done = [d for d in found if not d.endswith(".tmp") and os.path.isfile(os.path.join(d, MARKER))]
    return sorted(done, key=lambda d: int(d.rsplit("_", 1)[1]))


def find_resume_checkpoint(cfg) -> str | None:
    """The checkpoint to resume from, after checking its files; a bad one stops with advice."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        candidates = [cfg.resume]
    else:
        candidates = list_checkpoints(cfg.out_dir)
        if not candidates:
            return None
    newest = candidates[-1]
    problem = verify_checkpoint(newest)
    if problem is None:
        return newest
    earlier = [d for d in list_checkpoints(cfg.out_dir) if d != newest and verify_checkpoint(d) is None]
    advice = f"; the previous good checkpoint is {earlier[-1]}: rerun with resume={earlier[-1]}" if earlier else ""
    raise UserError(f"cannot resume: {problem}{advice}")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(
    out_dir: str,
    step: int,
    rank: int,
    save_model,  # callable(dir), master only: writes config.json + model.safetensors (+ adapter, tokenizer)
    optimizer_state: tuple[dict[str, torch.Tensor], dict] | None,
    state: dict,
    keep_last: int,
    per_rank_optimizer: bool = False,  # FSDP: every rank saves its own optimizer shard
) -> str:
    """Write OUT/checkpoints/step_{step:06d} atomically and prune old ones. Called on every rank.

    Each rank saves its own RNG state (dropout differs per rank); the master writes the model,
    the JSON state and, last, the manifest, then renames the folder into place.
    """
    final = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "train_state"))
    _barrier()
    ts = os.path.join(tmp, "train_state")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, os.path.join(ts, f"rng_rank{rank}.safetensors"))
    with open(os.path.join(ts, f"rng_rank{rank}.json"), "w") as fh:
        json.dump(rng_meta, fh)
    meta = None
    if optimizer_state is not None and (rank == 0 or per_rank_optimizer):
        tensors, meta = optimizer_state
        name = f"optimizer_rank{rank}" if per_rank_optimizer else "optimizer"
        save_file(tensors, os.path.join(ts, f"{name}.safetensors"))
    if rank == 0:
        save_model(tmp)
        with open(os.path.join(ts, "state.json"), "w") as fh:
            json.dump({**state, "step": step, "optimizer": meta}, fh)
    _barrier()  # every rank's files are on disk before the manifest vouches for them
    if rank == 0:
        write_manifest(tmp)
        if os.path.isdir(final):  # a rerun of the same step: replace only after the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_train_state(ckpt_dir: str, rank: int = 0, per_rank_optimizer: bool = False):
    """(state.json contents, this rank's optimizer tensors or None); restores this rank's RNG too."""
    ts = os.path.join(ckpt_dir, "train_state")
    try:
        with open(os.path.join(ts, "state.json")) as fh:
            state = json.load(fh)
        name = f"optimizer_rank{rank}" if per_rank_optimizer else "optimizer"
        opt_path = os.path.join(ts, f"{name}.safetensors")
        opt = load_file(opt_path) if os.path.isfile(opt_path) else None
        rng_path = os.path.join(ts, f"rng_rank{rank}.safetensors")
        if not os.path.isfile(rng_path):
            raise UserError(f"{ckpt_dir} was saved with fewer ranks: no {rng_path}; resume with the same world size")
        with open(os.path.join(ts, f"rng_rank{rank}.json")) as fh:
            set_rng_state(load_file(rng_path), json.load(fh))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot read training state in {ts}: {e}") from None
    return state, opt


def export_final(out_dir: str, ckpt_dir: str) -> None:
    """Copy the model files of the last checkpoint to OUT itself, so the next stage reads OUT."""
    # An earlier run of the other kind in this out_dir (overwrite=true) left its model: a LoRA dir that still held
    # model.safetensors, or a full one with adapter_config.json, would load as the wrong model.
    if os.path.isfile(os.path.join(ckpt_dir, "adapter_config.json")):
        stale = ("config.json", "model.safetensors")
    else:
        stale = ("adapter_config.json", "adapter_model.safetensors", "merged")
    for name in stale:
        old = os.path.join(out_dir, name)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
    for name in os.listdir(ckpt_dir):
        src = os.path.join(ckpt_dir, name)
        if os.path.isfile(src) and name != MARKER:
            tmp = os.path.join(out_dir, name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- one run per out_dir

_LOCKED: dict[str, int] = {}  # real path of an out_dir -> the descriptor holding its lock in this process


def lock_out_dir(out_dir: str) -> None:
    """Hold an exclusive lock on out_dir until the run finishes: a second run pointed at it stops at once.

    Two runs writing one out_dir would prune each other's checkpoints and rewrite each other's log.jsonl.
    flock on the directory itself creates no file, and the kernel drops the lock when its process dies (even
    by kill -9), so there is never a stale lock to delete. A run in this same process re-entering is allowed.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no flock; one run per out_dir is then up to the user
        return
    key = os.path.realpath(out_dir)
    if key in _LOCKED:
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"out_dir: {out_dir} is in use by another training run; wait for it to finish or choose another out_dir"
        ) from None
    except OSError as e:  # a filesystem without flock (Lustre mounted without it: ENOSYS): run unlocked
        os.close(fd)
        print(f"note: cannot lock {out_dir} ({e.strerror}); make sure no other run uses it", flush=True)
        return
    _LOCKED[key] = fd


def unlock_out_dir(out_dir: str) -> None:
    fd = _LOCKED.pop(os.path.realpath(out_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------- fine-tuning outputs (SFT, DPO)


def write_finetuned(raw_model: torch.nn.Module, path: str, tokenizer_dir: str, base_dir: str, state_dict=None) -> None:
    """The model files of a fine-tuning checkpoint. A LoRA model writes only its adapter (PEFT layout, with
    base_model_name_or_path = base_dir) plus the tokenizer files; a full model writes config.json +
    model.safetensors (state_dict: the full weights gathered from FSDP shards, else the model's own)."""
    if lora.lora_layers(raw_model):
        lora.save_adapter(raw_model, path, base_model_name_or_path=base_dir)
        copy_tokenizer_files(tokenizer_dir, path)
    else:
        raw_model.save_pretrained(path, tokenizer_dir=tokenizer_dir, state_dict=state_dict)


def read_finetuned(raw_model: torch.nn.Module, model: torch.nn.Module, ckpt_dir: str, device) -> None:
    """Load what write_finetuned wrote back into the running model (resume): the adapter weights into the
    existing LoRA layers of raw_model, or the full weights into `model` (raw_model as wrapped by DDP / FSDP)."""
    if lora.lora_layers(raw_model):
        lora.load_adapter(raw_model, ckpt_dir)  # the layers exist already: this only copies A and B
    else:
        sd = Transformer.from_pretrained(ckpt_dir, device=device).state_dict()
        distributed.load_full_state_dict(model, sd)


def write_merged(raw_model: torch.nn.Module, out_dir: str, tokenizer_dir: str) -> str:
    """OUT/merged: a plain checkpoint with every LoRA update folded into its base weight (QLoRA: into the
    dequantized base), which sample.py, eval.py, transformers and the next stage read like any model."""
    merged = os.path.join(out_dir, "merged")
    raw_model.save_pretrained(merged, tokenizer_dir=tokenizer_dir, state_dict=lora.merged_state_dict(raw_model))
    return merged
