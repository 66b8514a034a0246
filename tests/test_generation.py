"""generation.generate(): every sampling option, checked through generate itself against distributions computed by
hand (tests/test_sample.py checks the KV cache, padding, loading and the filters on their own).

The model is a stand-in whose next-token logits are a hand-written table indexed by the last token (a bigram), so
the distribution of every draw is known exactly. Each check draws N rows in one batch and compares the empirical
frequencies with the hand-computed probabilities: a token of probability 0 must never appear, the others must lie
within 5 standard deviations (binomial, sqrt(p (1 - p) / N)). The generator is seeded, so a run is deterministic;
the bound is loose enough that the seed does not matter and tight enough that every bug named below moves some
frequency by 10 or more standard deviations.

Top-p is tested at exact cumulative masses (powers of two, exact in fp32): the nucleus is the smallest set whose
mass reaches p, so a token whose preceding mass equals p exactly is out; `before > p` instead of `before >= p` would
keep it. Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_generation.py
"""

import math
from types import SimpleNamespace

import pytest
import torch

import generation

V = 8  # vocabulary of the stand-in model
N = 5000  # draws per distribution check
POW2 = [0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0, 0.0, 0.0]  # exact in fp32, as are all their partial sums


class TableModel(torch.nn.Module):
    """What generate() needs of a Transformer, with logits chosen by hand: logits(next | last token i) = table[i]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)  # (V, V)
        self.config = SimpleNamespace(vocab_size=table.shape[1], max_position_embeddings=64)

    def make_kv_cache(self, batch_size, max_len):
        return None  # the table needs no past: every position's logits depend on its own token only

    def forward(self, idx, kv_cache=None, start_pos=0, attention_mask=None):
        return self.table[idx]  # (B, T, V)


def same_row_model(logits) -> TableModel:
    """Every position gives the same logits, whatever the token."""
    return TableModel(torch.tensor(logits, dtype=torch.float64).expand(V, V).clone())


def log(probs):
    return [math.log(p) if p > 0 else float("-inf") for p in probs]


def softmax(logits, temperature=1.0):
    m = max(logits)
    e = [math.exp((x - m) / temperature) if x > float("-inf") else 0.0 for x in logits]
    return [x / sum(e) for x in e]


def renormalized(probs, keep):
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


def first_tokens(model, prompt, seed=0, **options) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out = generation.generate(model, [prompt] * N, 1, generator=gen, **options)
    return [row[0] for row in out]


def assert_follows(tokens, want):
    counts = torch.bincount(torch.tensor(tokens), minlength=V).tolist()
    for i, p in enumerate(want):
        if p == 0:
            assert counts[i] == 0, (i, counts, want)
        else:
            sigma = math.sqrt(p * (1 - p) / N)
            assert abs(counts[i] / N - p) <= 5 * sigma, (i, counts[i] / N, p, counts)


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(temperature):
    model = same_row_model(LOGITS)
    assert_follows(first_tokens(model, [7], temperature=temperature), softmax(LOGITS, temperature))


def test_temperature_zero_is_argmax():
    model = same_row_model([0.1, 0.3, 2.5, 2.4, 0.0, 0.0, 0.0, 0.0])
    assert first_tokens(model, [0], temperature=0.0) == [2] * N


def test_top_k_keeps_the_k_most_likely_after_temperature():
    model = same_row_model(LOGITS)
    tempered = softmax(LOGITS, 1.5)
    assert_follows(first_tokens(model, [7], temperature=1.5, top_k=3), renormalized(tempered, {0, 1, 2}))


def test_filter_sees_exact_masses():
    """The precondition of the boundary tests below: fp32 softmax reproduces the powers of two exactly."""
    probs = torch.tensor(log(POW2)).float().softmax(-1)
    assert probs.tolist() == POW2


@pytest.mark.parametrize(
    "p, keep",
    [
        (0.5, {0}),  # the first token's mass is exactly 0.5: it alone reaches p
        (0.75, {0, 1}),  # 0.5 + 0.25 reach 0.75 exactly: the 0.125 token (mass before it = p) is out
        (0.76, {0, 1, 2}),
        (0.875, {0, 1, 2}),  # again exactly at a cumulative mass
        (0.9, {0, 1, 2, "one of 3, 4"}),  # 0.875 + 0.0625 reach it with either of the tied 0.0625 tokens
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_through_generate_at_exact_cumulative_masses(p, keep):
    """Smallest set of most likely tokens whose mass reaches p (Holtzman et al. 2019), renormalized."""
    tokens = first_tokens(same_row_model(log(POW2)), [7], top_p=p)
    if "one of 3, 4" in keep:  # a tie: which of the two equal tokens the sort puts first is not specified
        seen = set(tokens) & {3, 4}
        assert len(seen) == 1, seen
        keep = (keep - {"one of 3, 4"}) | seen
    assert_follows(tokens, renormalized(POW2, keep))


def test_top_p_applies_to_the_tempered_distribution():
    """Temperature first, then the nucleus of what it gives: at T=2 the probabilities are prop. to sqrt(POW2)."""
    model = same_row_model(log(POW2))
    tempered = softmax(log(POW2), 2.0)  # [.343, .243, .172, .121, .121, 0, 0, 0]
    assert tempered[0] + tempered[1] < 0.7 <= tempered[0] + tempered[1] + tempered[2]
    assert_follows(first_tokens(model, [7], temperature=2.0, top_p=0.7), renormalized(tempered, {0, 1, 2}))


def test_top_k_then_top_p_on_the_renormalized_k():
    """top-k=2 leaves (2/3, 1/3); the mass before the second token is 2/3 >= 0.6, so top-p keeps one token. The
    other order (top-p on the full distribution, then top-k) would keep two."""
    model = same_row_model(log(POW2))
    assert first_tokens(model, [7], top_k=2, top_p=0.6) == [0] * N


def test_repetition_penalty_on_prompt_tokens():
    """CTRL: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    model = same_row_model(LOGITS)
    penalized = list(LOGITS)
    penalized[0], penalized[4] = LOGITS[0] / 2.0, LOGITS[4] * 2.0  # tokens 0 and 4 are in the prompt
    assert_follows(first_tokens(model, [0, 4], repetition_penalty=2.0), softmax(penalized))
    # Composed with temperature and top-k: the penalty acts on the raw logits, then the rest as usual.
    want = renormalized(softmax(penalized, 0.7), {0, 1, 2})
    assert_follows(first_tokens(model, [0, 4], repetition_penalty=2.0, temperature=0.7, top_k=3), want)


def test_repetition_penalty_counts_generated_tokens():
    """Greedy with penalty 2 on fixed logits [1.0, 0.9, 0.3, ...]: 0 first; then 0 is seen (0.5) so 1 wins (0.9);
    then both are seen (0.5 vs 0.45) and 0 wins from there on. Without the penalty: 0 every time."""
    model = same_row_model([1.0, 0.9, 0.3, 0.0, 0.0, 0.0, 0.0, -3.0])
    assert generation.generate(model, [[7]], 5, temperature=0.0, repetition_penalty=2.0) == [[0, 1, 0, 0, 0]]
    assert generation.generate(model, [[7]], 5, temperature=0.0) == [[0, 0, 0, 0, 0]]


def chain_model() -> TableModel:
    """Greedy walks 0 -> 1 -> 2 -> ... -> 7 -> 0: after token i, token i + 1 (mod V) is by far the most likely."""
    table = torch.zeros(V, V)
    table[torch.arange(V), (torch.arange(V) + 1) % V] = 10.0
    return TableModel(table)


def test_stop_ids_end_only_their_row_and_are_not_returned():
    out = generation.generate(chain_model(), [[0], [4], [2]], 6, temperature=0.0, stop_ids=(3,))
    assert out == [[1, 2], [5, 6, 7, 0, 1, 2], []]


def test_stop_strings_end_a_row_once_the_text_after_the_prompt_contains_them():
    decode = lambda ids: "".join("abcdefgh"[i] for i in ids)  # one letter per id
    model = chain_model()
    out = generation.generate(model, [[0], [5]], 6, temperature=0.0, stop_strings=("de",), decode=decode)
    assert out == [[1, 2, 3, 4], [6, 7, 0, 1, 2, 3]]  # "bcde" stops with the string; "ghabcd" never contains it
    # A stop string inside the prompt, or across the prompt's end, does not stop generation.
    for prompt, stop in (([0, 1], "ab"), ([1], "bc")):
        got = generation.generate(model, [prompt], 4, temperature=0.0, stop_strings=(stop,), decode=decode)
        assert got == [[(prompt[-1] + i) % V for i in range(1, 5)]], (prompt, stop, got)
