"""Vision-language training in LLaVA's two stages (Liu et al. 2023, "Visual Instruction Tuning").

    python train_vlm.py configs/vlm_tiny.yaml                  # built-in shapes, both stages, a few CPU minutes
    python train_vlm.py configs/vlm_tiny.yaml lm=out/pretrain  # start from the pretrained tiny LM
    python train_vlm.py configs/vlm_tiny.yaml train_lm=lora    # stage 2 with LoRA adapters on the LM

Stage 0, a pretrained vision tower (OUT/stage0, optional: stage0_steps > 0; it draws built-in scenes). LLaVA starts
from a CLIP encoder that already sees shapes; ours would start random, and then the only signal that reaches it is
the LM's loss through the projector, which teaches colour (nearly a mean over pixels) and little else. So the tower
first learns to see, supervised like an ImageNet-trained ViT: linear probes read colour and shape from the mean over
patches and which quadrants hold a shape from the patches in order, on freshly drawn scenes. The probes are dropped.
Stage 1, alignment (OUT/stage1): caption pairs, "<image>Describe the image." -> "two red squares". The
language model is frozen, so its weights leave stage 1 bit for bit as they came in; the projector learns
to write image features the frozen LM can read. LLaVA freezes its pretrained CLIP encoder here too
(`stage1_train_vision=false`); a tower that starts random must train here (`true`, the default).
Stage 2, instruction tuning (OUT): question/answer turns, loss on the answer tokens only. The language
model trains in full (`train_lm=full`), through LoRA adapters (`train_lm=lora`, adapter files whose base
is OUT/stage1), or stays frozen (`train_lm=frozen`).

Each stage is one train_common.Run with the loop of train_pretrain.py: checkpoints, exact resume (the
data position is saved), log.jsonl, SIGTERM saves, non-finite steps skipped. Stage 1's settings are the
`stage1_*` keys; stage 2 uses the usual ones (steps, lr, ...). A finished stage 1 is not run again.
Held-out VQA accuracy (greedy exact match, vlm.vqa_accuracy) is logged every eval_every steps of stage 2
as `vqa_acc`; stage 1 logs exact-match caption accuracy as `caption_acc`.

Data (caption_data / qa_data / test_data): `builtin` (vlm_data.py's synthetic scenes, made in memory),
a folder written by `python vlm_data.py`, a LLaVA-style json next to its images, or `hf:NAME[:SPLIT]`
(a `datasets` image dataset with hf_image_column / hf_text_column).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import distributed
import lora
import train_common as tc
import vlm_data
from config import UserError, run_cli, to_dict
from launch import TrainConfig, attn_impl_errors, resolve_attn_impl
from model import ModelConfig, Transformer
from planner import dry_run
from tokenizer import Tokenizer
from vlm import VLM, VisionConfig, VisionEncoder, collate, is_vlm_checkpoint, vqa_accuracy


@dataclass
class VLMTrainConfig(TrainConfig):
    out_dir: str = "out/vlm"  # stage 1 writes OUT/stage1, stage 2 (the final VLM) writes OUT
    stage: str = "both"  # 1 | 2 | both; stage 2 starts from OUT/stage1 when it exists, else from a fresh projector
    seq_len: int = 64  # longest conversation in tokens, image slots included (longer ones are cut)
    # ---- models ----
    lm: str = ""  # language-model checkpoint dir (e.g. out/pretrain); "" = a fresh LM shaped by lm_model
    lm_model: ModelConfig = field(
        default_factory=lambda: ModelConfig.from_preset("tiny")
    )  # a fresh LM's shape: lm_model=NAME fills it from configs/model/NAME.yaml (or a YAML path), lm_model.KEY=VALUE one key
    tokenizer_dir: str = "data/builtin"  # tokenizer for a fresh LM (a checkpoint dir brings its own)
    attn_impl: str = "auto"  # auto (triton on CUDA, else sdpa) | naive | sdpa | triton, for the LM and vision tower
    vision: VisionConfig = field(default_factory=VisionConfig)  # the vision tower's shape
    # ---- stage 0: pretrain the vision tower on the built-in scenes (optional) ----
    stage0_steps: int = 0  # supervised steps on built-in scenes before stage 1 (0: the tower starts random)
    stage0_lr: float = 2e-3  # constant AdamW LR of stage 0
    stage0_batch_size: int = 32  # scenes per stage-0 step, drawn fresh every step
    # ---- stage 1: alignment on captions, LM frozen ----
    stage1_steps: int = 200  # optimizer steps of stage 1
    stage1_lr: float = 1e-3  # peak LR of stage 1 (min LR is a tenth of it)
    stage1_train_vision: bool = True  # train the vision tower with the projector (it starts random)
    # ---- stage 2: instruction tuning ----
    train_lm: str = "full"  # full | lora | frozen: how the language model trains in stage 2
    stage2_train_vision: bool = True  # keep training the vision tower in stage 2
    lora_r: int = 8  # LoRA rank (train_lm=lora)
    lora_alpha: int = 16  # LoRA alpha (train_lm=lora)
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # LM Linear layers that get LoRA adapters
    # ---- data ----
    caption_data: str = "builtin"  # stage 1: builtin | vlm_data.py folder | LLaVA json | hf:NAME[:SPLIT]
    qa_data: str = "builtin"  # stage 2: builtin | vlm_data.py folder | LLaVA json | hf:NAME[:SPLIT]
    test_data: str = "builtin"  # held-out VQA rows with answers: builtin | folder | json | "" (no VQA eval)
    n_caption: int = 4000  # built-in caption rows
    n_train: int = 4000  # built-in question/answer rows
    n_test: int = 200  # built-in held-out rows (VQA and captions)
    families: list[str] = field(default_factory=lambda: list(vlm_data.FAMILIES))  # built-in question families
    qa_turns: int = 1  # built-in training rows ask this many questions per image (multi-turn; eval asks one)
    data_seed: int = 0  # seed of the built-in scene generator
    hf_image_column: str = "image"  # image column of an hf: dataset
    hf_text_column: str = "caption"  # text column of an hf: dataset (the assistant's answer)
    max_new_tokens: int = 12  # answer length limit in VQA / caption evaluation

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.stage not in ("1", "2", "both"):
            errors.append(f"stage must be 1, 2 or both, not '{self.stage}'")
        if self.train_lm not in ("full", "lora", "frozen"):
            errors.append(f"train_lm must be full, lora or frozen, not '{self.train_lm}'")
        errors += attn_impl_errors(self)
        try:
            ModelConfig(**to_dict(self.lm_model))  # the shape fits together: heads divide the width, ...
        except ValueError as e:
            errors.append(f"lm_model: {e}")
        if self.parallel not in ("auto", "none", "ddp", "torch_ddp"):
            errors.append("parallel must be auto, none, ddp or torch_ddp for the VLM (FSDP is not wired for it)")
        if self.compile:
            errors.append("compile is not supported by train_vlm.py yet (the image splice is a Python hook)")
        if self.qa_turns < 1:
            errors.append("qa_turns must be >= 1")
        if self.stage0_steps < 0 or self.stage0_lr <= 0 or self.stage0_batch_size <= 0:
            errors.append("stage0_steps must be >= 0, stage0_lr and stage0_batch_size > 0")
        if self.stage1_steps <= 0 or self.stage1_lr <= 0:
            errors.append("stage1_steps and stage1_lr must be > 0")
        if self.lm:
            self.check_path(errors, "lm", self.lm, "checkpoint directory")
        else:
            tokenizer, hint = os.path.join(self.tokenizer_dir, "tokenizer.model"), " (run: python prepare_data.py)"
            self.check_path(errors, "tokenizer_dir", tokenizer, "tokenizer.model file", hint)
        bad = [f for f in self.families if f not in vlm_data.FAMILIES]
        if bad or not self.families:
            errors.append(f"families must be among {list(vlm_data.FAMILIES)}, got {self.families}")
        return errors


def stage_config(cfg: VLMTrainConfig, stage: int) -> VLMTrainConfig:
    """The settings one Run sees: stage 1 gets its own out_dir, steps and LR; stage 2 uses the top-level ones."""
    c = copy.deepcopy(cfg)
    if stage == 1:
        c.out_dir, c.steps, c.lr = os.path.join(cfg.out_dir, "stage1"), cfg.stage1_steps, cfg.stage1_lr
        c.min_lr, c.warmup_steps = cfg.stage1_lr / 10, min(cfg.warmup_steps, cfg.stage1_steps)
        c.resume = cfg.resume if cfg.resume in ("auto", "never") else "auto"  # a PATH names a stage-2 checkpoint
    return c


# ---------------------------------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------------------------------
def load_rows(cfg: VLMTrainConfig, spec: str, kind: str, split: str):
    """Examples for one purpose: kind "caption" | "qa", split "train" | "test" (see the module docstring)."""
    if spec == "builtin":
        n = {"caption": cfg.n_caption, "qa": cfg.n_train}[kind] if split == "train" else cfg.n_test
        turns = cfg.qa_turns if split == "train" else 1
        return vlm_data.make_examples(n, kind, split, cfg.data_seed, cfg.vision.image_size, tuple(cfg.families), turns)
    if spec.startswith("hf:"):
        name, _, hf_split = spec[3:].partition(":")
        return vlm_data.load_hub_dataset(name, hf_split or split, cfg.hf_image_column, cfg.hf_text_column)
    if os.path.isdir(spec):  # a folder written by vlm_data.py
        spec = os.path.join(
            spec, {"caption": "captions.json", "qa": "train.json"}[kind] if split == "train" else "test.json"
        )
    if not os.path.isfile(spec):
        raise UserError(f"data: no file or folder at '{spec}'")
    return vlm_data.load_llava_json(spec)


def fresh_language_model(cfg: VLMTrainConfig, vocab_size: int, attn_impl: str) -> Transformer:
    return Transformer(language_model_config(cfg, vocab_size, attn_impl))


def language_model_config(cfg: VLMTrainConfig, vocab_size: int, attn_impl: str) -> ModelConfig:
    """A fresh LM: cfg.lm_model with the embedding grown to cover the tokenizer and this run's kernel."""
    values = {**to_dict(cfg.lm_model), "attn_impl": attn_impl}
    values["vocab_size"] = max(values["vocab_size"], vocab_size)
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"lm_model: {e}") from None


def build_model(cfg: VLMTrainConfig, stage: int, tokenizer: Tokenizer, attn_impl: str, device) -> tuple[VLM, str]:
    """(the VLM at the start of this stage, the dir holding its language model's weights on disk or "")."""
    stage1_dir = os.path.join(cfg.out_dir, "stage1")
    if stage == 2 and is_vlm_checkpoint(stage1_dir):
        return VLM.from_pretrained(stage1_dir, device=device, attn_impl=attn_impl), stage1_dir
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank
    if cfg.lm:
        lm = Transformer.from_pretrained(cfg.lm, device=device, attn_impl=attn_impl)
    else:
        lm = fresh_language_model(cfg, tokenizer.vocab_size, attn_impl)
    if lm.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"lm: model vocab {lm.config.vocab_size} < tokenizer vocab {tokenizer.vocab_size}")
    vision = copy.deepcopy(cfg.vision)
    vision.attn_impl = attn_impl
    model = VLM(vision, lm, tokenizer.pad_id).to(device)
    if cfg.stage0_steps:
        pretrained_tower(model.vision_tower, cfg, device)
    return model, cfg.lm


# ---------------------------------------------------------------------------------------------------------------------
# stage 0: a vision tower that sees before the language model asks
# ---------------------------------------------------------------------------------------------------------------------
class TowerProbes(nn.Module):
    """Linear read-outs of the tower's output (B, N, C_v): colour and shape from the mean over patches; which of
    the four quadrants hold a shape (count and position follow) from the N patch vectors in order."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        n = (c.image_size // c.patch_size) ** 2
        self.colour = nn.Linear(c.hidden_size, len(vlm_data.COLOURS))
        self.shape = nn.Linear(c.hidden_size, len(vlm_data.SHAPES))
        self.quadrants = nn.Linear(n * c.hidden_size, 4)

    def forward(self, feats):  # (B, N, C_v) -> logits {colour (B, 4), shape (B, 3), quadrants (B, 4)}
        mean = feats.mean(1)
        return {"colour": self.colour(mean), "shape": self.shape(mean), "quadrants": self.quadrants(feats.flatten(1))}


def scene_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, dict]:
    """n fresh built-in scenes: pixels (n, 3, S, S) and their labels {colour (n,), shape (n,), quadrants (n, 4)}."""
    pixels, labels = [], {"colour": [], "shape": [], "quadrants": []}
    for _ in range(n):
        image, attrs = vlm_data.make_scene(rng, size)
        pixels.append(vlm_data.image_to_tensor(image, size))
        labels["colour"].append(list(vlm_data.COLOURS).index(attrs["colour"]))
        labels["shape"].append(vlm_data.SHAPES.index(attrs["shape"]))
        labels["quadrants"].append([float(q in attrs["quadrants"]) for q in range(4)])
    return torch.stack(pixels), {k: torch.tensor(v) for k, v in labels.items()}


def probe_loss(probes: TowerProbes, feats, labels) -> tuple[torch.Tensor, dict]:
    """(summed cross-entropies, accuracies {colour, shape, quadrants: all four right})."""
    out = probes(feats)
    loss = (F.cross_entropy(out["colour"], labels["colour"]) + F.cross_entropy(out["shape"], labels["shape"])
            + F.binary_cross_entropy_with_logits(out["quadrants"], labels["quadrants"]))  # fmt: skip
    acc = {k: (out[k].argmax(-1) == labels[k]).float().mean().item() for k in ("colour", "shape")}
    acc["quadrants"] = ((out["quadrants"] > 0).float() == labels["quadrants"]).all(-1).float().mean().item()
    return loss, acc


def pretrained_tower(tower: VisionEncoder, cfg: VLMTrainConfig, device) -> None:
    """Stage 0 into `tower`: read OUT/stage0/vision_tower.safetensors when it was made with these settings (and
    resume is not never), else train it (every rank the same way from the same seed; DDP then broadcasts rank 0's
    weights anyway) and save it."""
    settings = json.dumps({"steps": cfg.stage0_steps, "lr": cfg.stage0_lr, "batch_size": cfg.stage0_batch_size,
                           "seed": cfg.data_seed, "vision": to_dict(cfg.vision)}, sort_keys=True)  # fmt: skip
    path = os.path.join(cfg.out_dir, "stage0", "vision_tower.safetensors")
    if cfg.resume != "never" and os.path.isfile(path):  # resume=never (make FORCE=1) trains it again
        with safe_open(path, "pt") as fh:
            made_with = (fh.metadata() or {}).get("settings")
        if made_with == settings:
            tower.load_state_dict(load_file(path, device=str(device)))
            distributed.print0(f"stage 0: vision tower from {path}", flush=True)
            return
    t0 = time.perf_counter()
    probes = TowerProbes(tower.config).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probes.parameters()], lr=cfg.stage0_lr, weight_decay=0.01)
    # Streams of their own ("split" 2 next to vlm_data's train 0 / test 1): never the rows stages 1 and 2 see.
    scenes = np.random.default_rng([cfg.data_seed, 2, 0])
    tower.train()
    for _ in range(cfg.stage0_steps):
        pixels, labels = scene_batch(scenes, cfg.stage0_batch_size, tower.config.image_size)
        loss, _ = probe_loss(probes, tower(pixels.to(device)), {k: v.to(device) for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    held_out = scene_batch(np.random.default_rng([cfg.data_seed, 2, 1]), 500, tower.config.image_size)
    with torch.no_grad():
        _, acc = probe_loss(probes, tower(held_out[0].to(device)), {k: v.to(device) for k, v in held_out[1].items()})
    if distributed.is_master():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
        save_file(tensors, path + ".tmp", metadata={"settings": settings, "probe_accuracy": json.dumps(acc)})
        os.replace(path + ".tmp", path)  # atomic: another rank or run never reads half a file
    seconds, probes_read = time.perf_counter() - t0, ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
    distributed.print0(f"stage 0: vision tower pretrained, {cfg.stage0_steps} steps in {seconds:.0f} s; "
                       f"probe accuracy on 500 held-out scenes: {probes_read}", flush=True)  # fmt: skip


def set_trainable(model: VLM, cfg: VLMTrainConfig, stage: int, lm_dir: str) -> None:
    """requires_grad per part for this stage; LoRA layers are added here (before Run.prepare builds AdamW)."""
    lm = model.language_model
    lm.requires_grad_(stage == 2 and cfg.train_lm == "full")
    if stage == 2 and cfg.train_lm == "lora":
        if not lm_dir:
            raise UserError("train_lm=lora needs the base LM on disk: run stage 1 first or set lm=DIR")
        lora.apply_lora(lm, tuple(cfg.lora_targets), r=cfg.lora_r, alpha=cfg.lora_alpha)
    model.vision_tower.requires_grad_(cfg.stage1_train_vision if stage == 1 else cfg.stage2_train_vision)
    model.projector.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------------
# one stage
# ---------------------------------------------------------------------------------------------------------------------
def run_stage(cfg: VLMTrainConfig, stage: int, leave_group: bool = True) -> bool:
    """Train one stage to its last step (or until a stop request). Returns True when the stage is complete.
    leave_group=False keeps the torchrun process group for the next stage in this process."""
    scfg = stage_config(cfg, stage)
    run = tc.Run(scfg, f"vlm-stage{stage}")
    device = run.device
    attn_impl = resolve_attn_impl(cfg, device)  # auto -> triton on CUDA, sdpa elsewhere

    # ---- data ----
    tok_dir = cfg.lm or cfg.tokenizer_dir
    if stage == 2 and is_vlm_checkpoint(os.path.join(cfg.out_dir, "stage1")):
        tok_dir = os.path.join(cfg.out_dir, "stage1")  # the tokenizer files travel with every checkpoint
    tokenizer = Tokenizer(tok_dir)
    kind = "caption" if stage == 1 else "qa"
    train_rows = load_rows(cfg, cfg.caption_data if stage == 1 else cfg.qa_data, kind, "train")
    if stage == 1 and cfg.caption_data == "builtin":
        test_rows = vlm_data.make_examples(cfg.n_test, "caption", "test", cfg.data_seed, cfg.vision.image_size)
    else:
        test_rows = load_rows(cfg, cfg.test_data, "qa", "test") if stage == 2 and cfg.test_data else []
    stream = vlm_data.ExampleStream(len(train_rows), run.micro, cfg.seed, run.rank, run.world_size)

    # ---- model ----
    raw_model, lm_dir = build_model(cfg, stage, tokenizer, attn_impl, device)
    set_trainable(raw_model, cfg, stage, lm_dir)
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in raw_model.parameters())
    run.print(f"stage {stage}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
              f"{raw_model.num_image_tokens} image tokens per image; {len(train_rows)} training rows")  # fmt: skip
    model, optimizer = run.prepare(raw_model)
    lora_base = os.path.abspath(lm_dir) if lm_dir else None

    def load_weights(ckpt: str) -> None:
        if lora.lora_layers(raw_model.language_model):
            lora.load_adapter(raw_model.language_model, ckpt)
        else:
            raw_model.language_model.load_state_dict(Transformer.from_pretrained(ckpt, device=device).state_dict())
        raw_model.load_vision_weights(ckpt)

    def write_weights(path: str) -> None:
        raw_model.save_pretrained(path, tokenizer_dir=tok_dir, lora_base=lora_base)

    def evaluate(step: int) -> None:
        if not test_rows:
            return
        with run.autocast:
            result = vqa_accuracy(raw_model, tokenizer, test_rows, max_new_tokens=cfg.max_new_tokens)
        name = "caption_acc" if stage == 1 else "vqa_acc"
        record = {"step": step, name: result["accuracy"]}
        if stage == 2:
            record.update({f"vqa/{f}": acc for f, acc in result["by_family"].items()})
        run.log(record)
        run.print(f"stage {stage} step {step}: {name} {result['accuracy']:.3f} on {result['n']} held-out rows")

    # ---- training loop ----
    step = run.resume(load_weights, data=stream)
    seen_tokens = 0  # sequence positions (image slots and padding included) fed since this process started
    t_last, step_last = time.perf_counter(), step  # for images/s since the last log line
    while step < scfg.steps:
        lr = tc.lr_at(step, scfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        vision_cfg = raw_model.vision_tower.config
        batches = [collate([train_rows[i] for i in stream.next_indices()], tokenizer, vision_cfg, cfg.seq_len)
                   for _ in range(run.accum)]  # fmt: skip
        # Every answer token of the step weighs the same (as in train_sft.py): answers differ in length, so a mean
        # per micro-batch would weigh tokens by which micro-batch (or rank) they landed in. DDP averages gradients
        # over ranks, so each rank divides the summed loss by the mean count over ranks.
        n_local = sum(int((y != -1).sum()) for _, y, _ in batches)  # answer tokens on this rank
        denom = max(tc.all_reduce_mean(torch.tensor(float(n_local), device=device)).item(), 1.0)
        tokens = sum(x.numel() for x, _, _ in batches) * run.world_size
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y, pixels) in enumerate(batches):
            x, y, pixels = x.to(device), y.to(device), pixels.to(device)
            with run.no_sync(micro):  # only the last micro-batch all-reduces gradients
                with run.autocast:
                    loss = model(x, pixels, y, loss_reduction="sum") / denom
                run.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_mean = tc.all_reduce_mean(loss_sum)  # mean loss per answer token over the global batch
        # ---- the step: unscale, clip, optimizer.step(), zero_grad ----
        run.scaler.unscale_(optimizer)  # fp16: true-scale gradients before clipping (a no-op in bf16 / fp32)
        grad_norm = distributed.clip_grad_norm_(model, scfg.grad_clip or math.inf)  # over all ranks and shards
        applied = tc.all_finite(loss_mean, grad_norm)  # a NaN / inf step is skipped: weights and moments stay
        if applied:
            run.scaler.step(optimizer)  # optimizer.step() (fp16: unless the scaled gradients overflowed)
            tc.update_moe_bias(raw_model)  # DeepSeek-V3 aux-loss-free balancing: a no-op for dense models
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.count_bad_steps(step, applied)  # policy: log a skipped step, stop after max_bad_steps in a row
        step += 1
        seen_tokens += tokens
        if run.progress is not None:
            run.progress.update(1)
        if not applied:
            continue

        # ---- logging, eval, checkpoints ----
        done = step == scfg.steps
        if step % cfg.log_every == 0 or done:
            now = time.perf_counter()
            img_per_s = cfg.batch_size * (step - step_last) / max(now - t_last, 1e-9)  # all ranks together
            t_last, step_last = now, step
            record = {"step": step, "loss": loss_mean.item(), "lr": lr, "tokens": seen_tokens,
                      "img_per_s": img_per_s, "tok_per_s": img_per_s * tokens / cfg.batch_size,
                      "grad_norm": grad_norm.item(), "stage": stage}  # fmt: skip
            run.log(record)
            if run.progress is not None:
                run.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}")
        if run.master and ((cfg.eval_every and step % cfg.eval_every == 0) or done):
            evaluate(step)
        stopping = run.should_stop(step)
        if step % cfg.save_every == 0 or done or stopping:
            run.save(step, write_weights, data=stream)
        if stopping:
            break

    # ---- finish ----
    complete = step >= scfg.steps
    run.finish(step, f"vlm stage {stage}", leave_group=leave_group or not complete)
    return complete


def plan_language_model(cfg: VLMTrainConfig) -> ModelConfig | None:
    """The language model's config for the dry run (the planner sizes the LM; the vision tower is small)."""
    if cfg.lm:
        return ModelConfig.from_checkpoint(cfg.lm) if os.path.isdir(cfg.lm) else None
    has_tokenizer = os.path.isfile(os.path.join(cfg.tokenizer_dir, "tokenizer.model"))
    return language_model_config(cfg, Tokenizer(cfg.tokenizer_dir).vocab_size if has_tokenizer else 0, "sdpa")


def main(cfg: VLMTrainConfig) -> None:
    if cfg.dry_run:
        note = (f"stage 1: {cfg.stage1_steps} steps at lr {cfg.stage1_lr}; memory counts the language model only",)
        return dry_run(cfg, "train_vlm.py", plan_language_model(cfg), "images", ragged=True, notes=note)
    # stage=both: stage 1 keeps the process group (under torchrun) for stage 2 in the same processes.
    if cfg.stage in ("1", "both") and not run_stage(cfg, 1, leave_group=cfg.stage == "1"):
        return  # stopped early (signal or stop_after_steps): resume=auto continues stage 1
    if cfg.stage in ("2", "both"):
        run_stage(cfg, 2)


if __name__ == "__main__":
    run_cli(main, VLMTrainConfig, __doc__)
