"""Built-in SFT / DPO / evaluation tasks whose right answers the Python interpreter computes.

Every task is a tiny Python expression and its answer is what the Python REPL would print for it
(`repr` of the value):

    user: len('banana') = ?            assistant: 6
    user: 'apple'[1:4] = ?             assistant: 'ppl'
    user: sorted([7, 2, 5]) = ?        assistant: [2, 5, 7]

Why this kind of data: it needs no download, every answer is checkable by running the expression,
and the answers are a few tokens long, so a few-million-parameter model pretrained for minutes on
Python source can measurably raise its held-out exact-match accuracy after a few minutes of SFT.

Key choices
- Three difficulty families. "easy" answers are one or two tokens and mostly copy or compare
  (`max(3, 8, 1)`, `[4, 9, 2][-1]`, `'a' in 'cat'`, `2 + 7`): a tiny model learns them quickly.
  "medium" needs one string/list operation (`len`, slicing, `.upper()`, `.count`, `sorted`, two-digit
  arithmetic); "hard" chains two (`'plum'[::-1]`, `sorted(xs)[1]`, `3 + 4 * 5`, `.split`).
- Answers are computed, never written by hand: each generated expression is checked against an AST
  whitelist and then evaluated with no builtins except a short list (`safe_eval`). It is a guard for
  our own generated expressions, not a sandbox for untrusted input.
- A held-out split that cannot leak. Each expression gets a canonical key (its AST, with `a + b` and
  `b + a` made equal); a stable hash of that key puts the expression on the test side (20%) or the
  train side, whatever the seed or the sizes. So test prompts never appear in any training file made
  by this module, and SFT, DPO and test rows are also deduplicated by exact prompt.
- DPO "rejected" answers are plausible mistakes of the same type, produced by evaluating a mistaken
  expression: an off-by-one index or count, the other end of a slice, `min` for `max`, the other case,
  the wrong operator precedence, the unsorted list. Never equal to the chosen answer.
- `exact_match` is the one scoring rule everywhere: both sides stripped of surrounding whitespace,
  then compared exactly (quotes and case matter: the answer to `'a'.upper()` is `'A'`, not `A`).
- `make_choice_examples` gives HellaSwag/ARC-style multiple-choice rows from held-out expressions,
  with wrong choices of different lengths, so length-normalised scoring matters (used by eval.py).

Run:
    python tasks.py out_dir=data/tasks            # sft_train/sft_test/dpo_train/test/choice_test.jsonl + tasks_meta.json
    python tasks.py --help

Training scripts read user-supplied files through `load_jsonl(path, required_keys)`, which names the
file and line of the first malformed row. Format references: the chat "messages" rows follow the
OpenAI / Hugging Face chat convention; the (prompt, chosen, rejected) rows follow DPO (Rafailov et
al., 2023, arXiv:2305.18290) as used by TRL.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from config import UserError, run_cli

FAMILIES = ("easy", "medium", "hard")
HELDOUT_PERCENT = 20  # share of the expression space reserved for the test side (by hash of the expression)

WORDS = (
    "ant ape arm art bag bat bed bee box bus cab cap car cat cow cup dog ear egg elf fan fig fox gem hat "
    "ice ink jam jar key kid leg lid map mud net nut owl pan pen pig pot rat rug sun tea toy van web yak "
    "bear bird boat bone cake coat corn crab deer desk dove drum duck fish frog gate goat harp kite lamp "
    "leaf lion milk moon nest pear plum ring rose sand seal ship sock star tree wolf yarn "
    "apple beach bread brush chair cloud crane daisy eagle flame grape horse house juice lemon mango "
    "melon mouse onion otter panda peach piano plant queen river robot shark sheep snake spoon stone "
    "table tiger train whale zebra banana carrot cherry donkey dragon garden guitar hammer island "
    "jungle kitten ladder monkey orange parrot pepper pillow rabbit rocket spider tomato turtle walrus "
    "window"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ----------------------------------------------------------------------------- restricted evaluation

SAFE_FUNCS = {"len": len, "sorted": sorted, "min": min, "max": max, "sum": sum, "abs": abs}
SAFE_METHODS = {"upper", "lower", "capitalize", "count", "replace", "find", "rfind", "join", "split", "strip"}
_SAFE_NODES = (
    ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Attribute, ast.Name,
    ast.Subscript, ast.Slice, ast.List, ast.Tuple, ast.keyword, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.Not,
    ast.Lt, ast.Gt, ast.Eq, ast.NotEq, ast.LtE, ast.GtE, ast.In, ast.NotIn,
)  # fmt: skip


def safe_eval(expr: str):
    """Value of one generated expression. Raises ValueError if it uses anything off the whitelist."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            raise ValueError(f"expression {expr!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in SAFE_FUNCS:
            raise ValueError(f"expression {expr!r}: name {node.id!r} is not allowed")
        if isinstance(node, ast.Attribute) and node.attr not in SAFE_METHODS:
            raise ValueError(f"expression {expr!r}: method {node.attr!r} is not allowed")
        if isinstance(node, ast.keyword) and node.arg != "reverse":
            raise ValueError(f"expression {expr!r}: keyword {node.arg!r} is not allowed")
    # No builtins at all besides the whitelist: even a missed node type could not reach open/import.
    return eval(compile(tree, "<task>", "eval"), {"__builtins__": {}, **SAFE_FUNCS}, {})


class _Canonical(ast.NodeTransformer):
    """Order the operands of int `+` and `*` so that `3 + 4` and `4 + 3` are one expression."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        ints = all(isinstance(x, ast.Constant) and type(x.value) is int for x in (node.left, node.right))
        if ints and isinstance(node.op, (ast.Add, ast.Mult)) and node.left.value > node.right.value:
            node.left, node.right = node.right, node.left
        return node


def canonical_key(expr: str) -> str:
    """The expression's identity for dedup and splitting: its AST, blind to spacing and a+b vs b+a."""
    return ast.dump(_Canonical().visit(ast.parse(expr, mode="eval")))


def is_heldout(expr: str) -> bool:
    """Test side or train side, fixed by a stable hash of the canonical expression (not by seed)."""
    digest = hashlib.sha256(canonical_key(expr).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def exact_match(prediction: str, answer: str) -> bool:
    """The one scoring rule: equal after stripping surrounding whitespace; case and quotes matter."""
    return prediction.strip() == answer.strip()


# ----------------------------------------------------------------------------- generators
# Each generator draws one task: (expression, [mistaken expressions]). A mistaken expression is what
# a careless solver would compute instead; its value (when it differs from the answer and has the
# same type) is a plausible wrong answer for DPO and multiple choice. Mistakes that raise (an index
# off the end) are simply skipped, which keeps the generators short.


def _word(rng, lo=3, hi=6):
    return rng.choice([w for w in WORDS if lo <= len(w) <= hi])


def _digits(rng, lo, hi):
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def _letter_of(rng, w):  # a letter in the word most of the time, sometimes one that is not
    return rng.choice(w) if rng.random() < 0.7 else rng.choice(LETTERS)


def g_add_digits(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b}", [f"{a} + {b} + 1", f"{a} + {b} - 1", f"{max(a, b)} - {min(a, b)}"]


def g_compare(rng):
    a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice(["<", ">", "=="])
    return f"{a} {op} {b}", [f"not {a} {op} {b}"]


def g_contains(rng):
    w = _word(rng)
    c = _letter_of(rng, w)
    return f"{c!r} in {w!r}", [f"{c!r} not in {w!r}"]


def g_max_min(rng):
    f, g = rng.choice([("max", "min"), ("min", "max")])
    args = ", ".join(map(str, _digits(rng, 2, 4)))
    return f"{f}({args})", [f"{g}({args})", f"{f}({args}) + 1", f"{f}({args}) - 1"]


def g_list_index(rng):
    xs, i = _digits(rng, 3, 5), rng.choice([0, 1, -1])
    return f"{xs!r}[{i}]", [f"{xs!r}[{i + 1}]", f"{xs!r}[{i - 1}]"]


def g_len_list(rng):
    xs = _digits(rng, 1, 6)
    return f"len({xs!r})", [f"len({xs!r}) + 1", f"len({xs!r}) - 1"]


def g_abs(rng):
    n = rng.randint(1, 20)
    return f"abs(-{n})", [f"-{n}", f"{n} + 1"]


def g_len_word(rng):
    w = _word(rng, 3, 7)
    return f"len({w!r})", [f"len({w!r}) + 1", f"len({w!r}) - 1"]


def g_char_index(rng):
    w = _word(rng)
    i = rng.randint(-len(w), len(w) - 1)
    return f"{w!r}[{i}]", [f"{w!r}[{i + 1}]", f"{w!r}[{i - 1}]"]


def g_case(rng):
    w = _word(rng)
    shown, method = rng.choice([(w, "upper"), (w, "capitalize"), (w.upper(), "lower"), (w.capitalize(), "upper")])
    others = [m for m in ("upper", "lower", "capitalize") if m != method]
    return f"{shown!r}.{method}()", [f"{shown!r}.{m}()" for m in others] + [repr(shown)]


def g_count(rng):
    w = _word(rng, 4, 7)
    c = _letter_of(rng, w)
    return f"{w!r}.count({c!r})", [f"{w!r}.count({c!r}) + 1", f"{w!r}.count({c!r}) - 1"]


def g_slice(rng):
    w = _word(rng, 4, 7)
    a = rng.randint(0, len(w) - 2)
    b = rng.randint(a + 1, len(w))
    return f"{w!r}[{a}:{b}]", [f"{w!r}[{a}:{b + 1}]", f"{w!r}[{a + 1}:{b}]", f"{w!r}[{a}:{b - 1}]"]


def g_sorted(rng):
    xs = _digits(rng, 3, 5)
    return f"sorted({xs!r})", [f"sorted({xs!r}, reverse=True)", repr(xs), f"sorted({xs!r})[1:]"]


def g_two_digit(rng):
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return f"{a} {op} {b}", [f"{a} {op} {b} + 1", f"{a} {op} {b} - 1", f"{a} {op} {b} + 10", f"{a} {op} {b} - 10"]


def g_times(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{a} * {b}", [f"{a} * {b + 1}", f"{a} * {b - 1}", f"{a} + {b}"]


def g_divmod(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    op, other = rng.choice([("//", "%"), ("%", "//")])
    return f"{a} {op} {b}", [f"{a} {other} {b}", f"{a} {op} {b} + 1", f"{a} {op} {b} - 1"]


def g_replace(rng):
    w = _word(rng, 4, 7)
    c, d = rng.choice(w), rng.choice(LETTERS)
    return f"{w!r}.replace({c!r}, {d!r})", [f"{w!r}.replace({c!r}, {d!r}, 1)", repr(w), f"{w!r}.replace({d!r}, {c!r})"]


def g_strip(rng):
    w = _word(rng)
    s = " " * rng.randint(1, 3) + w + " " * rng.randint(1, 3)
    return f"{s!r}.strip()", [repr(w + " "), repr(" " + w), repr(s)]


def g_precedence(rng):
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    forms = [f"{a} + {b} * {c}", f"({a} + {b}) * {c}", f"{a} * {b} - {c}", f"{a} * ({b} - {c})"]
    i = rng.randrange(len(forms))
    other = forms[i ^ 1]  # the same numbers with the other grouping: the classic precedence slip
    return forms[i], [other, f"{forms[i]} + 1", f"{forms[i]} - 1"]


def g_reverse(rng):
    w = _word(rng, 3, 6)
    return f"{w!r}[::-1]", [repr(w), f"{w!r}[:0:-1]", f"{w!r}[-2::-1]"]


def g_sorted_index(rng):
    xs, i = _digits(rng, 3, 5), rng.choice([0, 1, -1])
    return f"sorted({xs!r})[{i}]", [f"sorted({xs!r})[{i + 1}]", f"sorted({xs!r})[{i - 1}]", f"{xs!r}[{i}]"]


def g_sum(rng):
    xs = _digits(rng, 3, 5)
    return f"sum({xs!r})", [f"sum({xs!r}) + 1", f"sum({xs!r}) - 1", f"sum({xs!r}[1:])"]


def g_spread(rng):
    a = ", ".join(map(str, _digits(rng, 3, 5)))
    return f"max({a}) - min({a})", [f"max({a}) + min({a})", f"max({a}) - min({a}) + 1", f"max({a})"]


def g_find(rng):
    w = _word(rng, 4, 7)
    c = _letter_of(rng, w)
    return f"{w!r}.find({c!r})", [f"{w!r}.find({c!r}) + 1", f"{w!r}.rfind({c!r})", f"{w!r}.count({c!r})"]


def g_join_sorted(rng):
    w = _word(rng, 3, 6)
    return f"''.join(sorted({w!r}))", [f"''.join(sorted({w!r}, reverse=True))", repr(w), f"{w!r}[::-1]"]


def g_concat(rng):
    a, b = _word(rng, 3, 4), _word(rng, 3, 4)
    return f"{a!r} + {b!r}", [f"{b!r} + {a!r}", f"{a!r} + {b!r}[1:]", f"{a!r}[:-1] + {b!r}"]


def g_repeat(rng):
    w, n = _word(rng, 2, 3), rng.randint(2, 3)
    return f"{w!r} * {n}", [f"{w!r} * {n + 1}", f"{w!r} * {n - 1}"]


def g_slice_upper(rng):
    w = _word(rng, 4, 7)
    a = rng.randint(0, len(w) - 2)
    b = rng.randint(a + 1, len(w))
    return f"{w!r}[{a}:{b}].upper()", [f"{w!r}[{a}:{b + 1}].upper()", f"{w!r}[{a}:{b}]", f"{w!r}[{a + 1}:{b}].upper()"]


def g_split(rng):
    sep = rng.choice([",", "-", " "])
    parts = [_word(rng, 3, 4) for _ in range(rng.randint(2, 3))]
    s, p = sep.join(parts), repr(sep)
    return f"{s!r}.split({p})", [f"{s!r}.split({p})[::-1]", f"{s!r}.split({p})[:-1]", f"[{s!r}]"]


GENERATORS = {
    "easy": [g_add_digits, g_compare, g_contains, g_max_min, g_list_index, g_len_list, g_abs],
    "medium": [g_len_word, g_char_index, g_case, g_count, g_slice, g_sorted, g_two_digit, g_times, g_divmod,
               g_replace, g_strip],
    "hard": [g_precedence, g_reverse, g_sorted_index, g_sum, g_spread, g_find, g_join_sorted, g_concat, g_repeat,
             g_slice_upper, g_split],
}  # fmt: skip


# ----------------------------------------------------------------------------- drawing tasks


def _wrong_values(expr: str, value, mistakes: list[str]) -> list:
    """Distinct values of the mistaken expressions that differ from `value` and share its type."""
    # A count or a length of -1 is no plausible slip: negative wrong answers only where the
    # expression itself can go negative (it subtracts, or it is str.find).
    can_be_negative = "-" in expr or "find" in expr
    out = []
    for m in mistakes:
        try:
            v = safe_eval(m)
        except (IndexError, ValueError, ZeroDivisionError):  # e.g. an off-by-one index past the end
            continue
        if isinstance(v, int) and v < 0 <= value and not can_be_negative:
            continue
        if type(v) is type(value) and v != value and v not in out:
            out.append(v)
    return out


def _perturb(value, rng):
    """A generic near miss of the same type, for when the task's own mistakes ran out."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([d for d in (-2, -1, 1, 2, 10) if value + d >= 0 or value < 0])
    if isinstance(value, str):
        return rng.choice([value[:-1], value + value[-1:], value.swapcase(), value[::-1], value + "s"])
    return rng.choice([value[:-1], value[::-1], value + value[-1:]])  # list


def _draw(rng, family: str, seen: set, heldout: bool) -> dict:
    """One new task of `family` from the test side (heldout=True) or the train side, not in `seen`."""
    for _ in range(10_000):
        expr, mistakes = rng.choice(GENERATORS[family])(rng)
        key = canonical_key(expr)
        if key in seen or is_heldout(expr) != heldout:
            continue
        seen.add(key)
        value = safe_eval(expr)
        return {"expr": expr, "prompt": f"{expr} = ?", "answer": repr(value), "family": family,
                "value": value, "wrong": _wrong_values(expr, value, mistakes)}  # fmt: skip
    raise ValueError(f"family {family!r} ran out of distinct tasks; ask for fewer rows")


def _split_sizes(n: int) -> dict[str, int]:
    """n rows spread evenly over the families (the first families get the remainder)."""
    return {f: n // len(FAMILIES) + (i < n % len(FAMILIES)) for i, f in enumerate(FAMILIES)}


def make_tasks(seed: int = 0, n_train: int = 3000, n_test: int = 300, n_dpo: int = 1500,
               n_test_extra: int = 0) -> dict[str, list[dict]]:  # fmt: skip
    """{"sft_train", "sft_test", "dpo_train", "test"} (and "test_extra" when n_test_extra > 0): lists of
    JSON-ready rows, deterministic in `seed`.

    sft_test holds the same held-out prompts as test, as chat rows (for a validation loss). SFT and DPO
    training prompts are disjoint from each other and, by construction, from every test prompt. test_extra holds
    more held-out prompts, disjoint from test's: 300 tasks tell accuracies apart only to about +-3 points (one
    standard error at 0.5 is 2.9), too coarse for a stage that adds a few; 2,000 bring it to about +-1.1.
    """
    rng = random.Random(seed)
    seen: set[str] = set()  # canonical keys already used, across all splits and families
    sft, dpo, test = [], [], []
    for family in FAMILIES:
        frng = random.Random(f"{seed}/{family}")  # str seeds are hashed deterministically (sha512)
        # The test rows first, then DPO's, then SFT's: a larger n_train changes neither. (Drawn last, a large SFT set
        # takes what small generators can make, and the rows after it lean toward the big ones: DPO on such pairs
        # lowered held-out accuracy, 0.47 -> 0.40, when n_train grew from 3,000 to 20,000 with DPO drawn after SFT.)
        test += [_draw(frng, family, seen, heldout=True) for _ in range(_split_sizes(n_test)[family])]
        dpo += [_draw(frng, family, seen, heldout=False) for _ in range(_split_sizes(n_dpo)[family])]
        sft += [_draw(frng, family, seen, heldout=False) for _ in range(_split_sizes(n_train)[family])]
    extra = []  # drawn after every other split, from streams of their own: asking for them changes no other row
    for family in FAMILIES:
        erng = random.Random(f"{seed}/extra/{family}")
        extra += [_draw(erng, family, seen, heldout=True) for _ in range(_split_sizes(n_test_extra)[family])]
    for name, rows in (("sft", sft), ("dpo", dpo), ("test", test), ("extra", extra)):
        # Mix the families within each file, each split with its own stream: the test file is then the same
        # file, in the same order, whatever n_train and n_dpo are.
        random.Random(f"{seed}/order/{name}").shuffle(rows)

    def chat(t):
        return {"messages": [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["answer"]}],
                "family": t["family"]}  # fmt: skip

    def pair(t):
        wrong = rng.choice(t["wrong"]) if t["wrong"] else _perturb(t["value"], rng)
        return {"prompt": t["prompt"], "chosen": t["answer"], "rejected": repr(wrong), "family": t["family"]}

    def question(t):
        return {"prompt": t["prompt"], "answer": t["answer"], "family": t["family"]}

    splits = {
        "sft_train": [chat(t) for t in sft],
        "sft_test": [chat(t) for t in test],
        "dpo_train": [pair(t) for t in dpo],
        "test": [question(t) for t in test],
    }
    return splits | ({"test_extra": [question(t) for t in extra]} if n_test_extra else {})


def make_choice_examples(n: int = 200, seed: int = 0, n_choices: int = 4) -> list[dict]:
    """HellaSwag/ARC-style rows {"context", "choices", "label", "prompt", "family"} from held-out tasks.

    context is the doctest form ">>> EXPR\\n" (how Python source shows a REPL answer) and each choice is a
    candidate continuation: the right repr plus near misses, which often differ in length, so summed
    log-probabilities favour short choices and length normalisation changes the pick.
    Tasks with a True/False answer are skipped (they have only one wrong answer).
    """
    rng, seen, rows = random.Random(f"choice/{seed}"), set(), []
    while len(rows) < n:
        t = _draw(rng, FAMILIES[len(rows) % len(FAMILIES)], seen, heldout=True)
        if isinstance(t["value"], bool):
            continue
        wrong = t["wrong"][: n_choices - 1]
        while len(wrong) < n_choices - 1:
            w = _perturb(t["value"], rng)
            if w != t["value"] and w not in wrong:
                wrong.append(w)
        choices = [t["answer"]] + [repr(w) for w in wrong]
        rng.shuffle(choices)
        rows.append({"context": f">>> {t['expr']}\n", "choices": choices, "label": choices.index(t["answer"]),
                     "prompt": t["prompt"], "family": t["family"]})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- files

SFT_KEYS = {"messages": list}
DPO_KEYS = {"prompt": str, "chosen": str, "rejected": str}
TEST_KEYS = {"prompt": str, "answer": str}
CHOICE_KEYS = {"context": str, "choices": list, "label": int}


def check_row(row, required: dict) -> str | None:
    """The first problem with one parsed row, or None. Public: train_sft checks hub dataset rows with it, so a
    bad hub row fails as clearly as a bad jsonl line."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key, tp in required.items():
        if key not in row:
            return f"missing key '{key}'"
        v = row[key]
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            return f"'{key}' should be {tp.__name__}, got {type(v).__name__}"
    if "messages" in required:
        for i, m in enumerate(row["messages"]):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                return f"messages[{i}] needs a role of system/user/assistant"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}] needs a string 'content'"
        if not any(m["role"] == "assistant" for m in row["messages"]):
            return "conversation has no assistant turn (nothing to learn)"
    if "chosen" in required and "rejected" in required and row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical"
    if "choices" in required and "label" in required:
        if len(row["choices"]) < 2 or not all(isinstance(c, str) for c in row["choices"]):
            return "'choices' should be a list of at least two strings"
        if not 0 <= row["label"] < len(row["choices"]):
            return f"'label' {row['label']} is out of range for {len(row['choices'])} choices"
    return None


_check_row = check_row  # the old private name, kept for callers that still use it


def load_jsonl(path: str, required_keys) -> list[dict]:
    """Read a jsonl file (blank lines skipped) and validate every row; ValueError names file and line.

    required_keys: {key: type}, or a list of keys (then "messages"/"choices" must be lists, "label" an
    int, anything else a string). Rows with "messages" must hold an assistant turn; rows with chosen and
    rejected must have them differ; rows with choices and label must have the label in range.
    """
    if not isinstance(required_keys, dict):
        required_keys = {k: {"messages": list, "choices": list, "label": int}.get(k, str) for k in required_keys}
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path} line {lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            problem = check_row(row, required_keys)
            if problem:
                raise ValueError(f"{path} line {lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _write_jsonl(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"  # write then rename: a crash never leaves half a file under the real name
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_tasks(out_dir: str, seed: int = 0, n_train: int = 3000, n_test: int = 300, n_dpo: int = 1500,
                n_choice: int = 200, n_test_extra: int = 0) -> dict:  # fmt: skip
    """Write sft_train/sft_test/dpo_train/test/choice_test (and test_extra) .jsonl and tasks_meta.json; return
    the meta dict."""
    os.makedirs(out_dir, exist_ok=True)
    splits = make_tasks(seed=seed, n_train=n_train, n_test=n_test, n_dpo=n_dpo, n_test_extra=n_test_extra)
    splits["choice_test"] = make_choice_examples(n_choice, seed=seed)
    for name, rows in splits.items():
        _write_jsonl(rows, os.path.join(out_dir, f"{name}.jsonl"))
    meta = {
        "seed": seed,
        "heldout_percent": HELDOUT_PERCENT,
        "counts": {name: dict(sorted(Counter(r["family"] for r in rows).items())) for name, rows in splits.items()},
        "scoring": "exact_match: prediction.strip() == answer.strip(); answers are Python repr()",
        "prompt_format": "user: '<expr> = ?'  assistant: '<repr(value)>'",
    }
    with open(os.path.join(out_dir, "tasks_meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    return meta


# ----------------------------------------------------------------------------- task accuracy (greedy exact match)


@torch.no_grad()
def task_accuracy(rows: list[dict], answers: list[str]) -> dict:
    """Exact match of each generated answer against its row's "answer", overall and per row "family":
    {"accuracy": float, "by_family": {family: float}, "n": int}. The answers come from generation.chat_answers
    (greedy, one-turn chat) for the text tasks and from vlm.generate_answer for the VQA questions."""
    correct, by_family = [], defaultdict(list)
    for row, answer in zip(rows, answers, strict=True):
        ok = exact_match(answer, row["answer"])
        correct.append(ok)
        by_family[row.get("family", "all")].append(ok)
    acc = sum(correct) / max(1, len(correct))
    return {"accuracy": acc, "by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())}, "n": len(correct)}


# ----------------------------------------------------------------------------- command line


@dataclass
class TasksConfig:
    out_dir: str = "data/tasks"  # folder for the jsonl files and tasks_meta.json
    seed: int = 0  # which tasks are drawn (the train/test split itself does not depend on it)
    n_train: int = 3000  # SFT training conversations, spread evenly over easy/medium/hard
    n_dpo: int = 1500  # DPO (prompt, chosen, rejected) pairs, prompts disjoint from SFT and test
    n_test: int = 300  # held-out test prompts with answers (also written as sft_test.jsonl chat rows)
    n_choice: int = 200  # held-out multiple-choice rows for eval.py
    n_test_extra: int = 0  # more held-out test prompts (test_extra.jsonl), disjoint from test's; other files unchanged

    def validate(self) -> list[str]:
        keys = ("n_train", "n_dpo", "n_test", "n_choice", "n_test_extra")
        return [f"{k} must be >= 0" for k in keys if getattr(self, k) < 0]


def main(cfg: TasksConfig) -> dict:
    try:
        meta = write_tasks(cfg.out_dir, cfg.seed, cfg.n_train, cfg.n_test, cfg.n_dpo, cfg.n_choice, cfg.n_test_extra)
    except ValueError as e:  # e.g. more rows asked for than a family has distinct tasks
        raise UserError(str(e)) from None
    for name, counts in meta["counts"].items():
        print(f"{name:12s} {sum(counts.values()):6d}  {counts}")
    print(f"wrote {cfg.out_dir}/")
    return meta


if __name__ == "__main__":
    run_cli(main, TasksConfig, __doc__)
