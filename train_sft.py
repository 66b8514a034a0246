"""Supervised fine-tuning (SFT): teach a base model to answer in the chat format, one readable loop.

    python train_pretrain.py configs/pretrain_tiny.yaml          # the base model: out/pretrain
    python train_sft.py configs/sft_tiny.yaml                     # full fine-tuning (Muon) on the built-in tasks, ~4 min on CPU
    python train_sft.py configs/sft_tiny.yaml finetune=lora optimizer=adamw lr=3e-3 min_lr=3e-4 out_dir=out/sft_lora
    python sample.py checkpoint=out/sft chat=true          # talk to it
    torchrun --nproc_per_node 8 train_sft.py configs/sft_tinyllama_qlora.yaml

What it does
- Loads a base checkpoint (ours from pretraining, or a Hugging Face Llama dir) with
  `Transformer.from_pretrained`, then trains it in one of three ways (`finetune=`):
    full   every weight is trained (fp32 master weights, autocast on GPU);
    lora   frozen base + low-rank adapters on `lora_targets` (Hu et al. 2021), see lora.py;
    qlora  the same, with the frozen base stored in 4-bit NF4 (Dettmers et al. 2023).
- Conversations (`{"messages": [{"role", "content"}, ...]}` rows from the built-in tasks, a local
  .jsonl, or a hub dataset) are rendered by `tokenizer.render_chat`, which also returns the loss
  mask: 1 on assistant content and its closing <|end|>. Targets are -1 everywhere else, so the model
  is graded only on what it must learn to say, never on the user's words (InstructGPT, Ouyang et
  al. 2022, and most SFT recipes since).
- Every assistant token of a step weighs the same: the summed loss of all micro-batches is divided
  by the number of target tokens in the whole step (over ranks too). Dividing each micro-batch's
  mean by `accum`, as pretraining does, would over-weight tokens in micro-batches with short answers.
- `replay_data=DIR` adds `replay_rows` rows of DIR's pretraining text to every optimizer step (over all ranks,
  replay_rows / (world x accum) whole seq_len rows in each micro-batch), their own mean loss weighted by `replay_weight` (finetune.py, replay). Without it, 300 steps on short answers made the
  demo model forget its pretraining (3.76 -> 7.97 nats on that text; benchmarks/bench_forgetting.py).

Padding, or packing (the key data choice)
  By default each micro-batch is right-padded to its longest example (capped at `seq_len`), pad
  targets -1. With causal attention a real token only sees tokens to its left, so right padding never
  leaks into real positions: the padded batch gives exactly the per-example losses (tests check this
  against each example run alone). On short, ragged chats much of that batch is padding. `pack=true`
  packs the same micro-batch's examples into as few seq_len rows as first-fit decreasing finds and
  passes model.forward a document id per token: attention is block-diagonal and positions restart per
  example, so every example's loss is unchanged and the step's gradient equals the padded one (up to
  float summation order); only the padding work goes. The batch still counts examples, not rows.
  The Triton kernel (attn_impl=triton, the default on GPU) takes the document ids directly.

Data order is a seeded permutation per epoch; its position (epoch, index) is plain ints saved
with each checkpoint, so `resume=auto` continues bit-exactly (weights, optimizer, RNG, data).
Evaluation every `eval_every` steps (and at step 0): loss on `val_data` and greedy exact-match
accuracy on `eval_tasks` (tasks.task_accuracy), both in log.jsonl.

A foreign base tokenizer (TinyLlama / Llama: <unk>, <s>, </s>, no pad, no chat markers) is extended
at start-up by tokenizer.extend_with_chat_tokens: <pad> and the four markers are appended as control
ids after the existing 32,000 (OUT/tokenizer/ holds the result, copied into every output), and the
model's embed_tokens / lm_head grow to match (new rows = the mean of the old ones, Hewitt 2021). Frozen
LoRA could never learn those rows, so (q)lora runs then also train embed_tokens and lm_head in full and
save them in the adapter as PEFT's modules_to_save (lora.py); the merged model holds everything.

Outputs (ARCHITECTURE.md contract 2): full runs write config.json + model.safetensors; LoRA runs
write adapter_config.json + adapter_model.safetensors (PEFT layout, base_model_name_or_path = the
base dir), and at the end also OUT/merged/, a plain model with the adapters folded in, for
sample.py, eval.py and transformers. Tokenizer files are copied into every output.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

import distributed
import lora
import tasks
import train_common as tc
from checkpoint import read_finetuned, write_finetuned, write_merged
from config import UserError, run_cli
from finetune import (
    ReplayConfig,
    add_replay,
    collate,
    load_base,
    load_conversations,
    pack,
    plan_base_config,
    render_example,
    replay_stream,
    resolve_base,
    seek,
    val_loss,
)
from generation import chat_answers
from launch import resolve_attn_impl
from planner import dry_run
from shards import ExampleSampler
from tasks import task_accuracy
from tokenizer import Tokenizer, extend_with_chat_tokens

# Legend: B batch (examples in a micro-batch), T time (tokens), V vocabulary.


@dataclass
class SFTConfig(ReplayConfig):
    out_dir: str = "out/sft"  # where checkpoints, log.jsonl, the adapter and the merged model go
    data: str = "data/builtin/sft_train.jsonl"  # conversations: .jsonl file, local dataset file/dir, or hub dataset
    families: list[str] = field(default_factory=list)  # keep only rows with these "family" values (empty = all)
    val_data: str = "data/builtin/sft_test.jsonl"  # conversations for the validation loss, like `data` ('' = none)
    val_split: str = "test"  # split to read when `val_data` is a dataset, e.g. test_sft
    # SFT defaults: a few hundred steps at a LoRA-sized learning rate.
    steps: int = 300  # optimizer steps in the whole run
    lr: float = 2e-4  # peak learning rate
    min_lr: float = 2e-5  # learning rate at the end of the decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    eval_every: int = 100  # steps between evaluations (0 = only at the end)

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.val_data.endswith(".jsonl"):
            self.check_path(errors, "val_data", self.val_data, "file")
        return errors


def main(cfg: SFTConfig) -> None:
    if cfg.dry_run:
        lora_note = () if cfg.finetune == "full" else (f"{cfg.finetune}: only adapters train, memory is lower",)
        return dry_run(cfg, "train_sft.py", plan_base_config(cfg), "conversations", ragged=True, notes=lora_note)

    # ---- setup ----
    run = tc.Run(cfg, "sft")
    device = run.device
    use_lora = cfg.finetune != "full"
    cfg.base = resolve_base(cfg.base)  # hf:ORG/NAME -> its snapshot dir in the hub cache; a dir stays as is
    tok_dir = cfg.tokenizer or cfg.base
    base_dir = os.path.abspath(cfg.base)  # adapters name their base by an absolute path: loadable from anywhere

    # ---- data ----
    extended = False
    try:
        tokenizer = Tokenizer(tok_dir)
    except ValueError as e:
        try:  # an HF (Llama) tokenizer without our chat markers: append them; written to OUT/tokenizer below
            tokenizer, extended = extend_with_chat_tokens(tok_dir), True
        except ValueError:
            raise UserError(f"tokenizer in {tok_dir}: {e}") from None
        run.print(f"tokenizer: {tok_dir} extended with <pad> and the chat markers, vocab {tokenizer.vocab_size}")
        tok_dir = os.path.join(cfg.out_dir, "tokenizer")
    rows = load_conversations(cfg.data, cfg.data_split, cfg.families)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    train = [render_example(tokenizer, r["messages"], cfg.seq_len) for r in rows]
    train = [ex for ex in train if any(t != -1 for t in ex[1])]  # cut to seq_len before any answer: nothing to learn
    if len(train) < len(rows):
        run.print(f"note: {len(rows) - len(train)} conversations lost all assistant tokens at seq_len {cfg.seq_len}")
    if not train:
        raise UserError(f"data: no conversation has an assistant token within seq_len {cfg.seq_len}")
    val = []
    if cfg.val_data:
        val_rows = load_conversations(cfg.val_data, cfg.val_split, cfg.families)
        val_rows = val_rows[: cfg.eval_batches * cfg.micro_batch_size]  # the same examples at every evaluation
        val = [render_example(tokenizer, r["messages"], cfg.seq_len) for r in val_rows]
    task_rows = []
    if cfg.eval_tasks and cfg.eval_tasks_n:
        try:
            task_rows = tasks.load_jsonl(cfg.eval_tasks, tasks.TEST_KEYS)
        except ValueError as e:
            raise UserError(str(e)) from None
        task_rows = [r for r in task_rows if not cfg.families or r.get("family") in cfg.families][: cfg.eval_tasks_n]
    sampler = ExampleSampler(len(train), cfg.seed)
    replay = None
    if cfg.replay_data:  # rows of pretraining text for every micro-batch of this rank (finetune.py: replay)
        replay = replay_stream(cfg.replay_data, cfg.replay_rows, cfg.seq_len, tokenizer, run.rank, run.world_size,
                               run.accum, cfg.seed)  # fmt: skip
        run.print(f"replay: {cfg.replay_rows} rows of {cfg.replay_data} text per step, weight {cfg.replay_weight}")
    n_tokens = sum(len(x) for x, _ in train)
    n_targets = sum(sum(t != -1 for t in y) for _, y in train)
    run.print(f"data: {len(train)} conversations, {n_tokens:,} tokens, {n_targets:,} assistant tokens (trained on)")

    # ---- model ----
    torch.manual_seed(cfg.seed)  # LoRA's A init and dropout: identical on every rank
    raw_model = load_base(
        cfg, device, resolve_attn_impl(cfg, device), grow_vocab_to=tokenizer.vocab_size if extended else 0
    )
    if extended and raw_model.config.pad_token_id is None:
        raw_model.config.pad_token_id = tokenizer.pad_id  # config.json then names the new <pad>
    if tokenizer.vocab_size > raw_model.config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the base model only {raw_model.config.vocab_size}"
        )
    run.print(lora.trainable_report(raw_model) if use_lora else f"full: {raw_model.num_parameters():,} trainable")
    model, optimizer = run.prepare(raw_model)  # order: adapters first, then wrap, then the optimizer
    step_model = torch.compile(model) if cfg.compile else model

    def save(step: int) -> None:
        full_state = None if use_lora else run.full_state_dict()  # FSDP: gather the shards (collective)
        # LoRA: only the adapter (the base stays where it is, named in adapter_config.json) + the tokenizer.
        write = lambda path: write_finetuned(raw_model, path, tok_dir, base_dir, full_state)  # noqa: E731
        run.save(step, write, data=sampler)

    def evaluate(step: int) -> None:
        record = {"step": step}
        if val:
            record["val_loss"] = val_loss(model, val, cfg.micro_batch_size, tokenizer.pad_id, device, run.autocast)
        if task_rows and run.master and not run.sharded:  # generation needs the whole model on one rank
            with run.autocast:
                answers = chat_answers(raw_model, tokenizer, [r["prompt"] for r in task_rows], cfg.eval_max_new_tokens)
                acc = task_accuracy(task_rows, answers)
            record["task_acc"] = acc["accuracy"]
            record.update({f"task_acc/{f}": a for f, a in acc["by_family"].items()})
        run.log(record)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
        run.print(f"step {step}: {shown}")

    # ---- training loop ----
    step = run.resume(lambda ckpt: read_finetuned(raw_model, model, ckpt, device), data=sampler)
    if replay is not None:
        seek(replay, step)  # its position is a function of the step: nothing to save
    if extended and run.master:  # written only now: a run that stops at start-up leaves out_dir untouched
        tokenizer.save(tok_dir)
    if step == 0 and cfg.eval_at_start:
        evaluate(0)  # the base model's numbers, for the before/after comparison
    t_last, tokens_last = time.perf_counter(), sampler.tokens
    while step < cfg.steps:
        lr = tc.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This rank's share of the global batch (the order does not depend on world size), in micro-batches.
        mine = sampler.take(cfg.batch_size)[run.rank :: run.world_size]
        mb = run.micro
        chunks = [[train[i] for i in mine[m * mb : (m + 1) * mb]] for m in range(run.accum)]
        if cfg.pack:
            batches = [pack(chunk, tokenizer.pad_id, cfg.seq_len) for chunk in chunks]
        else:
            batches = [(*collate(chunk, tokenizer.pad_id), None) for chunk in chunks]
        n_sft = [len(x) for x, _, _ in batches]  # the first rows of each micro-batch are chats, any others replay
        if replay is not None:
            xr, yr = replay.next_batch()  # (replay_rows / world, seq_len) each
            k = cfg.replay_rows // (run.world_size * run.accum)  # rows per micro-batch
            batches = [add_replay(*b, xr[m * k : (m + 1) * k], yr[m * k : (m + 1) * k], tokenizer.pad_id)
                       for m, b in enumerate(batches)]  # fmt: skip
        # Normalize by the target tokens of the whole step on all ranks; DDP averages gradients over ranks,
        # so each rank divides by the mean count: the result is sum(token losses) / count(all tokens).
        sft_targets = sum(int((y[:n] != -1).sum()) for (_, y, _), n in zip(batches, n_sft, strict=True))
        replay_targets = sum(int((y[n:] != -1).sum()) for (_, y, _), n in zip(batches, n_sft, strict=True))
        counts = torch.tensor([sft_targets, replay_targets, sum(x.numel() for x, _, _ in batches)], dtype=torch.float64)
        n_targets, n_replay, n_rows = tc.all_reduce_mean(counts.to(device)).tolist()
        denom, replay_denom = max(n_targets, 1.0), max(n_replay, 1.0)
        sampler.tokens += round(n_rows * run.world_size)  # padded tokens processed, all ranks
        loss_sum = torch.zeros((), device=device)  # summed on device: no host sync until logging
        replay_sum = torch.zeros((), device=device)
        for micro, ((x, y, doc), n) in enumerate(zip(batches, n_sft, strict=True)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, T) each
            doc = doc.to(device, non_blocking=True) if doc is not None else None  # (B, T) packed rows, or None
            with run.no_sync(micro):  # only the last micro-batch all-reduces gradients
                with run.autocast:
                    # (B, T) per-token losses, 0 where y is -1 (the output head runs only where y is not)
                    nll = step_model(x, y, loss_reduction="none", document_ids=doc, only_targets=True)
                    aux = raw_model.moe_aux_loss()  # MoE balancing losses of this forward (0 for dense models)
                    loss = nll[:n].sum() / denom
                    # Replay rows: their own mean per token, weighted, so that the SFT loss keeps its meaning.
                    replay_loss = nll[n:].sum() / replay_denom
                # The token losses are already divided by the whole step's count; aux is a mean per forward.
                run.scaler.scale(loss + cfg.replay_weight * replay_loss + aux / run.accum).backward()
            loss_sum += loss.detach()
            replay_sum += replay_loss.detach()
        loss_mean = tc.all_reduce_mean(loss_sum)  # mean loss per assistant token over the global batch
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

        # ---- logging, eval, checkpoints ----
        done = step == cfg.steps
        if step % cfg.log_every == 0 or done:
            now = time.perf_counter()
            tok_per_s = (sampler.tokens - tokens_last) / max(now - t_last, 1e-9)  # padded tokens, all ranks
            t_last, tokens_last = now, sampler.tokens
            record = {"step": step, "loss": loss_mean.item(), "lr": lr, "tokens": sampler.tokens,
                      "tok_per_s": tok_per_s, "grad_norm": grad_norm.item(), "epoch": sampler.epoch}  # fmt: skip
            if replay is not None:
                record["replay_loss"] = tc.all_reduce_mean(replay_sum).item()  # on the pretraining text
            run.log(record)
            if run.progress is not None:
                run.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_per_s:.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or done:
            evaluate(step)
        stopping = run.should_stop(step)
        if step % cfg.save_every == 0 or done or stopping:
            save(step)
        if stopping:
            break

    # ---- finish ----
    if use_lora and cfg.merge_at_end and step == cfg.steps and run.master:
        # A plain checkpoint with W + scaling * B A folded in (QLoRA: into the dequantized base), which
        # sample.py, eval.py and transformers read like any other model.
        run.print(f"merged model in {write_merged(raw_model, cfg.out_dir, tok_dir)}")
    run.finish(step, f"sft {cfg.finetune} from {os.path.basename(base_dir)}")


if __name__ == "__main__":
    run_cli(main, SFTConfig, __doc__)
