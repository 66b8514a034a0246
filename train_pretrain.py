"""Pretraining: next-token prediction on token shards, one readable loop.

    python prepare_data.py                                   # built-in corpus -> data/builtin
    python train_pretrain.py configs/pretrain_tiny.yaml      # the CPU demo, a few minutes
    torchrun --nproc_per_node 8 train_pretrain.py configs/pretrain_0.5B.yaml parallel=fsdp

Each optimizer step sees `batch_size` sequences of `seq_len` tokens whatever the launch: on
`world_size` ranks each rank runs `accum` micro-batches of `micro` sequences (batch = micro x accum
x world), micro being the largest size up to `micro_batch_size` that divides batch_size / world_size
(launch.batch_split). The loss of each micro-batch is divided by `accum` so the summed
gradients are the mean over the whole batch, exactly as one big batch would give.
`dry_run=true` prints that plan (and the memory estimate) without training.

What happens where (one step: this file, then train_common, distributed, shards, model, moe):
- this file: the loop, forward, loss / accum, backward, unscale, clip, optimizer.step(), zero_grad();
- train_common.py: AdamW groups, LR schedule, the non-finite check, `Run` (checkpoints, log.jsonl, signals,
  the bad-step policy); the settings themselves are launch.TrainConfig, the model's a ModelConfig section;
- distributed.py: ranks, DDP / FSDP wrappers, the global gradient norm;
- shards.TokenStream: the batches, positioned exactly on resume;
- model.py / moe.py: the network (MoE auxiliary losses are added here and logged apart).

Faults: Ctrl-C / SIGTERM save at the next step boundary and exit 0; a non-finite loss or
gradient skips the step, and too many in a row stop the run without touching the last good
checkpoint; `resume=auto` continues bit-exactly from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

import distributed
import train_common as tc
from config import UserError, run_cli, to_dict
from generation import generate
from hf_checkpoint import LazyStateDict
from launch import TrainConfig, attn_impl_errors, resolve_attn_impl
from model import ModelConfig, Transformer
from planner import dry_run
from shards import TokenStream
from tokenizer import Tokenizer


@dataclass
class PretrainConfig(TrainConfig):
    out_dir: str = "out/pretrain"  # where checkpoints, log.jsonl and the final model go
    data_dir: str = "data/builtin"  # token shards + tokenizer written by prepare_data.py
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig.from_preset("tiny")
    )  # the network: model=NAME fills it from configs/model/NAME.yaml (or a model YAML's path), model.KEY=VALUE sets one key
    dropout: float = 0.0  # dropout on attention and residual branches
    attn_impl: str = "auto"  # auto (triton on CUDA, else sdpa) | naive | sdpa | triton
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward to save memory
    init_from: str = ""  # start from this checkpoint's weights instead of random (continued pretraining)
    sample_prompt: str = "def "  # prompt for the sample texts printed during training
    sample_tokens: int = 48  # tokens per sample text
    inject_nan_steps: list[int] = field(
        default_factory=list
    )  # fault drills: make the loss NaN at these steps (1-based)

    def validate(self) -> list[str]:
        errors = super().validate()
        meta = os.path.join(self.data_dir, "meta.json")
        self.check_path(errors, "data_dir", self.data_dir, "prepared data", " (run: python prepare_data.py)", meta)
        if not 0.0 <= self.dropout < 1.0:
            errors.append("dropout must be in [0, 1)")
        errors += attn_impl_errors(self)
        for key in ("attn_impl", "dropout", "gradient_checkpointing"):  # run choices, kept out of the shape
            if getattr(self.model, key) != getattr(ModelConfig(), key):
                errors.append(f"model.{key} is chosen per run: set {key}=... instead")
        try:
            ModelConfig(**to_dict(self.model))  # the shape fits together: heads divide the width, ...
        except ValueError as e:
            errors.append(f"model: {e}")
        if self.init_from:
            self.check_path(errors, "init_from", self.init_from, "checkpoint directory")
        return errors


def runtime_settings(cfg: PretrainConfig, attn_impl: str) -> dict:
    """The ModelConfig fields this run chooses rather than the checkpoint: kernel (resolved), dropout, recompute."""
    return dict(attn_impl=attn_impl, dropout=cfg.dropout, gradient_checkpointing=cfg.gradient_checkpointing)


def build_model_config(cfg: PretrainConfig, vocab_size: int, attn_impl: str) -> ModelConfig:
    """cfg.model plus this run's choices; the embedding grows to cover the tokenizer (vocab_size 0: a dry run
    without data). A shape that does not fit together (heads that do not divide the width, ...) is one line."""
    values = {**to_dict(cfg.model), **runtime_settings(cfg, attn_impl)}
    values["vocab_size"] = max(values["vocab_size"], vocab_size)
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"model: {e}") from None


@torch.no_grad()
def evaluate(model, stream: TokenStream, n_batches: int, device, autocast) -> float:
    """Mean validation loss over the first `n_batches` of the val split (the same batches every time)."""
    model.eval()
    stream.load_state_dict({**stream.state_dict(), "epoch": 0, "row": 0})  # the same batches every time
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = stream.next_batch()
        with autocast:
            total += model(x.to(device), y.to(device)).float()
    model.train()
    total = tc.all_reduce_mean(total)
    return total.item() / n_batches


def plan_model_config(cfg: PretrainConfig) -> ModelConfig:
    """The model this run would build, for the dry run (built on the meta device there: no weights are read)."""
    if cfg.init_from and os.path.isdir(cfg.init_from):
        try:
            return ModelConfig.from_checkpoint(cfg.init_from)
        except ValueError as e:
            raise UserError(f"init_from: {e}") from None
    has_data = os.path.isfile(os.path.join(cfg.data_dir, "tokenizer.model"))
    vocab_size = Tokenizer(cfg.data_dir).vocab_size if has_data else 0
    return build_model_config(cfg, vocab_size, resolve_attn_impl(cfg, torch.device("cpu")))


def main(cfg: PretrainConfig) -> None:
    if cfg.dry_run:
        return dry_run(cfg, "train_pretrain.py", plan_model_config(cfg))

    # ---- setup ----
    run = tc.Run(cfg, "pretrain")
    device = run.device
    attn_impl = resolve_attn_impl(cfg, device)  # auto -> triton on CUDA, sdpa elsewhere

    # ---- data ----
    with open(os.path.join(cfg.data_dir, "meta.json")) as fh:
        meta = json.load(fh)
    tokenizer = Tokenizer(cfg.data_dir)
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise UserError(f"{cfg.data_dir}/meta.json: shards were made with a different tokenizer than tokenizer.model")
    stream_args = dict(batch_size=run.micro, seq_len=cfg.seq_len, rank=run.rank, world_size=run.world_size)
    try:  # a truncated or foreign shard, or too little data for one batch: one line naming the file
        train_data = TokenStream(cfg.data_dir, "train", seed=cfg.seed, **stream_args)
        val_data = TokenStream(cfg.data_dir, "val", seed=cfg.seed, **stream_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    val_split = meta.get("splits", {}).get("val", {})
    # Bits per byte divides by the val split's own bytes per token: comparable across tokenizers.
    bytes_per_token = val_split["text_bytes"] / val_split["tokens"] if val_split.get("tokens") else None

    # ---- model ----
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    if cfg.init_from:
        try:
            # config.json stores the architecture only: this run's kernel, dropout and recompute come from cfg.
            raw_model = Transformer.from_pretrained(cfg.init_from, device=device, **runtime_settings(cfg, attn_impl))
        except ValueError as e:  # not a checkpoint, or truncated / corrupted weights
            raise UserError(f"init_from: {e}") from None
        if raw_model.config.vocab_size < tokenizer.vocab_size:
            raise UserError(
                f"init_from: model vocab {raw_model.config.vocab_size} < tokenizer vocab {tokenizer.vocab_size}"
            )
    else:
        with torch.device("meta"):  # shapes only; run.prepare initializes it (under fsdp one block at a time)
            raw_model = Transformer(build_model_config(cfg, tokenizer.vocab_size, attn_impl))
    flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len)
    peak = cfg.peak_flops or tc.guess_peak_flops(device, run.dtype)
    run.print(f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token")
    model, optimizer = run.prepare(raw_model)
    step_model = torch.compile(model) if cfg.compile else model  # `raw_model` keeps the uncompiled weights

    def load_weights(ckpt: str) -> None:
        if run.sharded:  # tensor by tensor from disk, each rank keeps its slice
            state = LazyStateDict(ckpt)
        else:
            state = Transformer.from_pretrained(ckpt, device=device).state_dict()
        distributed.load_full_state_dict(model, state)

    def write_weights(path: str, full_state=None) -> None:
        extra = {"state_dict": full_state} if full_state is not None else {}
        raw_model.save_pretrained(path, tokenizer_dir=cfg.data_dir, **extra)

    def save(step: int) -> None:
        full_state = run.full_state_dict()  # FSDP: gather the shards (every rank takes part)
        run.save(step, lambda path: write_weights(path, full_state), data=train_data)

    # ---- training loop ----
    step = run.resume(load_weights, data=train_data)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_last, tokens_last = time.perf_counter(), step * tokens_per_step  # for tokens/s since the last log line
    while step < cfg.steps:
        lr = tc.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)  # summed on device: no host sync until logging
        aux_sum = torch.zeros((), device=device)
        for micro in range(run.accum):
            x, y = train_data.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with run.no_sync(micro):  # only the last micro-batch all-reduces gradients
                with run.autocast:
                    loss = step_model(x, y)
                    aux = raw_model.moe_aux_loss()  # MoE balancing losses (0 for dense models)
                if step + 1 in cfg.inject_nan_steps:
                    loss = loss * float("nan")
                # Divide by accum: the gradients of `accum` micro-batches then sum to the mean over the batch.
                run.scaler.scale((loss + aux) / run.accum).backward()
            loss_sum += loss.detach()
            aux_sum += torch.as_tensor(aux).detach()
        loss_mean = tc.all_reduce_mean(loss_sum / run.accum)
        # ---- the step: unscale, clip, optimizer.step(), zero_grad ----
        run.scaler.unscale_(optimizer)  # fp16: true-scale gradients before clipping (a no-op in bf16 / fp32)
        grad_norm = distributed.clip_grad_norm_(model, cfg.grad_clip or math.inf)  # over all ranks and shards
        applied = tc.all_finite(loss_mean, grad_norm)  # a NaN / inf step is skipped: weights and moments stay
        if applied:
            run.scaler.step(optimizer)  # optimizer.step() (fp16: unless the scaled gradients overflowed)
            tc.update_moe_bias(raw_model)  # DeepSeek-V3 aux-loss-free balancing: a no-op for dense models
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.count_bad_steps(step, applied)  # policy: log a skipped step, stop after max_bad_steps in a row
        step += 1
        if run.progress is not None:
            run.progress.update(1)
        if not applied:
            continue

        # ---- logging, eval, samples, checkpoints ----
        done = step == cfg.steps
        if step % cfg.log_every == 0 or done:
            now, tokens = time.perf_counter(), step * tokens_per_step
            tok_per_s = (tokens - tokens_last) / max(now - t_last, 1e-9)  # all ranks together
            t_last, tokens_last = now, tokens
            record = {
                "step": step,
                "loss": loss_mean.item(),
                "lr": lr,
                "tokens": tokens,
                "tok_per_s": tok_per_s,
                "mfu": flops_per_token * tok_per_s / (peak * run.world_size),
                "grad_norm": grad_norm.item(),
            }
            if raw_model.config.n_experts:
                record["aux_loss"] = (aux_sum / run.accum).item()
                record.update(flatten_moe_metrics(raw_model.moe_metrics()))
            run.log(record)
            if run.progress is not None:
                run.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_per_s:.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or done:
            val = evaluate(step_model, val_data, cfg.eval_batches, device, run.autocast)
            record = {"step": step, "val_loss": val}
            if bytes_per_token:
                record["val_bpb"] = val / math.log(2) / bytes_per_token  # bits per byte: tokenizer-independent
            run.log(record)
            run.print(
                f"step {step}: val loss {val:.4f}" + (f", {record['val_bpb']:.3f} bits/byte" if bytes_per_token else "")
            )
        # Sampling needs whole weights on one rank; sharded (FSDP) weights only exist in pieces, so skip it there.
        if run.master and not run.sharded and ((cfg.sample_every and step % cfg.sample_every == 0) or done):
            print_sample(raw_model, tokenizer, cfg, device)
        stopping = run.should_stop(step)
        if step % cfg.save_every == 0 or done or stopping:
            save(step)
        if stopping:
            break

    # ---- finish ----
    run.finish(step, f"pretrain, {cfg.model.num_hidden_layers} layers x {cfg.model.hidden_size}")


def flatten_moe_metrics(metrics: dict) -> dict:
    """{layer: {name: tensor}} -> flat JSON numbers, e.g. moe/3/max_load."""
    flat = {}
    for layer, values in metrics.items():
        for name, value in values.items():
            value = value.tolist() if torch.is_tensor(value) else value
            flat[f"moe/{layer}/{name}"] = value
    return flat


@torch.no_grad()
def print_sample(model, tokenizer, cfg: PretrainConfig, device) -> None:
    """One sampled continuation of `sample_prompt`, with its own generator so training RNG is untouched."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ids = tokenizer.encode(cfg.sample_prompt, bos=True)
    was_training = model.training
    model.eval()
    out = generate(model, [ids], max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train(was_training)
    print("sample: " + repr(cfg.sample_prompt + tokenizer.decode(out[0])))


if __name__ == "__main__":
    run_cli(main, PretrainConfig, __doc__)
