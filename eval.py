"""Evaluation: loss / perplexity / bits-per-byte, task accuracy, multiple-choice scoring.

(Skeleton: `task_accuracy` is used by the training loops; the command line is being built.)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from sample import generate
from tasks import exact_match


@torch.no_grad()
def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Greedy exact-match accuracy on built-in task rows {"prompt", "answer", "family"}.

    Each prompt is rendered as a one-turn chat ending in the assistant marker; generation stops at
    the chat end marker or EOS. Returns {"accuracy": float, "by_family": {family: float}, "n": int}.
    """
    was_training = model.training
    model.eval()
    stop = (tokenizer.special_id("<|end|>"), tokenizer.eos_id)
    correct, by_family = [], defaultdict(list)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [tokenizer.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
                   for r in chunk]  # fmt: skip
        outs = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=stop)
        for row, out in zip(chunk, outs, strict=True):
            ok = exact_match(tokenizer.decode(out), row["answer"])
            correct.append(ok)
            by_family[row.get("family", "all")].append(ok)
    model.train(was_training)
    acc = sum(correct) / max(1, len(correct))
    return {"accuracy": acc, "by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())}, "n": len(correct)}
