"""Direct Preference Optimization (DPO): learn from (prompt, chosen, rejected) pairs, one readable loop.

    python prepare_data.py configs/data_builtin.yaml        # built-in tasks, incl. data/builtin/dpo_train.jsonl
    python train_sft.py configs/sft_tiny.yaml               # the SFT model DPO starts from (out/sft)
    python train_dpo.py configs/dpo_tiny.yaml               # LoRA DPO on the built-in pairs, ~40 s on 2 idle CPU cores
    python train_dpo.py configs/dpo_tiny.yaml loss_type=ipo pairs=static ref=precompute out_dir=out/dpo_ipo
    torchrun --nproc_per_node 8 train_dpo.py base=out/sft_big finetune=full ref=precompute lr=5e-7 min_lr=5e-8 \
        data=HuggingFaceH4/ultrafeedback_binarized data_split=train_prefs

The idea (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model"). The RLHF objective max E[r(x, y)] - beta KL(pi || pi_ref) is maximized by
pi(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), so a policy implies its own reward,
r(x, y) = beta log pi(y|x) / pi_ref(y|x) + (a term that depends on x only). Put that reward into the
Bradley-Terry model of "y_w is preferred to y_l" and the x-only term cancels: preference learning becomes
logistic regression on

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],    loss = -log sigmoid(beta h)

with no reward model and no sampling. log pi(y|x) sums the log-probs of the completion tokens only.

Key choices:
- `dpo_loss` holds every variant in one place: sigmoid (conservative DPO through label smoothing), IPO,
  hinge (SLiC) and robust DPO. Rewards beta * log-ratio are logged, never differentiated.
- The reference: with LoRA it is the same network with its adapters switched off (`lora.disable_adapters`),
  so there is no second copy in memory; full fine-tuning keeps a frozen copy; `ref=precompute` computes the
  reference log-probs of every pair once before training and then never runs the reference again.
  The reference always runs in eval mode (no dropout): it is a fixed function of the pair.
- The chosen and rejected sequences of a micro-batch go through the model in ONE forward (2B rows, padded on
  the right, padded targets -1): one pass over the weights instead of two. Right padding needs no attention
  mask: causal attention never lets a real token see the pads that follow it.
- Tokenization goes through tokenizer.render_prompt_completion, so the prompt/completion boundary is exact
  (no piece merges across it, BOS once). Too long: the prompt is cut from the left (BOS kept), because the
  completion is what is scored.
- `pairs`: static trains on the rows' own (chosen, rejected); on_policy samples k answers per prompt from the
  policy with the KV cache, judges them by exact match (never runs them) and pairs a right answer with the
  policy's own most frequent wrong one, in rounds every `pair_every` steps (iterative / online DPO;
  preference_pairs.py).
- `rpo_alpha` > 0 adds an NLL term on the chosen answer (RPO, Pang et al. 2024). Plain DPO may lower the
  likelihood of both answers; on tiny models that breaks the answer format, and the demo recipe uses it.
- Data loading, batching (right padding) and the resumable sampler are train_sft's; the checkpoint files
  (adapter or full, plus OUT/merged for LoRA) are train_common's, the same as SFT writes.

Checkpoints, resume, logging, signals and the non-finite-step guard are train_common.Run's, as in
train_pretrain.py. Every `eval_every` steps greedy exact-match accuracy on the held-out built-in tasks is
logged (tasks.task_accuracy), with the starting model's accuracy logged at step 0 for comparison.

Shapes: B pairs per micro-batch (2B rows through the model), T time, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import distributed
import lora
import train_common as tc
from checkpoint import read_finetuned, write_finetuned, write_merged
from config import UserError, run_cli
from finetune import (
    ReplayConfig,
    collate,
    load_base,
    pack,
    plan_base_config,
    replay_stream,
    resolve_base,
    seek,
)
from generation import chat_answers
from launch import resolve_attn_impl
from planner import dry_run
from preference_pairs import OnPolicyPairs, read_hub_pairs, read_pairs, tokenize_pair
from shards import ExampleSampler
from tasks import TEST_KEYS, load_jsonl, task_accuracy
from tokenizer import Tokenizer

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# ----------------------------------------------------------------------------- the loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses from summed completion log-probs, all (B,).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards = beta * (log pi - log pi_ref),
    detached. label_smoothing is the assumed probability that a label is flipped (sigmoid and robust).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,) log pi(y_w|x) / pi_ref(y_w|x)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,) how much more the policy prefers y_w than the reference does
    eps = label_smoothing
    if loss_type == "sigmoid":
        # Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the binary cross-entropy
        # against a soft label 1 - eps. eps = 0 is the original DPO loss.
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        # Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased estimate of the clean loss
        # under label noise eps. Unlike the smoothed loss it keeps pushing h up; it can go below zero.
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        # SLiC-HF (Zhao et al. 2023): a margin loss on the reward difference; zero once beta h >= 1.
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        # Preferences"): regress h onto 1 / (2 beta) instead of pushing it to infinity, so a deterministic
        # preference cannot drive the policy arbitrarily far from the reference. (Some libraries average the
        # log-probs over tokens for IPO; here every loss type uses the same summed log-probs.)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not '{loss_type}'")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def completion_logps(model, batch) -> torch.Tensor:
    """batch = (x, y, doc) from make_batch, targets -1 outside completions -> summed completion log-probs (2B,).

    The model's own fp32 cross-entropy with loss_reduction="none" gives -log p per target (0 where ignored).
    Padded rows (doc None) are one sequence each; packed rows add each token into its sequence's sum.
    """
    x, y, doc = batch
    token_logps = -model(x, y, loss_reduction="none", document_ids=doc, only_targets=True)  # (rows, T)
    if doc is None:
        return token_logps.sum(dim=-1)  # (2B, T) -> (2B,)
    real = doc >= 0  # padding is document -1
    n = int(doc.max()) + 1  # 2B sequences
    return token_logps.new_zeros(n).index_add(0, doc[real], token_logps[real])  # (2B,)


def completion_lengths(batch) -> torch.Tensor:
    """Completion tokens per sequence (2B,), for padded or packed batches."""
    _, y, doc = batch
    targets = y != -1
    if doc is None:
        return targets.sum(dim=-1)
    return torch.zeros(int(doc.max()) + 1, dtype=torch.long, device=y.device).index_add(
        0, doc[targets], torch.ones_like(doc[targets])
    )


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off inside the block, the previous mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_logps(model, ref_model, batch) -> torch.Tensor:
    """Reference completion log-probs (2B,): `ref_model` (a frozen copy) when given, else `model` itself with
    its LoRA adapters off, which for an unmerged LoRA model is bit-identical to the base network."""
    if ref_model is not None:
        with eval_mode(ref_model):
            return completion_logps(ref_model, batch)
    with eval_mode(model), lora.disable_adapters(model):
        return completion_logps(model, batch)


# ----------------------------------------------------------------------------- data


def sequence_example(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """prompt + completion -> (x, y) for finetune.collate: y[t] = x[t+1] on completion tokens, else -1.
    The prediction made at the last prompt token (<|assistant|>) is the first completion token."""
    s = prompt_ids + completion_ids
    return s[:-1], [-1] * (len(prompt_ids) - 1) + completion_ids


def make_batch(pairs: list, pad_id: int, pack_len: int = 0):
    """[(prompt_ids, chosen_ids, rejected_ids)] * B -> (x, y, doc). Sequences 0..B-1 are the chosen ones and
    B..2B-1 the rejected ones. pack_len 0: (2B, T) rows right-padded by SFT's collate, doc None. Else the 2B
    sequences packed into rows of at most pack_len tokens by SFT's pack, doc (rows, T) naming each token's
    sequence (-1 on padding)."""
    chosen = [sequence_example(p, c) for p, c, _ in pairs]
    rejected = [sequence_example(p, r) for p, _, r in pairs]
    if pack_len:
        return pack(chosen + rejected, pad_id, pack_len)
    return (*collate(chosen + rejected, pad_id), None)


def batch_to(batch, device):
    return tuple(t.to(device, non_blocking=True) if t is not None else None for t in batch)


@torch.no_grad()
def precompute_reference(model, pairs: list, batch_size: int, pad_id: int, device, autocast,
                         pack_len: int = 0) -> torch.Tensor:  # fmt: skip
    """Reference log-probs of every pair, (N, 2) = (chosen, rejected), from `model` as it is now (call it
    before the first update; a LoRA model runs with its adapters off)."""
    out = torch.empty(len(pairs), 2, device=device)
    for i in range(0, len(pairs), batch_size):
        batch = batch_to(make_batch(pairs[i : i + batch_size], pad_id, pack_len), device)
        with autocast:
            logps = reference_logps(model, None, batch).float()  # (2b,)
        out[i : i + batch_size] = logps.view(2, -1).T  # (b, 2)
    return out


# ----------------------------------------------------------------------------- settings


@dataclass
class DPOConfig(ReplayConfig):
    plain_base = True  # the base is also the reference

    out_dir: str = "out/dpo"  # where checkpoints, log.jsonl, the adapter and the merged model go
    base: str = "out/sft"  # the model to improve, which is also the reference: ours or an HF Llama dir
    data: str = "data/builtin/dpo_train.jsonl"  # .jsonl of preference pairs, or a hub dataset name
    # static: train on the rows' own (chosen, rejected). on_policy: the policy answers each row's prompt
    # samples_per_prompt times, exact match against the row's chosen judges, and a right answer is paired with
    # the policy's own most frequent wrong one (preference_pairs.py; iterative DPO, Xu et al. 2023 / Guo et al. 2024).
    pairs: str = "static"  # static | on_policy
    samples_per_prompt: int = 4  # on_policy: answers sampled per prompt (k)
    pair_prompts: int = 0  # on_policy: prompts sampled per round, a seeded draw (0 = all)
    pair_every: int = 0  # on_policy: steps between rounds of fresh pairs from the current policy (0 = one round)
    pair_temperature: float = 0.7  # on_policy: sampling temperature (lower: the mistakes greedy decoding makes)
    pair_max_new_tokens: int = 16  # on_policy: longest sampled answer
    beta: float = 0.1  # strength of the KL pull toward the reference (the reward is beta * log-ratio)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust
    label_smoothing: float = 0.0  # assumed label-flip probability: conservative DPO (sigmoid) or robust DPO
    rpo_alpha: float = 0.0  # weight of an extra NLL loss on the chosen completions (RPO; 0 = plain DPO)
    ref: str = "auto"  # reference: auto (adapters_off for (q)lora, copy for full) | adapters_off | copy | precompute
    # DPO defaults: short runs, pairs of two sequences each, small steps away from the reference.
    steps: int = 200  # optimizer steps in the whole run
    batch_size: int = 32  # pairs per optimizer step (2x sequences), summed over ranks and accumulation
    micro_batch_size: int = 8  # pairs per forward/backward on one rank (2x rows in the forward)
    seq_len: int = 128  # max tokens of prompt + completion (the prompt is cut from the left beyond it)
    lr: float = 5e-5  # peak learning rate
    min_lr: float = 5e-6  # learning rate at the end of the decay
    eval_every: int = 50  # steps between task-accuracy passes (0 = only at the end)
    save_every: int = 100  # steps between checkpoints (the last step is always saved)

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.beta <= 0:
            errors.append("beta must be > 0")
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not '{self.loss_type}'")
        if not 0.0 <= self.label_smoothing < 0.5:
            errors.append("label_smoothing must be in [0, 0.5)")
        if self.rpo_alpha < 0:
            errors.append("rpo_alpha must be >= 0")
        if self.ref not in ("auto", "adapters_off", "copy", "precompute"):
            errors.append(f"ref must be auto, adapters_off, copy or precompute, not '{self.ref}'")
        if self.ref == "adapters_off" and self.finetune == "full":
            errors.append("ref=adapters_off needs finetune=lora or qlora (full fine-tuning has no adapters)")
        if self.pairs not in ("static", "on_policy"):
            errors.append(f"pairs must be static or on_policy, not '{self.pairs}'")
        if self.pairs == "on_policy" and self.ref == "precompute":
            errors.append("ref=precompute needs pairs=static (on-policy pairs are new every round)")
        if self.samples_per_prompt < 1 or self.pair_prompts < 0 or self.pair_every < 0:
            errors.append("samples_per_prompt must be >= 1, pair_prompts and pair_every >= 0")
        if self.pair_temperature <= 0 or not 0 < self.pair_max_new_tokens <= self.seq_len - 8:
            errors.append("pair_temperature must be > 0 and pair_max_new_tokens in [1, seq_len - 8]")
        if self.seq_len < 16:
            errors.append("seq_len must be >= 16 (room for a prompt and a completion)")
        return errors


# ----------------------------------------------------------------------------- the run


def main(cfg: DPOConfig) -> None:
    if cfg.dry_run:
        lora_note = () if cfg.finetune == "full" else (f"{cfg.finetune}: only adapters train, memory is lower",)
        plan = plan_base_config(cfg)
        return dry_run(cfg, "train_dpo.py", plan, "pairs", per_example=2, ragged=True, notes=lora_note)

    # ---- setup ----
    run = tc.Run(cfg, "dpo")
    device = run.device
    use_lora = cfg.finetune != "full"
    ref_kind = cfg.ref if cfg.ref != "auto" else ("adapters_off" if use_lora else "copy")
    cfg.base = resolve_base(cfg.base)  # hf:ORG/NAME -> its snapshot dir in the hub cache; a dir stays as is
    tok_dir = cfg.tokenizer or cfg.base
    base_dir = os.path.abspath(cfg.base)  # adapters name their base by an absolute path: loadable from anywhere

    # ---- data ----
    try:
        tokenizer = Tokenizer(tok_dir)
        rows = read_pairs(cfg.data) if cfg.data.endswith(".jsonl") else read_hub_pairs(cfg.data, cfg.data_split)
    except ValueError as e:
        raise UserError(str(e)) from None
    rows = rows[: cfg.max_examples or None]
    pool = None  # on_policy: the pairs come per round from the policy's own samples (the training loop)
    if cfg.pairs == "on_policy":
        pool = OnPolicyPairs(rows, tokenizer, cfg.seq_len, cfg.seed, cfg.samples_per_prompt, cfg.pair_prompts,
                             cfg.pair_every, cfg.pair_max_new_tokens, cfg.pair_temperature)  # fmt: skip
    # [(prompt, chosen, rejected) ids]: static pairs now, on-policy ones at the start of each round
    pairs = [tokenize_pair(tokenizer, *row, cfg.seq_len) for row in rows] if pool is None else []
    task_rows = []
    if cfg.eval_tasks and cfg.eval_tasks_n:
        try:
            task_rows = load_jsonl(cfg.eval_tasks, TEST_KEYS)[: cfg.eval_tasks_n]
        except ValueError as e:
            raise UserError(str(e)) from None
    sampler = pool.sampler if pool is not None else ExampleSampler(len(pairs), cfg.seed)
    replay = None
    if cfg.replay_data:  # rows of pretraining text for every micro-batch, as in train_sft (finetune.py: replay)
        replay = replay_stream(cfg.replay_data, cfg.replay_rows, cfg.seq_len, tokenizer, run.rank, run.world_size,
                               run.accum, cfg.seed)  # fmt: skip
    if pool is None:
        run.print(f"data: {len(pairs)} pairs, {sum(len(p) + len(c) + len(r) for p, c, r in pairs):,} tokens")
    else:
        run.print(f"data: {len(pool.rows)} prompts, {pool.per_round} per round x {cfg.samples_per_prompt} samples")

    # ---- model ----
    torch.manual_seed(cfg.seed)  # LoRA's A init: identical on every rank
    raw_model = load_base(
        cfg, device, resolve_attn_impl(cfg, device)
    )  # SFT's loader: from_pretrained, then (Q)LoRA when asked
    if tokenizer.vocab_size > raw_model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {raw_model.config.vocab_size}")
    run.print(lora.trainable_report(raw_model) if use_lora else f"full: {raw_model.num_parameters():,} trainable")
    # Full fine-tuning needs the starting weights kept aside as the reference: one frozen copy, never trained.
    ref_model = copy.deepcopy(raw_model).requires_grad_(False).eval() if ref_kind == "copy" else None
    model, optimizer = run.prepare(raw_model)  # order: adapters first, then wrap, then the optimizer
    step_model = torch.compile(model) if cfg.compile else model
    pack_len = cfg.seq_len if cfg.pack else 0  # 0: right-padded rows, one sequence each
    ref_table = None
    if ref_kind == "precompute":
        # Before resume loads any trained weights: the model is still the reference (LoRA's B starts at 0,
        # and the adapters are off anyway). A resumed run recomputes the same table from the same start.
        ref_table = precompute_reference(
            model, pairs, 2 * cfg.micro_batch_size, tokenizer.pad_id, device, run.autocast, pack_len
        )
        run.print(f"reference log-probs precomputed for {len(pairs)} pairs")

    def save(step: int) -> None:
        full_state = None if use_lora else run.full_state_dict()  # FSDP: gather the shards (collective)
        write = lambda path: write_finetuned(raw_model, path, tok_dir, base_dir, full_state)  # noqa: E731
        run.save(step, write, data=pool or sampler)  # on_policy: the round's pairs too

    def evaluate(step: int) -> None:
        if not (task_rows and run.master and not run.sharded):  # generation needs the whole model on one rank
            return
        with run.autocast:
            answers = chat_answers(raw_model, tokenizer, [r["prompt"] for r in task_rows], cfg.eval_max_new_tokens)
            acc = task_accuracy(task_rows, answers)
        record = {"step": step, "task_acc": acc["accuracy"]}
        record.update({f"task_acc/{f}": a for f, a in acc["by_family"].items()})
        run.log(record)
        run.print(f"step {step}: task accuracy {acc['accuracy']:.4f}")

    # ---- training loop ----
    step = run.resume(lambda ckpt: read_finetuned(raw_model, model, ckpt, device), data=pool or sampler)
    if pool is not None:
        pairs, sampler = pool.pairs, pool.sampler  # a resumed round's pairs ([] on a fresh start)
    if replay is not None:
        seek(replay, step)  # its position is a function of the step: nothing to save
    if step == 0 and cfg.eval_at_start:
        evaluate(0)  # the starting model's accuracy, for the before/after comparison
    t_last, tokens_last = time.perf_counter(), sampler.tokens
    mb = run.micro
    while step < cfg.steps:
        if pool is not None and pool.due(step):  # a new round: pairs from the policy as it is now
            with run.autocast:
                stats = pool.refresh(step, raw_model, run.rank, run.world_size, device)
            pairs, sampler = pool.pairs, pool.sampler
            run.log(stats)
            run.print(f"step {step}: round {stats['pairs/round']}: {stats['pairs/n']} on-policy pairs, "
                      f"sample accuracy {stats['pairs/sample_acc']:.3f}")  # fmt: skip
        lr = tc.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This rank's share of the global batch of pairs (the order does not depend on world size).
        mine = sampler.take(cfg.batch_size)[run.rank :: run.world_size]
        # loss, chosen/rejected rewards, accuracy, margin, chosen/rejected log-probs: summed on device
        sums = torch.zeros(7, device=device)
        replay_sum = torch.zeros((), device=device)
        if replay is not None:
            xr, yr = replay.next_batch()  # (replay_rows / world, seq_len) each
        for micro in range(run.accum):
            idx = mine[micro * mb : (micro + 1) * mb]
            batch = batch_to(make_batch([pairs[i] for i in idx], tokenizer.pad_id, pack_len), device)
            sampler.tokens += batch[0].numel() * run.world_size  # tokens computed (padding included), all ranks
            if ref_table is not None:
                ref_c, ref_r = ref_table[idx].T  # (B,) each
            else:
                with run.autocast:
                    ref_c, ref_r = reference_logps(model, ref_model, batch).float().chunk(2)  # (B,) each
            with run.no_sync(micro):  # only the last micro-batch all-reduces gradients
                with run.autocast:
                    logps = completion_logps(step_model, batch)  # (2B,): chosen and rejected in one forward
                    aux = raw_model.moe_aux_loss()  # MoE balancing losses (0 for dense models)
                pol_c, pol_r = logps.float().chunk(2)  # (B,) each
                losses, rew_c, rew_r = dpo_loss(
                    pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing
                )
                if cfg.rpo_alpha:
                    # RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO can lower the
                    # likelihood of both answers and hand the freed mass to tokens neither contains; a per-token
                    # NLL on the chosen answer keeps it likely.
                    n_chosen = completion_lengths(batch)[: len(idx)].clamp(min=1)  # (B,) completion tokens
                    losses = losses + cfg.rpo_alpha * (-pol_c / n_chosen)
                # Each micro-batch holds the same number of pairs: the mean over one, divided by accum,
                # sums to the mean over the whole step (DDP then averages the ranks).
                total = losses.mean() + aux
                if replay is not None:  # the policy's mean loss on pretraining text, its own forward
                    k = cfg.replay_rows // (run.world_size * run.accum)  # rows per micro-batch
                    rows = slice(micro * k, (micro + 1) * k)
                    with run.autocast:
                        replay_loss = step_model(xr[rows].to(device), yr[rows].to(device))
                    total = total + cfg.replay_weight * replay_loss
                    replay_sum += replay_loss.detach() / run.accum
                run.scaler.scale(total / run.accum).backward()
            metrics = [
                losses.detach(),
                rew_c,
                rew_r,
                (rew_c > rew_r).float(),
                rew_c - rew_r,
                pol_c.detach(),
                pol_r.detach(),
            ]
            sums += torch.stack([m.mean() for m in metrics])
        means = tc.all_reduce_mean(sums / run.accum)
        # ---- the step: unscale, clip, optimizer.step(), zero_grad ----
        run.scaler.unscale_(optimizer)  # fp16: true-scale gradients before clipping (a no-op in bf16 / fp32)
        grad_norm = distributed.clip_grad_norm_(model, cfg.grad_clip or math.inf)  # over all ranks and shards
        applied = tc.all_finite(means[0], grad_norm)  # a NaN / inf step is skipped: weights and moments stay
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
            tok_per_s = (sampler.tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, sampler.tokens
            names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                     "logps/chosen", "logps/rejected"]  # fmt: skip
            record = {"step": step, **dict(zip(names, means.tolist(), strict=True)), "lr": lr,
                      "tokens": sampler.tokens, "tok_per_s": tok_per_s, "grad_norm": grad_norm.item(),
                      "epoch": sampler.epoch}  # fmt: skip
            if replay is not None:
                record["replay_loss"] = tc.all_reduce_mean(replay_sum).item()  # on the pretraining text
            run.log(record)
            if run.progress is not None:
                run.progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['rewards/accuracy']:.2f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or done:
            evaluate(step)
        stopping = run.should_stop(step)
        if step % cfg.save_every == 0 or done or stopping:
            save(step)
        if stopping:
            break

    # ---- finish ----
    if use_lora and cfg.merge_at_end and step == cfg.steps and run.master:
        run.print(f"merged model in {write_merged(raw_model, cfg.out_dir, tok_dir)}")
    run.finish(step, f"dpo {cfg.loss_type} ({cfg.finetune}) from {os.path.basename(base_dir)}")


if __name__ == "__main__":
    run_cli(main, DPOConfig, __doc__)
