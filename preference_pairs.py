"""Where DPO's preference pairs come from: a jsonl file or a hub dataset of (prompt, chosen, rejected) rows, or
the policy's own samples judged by Python (on-policy pairs); and how a pair becomes token ids.

    python train_dpo.py configs/dpo_tiny.yaml pairs=static             # the rows' own chosen / rejected
    python train_dpo.py configs/dpo_tiny.yaml pairs=on_policy pair_every=20

Static pairs (tasks.py: the right value against a hand-made slip such as an off-by-one) teach the model to
avoid mistakes it may never make, and miss the ones it does make (it rambles past the answer, it writes a
list where a number belongs). On-policy pairs are built from what the policy itself says:

    for each prompt x with reference answer a (the row's chosen):
        y_1..y_k ~ pi(.|x)                                 k samples with the KV cache, batched
        right = {y_i : exact_match(y_i, a)},  wrong = the rest
        no wrong sample       -> no pair (the policy already answers x; nothing to push against)
        chosen   = a right sample if there is one, else a   (the policy's own words where it has them)
        rejected = the most frequent wrong sample           (the mistake the policy is most likely to make)

This is iterative / online DPO: Xu et al. 2023 ("Some things are more CRINGE than others: Iterative
Preference Optimization with the Pairwise Cringe Loss") regenerate and re-judge pairs from the current
model in rounds; Guo et al. 2024 ("Direct Language Model Alignment from Online AI Feedback") show that
pairs sampled from the policy being trained beat a fixed offline set; Pang et al. 2024 ("Iterative
Reasoning Preference Optimization") judge samples by exact match against the gold answer and add the NLL
on the chosen one (train_dpo's rpo_alpha), which is the recipe here.

Key choices:
- The judge is tasks.exact_match, a string comparison. Model output is never parsed, evaluated or run.
- `pair_every` > 0 starts a new round every that many steps: fresh samples from the policy as it is then.
  0 samples once, before the first step.
- A round's prompts are a seeded draw (seed, round) from all prompts; under torchrun each rank samples its
  own slice with its own generator (seed, round, rank), and the judged samples are gathered in prompt order,
  so every rank trains on the same list and the global batch means what it means for static pairs.
- Exact resume: the checkpoint stores the round number, the round's pairs (token ids) and the sampler's
  position (`OnPolicyPairs.state_dict`), because the policy that sampled them is gone once training moved on.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

import distributed
from config import UserError
from generation import sample_answers
from shards import ExampleSampler
from tasks import exact_match, load_jsonl

# ----------------------------------------------------------------------------- pairs from files


def to_pair(row: dict, where: str) -> tuple[list[dict], str, str]:
    """One preference row -> (prompt messages, chosen text, rejected text). ValueError names `where`.

    Accepted shapes: {"prompt": str | messages, "chosen": str, "rejected": str}; conversation pairs
    {"chosen": messages, "rejected": messages} that share every turn but the last assistant answer (the
    Anthropic HH layout); or {"prompt": str | messages, "chosen": [assistant msg], "rejected": [assistant msg]}.
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(chosen, list) and isinstance(rejected, list):
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            last = msgs[-1] if msgs else None
            if (
                not isinstance(last, dict)
                or last.get("role") != "assistant"
                or not isinstance(last.get("content"), str)
            ):
                raise ValueError(f"{where}: '{side}' must end with an assistant message")
        if prompt is None:  # the shared history is the prompt
            prompt = chosen[:-1]
            if rejected[:-1] != prompt:
                raise ValueError(f"{where}: chosen and rejected conversations differ before the last answer")
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    elif not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both be message lists")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: needs a 'prompt' (a string or a message list)")
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are identical")
    return prompt, chosen, rejected


def read_pairs(path: str) -> list[tuple[list[dict], str, str]]:
    """A local jsonl file of preference rows -> [(prompt messages, chosen, rejected)]; errors name file and line."""
    # load_jsonl does the JSON / UTF-8 / identical-pair checks with line numbers; `object` accepts any JSON
    # value, because chosen/rejected may be strings or message lists (to_pair checks which).
    rows = load_jsonl(path, {"chosen": object, "rejected": object})
    with open(path, "rb") as fh:
        lines = [n for n, raw in enumerate(fh, start=1) if raw.strip()]  # load_jsonl skips blank lines
    return [to_pair(row, f"{path} line {n}") for row, n in zip(rows, lines, strict=True)]


def read_hub_pairs(name: str, split: str) -> list[tuple[list[dict], str, str]]:
    """A Hugging Face hub dataset with the same columns (needs the network once; cached after)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types (connection, missing split, auth): one line for all
        raise UserError(f"hub_dataset {name} split {split}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return [to_pair(row, f"{name} ({split}) row {i}") for i, row in enumerate(ds)]


def tokenize_pair(tokenizer, prompt, chosen: str, rejected: str, seq_len: int):
    """-> (prompt_ids, chosen_ids, rejected_ids); prompt + either completion is at most seq_len + 1 tokens
    (seq_len inputs after the shift by one).

    Both completions share the same (possibly shortened) prompt, so their log-probs stay comparable. Too
    long: the prompt loses tokens from the left, after BOS; only a completion that leaves fewer than 8
    prompt tokens is cut itself (from the right).
    """
    p, c = tokenizer.render_prompt_completion(prompt, chosen)
    _, r = tokenizer.render_prompt_completion(prompt, rejected)
    limit = seq_len + 1
    min_prompt = min(len(p), 8)
    budget = limit - max(len(c), len(r))  # tokens left for the prompt
    if budget < min_prompt:
        c, r, budget = c[: limit - min_prompt], r[: limit - min_prompt], min_prompt
    if len(p) > budget:
        p = p[:1] + p[len(p) - budget + 1 :]  # BOS, then the end of the prompt (the question and <|assistant|>)
    return p, c, r


# ----------------------------------------------------------------------------- pairs from the policy


def build_pair(samples: list[str], answer: str) -> tuple[str, str] | None:
    """k sampled answers to one prompt and its reference answer -> (chosen, rejected), or None when every sample
    is right. Pure string work: a sample is compared with `answer`, never evaluated."""
    right = [s for s in samples if exact_match(s, answer)]
    wrong = [s for s in samples if not exact_match(s, answer)]
    if not wrong:
        return None
    # Counter keeps first-seen order among equal counts, so the pick is deterministic.
    rejected = Counter(wrong).most_common(1)[0][0]
    return (right[0] if right else answer), rejected


class OnPolicyPairs:
    """The current round's pairs and the sampler over them, for train_dpo's loop.

    rows: [(prompt messages, chosen, rejected)] as read_pairs gives them; each row's chosen is the reference
    answer the samples are judged against (its rejected is not used). `pairs` holds token triples
    (prompt_ids, chosen_ids, rejected_ids) from tokenize_pair. state_dict() is JSON: round, pairs, sampler.
    """

    def __init__(self, rows: list, tokenizer, seq_len: int, seed: int, k: int, prompts_per_round: int,
                 pair_every: int, max_new_tokens: int, temperature: float):  # fmt: skip
        self.tokenizer, self.seq_len, self.seed, self.k = tokenizer, seq_len, seed, k
        self.rows = [(msgs, chosen) for msgs, chosen, _ in rows]
        limit = seq_len + 1 - max_new_tokens  # prompt tokens that leave room for an answer: too long, keep the end
        self.prompts = []
        for msgs, _ in self.rows:
            p = tokenizer.render_chat(msgs, add_generation_prompt=True)[0]
            self.prompts.append(p if len(p) <= limit else p[:1] + p[len(p) - limit + 1 :])
        self.per_round = min(prompts_per_round or len(rows), len(rows))
        self.pair_every, self.max_new_tokens, self.temperature = pair_every, max_new_tokens, temperature
        self.round, self.pairs = -1, []
        self.sampler = ExampleSampler(0, seed)

    def round_of(self, step: int) -> int:
        return step // self.pair_every if self.pair_every else 0

    def due(self, step: int) -> bool:
        """Does `step` start a round whose pairs are not here yet (a fresh run, a round boundary)?"""
        return self.round_of(step) != self.round

    def refresh(self, step: int, model, rank: int, world_size: int, device) -> dict:
        """Sample and judge this round's prompts with `model` as it is now; returns the round's statistics."""
        r, k = self.round_of(step), self.k
        drawn = random.Random(f"{self.seed}/round{r}").sample(range(len(self.rows)), self.per_round)
        mine = sorted(drawn)[rank::world_size]  # this rank's slice of the round's prompts
        gen = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + r) * 1009 + rank)
        samples = sample_answers(model, self.tokenizer, [self.prompts[i] for i in mine], k, self.max_new_tokens,
                                 self.temperature, gen)  # fmt: skip
        judged = []  # (prompt index, number of right samples, (chosen, rejected) or None)
        for i, texts in zip(mine, samples, strict=True):
            answer = self.rows[i][1]
            judged.append((i, sum(exact_match(t, answer) for t in texts), build_pair(texts, answer)))
        judged = sorted(j for part in distributed.all_gather_objects(judged) for j in part)  # prompt order
        pairs = [tokenize_pair(self.tokenizer, self.rows[i][0], *pair, self.seq_len) for i, _, pair in judged if pair]
        if pairs:  # a round where every sample was right keeps the previous round's pairs
            tokens = self.sampler.tokens
            self.pairs, self.sampler = pairs, ExampleSampler(len(pairs), f"{self.seed}/round{r}")
            self.sampler.tokens = tokens
        elif not self.pairs:
            raise UserError(f"on-policy round {r}: every sample of every prompt was right, no pair to train on")
        self.round, n = r, len(judged)
        return {"step": step, "pairs/round": r, "pairs/n": len(pairs),
                "pairs/sample_acc": sum(j[1] for j in judged) / (n * k),
                "pairs/all_right": sum(j[1] == k for j in judged) / n,
                "pairs/own_chosen": sum(0 < j[1] < k for j in judged) / n}  # fmt: skip

    def state_dict(self) -> dict:
        return {"round": self.round, "pairs": [list(p) for p in self.pairs], "sampler": self.sampler.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.round, self.pairs = d["round"], [tuple(p) for p in d["pairs"]]
        self.sampler = ExampleSampler(len(self.pairs), f"{self.seed}/round{self.round}")
        self.sampler.load_state_dict(d["sampler"])
