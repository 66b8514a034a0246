"""Evaluation: loss / perplexity / bits-per-byte, task accuracy, multiple-choice scoring.

    python eval.py checkpoint=out/pretrain                           # everything, on data/builtin
    python eval.py checkpoint=out/sft data=notes/*.txt tasks= choices=   # only the text loss of some files
    python eval.py compare=out/pretrain,out/sft,out/dpo              # side-by-side table: base -> SFT -> DPO
    python eval.py compare=out/pretrain,out/sft,out/dpo plot=out/summary.png   # ... and the summary figure
    python eval.py compare=out/pretrain,out/sft,out/dpo save=out/eval.json     # ... and the JSON in a file
    python eval.py compare=out/sft,out/dpo/merged data= choices= samples=16    # + pass@1, pass@16, maj@16
    python eval.py --help

What is measured (each part is skipped when its input is set to ""):
- Language modelling on `data`: a prepared data dir (its val_*.bin shards) or text files (.txt, one
  document per file; .jsonl, one document per row's "text"). Sequences are cut into windows of
  seq_len + 1 tokens at stride seq_len, so every token after the first is predicted exactly once.
    val_loss = mean nats per predicted token;  val_ppl = exp(val_loss);
    val_bpb  = total nats / ln 2 / total UTF-8 bytes of the text.
  Bits per byte does not depend on the tokenizer, so models with different vocabularies compare
  fairly (Gao et al. 2020, "The Pile", section 4). For text files the bytes are counted exactly
  (each document is BOS + its tokens; every text token is predicted); for shards the byte count is
  the predicted tokens times meta.json's val text_bytes / tokens.
- Exact match on the built-in held-out tasks (`tasks`, rows {"prompt", "answer"}; DPO pairs {"prompt", "chosen"}
  count the chosen answer as right, to score the prompts DPO and GRPO trained on): greedy decoding of
  a one-turn chat (`generation.chat_answers`), scored by tasks.exact_match (`tasks.task_accuracy`); the SFT/DPO/GRPO
  loops log the same pair.
  With samples=N, N answers per task are also sampled at `temperature` (generation.sample_answers) and scored
  (sampled_accuracy): task_pass@1 = expected accuracy of one sample; task_pass@N = share of tasks with a
  right answer among the N (Chen et al. 2021's unbiased estimator); task_maj@N = accuracy of the majority answer
  (self-consistency, Wang et al. 2022). Greedy task_acc near maj@N means the model's most frequent answer is
  already the one it gives; pass@N - task_acc is the room a method that only reweights its own answers has.
- Multiple choice (`choices`, rows {"context", "choices", "label"} as in HellaSwag / ARC; tasks.py
  writes choice_test.jsonl): each choice is scored by the log-likelihood of its tokens given the
  context, sum over the choice's tokens of log p(token | everything before it). The choice is appended
  to the context as-is (write a leading space into the choice when the text needs one, as lm-eval's
  HellaSwag does); the context/choice token boundary is taken from tokenizing the concatenation.
    choice_acc            argmax of the summed log-prob (lm-evaluation-harness's `acc`);
    choice_acc_norm       argmax of summed log-prob / UTF-8 bytes of the choice (lm-eval's `acc_bytes`,
                          the same as its character-normalised `acc_norm` for ASCII choices);
    choice_acc_token_norm argmax of summed log-prob / number of choice tokens.
  A sum favours short choices (fewer negative terms); normalising removes that bias.
    choice_chat_acc       the same choices scored as the assistant's answer to the row's "prompt" in the chat
                          format (rows from tasks.py have one), answer tokens and the closing <|end|>: the
                          format SFT and DPO train on. The doctest form ">>> expr" is what pretraining text
                          holds, but a 4M model that read 1.2M tokens of it never learned to evaluate Python
                          there, so the other three stay at chance (0.25) for every stage.

The last line of stdout is one JSON object with every metric (ARCHITECTURE.md, contract 4); with
`compare=` a table comes first and the JSON holds one entry per checkpoint. `save=PATH` also writes that
object to a file (`make demo` keeps its numbers in out/eval.json; docs/make_results.py copies them into
docs/results/demo.json, the file the numbers quoted in the README and chapters are checked against).

For standard benchmarks run lm-evaluation-harness on the same directory (it loads our checkpoints
through transformers): lm_eval --model hf --model_args pretrained=out/sft --tasks hellaswag,arc_easy

Shape legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

import vlm
from config import UserError, run_cli
from finetune import collate
from generation import chat_answers, load_for_inference, sample_answers
from shards import read_shard
from tasks import exact_match, load_jsonl, task_accuracy

# ----------------------------------------------------------------------------- loss over token sequences


def _windows(seqs, seq_len: int):
    """(input, target) pairs of length <= seq_len from each sequence, stride seq_len: each token after a
    sequence's first is a target exactly once. seqs: iterable of 1-D int arrays (np.memmap is fine)."""
    for seq in seqs:
        for start in range(0, len(seq) - 1, seq_len):
            chunk = np.asarray(seq[start : start + seq_len + 1], dtype=np.int64)
            yield chunk[:-1], chunk[1:]


@torch.no_grad()
def sequence_nll(model, seqs, seq_len: int, batch_size: int = 8, max_tokens: int = 0) -> tuple[float, int]:
    """(total nats, number of predicted tokens) of the model on token sequences; max_tokens > 0 stops once
    at least that many tokens are predicted."""
    device = next(model.parameters()).device
    V = model.config.vocab_size
    nats, count, batch = 0.0, 0, []

    def flush():
        nonlocal nats, count
        # Right padding (id 0, no loss) needs no mask: causal attention never lets a real token see the pads after it.
        x, y = (t.to(device) for t in collate(batch, 0))  # (B, T) each
        if int(x.max()) >= V or int(y.max()) >= V:
            raise UserError(f"data holds token id {max(int(x.max()), int(y.max()))} >= model vocab_size {V}")
        nats += float(model(x, targets=y, loss_reduction="sum"))  # fp32 cross-entropy inside the model
        count += int((y != -1).sum())
        batch.clear()

    for pair in _windows(seqs, seq_len):
        batch.append(pair)
        if len(batch) == batch_size:
            flush()
            if max_tokens and count >= max_tokens:
                return nats, count
    if batch:
        flush()
    return nats, count


def _lm_metrics(nats: float, tokens: int, n_bytes: float, source: str) -> dict:
    loss = nats / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": nats / math.log(2) / n_bytes,
            "val_tokens": tokens, "val_bytes": round(n_bytes), "val_source": source}  # fmt: skip


def shard_loss(model, tokenizer, data_dir: str, seq_len: int, batch_size: int = 8, max_tokens: int = 0) -> dict:
    """Loss / perplexity / bits-per-byte on the val_*.bin shards of a prepare_data.py directory."""
    with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    sha = meta.get("tokenizer_sha256")
    if sha and getattr(tokenizer, "sha256", None) and sha != tokenizer.sha256:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the checkpoint's (sha256 differs)")
    paths = sorted(glob.glob(os.path.join(data_dir, "val_*.bin")))
    if not paths:
        raise UserError(f"{data_dir}: no val_*.bin shards; run prepare_data.py with val_fraction > 0")
    try:
        shards = [read_shard(p) for p in paths]
    except ValueError as e:
        raise UserError(str(e)) from None
    nats, tokens = sequence_nll(model, shards, seq_len, batch_size, max_tokens)
    val = meta["splits"]["val"]
    bytes_per_token = val["text_bytes"] / max(val["tokens"], 1)  # BOS/EOS counted as tokens, as the loss does
    return _lm_metrics(nats, tokens, tokens * bytes_per_token, data_dir)


def read_documents(pattern: str) -> list[str]:
    """Documents of text files: .txt = one document per file, .jsonl = the "text" of each row."""
    paths = sorted(p for part in pattern.split(",") for p in glob.glob(part.strip()) if os.path.isfile(p))
    if not paths:
        raise UserError(f"data: no files match '{pattern}'")
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            docs += [row["text"] for row in _load(path, {"text": str})]
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                docs.append(fh.read())
    return [d for d in docs if d]


def text_loss(model, tokenizer, pattern: str, seq_len: int, batch_size: int = 8, max_tokens: int = 0) -> dict:
    """Loss / perplexity / bits-per-byte on text files; every token of each document after its BOS is predicted."""
    docs = read_documents(pattern)
    seqs = [[tokenizer.bos_id] + tokenizer.encode(d) for d in docs]
    nats, tokens = sequence_nll(model, seqs, seq_len, batch_size, max_tokens)
    # With a token cap only part of the text was scored: count the bytes of the scored documents' share.
    total_tokens = sum(len(s) - 1 for s in seqs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs) * min(1.0, tokens / max(total_tokens, 1))
    return _lm_metrics(nats, tokens, n_bytes, pattern)


# ----------------------------------------------------------------------------- multiple-choice log-likelihood


def encode_choice(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, choice ids). The boundary comes from tokenizing context + choice together, so the
    choice tokens are the ones the model would really see after that context (lm-eval does the same); if the
    tokenizer merges a piece across the boundary, fall back to tokenizing the two parts separately."""
    ctx = [tokenizer.bos_id] + tokenizer.encode(context)
    whole = [tokenizer.bos_id] + tokenizer.encode(context + choice)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(choice)


@torch.no_grad()
def choice_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 16, chat: bool = False):
    """For each row, for each choice: (sum of log p(choice token | context and earlier choice tokens), number of
    choice tokens). Sequences longer than the model context lose their oldest context tokens.

    chat=True scores each choice as the assistant's answer to the row's "prompt" in the chat format the SFT
    and DPO models were trained on (render_prompt_completion: the choice's tokens and the closing <|end|>)."""
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings + 1
    pairs, owner = [], []  # (input, target) with targets -1 on the context; owner = (row, choice)
    for r, row in enumerate(rows):
        for c, choice in enumerate(row["choices"]):
            if chat:
                ctx, cont = tokenizer.render_prompt_completion(row["prompt"], choice)
            else:
                ctx, cont = encode_choice(tokenizer, row["context"], choice)
            seq = np.array((ctx + cont)[-limit:], dtype=np.int64)
            target = seq[1:].copy()
            target[: len(seq) - 1 - len(cont)] = -1  # score only the choice tokens
            pairs.append((seq[:-1], target))
            owner.append((r, c, len(cont)))
    scores = [[None] * len(row["choices"]) for row in rows]
    for i in range(0, len(pairs), batch_size):
        x, y = (t.to(device) for t in collate(pairs[i : i + batch_size], 0))  # right-padded (B, T) each
        nll = model(x, targets=y, loss_reduction="none")  # (B, T) nats, 0 where ignored
        for (r, c, n), row_nll in zip(owner[i : i + batch_size], nll.sum(-1).tolist(), strict=True):
            scores[r][c] = (-row_nll, n)
    return scores


def choice_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 16, chat: bool = False) -> dict:
    """acc (raw sum), acc_norm (per UTF-8 byte of the choice), acc_token_norm (per choice token), n; ties go
    to the first choice. chat: as in choice_logprobs."""
    scores = choice_logprobs(model, tokenizer, rows, batch_size, chat)
    hits = {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    for row, row_scores in zip(rows, scores, strict=True):
        logp = np.array([s for s, _ in row_scores])
        n_bytes = np.array([max(1, len(c.encode("utf-8"))) for c in row["choices"]])
        n_tokens = np.array([max(1, n) for _, n in row_scores])
        hits["acc"] += int(np.argmax(logp)) == row["label"]
        hits["acc_norm"] += int(np.argmax(logp / n_bytes)) == row["label"]
        hits["acc_token_norm"] += int(np.argmax(logp / n_tokens)) == row["label"]
    return {k: v / len(rows) for k, v in hits.items()} | {"n": len(rows)}


# ----------------------------------------------------------------------------- sampled answers: pass@k, maj@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k answers, drawn without replacement from n samples of which c are right,
    is right: 1 - C(n-c, k) / C(n, k). Averaged over tasks it is the unbiased pass@k estimator of Chen et al.
    2021 ("Evaluating Large Language Models Trained on Code", section 2.1). The ratio of binomials is a product
    of k fractions, exact without huge integers: C(n-c, k) / C(n, k) = prod_{i<k} (n-c-i) / (n-i)."""
    if not (0 < k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:  # fewer wrong samples than draws: some draw is right
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer after stripping whitespace (exact_match's rule); a tie goes to the answer sampled
    first among the tied (Counter.most_common keeps the order of first appearance)."""
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


def sampled_accuracy(rows: list[dict], samples: list[list[str]], ks=(1,)) -> dict:
    """What n sampled answers per task (generation.sample_answers) say about a model, beside its greedy accuracy:
    {"pass@k" for each k in ks, "maj@n", "n": tasks, "samples": n}.

    pass@1 is the expected accuracy of one sampled answer (the mean share of right samples); pass@n the share of
    tasks with at least one right sample, the most any reranking or RL that only reweights the model's own
    answers could reach; maj@n the accuracy of the majority vote (self-consistency, Wang et al. 2022), what
    "sharpening" the distribution onto its most frequent answer gives."""
    n = len(samples[0]) if samples else 0
    if any(len(s) != n for s in samples) or not all(0 < k <= n for k in ks):
        raise ValueError(f"every task needs the same number of samples, at least max(ks) = {max(ks)}")
    right = [sum(exact_match(a, row["answer"]) for a in s) for row, s in zip(rows, samples, strict=True)]
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in right) / max(1, len(rows)) for k in ks}
    votes = [exact_match(majority_answer(s), row["answer"]) for row, s in zip(rows, samples, strict=True)]
    out[f"maj@{n}"] = sum(votes) / max(1, len(rows))
    return out | {"n": len(rows), "samples": n}


# ----------------------------------------------------------------------------- the command line


@dataclass
class EvalConfig:
    checkpoint: str = "out/pretrain"  # checkpoint dir (ours, a LoRA adapter, HF Llama/Mixtral) or hf:ORG/NAME
    compare: list[str] = field(default_factory=list)  # several checkpoints side by side, e.g. compare=base,sft,dpo
    data: str = "data/builtin"  # LM loss: a prepared data dir (val shards) or text files (glob, comma list); "" = skip
    tasks: str = "data/builtin/test.jsonl"  # exact match on {"prompt","answer"} or {"prompt","chosen"} rows; "" = skip
    choices: str = "data/builtin/choice_test.jsonl"  # multiple choice {"context","choices","label"}; "" = skip
    seq_len: int = 0  # window for the LM loss; 0 = the model's context length
    max_tokens: int = 0  # stop the LM loss after this many predicted tokens (0 = all)
    limit: int = 0  # use only the first N task and choice rows (0 = all)
    vqa: str = ""  # VLM checkpoints: VQA exact match on builtin | a vlm_data.py folder | a LLaVA json with answers
    max_new_tokens: int = 24  # generation budget per task answer
    samples: int = 0  # also sample this many answers per task: pass@1, pass@N, maj@N beside greedy (0 = greedy only)
    temperature: float = 0.7  # sampling temperature for samples= (top-p 1, no top-k)
    seed: int = 0  # seed of the samples= generator: the same seed, the same samples
    batch_size: int = 8  # sequences per forward
    plot: str = ""  # with compare=: also draw accuracy by stage and family and val loss by stage into this PNG
    save: str = ""  # also write the metrics JSON (the last line printed) to this .json file; "" = print only
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    quantize: str = ""  # nf4: block linears stored in 4 bits (lora.quantize_nf4); "" = as loaded

    def validate(self) -> list[str]:
        errors = [f"checkpoint: no directory at '{d}'" for d in self.checkpoints()
                  if not d.startswith("hf:") and not os.path.isdir(d)]  # fmt: skip
        if self.quantize not in ("", "nf4"):
            errors.append(f"quantize must be '' or nf4, not '{self.quantize}'")
        if self.data and not os.path.isdir(self.data) and not any(glob.glob(p.strip()) for p in self.data.split(",")):
            errors.append(f"data: no directory or files at '{self.data}' (set data= to skip the LM loss)")
        for key in ("tasks", "choices"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                errors.append(f"{key}: no file at '{path}' (run prepare_data.py, or set {key}= to skip)")
        if self.seq_len < 0 or self.max_tokens < 0 or self.limit < 0:
            errors.append("seq_len, max_tokens and limit must be >= 0")
        if self.batch_size <= 0 or self.max_new_tokens <= 0:
            errors.append("batch_size and max_new_tokens must be > 0")
        if self.samples < 0 or (self.samples and self.temperature <= 0):
            errors.append("samples must be >= 0, and temperature > 0 when samples > 0 (greedy is task_acc)")
        if self.samples and not self.tasks:
            errors.append("samples= samples answers to tasks=: set tasks= to a task file")
        if self.plot and not self.plot.endswith(".png"):
            errors.append(f"plot: '{self.plot}' must be a .png path")
        if self.save and not self.save.endswith(".json"):
            errors.append(f"save: '{self.save}' must be a .json path")
        return errors

    def checkpoints(self) -> list[str]:
        return list(self.compare) or [self.checkpoint]


def _load(path: str, keys) -> list[dict]:
    try:
        return load_jsonl(path, keys)
    except ValueError as e:  # names the file and line
        raise UserError(str(e)) from None


def task_row(row: dict, path: str, n: int) -> dict:
    """A task row {"prompt", "answer"}; a DPO pair {"prompt", "chosen"} counts its chosen answer as the right one (as
    train_grpo.py reads it: true of the built-in pairs), so eval.py can score a model on the prompts DPO and GRPO
    trained on, beside the held-out ones."""
    answer = row.get("answer", row.get("chosen"))
    if not isinstance(answer, str):
        raise UserError(f"{path} row {n}: needs an 'answer' string (or a DPO pair's 'chosen')")
    return row | {"answer": answer}


def evaluate(checkpoint: str, cfg: EvalConfig) -> dict:
    """Every metric the config asks for, on one checkpoint: a flat dict (by_family nested)."""
    t0 = time.perf_counter()
    metrics: dict = {"checkpoint": checkpoint}
    if cfg.vqa:
        if vlm.is_vlm_checkpoint(checkpoint):  # caption / VQA exact match on held-out images
            metrics |= vlm.evaluate_checkpoint(checkpoint, cfg.vqa, n=cfg.limit or 200)
    model, tokenizer = load_for_inference(checkpoint, cfg.device, cfg.dtype, cfg.quantize)
    if cfg.data:
        seq_len = min(cfg.seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        if os.path.isfile(os.path.join(cfg.data, "meta.json")):
            metrics |= shard_loss(model, tokenizer, cfg.data, seq_len, cfg.batch_size, cfg.max_tokens)
        else:
            metrics |= text_loss(model, tokenizer, cfg.data, seq_len, cfg.batch_size, cfg.max_tokens)
    if cfg.tasks:
        rows = [task_row(r, cfg.tasks, n) for n, r in enumerate(_load(cfg.tasks, {"prompt": str}), start=1)]
        rows = rows[: cfg.limit or None]
        answers = chat_answers(model, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, 4 * cfg.batch_size)
        acc = task_accuracy(rows, answers)
        metrics |= {"task_acc": acc["accuracy"], "task_n": acc["n"], "task_by_family": acc["by_family"]}
        if cfg.samples:
            metrics |= sampled_metrics(model, tokenizer, rows, cfg)
    if cfg.choices:
        rows = _load(cfg.choices, {"context": str, "choices": list, "label": int})[: cfg.limit or None]
        metrics |= {f"choice_{k}": v for k, v in choice_accuracy(model, tokenizer, rows, 2 * cfg.batch_size).items()}
        if all("prompt" in r for r in rows):  # the built-in rows: also the same choices asked as a chat question
            chat = choice_accuracy(model, tokenizer, rows, 2 * cfg.batch_size, chat=True)
            metrics["choice_chat_acc"] = chat["acc"]
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return metrics


def sampled_metrics(model, tokenizer, rows: list[dict], cfg: EvalConfig) -> dict:
    """task_pass@1, task_pass@N and task_maj@N from N = cfg.samples answers per task at cfg.temperature
    (sampled_accuracy says what each means). Greedy task_acc against maj@N tells whether the model's most
    frequent answer is already its greedy one; pass@N how many tasks have a right answer among its samples at all."""
    prompts = [tokenizer.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
               for r in rows]  # fmt: skip
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    samples = sample_answers(model, tokenizer, prompts, cfg.samples, cfg.max_new_tokens, cfg.temperature, generator,
                             rows_per_call=16 * cfg.batch_size)  # fmt: skip
    ks = sorted({1, cfg.samples})
    scores = sampled_accuracy(rows, samples, ks)
    return {f"task_{key}": scores[key] for key in [f"pass@{k}" for k in ks] + [f"maj@{cfg.samples}"]} | {
        "task_samples": cfg.samples, "task_temperature": cfg.temperature}  # fmt: skip


TABLE_ROWS = (
    "val_loss",
    "val_ppl",
    "val_bpb",
    "task_acc",
    "choice_acc",
    "choice_acc_norm",
    "choice_acc_token_norm",
    "choice_chat_acc",
    "vqa_acc",
    "caption_acc",
)


def format_table(results: list[dict]) -> str:
    """Metrics as rows, checkpoints as columns (base -> SFT -> DPO reads left to right)."""
    names = [r["checkpoint"].rstrip("/") for r in results]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<22}" + "".join(f"{n:>{width + 2}}" for n in names)]
    families = sorted({f for r in results for f in r.get("task_by_family", {})})
    rows = [(k, lambda r, k=k: r.get(k)) for k in TABLE_ROWS]
    rows[4:4] = [(f"task_acc/{f}", lambda r, f=f: r.get("task_by_family", {}).get(f)) for f in families]
    sampled = sorted({k for r in results for k in r if k.startswith(("task_pass@", "task_maj@"))},
                     key=lambda k: (k.startswith("task_maj@"), int(k.split("@")[1])))  # fmt: skip
    at = 4 + len(families)  # after the greedy task rows: pass@1, pass@N, maj@N
    rows[at:at] = [(k, lambda r, k=k: r.get(k)) for k in sampled]
    for label, get in rows:
        values = [get(r) for r in results]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:<22}" + "".join(f"{'-' if v is None else f'{v:.4f}':>{width + 2}}" for v in values))
    return "\n".join(lines)


def plot_summary(results: list[dict], path: str) -> str:
    """One PNG of the compare= results: held-out task accuracy per stage (all tasks and each family) on the
    left, val loss on the pretraining text per stage on the right. The picture of what each stage did:
    SFT should raise the bars on the left without raising the one on the right."""
    import matplotlib  # lazy: pyplot takes ~1 s to import and only compare=... plot= needs it

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [os.path.basename(r["checkpoint"].rstrip("/").removesuffix("/merged")) or r["checkpoint"] for r in results]
    families = sorted({f for r in results for f in r.get("task_by_family", {})})
    groups = ["all", *families]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(results), 1)
    for i, (name, r) in enumerate(zip(names, results, strict=True)):
        accs = [r.get("task_acc", 0.0)] + [r.get("task_by_family", {}).get(f, 0.0) for f in families]
        bars = left.bar([g + (i - (len(results) - 1) / 2) * width for g in range(len(groups))], accs, width, label=name)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(range(len(groups)), [f"{g} tasks" for g in groups])
    left.set_ylabel("held-out exact match")
    left.set_ylim(0, 1)
    left.set_title("task accuracy by stage")
    left.legend(fontsize=8)
    losses = [r.get("val_loss", float("nan")) for r in results]
    bars = right.bar(names, losses, color=[f"C{i}" for i in range(len(results))])
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_ylabel("nats / token")
    right.set_title("val loss on pretraining text")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(cfg: EvalConfig) -> dict:
    results = []
    for checkpoint in cfg.checkpoints():
        metrics = evaluate(checkpoint, cfg)
        results.append(metrics)
        print(f"{checkpoint}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if cfg.compare:
        print(format_table(results))
        if cfg.plot:
            print(f"summary figure: {plot_summary(results, cfg.plot)}")
        out = {"compare": results}
    else:
        out = results[0]
    if cfg.save:  # the same object as the printed line, indented for people who read the file
        os.makedirs(os.path.dirname(cfg.save) or ".", exist_ok=True)
        with open(cfg.save, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
            fh.write("\n")
    print(json.dumps(out), flush=True)  # contract 4: the last line of stdout is the metrics JSON
    return out


if __name__ == "__main__":
    run_cli(main, EvalConfig, __doc__, show_config=False)
