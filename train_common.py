"""What the three training loops share: settings, optimizer groups, LR schedule, checkpoints, logging.

train_pretrain.py, train_sft.py and train_dpo.py each own one visible loop; everything that
must exist exactly once lives here (STYLE.md rule 11):

- The settings every loop has are `launch.TrainConfig` (each script subclasses it, the fine-tuning ones through
  `finetune.FinetuneConfig`); what a launch makes of them (parallel=auto, the micro x accum x world split,
  device, dtype) is decided there too.
- `param_groups` / `make_optimizer`: AdamW with weight decay on matrices only. Norm gains and biases
  are not decayed: shrinking them toward zero changes what the layer computes rather than
  regularizing it (as in GPT-2 / nanoGPT practice). optimizer=muon trains the hidden matrices with
  Muon (muon.py) and the rest with AdamW, in one optimizer.
- `lr_at(step)`: linear warmup, then cosine or warmup-stable-decay (WSD, Hu et al. 2024, MiniCPM),
  a pure function of the step so that a resumed run continues the same curve.
- Checkpoints (ARCHITECTURE.md contract 2) are written by checkpoint.py, called from `Run`:
  atomic, with a manifest written last, RNG and data position included, verified on resume.
- `RunLogger`: one JSON object per logged step in `OUT/log.jsonl`, optional wandb, a loss-curve PNG.
- `StopFlag`: SIGTERM / SIGINT ask the loop to save at the next step boundary and exit 0.
- One run per out_dir (checkpoint.lock_out_dir, taken in Run.resume); a new run (resume=never, or resume=PATH
  elsewhere) refuses an out_dir holding an earlier run's checkpoints unless overwrite=true says to delete them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time

import torch
from tqdm import tqdm

import distributed
from checkpoint import (
    export_final,
    find_resume_checkpoint,
    list_checkpoints,
    load_optimizer_tensors,
    load_train_state,
    lock_out_dir,
    optimizer_tensors,
    save_checkpoint,
    unlock_out_dir,
)
from config import UserError, save_config, to_dict
from launch import TrainConfig, batch_split, is_sharded, resolve_dtype, resolve_parallel
from muon import Muon

# ----------------------------------------------------------------------------- optimizer and schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay, vectors (norm gains, biases) do not.

    A parameter may say for itself with a `.decay` attribute: flat FSDP shards are 1-D but hold
    matrices, so distributed.py marks them.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if getattr(p, "decay", p.dim() >= 2) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the blocks (attention and MLP projections): what Muon trains. The embedding (a lookup),
    the output head and MoE routers (`...gate.weight`, E x C) stay with AdamW, as in modded-nanogpt / nanochat."""
    return p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name and not name.endswith("gate.weight")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        # One lr schedule for every group (the loop sets group["lr"]); the matrices run at muon_lr / lr times it.
        muon_group = {"params": hidden, "muon": True, "lr_scale": cfg.muon_lr / cfg.lr,
                      "weight_decay": cfg.muon_weight_decay}  # fmt: skip
        adam_groups = param_groups(torch.nn.ParameterList(rest), cfg.weight_decay)
        return Muon([muon_group, *adam_groups], lr=cfg.lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2))
    # The fused CUDA kernel updates every parameter in one launch; on CPU the foreach path is fastest.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based). Pure: resume needs no schedule state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # Warmup-stable-decay: hold the peak, then decay linearly over the last decay_frac of the run.
        decay_steps = max(1, round(cfg.decay_frac * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.steps - 1 - decay_start)
        return cfg.lr - (cfg.lr - cfg.min_lr) * min(1.0, frac)
    # Cosine from lr at the end of warmup down to min_lr at the last step.
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, frac)))


def update_moe_bias(model: torch.nn.Module) -> None:
    """DeepSeek-V3 aux-loss-free balancing, after each optimizer step: nudge each router's expert bias.

    The expert loads counted during the step are summed over ranks first, so every rank applies the
    same update and the replicas stay identical. A no-op for dense models and softmax routers.
    """
    multi = torch.distributed.is_available() and torch.distributed.is_initialized()
    for module in model.modules():
        if hasattr(module, "update_bias") and getattr(module, "router", "") == "sigmoid_bias":
            if multi and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(module.load_counts)
            module.update_bias()


def all_finite(*values: torch.Tensor) -> bool:
    """True when every value (the step's loss, the global gradient norm) is finite. A NaN or inf step must not
    update: one bad batch would otherwise write NaN into every weight and Adam moment."""
    return all(bool(torch.isfinite(v)) for v in values)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (identity in a single process). For logging, not for gradients."""
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t /= torch.distributed.get_world_size()
    return t


# ----------------------------------------------------------------------------- logging


class RunLogger:
    """log.jsonl (contract 4), optional wandb with a run id that survives resume, a loss-curve PNG."""

    def __init__(self, cfg: TrainConfig, enabled: bool, run_id: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self.wandb = None
        self.run_id = run_id
        if enabled and cfg.wandb_project and cfg.wandb_mode != "disabled":
            import wandb  # imported only when asked for: it is slow to import and optional offline

            self.run_id = run_id or wandb.util.generate_id()
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                id=self.run_id,
                resume="allow",
                mode=cfg.wandb_mode,
                dir=cfg.out_dir,
                config=to_dict(cfg),
            )

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so log.jsonl reads as one clean run."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        keep = []
        with open(self.path) as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a kill mid-write: drop it
                    continue
                if record.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(out_dir: str, title: str) -> str | None:
    """loss_curve.png from log.jsonl; skipped with a note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the loss-curve PNG")
        return None
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    replay = [(r["step"], r["replay_loss"]) for r in rows if "replay_loss" in r]  # SFT/DPO with replay_data
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if replay:
        ax.plot(*zip(*replay, strict=True), label="loss on replayed pretraining text")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss_curve.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- faults


class StopFlag:
    """SIGTERM / SIGINT set a flag instead of killing the process mid-step.

    The loop checks `flag.stop` at each step boundary, saves a checkpoint and exits 0. A second
    Ctrl-C while the flag is already set restores the default handler, so an impatient user can
    still kill the run.
    """

    def __init__(self):
        self.stop = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop = True
        self.signal_name = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- one run's machinery


class Run:
    """Everything around a training loop that the three scripts share, so each loop stays short.

        run = Run(cfg, "sft")                                 # ranks, device, dtype, run.micro x run.accum
        model, optimizer = run.prepare(raw_model)             # wrap (DDP/FSDP), AdamW groups
        start = run.resume(load_weights, data=stream)         # newest complete checkpoint, if any
        while step < cfg.steps:
            ... forward / backward under run.autocast and run.no_sync(micro) ...
            ... unscale, clip, optimizer.step(), zero_grad() in the loop's own lines ...
            run.count_bad_steps(step, applied)                # policy: skipped steps, stop after too many
            ...; run.log({...}); run.save(step + 1, write_weights, data=stream)
        run.finish(step)

    The model-specific parts come in as callbacks: `write_weights(dir)` writes config.json +
    model.safetensors (or a LoRA adapter) and `load_weights(dir)` reads them back, so one
    checkpoint format serves full fine-tuning and adapters alike.
    """

    def __init__(self, cfg: TrainConfig, stage: str):
        self.cfg, self.stage = cfg, stage
        # Decided before any process group exists, so a mistake stops every rank at start-up with one line.
        world_size = distributed.launch_env()[2]
        self.parallel = resolve_parallel(cfg, world_size)  # auto -> none or ddp
        self.micro, self.accum = batch_split(cfg, world_size)  # batch_size = micro x accum x world
        try:  # device=cuda on a machine without one, WORLD_SIZE without torchrun: one line, not a traceback
            self.dist = distributed.init_distributed(cfg.device)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.master = self.rank == 0
        self.device = self.dist.device  # the process group's device is the batches' device: one decision
        self.dtype = resolve_dtype(cfg, self.device)
        use_autocast = self.dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if use_autocast else contextlib.nullcontext()
        # fp16 needs loss scaling (its exponent range is too small for small gradients); bf16 does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # FSDP: every rank holds (and so saves) its own slice of the optimizer state.
        self.sharded = is_sharded(self.parallel)
        self.bad_in_a_row = self.bad_steps_total = 0
        self.start_step, self.last_checkpoint, self.progress, self.logger = 0, None, None, None
        self.stop = StopFlag()
        # Nothing is written to out_dir yet: a run that stops on bad data or a bad checkpoint before its
        # first step leaves an existing out_dir exactly as it was (ARCHITECTURE.md contract 1). See resume().

    def print(self, *args) -> None:
        distributed.print0(*args, flush=True)

    def prepare(self, raw_model: torch.nn.Module):
        """(wrapped model, AdamW over its trainable parameters). Order: adapters first, then wrap, then optimize."""
        self.raw_model = raw_model
        cfg, opts = self.cfg, {}
        if self.sharded:
            opts["mixed_precision"] = cfg.fsdp_mixed_precision and self.dtype == torch.bfloat16
        if self.parallel == "fsdp":
            opts.update(prefetch=cfg.fsdp_prefetch, zero2=cfg.zero2)
        try:  # ranks that built different models: one line, before any weight moves
            self.model = distributed.wrap_model(raw_model, self.parallel, self.dist, **opts)
        except distributed.ModelMismatchError as e:
            raise UserError(str(e)) from None
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        # Dropout differs per rank; initial weights were drawn before this, identically on every rank.
        torch.manual_seed(self.cfg.seed + 1000 * self.rank)
        return self.model, self.optimizer

    def no_sync(self, micro: int):
        """Gradient accumulation: only the last micro-batch of a step all-reduces gradients."""
        return distributed.maybe_no_sync(self.model, micro < self.accum - 1)

    def resume(self, load_weights, data=None) -> int:
        """Restore the newest complete checkpoint (or cfg.resume); returns the step to continue from.

        load_weights(ckpt_dir) -> a full state dict for `self.model` (the script knows whether that is the
        whole network or only LoRA weights). Also starts the logger and the progress bar.
        """
        cfg, run_id = self.cfg, None
        if self.master and os.path.isdir(cfg.out_dir):  # before reading a checkpoint another run may be pruning
            lock_out_dir(cfg.out_dir)
        # resume=never, or resume=PATH to a checkpoint of another out_dir, starts a new run here.
        own = os.path.realpath(os.path.join(cfg.out_dir, "checkpoints"))
        foreign = cfg.resume not in ("auto", "never") and os.path.dirname(os.path.realpath(cfg.resume)) != own
        earlier = list_checkpoints(cfg.out_dir) if cfg.resume == "never" or foreign else []
        if earlier and not cfg.overwrite:
            # A new run among an old run's checkpoints would mix the two: pruning keeps the highest step
            # numbers (the old run's) and a later resume=auto would pick the old run's newest.
            raise UserError(
                f"resume={cfg.resume}: {cfg.out_dir} holds {len(earlier)} checkpoint(s) of an earlier run "
                f"(newest {os.path.basename(earlier[-1])}); add overwrite=true to delete them, or choose another out_dir"
            )
        ckpt = find_resume_checkpoint(cfg)
        if ckpt is not None:
            load_weights(ckpt)
            state, opt_tensors = load_train_state(ckpt, self.rank, per_rank_optimizer=self.sharded)
            if opt_tensors is not None:
                load_optimizer_tensors(self.optimizer, opt_tensors, state["optimizer"])
            if data is not None:
                data.load_state_dict(state["data"])
            self.start_step, run_id = state["step"], state.get("wandb_run_id")
            # A run killed after its last save but before the final export resumes at step == steps: finish()
            # then exports this checkpoint (and writes DONE) without running a step.
            self.last_checkpoint = ckpt
            self.bad_steps_total = state.get("bad_steps_total", 0)
            self.print(f"resumed from {ckpt} at step {self.start_step}")
        if self.master:  # data and model have loaded: from here on the run writes its outputs
            os.makedirs(cfg.out_dir, exist_ok=True)
            lock_out_dir(cfg.out_dir)  # a no-op when taken above
            if earlier:
                shutil.rmtree(os.path.join(cfg.out_dir, "checkpoints"))
                self.print(f"overwrite=true: deleted {len(earlier)} earlier checkpoint(s) in {cfg.out_dir}")
            if ckpt is None or foreign:  # a new run here: what an earlier one finished is no longer the result
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(cfg.out_dir, "DONE"))  # `make` must not skip a stage half redone
            save_config(cfg, os.path.join(cfg.out_dir, "train_config.json"))
        self.logger = RunLogger(cfg, enabled=self.master, run_id=run_id)
        # On resume drop what was logged after the checkpoint; a fresh start begins a fresh log.
        self.logger.truncate_after(self.start_step if ckpt is not None else -1)
        if self.master and cfg.progress:
            self.progress = tqdm(total=cfg.steps, initial=self.start_step, desc=self.stage, dynamic_ncols=True)
        return self.start_step

    def count_bad_steps(self, step: int, applied: bool) -> None:
        """Policy after the loop's step: a skipped (non-finite) step is logged and counted, and max_bad_steps of
        them in a row stop the run, naming the last good checkpoint. The counts are saved with checkpoints."""
        if applied:
            self.bad_in_a_row = 0
            return
        cfg = self.cfg
        self.bad_in_a_row += 1
        self.bad_steps_total += 1
        self.logger.log({"step": step + 1, "skipped": True, "loss": None, "bad_in_a_row": self.bad_in_a_row})
        self.print(f"step {step + 1}: non-finite loss or gradient, update skipped ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row >= cfg.max_bad_steps:
            good = list_checkpoints(cfg.out_dir)
            where = f"; the last good checkpoint is {good[-1]}" if good else ""
            self.stop.restore()
            raise UserError(f"stopping: {self.bad_in_a_row} non-finite steps in a row at step {step + 1}{where}")

    def log(self, record: dict) -> None:
        self.logger.log(record)

    def should_stop(self, step: int) -> bool:
        """A signal arrived, or this process has run its stop_after_steps."""
        n = self.cfg.stop_after_steps
        return self.stop.stop or bool(n and step - self.start_step >= n)

    def save(self, step: int, write_weights, data=None, extra: dict | None = None) -> str:
        """A checkpoint of step `step`. write_weights(dir) runs on the master; under FSDP call
        `self.full_state_dict()` on every rank first (it is a collective)."""
        state = {
            "data": data.state_dict() if data is not None else None,
            "wandb_run_id": self.logger.run_id,
            "bad_steps_total": self.bad_steps_total,
            "config": to_dict(self.cfg),
            **(extra or {}),
        }
        path = save_checkpoint(
            self.cfg.out_dir,
            step,
            self.rank,
            write_weights,
            optimizer_tensors(self.optimizer),
            state,
            self.cfg.keep_last,
            per_rank_optimizer=self.sharded,
        )
        self.last_checkpoint = path
        self.print(f"saved {path}")
        return path

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights gathered from FSDP shards (collective) onto the master, which alone writes
        them ({} on the other ranks); None when not sharded."""
        return distributed.full_state_dict(self.model, rank0_only=True) if self.sharded else None

    def finish(self, step: int, title: str, leave_group: bool = True) -> None:
        """Close the progress bar; at the true end export the final model to out_dir and plot the losses.
        leave_group=False keeps the process group for another Run in this process (train_vlm's stage=both)."""
        if self.progress is not None:
            self.progress.close()
        if self.stop.stop or (self.cfg.stop_after_steps and step < self.cfg.steps):
            self.print(f"{self.stop.signal_name or 'stop_after_steps'}: saved step {step}; continue with resume=auto")
        elif self.master and self.last_checkpoint:
            export_final(self.cfg.out_dir, self.last_checkpoint)
            png = plot_loss_curve(self.cfg.out_dir, title)
            # DONE marks a finished stage: `make demo` skips stages that have one (FORCE=1 redoes them).
            with open(os.path.join(self.cfg.out_dir, "DONE"), "w") as fh:
                json.dump({"stage": self.stage, "step": step, "time": time.time()}, fh)
            print(f"done: final model in {self.cfg.out_dir}" + (f", loss curve {png}" if png else ""), flush=True)
        self.logger.finish()
        self.stop.restore()
        if self.master:
            unlock_out_dir(self.cfg.out_dir)
        if leave_group:
            distributed.cleanup()
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the master's export is on disk before another Run on any rank reads it


def guess_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """A rough per-device dense peak for MFU when the user gives none (bf16 tensor cores on GPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12, "A10": 125e12}
        for key, flops in table.items():
            if key in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2  # fp32 matmuls run as TF32
        return 100e12
    # CPU: cores x ~2.5 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units); only a yardstick.
    return (os.cpu_count() or 1) * 2.5e9 * 32
