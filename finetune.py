"""Fine-tuning support: what SFT, DPO and GRPO share below their loops.

- the settings: `FinetuneConfig` (base, data, task accuracy, LoRA / QLoRA, with their checks) and `ReplayConfig`
  (plus a dataset split, packing and replay, for SFT and DPO);
- the data: conversations from a .jsonl file or a dataset (`load_conversations`), one conversation rendered
  into (x, y) with the loss on assistant tokens only (`render_example`), a micro-batch right-padded
  (`collate`) or packed into few rows (`pack`); the seeded, resumable example order is shards.ExampleSampler;
- replay: rows of pretraining text that join each SFT micro-batch against forgetting (`replay_stream`,
  `add_replay`);
- the held-out loss per assistant token (`val_loss`);
- the base model with LoRA / QLoRA applied (`load_base`), named by a dir or a hub id (`resolve_base`), its
  size for a dry run (`plan_base_config`), and the parallel modes adapters accept (`sharding_errors`).

The loops themselves live in train_sft.py, train_dpo.py and train_grpo.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

import lora
import tasks
from config import UserError
from hf_checkpoint import resolve_checkpoint
from launch import TrainConfig, attn_impl_errors, is_sharded
from model import ModelConfig, Transformer
from shards import TokenStream
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- settings


@dataclass
class FinetuneConfig(TrainConfig):
    """The settings SFT, DPO and GRPO share: the base and its tokenizer, the training rows, the held-out task
    accuracy, full / LoRA / QLoRA, and the run choices of the network. Each stage subclasses it (SFT and DPO
    through ReplayConfig) with its own data and loss keys, and may give a key a different default."""

    plain_base: ClassVar[bool] = False  # DPO, GRPO: the base is also the reference, so not a LoRA adapter dir

    base: str = "out/pretrain"  # the model to fine-tune: our checkpoint dir, an HF Llama dir, or hf:ORG/NAME
    tokenizer: str = ""  # dir holding tokenizer.model (default: the base dir)
    data: str = ""  # training rows: a .jsonl file (or, for SFT and DPO, a dataset name)
    max_examples: int = 0  # use at most this many training rows (0 = all)
    eval_tasks: str = "data/builtin/test.jsonl"  # {"prompt","answer"} rows for exact-match accuracy ('' = none)
    eval_tasks_n: int = 300  # task rows per accuracy pass (the first n)
    eval_max_new_tokens: int = 16  # greedy tokens generated per task prompt
    eval_at_start: bool = True  # also evaluate the starting model before the first step (the "before" number)
    finetune: str = "lora"  # full | lora | qlora
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )  # module name suffixes that get adapters
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter scale numerator: scaling = alpha / r (or alpha / sqrt(r) with rsLoRA)
    lora_dropout: float = 0.0  # dropout on the adapter input
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023)
    double_quant: bool = False  # qlora: also quantize the NF4 block constants (QLoRA section 3)
    base_dtype: str = "auto"  # dtype of the frozen base: auto (bf16 for (q)lora on GPU, else float32) | float32 | ...
    merge_at_end: bool = True  # (q)lora: also write OUT/merged, the base with adapters folded in
    dropout: float = 0.0  # dropout on attention and residual branches (generation and a reference run without)
    attn_impl: str = "auto"  # auto (triton on CUDA, else sdpa) | naive | sdpa | triton
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward to save memory
    # Fine-tuning defaults differ from pretraining: short warmup, no weight decay on adapters.
    warmup_steps: int = 10  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.finetune not in ("full", "lora", "qlora"):
            errors.append(f"finetune must be full, lora or qlora, not '{self.finetune}'")
        # A hub id is resolved (downloaded) in main, not while validating.
        found = not self.base.startswith("hf:") and self.check_path(errors, "base", self.base, "checkpoint directory")
        if found and self.plain_base and os.path.isfile(os.path.join(self.base, "adapter_config.json")):
            merged = os.path.join(self.base, "merged")
            hint = f"; use its merged model {merged}" if os.path.isdir(merged) else ""
            errors.append(f"base: '{self.base}' is a LoRA adapter dir; this stage needs a plain model{hint}")
        if self.tokenizer:
            self.check_path(errors, "tokenizer", self.tokenizer)
        for key in ("data", "eval_tasks"):
            if getattr(self, key).endswith(".jsonl"):
                self.check_path(errors, key, getattr(self, key), "file")
        errors += sharding_errors(self) + attn_impl_errors(self)
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            errors.append("lora_r and lora_alpha must be > 0")
        if not (0.0 <= self.lora_dropout < 1.0 and 0.0 <= self.dropout < 1.0):
            errors.append("lora_dropout and dropout must be in [0, 1)")
        if not self.lora_targets:
            errors.append("lora_targets must name at least one module")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            errors.append(f"base_dtype must be auto, float32, bfloat16 or float16, not '{self.base_dtype}'")
        if self.optimizer == "muon" and self.finetune != "full":  # Muon's update is a whole matrix's, not an adapter's
            errors.append(f"optimizer=muon trains whole weight matrices, finetune={self.finetune} trains adapters: "
                          "use optimizer=adamw (or finetune=full)")  # fmt: skip
        if self.finetune == "full" and self.base_dtype not in ("auto", "float32"):
            errors.append("base_dtype: full fine-tuning keeps fp32 master weights; use dtype=bfloat16 for autocast")
        if self.eval_tasks_n < 0 or self.eval_max_new_tokens <= 0 or self.max_examples < 0:
            errors.append("eval_tasks_n and max_examples must be >= 0, eval_max_new_tokens > 0")
        return errors


@dataclass
class ReplayConfig(FinetuneConfig):
    """FinetuneConfig for stages that read fixed rows (SFT, DPO): a dataset split, packing, and replayed
    pretraining text against forgetting."""

    data_split: str = "train"  # split to read when `data` is a dataset (hub or local)
    pack: bool = False  # pack each micro-batch's sequences into fewer seq_len rows: same loss, less padding
    replay_data: str = (
        ""  # a prepared data dir whose train text joins every micro-batch, against forgetting ('' = none)
    )
    replay_rows: int = 2  # replay rows of seq_len tokens per optimizer step (all ranks), spread over its micro-batches
    replay_weight: float = 1.0  # weight of the replay loss (mean per replay token) added to the stage's loss

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.replay_data:
            meta = os.path.join(self.replay_data, "meta.json")
            self.check_path(errors, "replay_data", self.replay_data, "prepared data dir (meta.json)", probe=meta)
        if self.replay_rows < 1 or self.replay_weight < 0:
            errors.append("replay_rows must be >= 1 and replay_weight >= 0")
        return errors


# ----------------------------------------------------------------------------- data


def load_conversations(source: str, split: str = "train", families=()) -> list[dict]:
    """Rows with a valid "messages" list (at least one assistant turn) from a .jsonl file (errors name
    file and line), or from a dataset that `datasets.load_dataset` reads (errors name the row)."""
    if source.endswith(".jsonl") and os.path.isfile(source):
        try:
            rows = tasks.load_jsonl(source, tasks.SFT_KEYS)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        rows = _load_dataset_rows(source, split)
    if families:
        rows = [r for r in rows if r.get("family") in families]
        if not rows:
            raise UserError(f"{source}: no rows with family in {list(families)}")
    return rows


def _load_dataset_rows(source: str, split: str) -> list[dict]:
    import datasets  # lazy: importing it takes seconds, and only hub / non-jsonl sources need it

    datasets.logging.set_verbosity_error()
    try:
        if os.path.isfile(source):  # a local .json / .parquet / .csv file
            kind = {"jsonl": "json"}.get(source.rsplit(".", 1)[-1], source.rsplit(".", 1)[-1])
            ds = datasets.load_dataset(kind, data_files=source, split="train")
        else:  # a local dataset dir or a hub name such as HuggingFaceH4/ultrachat_200k
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise UserError(
            f"data: cannot load '{source}' split '{split}': {type(e).__name__}: {e}".split("\n")[0]
        ) from None
    if "messages" not in ds.column_names:
        raise UserError(f"data: '{source}' has no 'messages' column (columns: {ds.column_names})")
    rows = []
    for i, row in enumerate(ds):
        # The same row checks as tasks.load_jsonl, so a hub dataset fails as clearly as a local file.
        problem = tasks.check_row(row, tasks.SFT_KEYS)
        if problem:
            raise UserError(f"{source} [{split}] row {i}: {problem}")
        rows.append(row)
    return rows


def render_example(tokenizer: Tokenizer, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]]:
    """One conversation -> (x, y), each of length <= seq_len: y[t] = x[t+1] where that token is assistant
    output (render_chat's mask), else -1. Longer conversations are cut at seq_len + 1 tokens."""
    ids, mask = tokenizer.render_chat(messages)
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    x = ids[:-1]
    y = [tok if learn else -1 for tok, learn in zip(ids[1:], mask[1:], strict=True)]
    return x, y


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: x (B, T) with pad_id, y (B, T) with -1 (no loss on padding)."""
    T = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for row, (xs, ys) in enumerate(examples):
        x[row, : len(xs)] = torch.tensor(xs)
        y[row, : len(ys)] = torch.tensor(ys)
    return x, y


def pack(examples: list[tuple[list[int], list[int]]], pad_id: int, seq_len: int):
    """Pack examples into rows of at most seq_len tokens: x (R, T), y (R, T), document_ids (R, T), R <= B.

    First-fit decreasing (the longest example goes first, each into the first row with room). Each example
    keeps its own run of document ids, so model.forward(document_ids=...) attends within it only and restarts
    its positions: every example's loss is what it is unpacked, only fewer padding tokens are computed.
    (Packing with a block-diagonal mask: Krell et al. 2021, "Efficient Sequence Packing without
    Cross-contamination".) Rows are right-padded to the longest row; padding is a document of its own. An example's
    document id is its index in `examples`, so a caller can map token results back (train_dpo sums per sequence)."""
    rows: list[list[tuple[int, tuple[list[int], list[int]]]]] = []
    room: list[int] = []
    for i, ex in sorted(enumerate(examples), key=lambda item: -len(item[1][0])):
        r = next((i for i, free in enumerate(room) if free >= len(ex[0])), None)
        if r is None:
            rows.append([]), room.append(seq_len)
            r = len(rows) - 1
        rows[r].append((i, ex))
        room[r] -= len(ex[0])
    T = seq_len - min(room)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: padding
    for i, row in enumerate(rows):
        t = 0
        for j, (xs, ys) in row:
            x[i, t : t + len(xs)] = torch.tensor(xs)
            y[i, t : t + len(ys)] = torch.tensor(ys)
            doc[i, t : t + len(xs)] = j  # example j of the input list
            t += len(xs)
    return x, y, doc


# ----------------------------------------------------------------------------- replay of pretraining text
# Fine-tuning on a narrow task moves the weights wherever that task's loss goes, and nothing holds the rest of
# what the model knew: the loss on its pretraining text climbs (catastrophic forgetting; McCloskey & Cohen
# 1989). The standard remedy is to keep some of that text in the mix: InstructGPT adds the pretraining loss to
# its RL objective ("PPO-ptx", Ouyang et al. 2022), and continual-training recipes replay a few percent of the
# old data. Here each micro-batch gets a few rows of the base model's own training shards.


def replay_stream(
    data_dir: str, replay_rows: int, seq_len: int, tokenizer, rank: int, world_size: int, accum: int, seed: int
):
    """A TokenStream over data_dir's train shards: each next_batch() gives this rank its replay_rows / world_size rows
    of seq_len tokens for one optimizer step. replay_rows counts the rows of a step over all ranks, so the run does not
    depend on the world size; it must split evenly over the step's world_size x accum micro-batches. Refuses shards
    made by another tokenizer (their ids mean other text)."""
    if replay_rows % (world_size * accum):
        raise UserError(f"replay_rows {replay_rows} must be a multiple of the {world_size * accum} micro-batches of a "
                        f"step (world {world_size} x accum {accum})")  # fmt: skip
    with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as fh:
        sha = json.load(fh).get("tokenizer_sha256")
    if sha and getattr(tokenizer, "sha256", None) and sha != tokenizer.sha256:
        raise UserError(f"replay_data: {data_dir} was tokenized with another tokenizer than the model's")
    try:
        return TokenStream(data_dir, "train", replay_rows // world_size, seq_len, rank, world_size, seed=seed)
    except ValueError as e:
        raise UserError(f"replay_data: {e}") from None


def seek(stream: TokenStream, steps: int) -> None:
    """Put the stream where it is after `steps` next_batch() calls: a resumed run replays the same rows
    without saving the position (it is a function of the step)."""
    epoch, batch = divmod(steps, stream.batches_per_epoch)
    stream.load_state_dict({"epoch": epoch, "row": batch * stream.global_batch, "seed": stream.seed,
                            "n_rows": stream.n_rows})  # fmt: skip


def add_replay(x, y, doc, xr, yr, pad_id: int):
    """Append replay rows xr, yr (k, S) to a micro-batch x, y (R, T) -> x, y, doc of (R + k, max(T, S)).

    Replay rows keep their whole width S (seq_len) and the chat rows are right-padded to it (targets -1, a padding
    document of their own): the replay tokens of a step are then the same whatever chats share their micro-batch,
    so a run on N ranks (other micro-batch groupings) trains exactly like one process. Every replay token is a
    target. With packing each replay row is a document of its own (ids after the chats'). The first R rows stay
    the SFT rows."""
    T = max(x.shape[1], xr.shape[1])
    pad = T - x.shape[1]
    x = torch.nn.functional.pad(x, (0, pad), value=pad_id)  # (R, T)
    y = torch.nn.functional.pad(y, (0, pad), value=-1)
    if doc is not None:
        doc = torch.nn.functional.pad(doc, (0, pad), value=-1)  # -1: padding, as pack() marks it
        first = int(doc.max()) + 1
        doc = torch.cat([doc, first + torch.arange(len(xr))[:, None].expand(-1, T)])  # (R + k, T)
    return torch.cat([x, xr]), torch.cat([y, yr]), doc


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def val_loss(model, examples, batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean loss per assistant token over `examples` (every token weighs the same)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], pad_id)
        with autocast:
            total += model(x.to(device), y.to(device), loss_reduction="sum").float()
        count += int((y != -1).sum())
    model.train()
    return total.item() / max(count, 1)


# ----------------------------------------------------------------------------- the base model


def sharding_errors(cfg) -> list[str]:
    """(Q)LoRA refuses parallel=fsdp / torch_fsdp2 at start-up. fsdp.py flattens every weight of a unit into one
    trainable shard, so the frozen base would be trained; and the adapter files are written from the unsharded
    model. The adapters are small and the base is frozen, so ddp (a replicated base) is the right tool anyway."""
    if cfg.finetune != "full" and is_sharded(cfg.parallel):
        return [f"parallel={cfg.parallel} with finetune={cfg.finetune} is not supported; use parallel=ddp (or auto)"]
    return []


def plan_base_config(cfg):
    """The base's ModelConfig from its config.json for the dry run, or None when the base is not on this machine."""
    if not os.path.isdir(cfg.base):
        return None
    try:
        return ModelConfig.from_checkpoint(cfg.base)
    except ValueError as e:
        raise UserError(f"base: {e}") from None


def resolve_base(base: str) -> str:
    """The local dir of `base=`: a dir as is, `hf:ORG/NAME` downloaded into huggingface_hub's cache (or found
    there offline). Scripts call it once before reading the tokenizer and the weights from the dir."""
    try:
        return resolve_checkpoint(base)
    except ValueError as e:
        raise UserError(f"base: {e}") from None


def load_base(cfg, device: torch.device, attn_impl: str, grow_vocab_to: int = 0) -> Transformer:
    """The base model, with LoRA / QLoRA applied when asked (every non-adapter weight frozen). cfg: an SFT, DPO
    or GRPO config (base, finetune, base_dtype, dropout, gradient_checkpointing, the lora_* keys, seq_len); attn_impl
    as launch.resolve_attn_impl resolved it.

    grow_vocab_to: the size of a tokenizer extended with new tokens (0 = none). The embedding and lm_head
    grow to it (lora.grow_vocab), and LoRA runs then train those two modules in full: the new rows would
    stay at their initial value under frozen LoRA."""
    dtype = cfg.base_dtype
    if dtype == "auto":
        dtype = "bfloat16" if cfg.finetune != "full" and device.type == "cuda" else "float32"
    try:
        model = Transformer.from_pretrained(
            resolve_base(cfg.base), dtype=dtype, device=device, attn_impl=attn_impl, dropout=cfg.dropout,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )  # fmt: skip
        added = lora.grow_vocab(model, grow_vocab_to) if grow_vocab_to else 0
        if cfg.finetune != "full":
            lora.apply_lora(
                model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora,
                quantize="nf4" if cfg.finetune == "qlora" else None, double_quant=cfg.double_quant,
            )  # fmt: skip
            for p in lora.lora_parameters(model):
                p.data = p.data.float()  # adapters train in fp32 even on a bf16 base: Adam needs the precision
            if added:  # saved with the adapter as modules_to_save
                lora.train_modules(model, ["model.embed_tokens", "lm_head"])
    except ValueError as e:
        raise UserError(f"base: {e}") from None
    if cfg.seq_len > model.config.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} > the base model's context {model.config.max_position_embeddings}")
    return model
