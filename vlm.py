"""A small LLaVA-style vision-language model: ViT encoder -> MLP projector -> image tokens in a Llama prompt.

What is here, top to bottom:
  VisionConfig     - the encoder's shape (image and patch size, width, depth, heads)
  vision_attention - bidirectional attention through the same kernels as model.py (naive | sdpa | triton)
  VisionEncoder    - a Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"): a
                     strided convolution cuts the image into P x P patches and embeds each one, a learned
                     position embedding says where each patch was, pre-norm blocks mix them
  Projector        - Linear -> GELU -> Linear into the language model's embedding width (LLaVA-1.5's
                     "mlp2x_gelu", Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning")
  VLM              - vision tower + projector + model.Transformer, with the image tokens spliced into the prompt
  render_with_image / collate / generate_answer / vqa_accuracy - prompts, batches, answers, exact-match scoring

Key choices
  * The vision blocks reuse model.py's RMSNorm and attention() and moe.py's SwiGLU MLP; only the mask differs: a patch
    sees every other patch (no causal mask, no RoPE: positions come from the learned embedding, as in ViT).
    ViT itself uses LayerNorm and a GELU MLP; using the language model's pieces keeps one set of kernels.
  * The `<image>` placeholder. The tokenizer has no image token (and is not ours to change), so the image
    goes where the text "<image>" stands in a user turn, as N copies of the <pad> id, N = patches per image.
    <pad> is a control symbol that encode() never produces from text, our batches pad with EOS (behind
    targets of -1) and sample.generate left-pads with id 0, so a <pad> id in a VLM prompt can only mean
    "an image embedding goes here". HF's LLaVA works the same way with its own <image> id.
  * The splice. model.Transformer.forward takes token ids, not embeddings. Rather than copy its forward
    (RoPE, padding masks, KV cache, checkpointing), the VLM hooks `embed_tokens`: while images are pending,
    the embedding output at the <pad> slots is replaced by the projected image features, in order (row by
    row, image i fills the i-th run of slots). Everything downstream is the unchanged language model, so
    sample.generate with its KV cache works as is: only the prefill contains slots. A
    `forward(inputs_embeds=...)` argument on Transformer would make the hook unnecessary.
  * Files: a VLM checkpoint is a normal language-model checkpoint (config.json + model.safetensors, or a
    LoRA adapter) that transformers and model.Transformer read as before, plus `vision.safetensors`
    (vision_tower.* and projector.*) and `vlm_config.json`.

Use it:
    vlm = VLM.from_pretrained("out/vlm")
    generate_answer(vlm, Tokenizer("out/vlm"), ["shapes.png"], ["What colour is the shape?"])  # ['red']

Tests: OMP_NUM_THREADS=1 python -m pytest -q tests/test_vlm.py     Benchmark: python benchmarks/bench_vlm.py

Shape legend: B batch, T time, C channels (LM width), C_v vision width, N patches per image, P patch side,
S image side, H heads, D head dim, F feed-forward width, V vocab.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora
import vlm_data
from generation import generate
from hf_checkpoint import copy_tokenizer_files
from model import ATTN_IMPLS, RMSNorm, Transformer, attention
from moe import SwiGLU
from tasks import task_accuracy
from tokenizer import Tokenizer

IMAGE_TAG = "<image>"
VISION_WEIGHTS, VLM_CONFIG = "vision.safetensors", "vlm_config.json"


# ---------------------------------------------------------------------------------------------------------------------
# the vision encoder
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    image_size: int = 32  # S: images are resized to S x S pixels
    patch_size: int = 8  # P: side of one patch; N = (S / P)^2 image tokens per image
    num_channels: int = 3  # input channels (RGB)
    hidden_size: int = 128  # C_v: width of the vision tower
    intermediate_size: int = 352  # F: SwiGLU width of the vision MLP (~8/3 C_v)
    num_hidden_layers: int = 2  # vision Transformer blocks
    num_attention_heads: int = 4  # H; head dim D = C_v / H (16, 32, 64 or 128 for the triton kernel)
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm
    attn_impl: str = "sdpa"  # naive | sdpa | triton (train_vlm.py sets it from its own attn_impl)

    def validate(self) -> list[str]:
        errors = []
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            errors.append(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            errors.append(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads")
        if min(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_channels) <= 0:
            errors.append("hidden_size, intermediate_size, num_hidden_layers and num_channels must be > 0")
        if self.attn_impl not in ATTN_IMPLS:
            errors.append(f"attn_impl must be one of {ATTN_IMPLS}, not '{self.attn_impl}'")
        return errors

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vision_attention(q, k, v, impl: str):
    """softmax(q k^T / sqrt(D)) v with no mask: every patch attends to every patch. q/k/v (B, H, N, D).

    "triton" runs flash_attention(causal=False) on a GPU or under TRITON_INTERPRET=1 (model.attention sends
    only causal calls there); elsewhere it falls back to SDPA, as model.py does.
    """
    if impl == "triton" and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from flash_attention import flash_attention  # lazy: importing it imports triton (slow, optional on CPU)

        return flash_attention(q, k, v, causal=False)
    return attention(q, k, v, None, False, "naive" if impl == "naive" else "sdpa")  # (B, H, N, D)


class VisionAttention(nn.Module):
    """Multi-head self-attention over patches; biases as in ViT, no RoPE (positions are in the embedding)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head, self.impl = c.num_attention_heads, c.attn_impl
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, C) -> (B, H, N, D) for each of q, k, v
        q, k, v = (
            proj(x).view(B, N, self.n_head, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = vision_attention(q, k, v, self.impl)  # (B, H, N, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class VisionBlock(nn.Module):
    """Pre-norm block, model.Block's layout: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = VisionAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    """Images (B, 3, S, S) -> patch features (B, N, C_v)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        problems = c.validate()
        if problems:
            raise ValueError(f"VisionConfig: {problems[0]}")
        self.config = c
        # A P x P convolution with stride P is one linear map per non-overlapping patch (ViT's "patchify").
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, c.num_patches, c.hidden_size) * 0.02)  # learned (ViT)
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, pixels):
        S = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (self.config.num_channels, S, S):
            raise ValueError(f"pixels must be (B, {self.config.num_channels}, {S}, {S}), got {tuple(pixels.shape)}")
        x = self.patch_embedding(pixels)  # (B, C_v, S/P, S/P)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding  # (B, N, C_v), patches in row-major order
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # (B, N, C_v)


class Projector(nn.Module):
    """Vision features -> language-model embeddings: Linear, GELU, Linear (LLaVA-1.5; names as in HF LLaVA)."""

    def __init__(self, vision_size: int, text_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # (B, N, C_v) -> (B, N, C)


# ---------------------------------------------------------------------------------------------------------------------
# the vision-language model
# ---------------------------------------------------------------------------------------------------------------------
class VLM(nn.Module):
    """vision_tower + projector + language_model (a model.Transformer, possibly with LoRA layers).

    forward(input_ids (B, T), pixel_values (B_img, 3, S, S), targets=None, **lm_kwargs) is the language model's
    forward with image features at the <pad> slots: logits (B, T, V), or the loss when targets are given.
    """

    def __init__(self, vision_config: VisionConfig, language_model: Transformer, image_token_id: int):
        super().__init__()
        self.vision_tower = VisionEncoder(vision_config)
        self.projector = Projector(vision_config.hidden_size, language_model.config.hidden_size)
        self.language_model = language_model
        self.image_token_id = image_token_id
        self._pending = None  # (B_img, N, C) image features waiting for the next embedding lookup
        language_model.model.embed_tokens.register_forward_hook(self._splice)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.config.num_patches

    def encode_images(self, pixels):
        """(B_img, 3, S, S) -> (B_img, N, C): what fills one image's N slots."""
        return self.projector(self.vision_tower(pixels))

    @contextlib.contextmanager
    def images(self, pixels):
        """Within this block, language-model forwards put these images' features at their <pad> slots."""
        self._pending = self.encode_images(pixels) if pixels is not None else None
        try:
            yield
        finally:
            self._pending = None

    def _splice(self, module, inputs, output):
        """Forward hook on embed_tokens: output (B, T, C) with the slots replaced by image features."""
        if self._pending is None:
            return None
        slots = inputs[0] == self.image_token_id  # (B, T)
        n = int(slots.sum())
        if n == 0:  # a decode step after the prefill: nothing to splice
            return None
        feats = self._pending  # (B_img, N, C)
        if n != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"the prompt has {n} image slots but {feats.shape[0]} image(s) x {feats.shape[1]} tokens")
        # masked_scatter fills the True slots in row-major order with the features in order: image i -> run i.
        return output.masked_scatter(slots[..., None], feats.to(output.dtype))

    def forward(self, input_ids, pixel_values=None, targets=None, **lm_kwargs):
        with self.images(pixel_values):
            return self.language_model(input_ids, targets, **lm_kwargs)

    # ---- files ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str, tokenizer_dir: str | None = None, lora_base: str | None = None):
        """The language model's files (full weights, or a PEFT adapter naming lora_base when it has LoRA layers),
        vision.safetensors, vlm_config.json, and the tokenizer files from tokenizer_dir."""
        os.makedirs(path, exist_ok=True)
        if lora.lora_layers(self.language_model):
            lora.save_adapter(self.language_model, path, base_model_name_or_path=lora_base)
        else:
            self.language_model.save_pretrained(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                   if k.startswith(("vision_tower.", "projector."))}  # fmt: skip
        save_file(tensors, os.path.join(path, VISION_WEIGHTS + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, VISION_WEIGHTS + ".tmp"), os.path.join(path, VISION_WEIGHTS))
        meta = {"vision": asdict(self.vision_tower.config), "image_token_id": self.image_token_id,
                "image_token": "<pad>", "num_image_tokens": self.num_image_tokens, "projector": "mlp2x_gelu"}  # fmt: skip
        with open(os.path.join(path, VLM_CONFIG + ".tmp"), "w") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(os.path.join(path, VLM_CONFIG + ".tmp"), os.path.join(path, VLM_CONFIG))
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, path)

    def load_vision_weights(self, path: str) -> None:
        """Load vision_tower.* and projector.* from path/vision.safetensors (strict: every key, right shapes)."""
        tensors = load_file(os.path.join(path, VISION_WEIGHTS))
        own = {k for k in self.state_dict() if k.startswith(("vision_tower.", "projector."))}
        if set(tensors) != own:
            raise ValueError(
                f"{path}/{VISION_WEIGHTS} does not match the vision config: {sorted(set(tensors) ^ own)[:4]}"
            )
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", attn_impl: str | None = None) -> VLM:
        """Load a VLM checkpoint dir (its language model may be a LoRA adapter over a base dir)."""
        if not is_vlm_checkpoint(path):
            raise ValueError(f"{path!r} is not a VLM checkpoint (no {VLM_CONFIG})")
        with open(os.path.join(path, VLM_CONFIG)) as fh:
            meta = json.load(fh)
        overrides = {"attn_impl": attn_impl} if attn_impl else {}
        lm = Transformer.from_pretrained(path, device=device, **overrides)
        vision = VisionConfig(**{**meta["vision"], **overrides})
        model = cls(vision, lm, meta["image_token_id"]).to(device)
        model.load_vision_weights(path)
        return model


def is_vlm_checkpoint(path: str) -> bool:
    """True for a directory written by VLM.save_pretrained (what sample.py / eval.py check for image=...)."""
    return os.path.isfile(os.path.join(path, VLM_CONFIG))


# ---------------------------------------------------------------------------------------------------------------------
# prompts, batches, answers
# ---------------------------------------------------------------------------------------------------------------------
def render_with_image(tokenizer, messages: list[dict], num_image_tokens: int, add_generation_prompt: bool = False):
    """tokenizer.render_chat with the text "<image>" of one user turn replaced by num_image_tokens <pad> ids.

    Returns (ids, mask) like render_chat; the image slots have mask 0. The chat layout stays render_chat's
    own: the turn is rendered empty and its content (text before, slots, text after) is put after its role
    marker, so the surrounding tokens are exactly what render_chat gives.
    """
    holders = [i for i, m in enumerate(messages) if IMAGE_TAG in m.get("content", "")]
    if len(holders) != 1 or messages[holders[0]]["content"].count(IMAGE_TAG) != 1:
        raise ValueError(f"a VLM conversation needs exactly one {IMAGE_TAG} (in a user turn)")
    n = holders[0]
    if messages[n].get("role") != "user":
        raise ValueError(f"{IMAGE_TAG} must be in a user turn, not a {messages[n].get('role')!r} turn")
    before, after = messages[n]["content"].split(IMAGE_TAG)
    blank = [*messages[:n], {**messages[n], "content": ""}, *messages[n + 1 :]]
    ids, mask = tokenizer.render_chat(blank, add_generation_prompt)
    start = len(tokenizer.render_chat(messages[:n])[0]) + 1  # just after turn n's <|user|> marker
    if ids[start - 1] != tokenizer.special_id("user"):
        raise ValueError("render_chat's layout changed: expected <|user|> before the turn's content")
    content = tokenizer.encode(before) + [tokenizer.pad_id] * num_image_tokens + tokenizer.encode(after)
    return ids[:start] + content + ids[start:], mask[:start] + [0] * len(content) + mask[start:]


def collate(rows: list[dict], tokenizer, vision: VisionConfig, max_len: int):
    """Examples -> (x (B, T), y (B, T), pixels (B, 3, S, S)). y is x shifted by one, -1 where no loss is taken
    (prompt, image slots, padding); sequences are right-padded with EOS and cut to max_len tokens."""
    seqs, labels = [], []
    for row in rows:
        ids, mask = render_with_image(tokenizer, row["messages"], vision.num_patches)
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if ids.count(tokenizer.pad_id) != vision.num_patches:
            raise ValueError(f"max_len {max_len} cuts through the image slots; raise it")
        seqs.append(ids[:-1])
        labels.append([t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)])  # predict t+1 from t
    T = max(len(s) for s in seqs)
    x = torch.full((len(rows), T), tokenizer.eos_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        x[b, : len(s)], y[b, : len(lab)] = torch.tensor(s), torch.tensor(lab)
    pixels = torch.stack([vlm_data.image_to_tensor(row["image"], vision.image_size) for row in rows])  # (B, 3, S, S)
    return x, y, pixels


@torch.no_grad()
def generate_answer(model: VLM, tokenizer, images: list, questions: list[str], max_new_tokens: int = 16,
                    **sampling) -> list[str]:  # fmt: skip
    """One answer per (image, question), generated by sample.generate with its KV cache; greedy by default.

    images: paths, PIL images or uint8 arrays; a question without "<image>" gets the image in front of it.
    sampling: generate()'s options (temperature, top_k, top_p, generator, stop_ids, ...); stops at <|end|>/EOS.
    """
    vision = model.vision_tower.config
    device = next(model.parameters()).device
    prompts = []
    for q in questions:
        turn = {"role": "user", "content": q if IMAGE_TAG in q else IMAGE_TAG + q}
        prompts.append(render_with_image(tokenizer, [turn], vision.num_patches, add_generation_prompt=True)[0])
    pixels = torch.stack([vlm_data.image_to_tensor(im, vision.image_size) for im in images]).to(device)  # (B, 3, S, S)
    options = {"temperature": 0.0, "stop_ids": (tokenizer.special_id("<|end|>"), tokenizer.eos_id), **sampling}
    was_training = model.training
    model.eval()
    with model.images(pixels.to(next(model.parameters()).dtype)):
        outs = generate(model.language_model, prompts, max_new_tokens, **options)
    model.train(was_training)
    return [tokenizer.decode(o) for o in outs]


def vqa_accuracy(model: VLM, tokenizer, rows: list[dict], batch_size: int = 64, max_new_tokens: int = 8) -> dict:
    """Greedy exact-match accuracy on one-question examples (vlm_data rows: the first user turn is asked, "answer"
    is the truth), scored by tasks.task_accuracy as the text tasks are: {"accuracy": float, "by_family": {family: float}, "n": int}."""
    answers = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        questions = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in chunk]
        answers += generate_answer(model, tokenizer, [r["image"] for r in chunk], questions, max_new_tokens)
    return task_accuracy(rows, answers)


def evaluate_checkpoint(path: str, data: str = "builtin", n: int = 200, device="cpu", batch_size: int = 64) -> dict:
    """Exact-match accuracy of a VLM checkpoint, for eval.py in one call: held-out VQA (per family) and, on the
    built-in set, held-out captions. data: builtin | a vlm_data.py folder (test.json) | a LLaVA json with
    answers. Returns {"vqa_acc", "vqa_by_family", "vqa_n"[, "caption_acc"]}."""
    model = VLM.from_pretrained(path, device=device)
    tokenizer = Tokenizer(path)
    size = model.vision_tower.config.image_size
    if data == "builtin":
        rows = vlm_data.make_examples(n, "qa", "test", size=size)
    else:
        rows = vlm_data.load_llava_json(os.path.join(data, "test.json") if os.path.isdir(data) else data)[: n or None]
    vqa = vqa_accuracy(model, tokenizer, rows, batch_size)
    result = {"vqa_acc": vqa["accuracy"], "vqa_by_family": vqa["by_family"], "vqa_n": vqa["n"]}
    if data == "builtin":
        captions = vlm_data.make_examples(n, "caption", "test", size=size)
        result["caption_acc"] = vqa_accuracy(model, tokenizer, captions, batch_size, max_new_tokens=16)["accuracy"]
    return result
