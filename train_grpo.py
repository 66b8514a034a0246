"""Group Relative Policy Optimization (GRPO): reinforcement learning on rewards a program checks, one loop.

    python train_sft.py configs/sft_tiny.yaml               # the SFT model GRPO starts from (out/sft)
    python train_grpo.py configs/grpo_tiny.yaml             # LoRA GRPO on the built-in tasks, ~3 min on 2 CPU cores
    python train_grpo.py configs/grpo_tiny.yaml scale_rewards=false loss_agg=dr_grpo out_dir=out/grpo_dr
    python eval.py compare=out/sft,out/grpo/merged data= choices=
    torchrun --nproc_per_node 8 train_grpo.py base=out/sft_big finetune=full beta=0.04 lr=1e-6 min_lr=1e-7

The idea (Shao et al. 2024, "DeepSeekMath", section 4). For each prompt q, sample a group of G completions
o_1..o_G from the current policy, score each with a reward r_i that a program computes (here: is the answer
the Python value of the task's expression), and push up the log-probability of the completions that did
better than their group:

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                            the group-relative advantage
    J = mean over tokens of  min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t(pi || pi_ref)
    rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)                      pi_old: the policy that sampled

The group mean is the baseline that PPO gets from a learned value model: no critic to train or store.
With one update per batch of rollouts (updates_per_batch=1) rho is exactly 1, the clip never acts and the
gradient is REINFORCE with the group baseline: sum_t A_i grad log pi(o_t).

Key choices, each a switch (the defaults are what the ablation in docs/10-rl-grpo.md supports):
- `scale_rewards`: divide by the group std (GRPO) or not (Dr. GRPO, Liu et al. 2025, "Understanding
  R1-Zero-Like Training": the std up-weights prompts that are almost always right or wrong).
- `loss_agg`: how token losses become one number. sequence = mean over each completion's tokens, then over
  completions (the GRPO paper: a token of a short answer weighs more); token = mean over all completion
  tokens of the batch (DAPO, Yu et al. 2025); dr_grpo = sum over tokens / (completions x max_new_tokens),
  a constant, so no length bias at all (Dr. GRPO).
- `beta`: the KL pull toward the reference, with Schulman's k3 estimator (2020, "Approximating KL
  divergence"): exp(ref - logp) - (ref - logp) - 1, unbiased, always >= 0. Under LoRA the reference is the
  base with adapters off (no copy), as train_dpo does; full fine-tuning keeps a frozen copy. beta=0 with
  track_kl=false never runs the reference.
- `clip_eps`: PPO's clip of rho to [1 - eps, 1 + eps] (0 = off); it only acts when updates_per_batch > 1.
- `oversample`: DAPO's dynamic sampling. Sample k times the batch's prompts and train on the groups whose
  rewards differ (`pick_groups`): an all-right or all-wrong group has zero advantages and adds nothing.
- The reward never runs model output: exact match against the row's answer (tasks.exact_match), plus an
  optional `format_reward` when the text parses with ast.literal_eval into the answer's type.

Rollouts use generation.generate (KV cache, batched: every prompt repeated G times in one call) at
`temperature` and `top_p`. Its random generator is seeded from (seed, step, rank) alone, so a resumed run
draws the same completions without saving any RNG state for it. Checkpoints and stops (SIGTERM) happen
only between batches of rollouts, so resume never needs the old rollouts. Checkpoints, logging and the
non-finite guard are train_common.Run's, as in train_dpo.py.

Shapes: B completions in a micro-batch, T time, V vocabulary, P prompts, G completions per prompt.
"""

from __future__ import annotations

import ast
import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import distributed
import lora
import train_common as tc
from checkpoint import read_finetuned, write_finetuned, write_merged
from config import UserError, run_cli
from finetune import FinetuneConfig, collate, load_base, plan_base_config, resolve_base
from generation import chat_answers, generate
from launch import resolve_attn_impl
from planner import dry_run
from shards import ExampleSampler
from tasks import TEST_KEYS, exact_match, load_jsonl, task_accuracy
from tokenizer import Tokenizer

AGGREGATIONS = ("token", "sequence", "dr_grpo")

# ----------------------------------------------------------------------------- the loss


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P*G,), each prompt's G completions next to each other -> advantages (P*G,).

    r - mean(group), divided by the group's std when `scale` (unbiased std, as TRL; eps keeps a tiny std
    from exploding). A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    """
    r = rewards.view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1); the mean of equal floats may round, so force 0
    return torch.where(equal, torch.zeros_like(adv), adv).view(-1)


def pick_groups(rewards: torch.Tensor, group_size: int, n_keep: int) -> list[int]:
    """Which n_keep groups of (P*G,) rewards to train on: those with mixed rewards first, then the rest.

    DAPO's dynamic sampling (Yu et al. 2025): a group whose rewards are all equal has zero advantages and
    teaches nothing, so sample more prompts than the batch holds and keep the groups that carry a signal.
    Both kinds keep their draw order, and the result is sorted, so the batch's shape never changes.
    """
    r = rewards.view(-1, group_size)
    mixed = (r != r[:, :1]).any(dim=1).tolist()  # the same test as group_advantages' zero groups
    order = [g for g, m in enumerate(mixed) if m] + [g for g, m in enumerate(mixed) if not m]
    return sorted(order[:n_keep])


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from tokens sampled from pi: k3 = exp(d) - d - 1, d = ref - logp.
    Its mean is the true KL (E_pi[pi_ref / pi] = 1) and every term is >= 0 (e^d >= 1 + d); 0 where equal."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    loss_agg: str = "token",
    max_len: int = 0,
    n_seqs: float | None = None,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (minus the objective) of a batch of completions.

    logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens under the policy being trained, the
    policy that sampled them, the reference (None: no KL, allowed when beta == 0); advantages (B,); mask (B, T) True on
    completion tokens. max_len: the dr_grpo constant (max_new_tokens). n_seqs, n_tokens: the normalizers of
    the whole optimizer step (all micro-batches on this rank); by default this batch's own, which makes the
    result the paper's equation. Returns (loss, {"kl", "clip_frac"}): token means, detached.
    """
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {', '.join(AGGREGATIONS)}, not '{loss_agg}'")
    m = mask.to(logps.dtype)  # (B, T)
    ratio = torch.exp(logps - old_logps)  # (B, T) rho_t; exactly 1 on the first update of a batch
    adv = advantages[:, None]  # (B, 1): every token of a completion shares the completion's advantage
    surrogate = ratio * adv  # (B, T)
    clipped = torch.zeros_like(m, dtype=torch.bool)
    if clip_eps > 0:
        # PPO (Schulman et al. 2017): the pessimistic min stops rewarding moves of rho past 1 + eps for a good
        # completion (A > 0) and past 1 - eps for a bad one (A < 0); there the gradient is zero.
        bounded = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
        clipped = bounded < surrogate
        surrogate = torch.minimum(surrogate, bounded)
    per_token = -surrogate  # (B, T) minimize the negative objective
    kl = torch.zeros_like(m) if ref_logps is None else k3_kl(logps, ref_logps)  # (B, T); logged even at beta 0
    if beta > 0:
        per_token = per_token + beta * kl
    n_seqs = float(m.shape[0]) if n_seqs is None else n_seqs
    if loss_agg == "token":  # every completion token of the step weighs the same (DAPO)
        weights = m / (float(m.sum()) if n_tokens is None else n_tokens)
    elif loss_agg == "sequence":  # mean per completion, then mean over completions (GRPO paper, eq. 3)
        weights = m / (m.sum(dim=1, keepdim=True).clamp(min=1) * n_seqs)
    else:  # dr_grpo: a constant normalizer, so a long completion's tokens weigh what a short one's do
        weights = m / (n_seqs * max_len)
    loss = (per_token * weights).sum()
    count = m.sum().clamp(min=1)
    stats = {"kl": (kl.detach() * m).sum() / count, "clip_frac": (clipped.float() * m).sum() / count}
    return loss, stats


def token_logps(model, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t | x_<=t), entropy of pi at t), each (B, T), 0 where y is -1; the entropy is detached.

    pi is the distribution the rollouts sample from, softmax(logits / temperature), so the samples are exactly
    on-policy (top_p < 1 truncates it further; that part is ignored, as in TRL)."""
    logits = model(x).float() / temperature  # (B, T, V) fp32: log-ratios of nearly equal numbers need precision
    logp_all = F.log_softmax(logits, dim=-1)  # (B, T, V)
    mask = y != -1
    logps = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask  # (B, T)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1) * mask  # (B, T)
    return logps, entropy


# ----------------------------------------------------------------------------- rewards


def _literal(text: str):
    """The Python literal a text spells (ast.literal_eval: literals only, never runs code), or None."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def task_reward(text: str, answer: str, format_reward: float = 0.0) -> float:
    """1 for the right answer (tasks.exact_match, the rule eval uses); `format_reward` for a wrong answer that
    is still a literal of the answer's type (a number for a number, a list for a list); else 0."""
    if exact_match(text, answer):
        return 1.0
    if format_reward:
        got, want = _literal(text), _literal(answer)
        if got is not None and want is not None and type(got) is type(want):
            return format_reward
    return 0.0


# ----------------------------------------------------------------------------- data and rollouts


def read_prompts(path: str, families=()) -> list[tuple[list[dict], str]]:
    """Rows with a checkable answer -> [(prompt messages, answer)]. Accepted: {"prompt", "answer"} (test.jsonl),
    DPO pairs {"prompt", "chosen"} (the built-in chosen answer is the right one) and chat rows {"messages"}
    (the last assistant turn is the answer). ValueError names the file and line."""
    rows = load_jsonl(path, {})
    out = []
    for n, row in enumerate(rows, start=1):
        if families and row.get("family") not in families:
            continue
        last = row["messages"][-1] if isinstance(row.get("messages"), list) and row["messages"] else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            prompt, answer = row["messages"][:-1], last.get("content")
        else:
            prompt, answer = row.get("prompt"), row.get("answer", row.get("chosen"))
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not (isinstance(prompt, list) and prompt and isinstance(answer, str)):
            raise ValueError(f"{path} row {n}: needs 'prompt' and 'answer' (or 'chosen'), or chat 'messages'")
        out.append((prompt, answer))
    if not out:
        raise ValueError(f"{path}: no rows" + (f" with family in {list(families)}" if families else ""))
    return out


def rollout(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
            top_p: float, end_id: int, generator: torch.Generator) -> list[list[int]]:  # fmt: skip
    """G completions for each prompt, in one batched generate call with the KV cache: [P*G] token lists, a
    prompt's G next to each other. A completion that stopped ends with `end_id` (it is trained on: the model
    learns to stop); one cut at max_new_tokens does not. Only end_id stops a row, so a stray EOS stays in the
    completion, is scored and is trained on like any other token."""
    was_training = model.training
    model.eval()  # no dropout while sampling: the samples come from pi itself
    repeated = [p for p in prompts for _ in range(group_size)]  # (P*G) prompts
    outs = generate(model, repeated, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=(end_id,),
                    generator=generator)  # fmt: skip
    model.train(was_training)
    return [out + [end_id] if len(out) < max_new_tokens else out for out in outs]


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """-> x, y (B, T) right-padded by finetune.collate: y = the next token on completion tokens, -1 elsewhere."""
    examples = [((p + c)[:-1], [-1] * (len(p) - 1) + c) for p, c in zip(prompts, completions, strict=True)]
    return collate(examples, pad_id)


# ----------------------------------------------------------------------------- settings


@dataclass
class GRPOConfig(FinetuneConfig):
    plain_base = True  # the base is also the reference

    out_dir: str = "out/grpo"  # where checkpoints, log.jsonl, the adapter and the merged model go
    base: str = "out/sft"  # the model to improve (and the reference): ours or an HF Llama dir
    data: str = "data/builtin/dpo_train.jsonl"  # .jsonl of prompts with answers (prompt/answer, DPO or chat rows)
    families: list[str] = field(default_factory=list)  # keep only rows with these "family" values (empty = all)
    group_size: int = 8  # G: completions sampled per prompt (the group that forms the baseline)
    oversample: int = 1  # sample this many times the batch's prompts, train on the groups with mixed rewards first
    max_new_tokens: int = 16  # longest completion; also the dr_grpo normalizer
    temperature: float = (
        1.0  # rollout temperature; the policy trained is softmax(logits / temperature) (greedy is unchanged)
    )
    top_p: float = 1.0  # nucleus sampling of the rollouts (1 = off)
    format_reward: float = 0.0  # reward for a wrong answer that is a literal of the right type (0 = off)
    scale_rewards: bool = True  # divide advantages by the group std (GRPO); false = Dr. GRPO
    loss_agg: str = "token"  # token (all tokens equal) | sequence (mean per completion; GRPO) | dr_grpo (constant)
    beta: float = 0.0  # weight of the k3 KL penalty toward the reference (0 = off, no reference forward)
    clip_eps: float = 0.2  # PPO clip range of the ratio to the sampling policy (0 = no clipping)
    updates_per_batch: int = 1  # optimizer steps on each batch of rollouts (GRPO's mu); > 1 makes the clip act
    track_kl: bool = True  # run the reference and log the KL even when beta == 0 (one no-grad forward per batch)
    ref: str = "auto"  # reference for the KL: auto (adapters_off for (q)lora, copy for full) | adapters_off | copy
    # GRPO defaults: batch_size counts completions (prompts x group_size) per batch of rollouts.
    steps: int = 100  # optimizer steps in the whole run (a multiple of updates_per_batch)
    batch_size: int = 64  # completions per batch of rollouts, summed over ranks: batch_size / group_size prompts
    micro_batch_size: int = 64  # completions per forward/backward on one rank
    seq_len: int = 128  # max tokens of prompt + completion (the prompt is cut from the left beyond it)
    lr: float = 5e-5  # peak learning rate
    min_lr: float = 5e-6  # learning rate at the end of the decay
    warmup_steps: int = 5  # linear warmup from 0 to lr
    eval_every: int = 50  # steps between task-accuracy passes (0 = only at the end)
    save_every: int = 50  # steps between checkpoints (a multiple of updates_per_batch; the last step is saved)

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.group_size < 2:
            errors.append("group_size must be >= 2 (the baseline is the mean of the group)")
        elif self.batch_size % self.group_size:
            errors.append(f"batch_size {self.batch_size} must be a multiple of group_size {self.group_size}")
        if self.max_new_tokens <= 0 or self.seq_len < self.max_new_tokens + 8:
            errors.append("max_new_tokens must be > 0 and seq_len >= max_new_tokens + 8 (room for a prompt)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            errors.append("temperature must be > 0 and top_p in (0, 1]")
        if not 0 <= self.format_reward < 1:
            errors.append("format_reward must be in [0, 1)")
        if self.loss_agg not in AGGREGATIONS:
            errors.append(f"loss_agg must be one of {', '.join(AGGREGATIONS)}, not '{self.loss_agg}'")
        if self.beta < 0 or self.clip_eps < 0:
            errors.append("beta and clip_eps must be >= 0")
        if self.oversample < 1:
            errors.append("oversample must be >= 1 (1 = train on every group sampled)")
        if self.updates_per_batch < 1:
            errors.append("updates_per_batch must be >= 1")
        elif self.steps % self.updates_per_batch or self.save_every % self.updates_per_batch:
            errors.append("steps and save_every must be multiples of updates_per_batch (saves fall between batches)")
        if self.ref not in ("auto", "adapters_off", "copy"):
            errors.append(f"ref must be auto, adapters_off or copy, not '{self.ref}'")
        if self.ref == "adapters_off" and self.finetune == "full":
            errors.append("ref=adapters_off needs finetune=lora or qlora (full fine-tuning has no adapters)")
        if self.parallel in ("fsdp", "torch_fsdp2"):
            errors.append("parallel: GRPO runs with none or ddp (rollouts need the whole model on each rank)")
        return errors


# ----------------------------------------------------------------------------- the run


def main(cfg: GRPOConfig) -> None:
    if cfg.dry_run:
        drawn = f", picked from {cfg.oversample}x as many sampled" if cfg.oversample > 1 else ""
        notes = (
            f"rollouts: {cfg.batch_size // cfg.group_size} prompts x {cfg.group_size} completions per batch{drawn}",
        )
        return dry_run(cfg, "train_grpo.py", plan_base_config(cfg), "completions", ragged=True, notes=notes)

    # ---- setup ----
    run = tc.Run(cfg, "grpo")
    device = run.device
    use_lora = cfg.finetune != "full"
    ref_kind = cfg.ref if cfg.ref != "auto" else ("adapters_off" if use_lora else "copy")
    cfg.base = resolve_base(cfg.base)  # hf:ORG/NAME -> its snapshot dir in the hub cache; a dir stays as is
    tok_dir = cfg.tokenizer or cfg.base
    base_dir = os.path.abspath(cfg.base)  # adapters name their base by an absolute path: loadable from anywhere
    prompts_per_step = cfg.batch_size // cfg.group_size
    if prompts_per_step % run.world_size:
        raise UserError(f"batch_size / group_size = {prompts_per_step} prompts must split evenly over "
                        f"{run.world_size} ranks (each rank owns whole groups)")  # fmt: skip

    # ---- data ----
    try:
        tokenizer = Tokenizer(tok_dir)
        rows = read_prompts(cfg.data, cfg.families)[: cfg.max_examples or None]
        task_rows = load_jsonl(cfg.eval_tasks, TEST_KEYS)[: cfg.eval_tasks_n] if cfg.eval_tasks else []
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        end_id = tokenizer.special_id("<|end|>")  # the chat turn ends here: the natural end of an answer
    except ValueError:
        end_id = tokenizer.eos_id
    limit = cfg.seq_len + 1 - cfg.max_new_tokens  # prompt tokens that fit: too long, keep BOS and the end
    prompts = []
    for messages, _ in rows:
        p = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        prompts.append(p if len(p) <= limit else p[:1] + p[len(p) - limit + 1 :])
    answers = [answer for _, answer in rows]
    sampler = ExampleSampler(len(prompts), cfg.seed)
    drawn = f", picked from {prompts_per_step * cfg.oversample} sampled" if cfg.oversample > 1 else ""
    run.print(f"data: {len(prompts)} prompts, {prompts_per_step} per batch x {cfg.group_size} completions{drawn}")

    # ---- model ----
    torch.manual_seed(cfg.seed)  # LoRA's A init: identical on every rank
    raw_model = load_base(cfg, device, resolve_attn_impl(cfg, device))  # from_pretrained, then (Q)LoRA when asked
    if tokenizer.vocab_size > raw_model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {raw_model.config.vocab_size}")
    run.print(lora.trainable_report(raw_model) if use_lora else f"full: {raw_model.num_parameters():,} trainable")
    # Full fine-tuning keeps the starting weights as the reference: one frozen copy, only when the KL is wanted.
    use_ref = cfg.beta > 0 or cfg.track_kl
    ref_model = copy.deepcopy(raw_model).requires_grad_(False).eval() if use_ref and ref_kind == "copy" else None
    model, optimizer = run.prepare(raw_model)  # order: adapters first, then wrap, then the optimizer
    step_model = torch.compile(model) if cfg.compile else model
    mu, mb = cfg.updates_per_batch, run.micro  # run.micro: the micro-batch launch.batch_split chose

    def save(step: int) -> None:
        write = lambda path: write_finetuned(raw_model, path, tok_dir, base_dir)  # noqa: E731
        run.save(step, write, data=sampler)

    def evaluate(step: int) -> None:
        if not (task_rows and run.master):
            return
        with run.autocast:
            answers = chat_answers(raw_model, tokenizer, [r["prompt"] for r in task_rows], cfg.eval_max_new_tokens)
            acc = task_accuracy(task_rows, answers)
        record = {"step": step, "task_acc": acc["accuracy"]}
        record.update({f"task_acc/{f}": a for f, a in acc["by_family"].items()})
        run.log(record)
        run.print(f"step {step}: task accuracy {acc['accuracy']:.4f}")

    @torch.no_grad()
    def collect(step: int) -> tuple[list[dict], dict]:
        """One batch of rollouts on this rank: micro-batches {x, y, adv, ref, old} and their metrics."""
        drawn = sampler.take(prompts_per_step * cfg.oversample)[run.rank :: run.world_size]  # whole groups per rank
        gen = torch.Generator(device=device).manual_seed((cfg.seed * 1_000_003 + step) * 1009 + run.rank)
        t0 = time.perf_counter()
        with run.autocast:
            completions = rollout(raw_model, [prompts[i] for i in drawn], cfg.group_size, cfg.max_new_tokens,
                                  cfg.temperature, cfg.top_p, end_id, gen)  # fmt: skip
        gen_s = time.perf_counter() - t0
        texts = [tokenizer.decode([t for t in c if t != end_id]) for c in completions]
        targets = [answers[i] for i in drawn for _ in range(cfg.group_size)]
        rewards = torch.tensor([task_reward(t, a, cfg.format_reward) for t, a in zip(texts, targets, strict=True)])
        sampled = rewards.clone()  # the policy's reward on everything it sampled, for the log
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
        mine = drawn
        if cfg.oversample > 1:  # dynamic sampling: train on the groups that carry a signal
            keep = pick_groups(rewards, cfg.group_size, len(drawn) // cfg.oversample)
            picked = torch.tensor([g * cfg.group_size + j for g in keep for j in range(cfg.group_size)])
            mine, completions, rewards = [drawn[g] for g in keep], [completions[r] for r in picked], rewards[picked]
        adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)  # (P*G,)
        batches = []
        for m in range(run.accum):
            sl = slice(m * mb, (m + 1) * mb)
            x, y = make_batch([prompts[i] for i in mine for _ in range(cfg.group_size)][sl], completions[sl],
                              tokenizer.pad_id)  # fmt: skip
            b = {"x": x.to(device), "y": y.to(device), "adv": adv[sl].to(device), "ref": None, "old": None}
            if use_ref:  # the reference never changes: its log-probs serve every update of this batch
                with run.autocast:
                    if ref_model is not None:
                        b["ref"] = token_logps(ref_model, b["x"], b["y"], cfg.temperature)[0]
                    else:
                        raw_model.eval()
                        with lora.disable_adapters(raw_model):
                            b["ref"] = token_logps(raw_model, b["x"], b["y"], cfg.temperature)[0]
                        raw_model.train()
            batches.append(b)
        groups = sampled.view(-1, cfg.group_size)
        stats = torch.tensor([sampled.mean(), groups.std(dim=1).mean(), (sampled == 1).float().mean(),
                              (adv.view(-1, cfg.group_size) == 0).all(dim=1).float().mean(),
                              (groups == groups[:, :1]).all(dim=1).float().mean(), lengths.mean(),
                              lengths.sum() / max(gen_s, 1e-9)], device=device)  # fmt: skip
        names = ["reward", "reward_std", "accuracy", "zero_adv_groups", "zero_adv_sampled", "completion_len",
                 "rollout_tok_per_s"]  # fmt: skip
        n_tokens = sum(int((b["y"] != -1).sum()) for b in batches)
        return batches, dict(zip(names, tc.all_reduce_mean(stats).tolist(), strict=True)) | {"n_tokens": n_tokens}

    # ---- training loop ----
    step = run.resume(lambda ckpt: read_finetuned(raw_model, model, ckpt, device), data=sampler)
    if step == 0 and cfg.eval_at_start:
        evaluate(0)  # the starting model's accuracy, for the before/after comparison
    t_last, tokens_last = time.perf_counter(), sampler.tokens
    while step < cfg.steps:
        if step % mu == 0:  # a new batch of rollouts from the policy as it is now (pi_old = pi)
            batches, rollout_stats = collect(step)
            # Loss normalizers of the whole step: DDP averages gradients over ranks, so each rank divides by the
            # mean count over ranks and the sum over all ranks comes out divided by the global count.
            n_tokens = tc.all_reduce_mean(torch.tensor(float(rollout_stats["n_tokens"]), device=device)).item()
        lr = tc.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, device=device)  # loss, kl, clip fraction, entropy: summed on device
        for micro, b in enumerate(batches):
            with run.no_sync(micro):  # only the last micro-batch all-reduces gradients
                with run.autocast:
                    logps, entropy = token_logps(step_model, b["x"], b["y"], cfg.temperature)  # (B, T) each
                    aux = raw_model.moe_aux_loss()  # MoE balancing losses of this forward (0 for dense models)
                if b["old"] is None:  # first update on this batch: the weights are still the sampling policy's
                    b["old"] = logps.detach()
                mask = b["y"] != -1
                # The normalizers are the whole step's, so the micro-batch losses add up to the step's loss
                # (no division by accum).
                loss, st = grpo_loss(logps, b["old"], b["ref"], b["adv"], mask, cfg.beta, cfg.clip_eps,
                                     cfg.loss_agg, cfg.max_new_tokens, cfg.batch_size / run.world_size, n_tokens)  # fmt: skip
                run.scaler.scale(loss + aux / len(batches)).backward()  # aux: a mean per forward
            sums += torch.stack([loss.detach(), st["kl"], st["clip_frac"], entropy.sum() / mask.sum().clamp(min=1)])
            sampler.tokens += b["x"].numel() * run.world_size  # tokens through the training forward, all ranks
        means = tc.all_reduce_mean(sums / torch.tensor([1.0, len(batches), len(batches), len(batches)], device=device))
        # ---- the step: unscale, clip, optimizer.step(), zero_grad ----
        run.scaler.unscale_(optimizer)  # fp16: true-scale gradients before clipping (a no-op in bf16 / fp32)
        grad_norm = distributed.clip_grad_norm_(model, cfg.grad_clip or math.inf)  # over all ranks
        applied = tc.all_finite(means[0], grad_norm)  # a NaN / inf step is skipped: weights and moments stay
        if applied:
            run.scaler.step(optimizer)  # optimizer.step()
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
            tok_per_s = (sampler.tokens - tokens_last) / max(now - t_last, 1e-9)  # wall time incl. rollouts
            t_last, tokens_last = now, sampler.tokens
            record = {"step": step, **dict(zip(["loss", "kl", "clip_frac", "entropy"], means.tolist(), strict=True)),
                      **{k: v for k, v in rollout_stats.items() if k != "n_tokens"}, "lr": lr,
                      "tokens": sampler.tokens, "tok_per_s": tok_per_s, "grad_norm": grad_norm.item(),
                      "epoch": sampler.epoch}  # fmt: skip
            run.log(record)
            if run.progress is not None:
                run.progress.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or done:
            evaluate(step)
        between = step % mu == 0  # the next step would sample new rollouts: nothing is lost by stopping here
        stopping = between and run.should_stop(step)
        if (step % cfg.save_every == 0 or done or stopping) and between:
            save(step)
        if stopping:
            break

    # ---- finish ----
    if use_lora and cfg.merge_at_end and step == cfg.steps and run.master:
        run.print(f"merged model in {write_merged(raw_model, cfg.out_dir, tok_dir)}")
    run.finish(step, f"grpo ({cfg.finetune}) from {os.path.basename(base_dir)}")


if __name__ == "__main__":
    run_cli(main, GRPOConfig, __doc__)
