"""Tests for tasks.py: answers re-verified by a separate Python process, the split, DPO pairs, file checks.

The reference for every answer is a fresh interpreter with full builtins running `repr(eval(expr))`:
a different code path from tasks.safe_eval (no AST whitelist, no restricted globals, other process).
"""

import ast
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(n_train=600, n_test=150, n_dpo=300)


@pytest.fixture(scope="module")
def splits():
    return tasks.make_tasks(seed=0, **SIZES)


@pytest.fixture(scope="module")
def choices():
    return tasks.make_choice_examples(90, seed=0)


def expr_of(prompt: str) -> str:
    assert prompt.endswith(" = ?"), prompt
    return prompt[: -len(" = ?")]


def reference_reprs(exprs: list[str]) -> list[str]:
    """repr(eval(e)) for each expression, computed by a separate Python process."""
    code = "import json, sys; print(json.dumps([repr(eval(e)) for e in json.load(sys.stdin)]))"
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(exprs), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def norm_key(expr: str) -> str:
    """Independent dedup key for the test: AST dump, with `a + b` / `a * b` of two int literals sorted."""
    m = re.fullmatch(r"(\d+) ([+*]) (\d+)", expr)
    if m:
        a, op, b = sorted([int(m[1]), int(m[3])])[0], m[2], sorted([int(m[1]), int(m[3])])[1]
        expr = f"{a} {op} {b}"
    return ast.dump(ast.parse(expr, mode="eval"))


def train_prompts(s):
    return [r["messages"][0]["content"] for r in s["sft_train"]] + [r["prompt"] for r in s["dpo_train"]]


# ----------------------------------------------------------------------------- answers


def test_every_answer_matches_a_fresh_interpreter(splits, choices):
    rows = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in splits["sft_train"]]
    rows += [(r["prompt"], r["chosen"]) for r in splits["dpo_train"]]
    rows += [(r["prompt"], r["answer"]) for r in splits["test"]]
    rows += [(r["prompt"], r["choices"][r["label"]]) for r in choices]
    want = reference_reprs([expr_of(p) for p, _ in rows])
    bad = [(p, a, w) for (p, a), w in zip(rows, want, strict=True) if a != w]
    assert not bad, bad[:5]


def test_sft_test_mirrors_test(splits):
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in splits["sft_test"]] == [
        (r["prompt"], r["answer"]) for r in splits["test"]
    ]


def test_row_shapes_sizes_and_short_answers(splits):
    assert len(splits["sft_train"]) == 600 and len(splits["test"]) == 150 and len(splits["dpo_train"]) == 300
    for r in splits["sft_train"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["family"] in tasks.FAMILIES
    fams = {f: sum(r["family"] == f for r in splits["test"]) for f in tasks.FAMILIES}
    assert fams == {"easy": 50, "medium": 50, "hard": 50}
    # The easy family must stay learnable by a tiny model: answers of a token or two.
    easy = [r["answer"] for r in splits["test"] if r["family"] == "easy"]
    assert max(len(a) for a in easy) <= 5
    assert max(len(r["answer"]) for r in splits["test"]) <= 40
    # Every answer is a Python literal of a simple type (what repr of an int/str/bool/list gives).
    for r in splits["test"]:
        assert type(ast.literal_eval(r["answer"])) in (int, str, bool, list)


# ----------------------------------------------------------------------------- split


def test_no_train_test_overlap_by_prompt_or_expression(splits):
    test_prompts = [r["prompt"] for r in splits["test"]]
    train = train_prompts(splits)
    assert not set(train) & set(test_prompts)
    assert not {norm_key(expr_of(p)) for p in train} & {norm_key(expr_of(p)) for p in test_prompts}
    # No duplicates inside a split, and SFT and DPO prompts are disjoint too.
    sft = [r["messages"][0]["content"] for r in splits["sft_train"]]
    dpo = [r["prompt"] for r in splits["dpo_train"]]
    assert len(set(sft)) == len(sft) and len(set(dpo)) == len(dpo) and len(set(test_prompts)) == len(test_prompts)
    assert not {norm_key(expr_of(p)) for p in sft} & {norm_key(expr_of(p)) for p in dpo}


def test_split_holds_across_seeds_and_for_choice_rows(splits, choices):
    # The split is by a hash of the expression, so training data of one seed never holds another seed's test.
    other = tasks.make_tasks(seed=1, **SIZES)
    test_keys = {norm_key(expr_of(r["prompt"])) for r in splits["test"]}
    test_keys |= {norm_key(expr_of(r["prompt"])) for r in choices}
    assert not {norm_key(expr_of(p)) for p in train_prompts(other) + train_prompts(splits)} & test_keys


def test_commutative_twins_share_a_side():
    assert tasks.canonical_key("3 + 4") == tasks.canonical_key("4+3") != tasks.canonical_key("3 - 4")
    for a in range(10):
        for b in range(10):
            assert tasks.is_heldout(f"{a} + {b}") == tasks.is_heldout(f"{b} + {a}")


def test_a_larger_sft_split_leaves_the_test_and_dpo_rows_as_they_were():
    """prepare_data.py sft_rows=20000 (the demo) and the default 3,000 must score on the same test file, in the same
    order, and give DPO the same pairs; the smaller SFT split is the start of the larger one."""
    small = tasks.make_tasks(seed=0, n_train=90, n_test=30, n_dpo=30)
    big = tasks.make_tasks(seed=0, n_train=900, n_test=30, n_dpo=30)
    assert big["test"] == small["test"] and big["sft_test"] == small["sft_test"]
    assert big["dpo_train"] == small["dpo_train"]
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert prompts(small["sft_train"]) < prompts(big["sft_train"])


def test_extra_test_rows_are_held_out_new_and_change_nothing_else():
    """test_extra: more prompts from the test side, none of them in test.jsonl; every other file is as before."""
    plain = tasks.make_tasks(seed=0, **SIZES)
    more = tasks.make_tasks(seed=0, **SIZES, n_test_extra=90)
    assert "test_extra" not in plain and {k: more[k] for k in plain} == plain
    extra = more["test_extra"]
    assert Counter(r["family"] for r in extra) == dict.fromkeys(tasks.FAMILIES, 30)
    keys = [norm_key(expr_of(r["prompt"])) for r in extra]
    assert len(set(keys)) == 90 and not set(keys) & {norm_key(expr_of(r["prompt"])) for r in plain["test"]}
    assert all(tasks.is_heldout(expr_of(r["prompt"])) for r in extra)
    assert not set(keys) & {norm_key(expr_of(p)) for p in train_prompts(plain)}
    for row in extra:  # the answer is what a fresh evaluation of the expression gives
        assert row["answer"] == repr(ast.literal_eval(row["answer"])) == repr(tasks.safe_eval(expr_of(row["prompt"])))


def test_deterministic_by_seed(tmp_path):
    assert tasks.make_tasks(seed=5, n_train=60, n_test=30, n_dpo=30) == tasks.make_tasks(
        seed=5, n_train=60, n_test=30, n_dpo=30
    )
    assert tasks.make_tasks(seed=5, n_train=60, n_test=30, n_dpo=30) != tasks.make_tasks(
        seed=6, n_train=60, n_test=30, n_dpo=30
    )
    assert tasks.make_choice_examples(20, seed=2) == tasks.make_choice_examples(20, seed=2)
    for d in ("a", "b"):
        tasks.write_tasks(str(tmp_path / d), seed=3, n_train=60, n_test=30, n_dpo=30, n_choice=12)
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_asking_for_more_tasks_than_exist_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(tasks.GENERATORS, "easy", [tasks.g_add_digits])  # only 55 distinct sums of two digits
    with pytest.raises(ValueError, match="ran out of distinct tasks"):
        tasks.make_tasks(seed=0, n_train=300, n_test=3, n_dpo=3)


# ----------------------------------------------------------------------------- DPO and multiple choice


def test_dpo_rejected_is_wrong_but_plausible(splits):
    pairs = splits["dpo_train"]
    want = reference_reprs([expr_of(r["prompt"]) for r in pairs])
    for r, w in zip(pairs, want, strict=True):
        chosen, rejected = ast.literal_eval(r["chosen"]), ast.literal_eval(r["rejected"])
        assert r["chosen"] == w and r["rejected"] != w, r
        assert type(rejected) is type(chosen), r  # same type: a wrong number for a number, a string for a string
        if isinstance(chosen, int) and chosen >= 0 and rejected < 0:  # negatives only where the task can go there
            assert "-" in r["prompt"] or "find" in r["prompt"], r


def test_choice_rows(choices):
    assert len(choices) == 90
    for r in choices:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["context"] == f">>> {expr_of(r['prompt'])}\n"
        types = {type(ast.literal_eval(c)) for c in r["choices"]}
        assert len(types) == 1, r
    # Length normalisation must matter somewhere: choices of different lengths, and a right answer
    # that is not the shortest choice (summed log-probs favour short continuations).
    assert any(len({len(c) for c in r["choices"]}) > 1 for r in choices)
    assert any(len(r["choices"][r["label"]]) > min(len(c) for c in r["choices"]) for r in choices)
    assert {r["family"] for r in choices} == set(tasks.FAMILIES)


# ----------------------------------------------------------------------------- scoring and safety


def test_exact_match():
    assert tasks.exact_match(" 6\n", "6")
    assert tasks.exact_match("'BANANA'", " 'BANANA' ")
    assert not tasks.exact_match("BANANA", "'BANANA'")  # quotes are part of the Python answer
    assert not tasks.exact_match("'banana'", "'BANANA'")  # case matters
    assert not tasks.exact_match("6.0", "6")
    assert not tasks.exact_match("6 7", "6")
    assert not tasks.exact_match("", "6")


@pytest.mark.parametrize(
    "expr", ["__import__('os')", "open('x')", "(1).__class__", "[c for c in 'ab']", "'a'.format()", "x", "f(1)"]
)
def test_safe_eval_refuses_anything_off_the_whitelist(expr):
    with pytest.raises(ValueError):
        tasks.safe_eval(expr)


# ----------------------------------------------------------------------------- files


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


GOOD_SFT = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize(
    "bad, keys, message",
    [
        ("{not json", tasks.SFT_KEYS, "invalid JSON"),
        ("[1, 2]", tasks.SFT_KEYS, "expected a JSON object"),
        ('{"prompt": "q", "chosen": "a"}', tasks.DPO_KEYS, "missing key 'rejected'"),
        ('{"prompt": "q", "chosen": "a", "rejected": 3}', tasks.DPO_KEYS, "'rejected' should be str"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', tasks.DPO_KEYS, "identical"),
        ('{"messages": [{"role": "user", "content": "q"}]}', tasks.SFT_KEYS, "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', tasks.SFT_KEYS, "role"),
        ('{"messages": [{"role": "assistant", "content": 5}]}', tasks.SFT_KEYS, "content"),
        ('{"messages": "hi"}', ["messages"], "'messages' should be list"),
        ('{"context": "c", "choices": ["a", "b"], "label": 2}', tasks.CHOICE_KEYS, "out of range"),
        ('{"context": "c", "choices": ["a", "b"], "label": true}', tasks.CHOICE_KEYS, "'label' should be int"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path, bad, keys, message):
    # A good row (or a blank line, which is skipped) and a blank line first: the bad row is line 3.
    path = write(tmp_path / "data.jsonl", [GOOD_SFT if "messages" in keys else "", "", bad, "{"])
    line = 3
    with pytest.raises(ValueError) as err:
        tasks.load_jsonl(path, keys)
    text = str(err.value)
    assert text.startswith(f"{path} line {line}: ") and message in text and "\n" not in text, text


def test_load_jsonl_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        tasks.load_jsonl(str(tmp_path / "missing.jsonl"), tasks.TEST_KEYS)
    with pytest.raises(ValueError, match="no rows"):
        tasks.load_jsonl(write(tmp_path / "empty.jsonl", [""]), tasks.TEST_KEYS)
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "q", "answer": "a"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"bin.jsonl line 2: not UTF-8"):
        tasks.load_jsonl(str(tmp_path / "bin.jsonl"), tasks.TEST_KEYS)


def test_written_files_load_back(tmp_path):
    meta = tasks.write_tasks(str(tmp_path), seed=0, n_train=30, n_test=15, n_dpo=15, n_choice=9, n_test_extra=6)
    schema = {"sft_train": tasks.SFT_KEYS, "sft_test": tasks.SFT_KEYS, "dpo_train": tasks.DPO_KEYS,
              "test": tasks.TEST_KEYS, "test_extra": tasks.TEST_KEYS, "choice_test": tasks.CHOICE_KEYS}  # fmt: skip
    on_disk = json.loads((tmp_path / "tasks_meta.json").read_text())
    assert on_disk == meta and on_disk["seed"] == 0
    for name, keys in schema.items():
        rows = tasks.load_jsonl(str(tmp_path / f"{name}.jsonl"), keys)
        assert sum(meta["counts"][name].values()) == len(rows)
    assert meta["counts"]["test"] == {"easy": 5, "hard": 5, "medium": 5}
    assert meta["counts"]["test_extra"] == {"easy": 2, "hard": 2, "medium": 2}


def test_cli(tmp_path):
    out = tmp_path / "t"
    ok = subprocess.run([sys.executable, "tasks.py", f"out_dir={out}", "n_train=30", "n_dpo=9", "n_test=9",
                         "n_choice=3"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(out)) == sorted(
        ["sft_train.jsonl", "sft_test.jsonl", "dpo_train.jsonl", "test.jsonl", "choice_test.jsonl", "tasks_meta.json"]
    )
    bad = subprocess.run([sys.executable, "tasks.py", "n_tset=3"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "n_tset" in bad.stderr
