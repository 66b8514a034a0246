"""Numbers the README and the chapters quote from a run are checked against the results file they come from.

A quoted number carries an HTML comment right after it (invisible on GitHub, readable in the source):

    val loss 4.92<!-- result: demo pretrain.first_val_loss --> nats

names docs/results/demo.json and the key `pretrain.first_val_loss` in it (dots go down the nesting; a key with
a slash, like task_acc/easy, is one key). The shown number must equal the file's value rounded to the digits shown (0.207 for 0.20666...; `3,675,410` for
an integer; a trailing k or M means thousands or millions: `3.68M` for 3,675,410). A fenced eval table preceded
by the line `<!-- results table: demo eval -->` must be exactly what eval.format_table prints
for the file's eval entries (a dict of entries, or the list that `eval.py compare=... save=` writes under
"compare", as docs/results/sampling.json holds). The English and Chinese twins carry the same markers, in the same order.
docs/make_results.py (`make results`) writes docs/results/demo.json from one `make demo` run's out/ directory.

The checker is tested on scratch text: a wrong digit, a key that does not exist, a marker with no number and an
edited table row must each make it fail; so must a deliberately wrong number in a copy of the real README.
Run: `python -m pytest -q tests/test_results.py` (well under a second).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys

import pytest
from test_docs import fenced_blocks

import eval as ev
from config import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/make_results.py is a script beside the chapters, not a module on the path: load it by file name.
_spec = importlib.util.spec_from_file_location("make_results", os.path.join(ROOT, "docs", "make_results.py"))
make_results = importlib.util.module_from_spec(_spec)
sys.modules["make_results"] = make_results  # dataclasses resolve the config's annotations through sys.modules
_spec.loader.exec_module(make_results)
PAGES = [os.path.join(ROOT, n) for n in ("README.md", "README_zh.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "docs", "zh", "*.md"))
)
RESULT = re.compile(r"<!--\s*result:\s*(\S+)\s+(\S+)\s*-->")
NUMBER = re.compile(r"(?<![\w.])(-?\d[\d,]*(?:\.\d+)?)([kM]?)$")  # the number ending right before a marker
TABLE = re.compile(r"^<!--\s*results table:\s*(\S+)\s+(\S+)\s*-->$")
SCALE = {"": 1.0, "k": 1e3, "M": 1e6}


def lookup(data: dict, key: str):
    """data['eval']['sft']['task_acc'] for 'eval.sft.task_acc'; a number indexes a list ('compare.0.task_acc' in
    an eval.py save= file); KeyError names the missing part."""
    value = data
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"no '{part}' in {key}")
    return value


def markers(text: str) -> list[tuple[int, str, str, str]]:
    """(line, shown number or '', file, key) for every inline result marker, in order."""
    found = []
    for m in RESULT.finditer(text):
        number = NUMBER.search(text[: m.start()])
        found.append((text.count("\n", 0, m.start()) + 1, number.group(0) if number else "", m.group(1), m.group(2)))
    return found


def shown_matches(shown: str, value: float) -> bool:
    """Is `shown` (digits, commas, an optional k/M) the value rounded to the digits it shows?"""
    number, suffix = NUMBER.fullmatch(shown).groups()
    number = number.replace(",", "")
    digits = len(number.split(".")[1]) if "." in number else 0
    return f"{value / SCALE[suffix]:.{digits}f}" == number


def check(text: str, load) -> list[str]:
    """Problems in one page's result markers; load(file) returns the parsed results file."""
    problems = []
    for line, shown, path, key in markers(text):
        if not shown:
            problems.append(f"line {line}: the marker for {key} has no number right before it")
            continue
        try:
            value = lookup(load(path), key)
        except (KeyError, FileNotFoundError) as e:
            problems.append(f"line {line}: {path} {key}: {e}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"line {line}: {path} {key} is {value!r}, not a number")
        elif not shown_matches(shown, value):
            problems.append(f"line {line}: shows {shown}, but {path} has {key} = {value!r}")
    lines = text.split("\n")
    for block in fenced_blocks(text):
        m = TABLE.match(lines[block["start"] - 2].strip()) if block["start"] > 1 else None
        if not m:
            continue
        entries = lookup(load(m.group(1)), m.group(2))  # demo.json's eval: {stage: metrics}; eval.py save=: [metrics]
        want = ev.format_table(list(entries.values()) if isinstance(entries, dict) else entries).split("\n")
        have = [line.rstrip() for line in block["lines"]]
        if have != want:
            problems.append(f"line {block['start']}: the table is not what {m.group(1)} {m.group(2)} prints:\n"
                            + "\n".join(want))  # fmt: skip
    dangling = [n + 1 for n, line in enumerate(lines) if TABLE.match(line.strip()) and not (
        n + 1 < len(lines) and lines[n + 1].lstrip().startswith("```"))]  # fmt: skip
    problems += [f"line {n}: results table marker not directly followed by a fence" for n in dangling]
    return problems


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _load(name: str) -> dict:
    """The results file a marker names: `demo` is docs/results/demo.json, `sampling` docs/results/sampling.json."""
    return json.loads(_read(os.path.join(ROOT, "docs", "results", f"{name}.json")))


def _twin(page: str) -> str | None:
    """The English original of a Chinese page (README_zh.md -> README.md, docs/zh/X.md -> docs/X.md)."""
    if page.endswith("README_zh.md"):
        return os.path.join(ROOT, "README.md")
    if os.path.dirname(page) == os.path.join(ROOT, "docs", "zh"):
        return os.path.join(ROOT, "docs", os.path.basename(page))
    return None


# ----------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_quoted_numbers_equal_the_results_file(page):
    problems = check(_read(page), _load)
    assert not problems, f"{os.path.relpath(page, ROOT)}:\n" + "\n".join(problems)


def test_the_demo_numbers_are_marked():
    """The README's demo results carry markers, in both languages, and so do chapter 08's."""
    for name in ("README.md", "README_zh.md", "docs/08-sampling-and-eval.md", "docs/zh/08-sampling-and-eval.md"):
        keys = {key for _, _, _, key in markers(_read(os.path.join(ROOT, name)))}
        assert {"eval.pretrain.val_loss", "eval.sft.task_acc", "eval.dpo.task_acc"} <= keys, name
    for name in ("README.md", "README_zh.md"):
        text = _read(os.path.join(ROOT, name))
        keys = {key for _, _, _, key in markers(text)}
        assert {"pretrain.val_loss", "pretrain.val_bpb", "dpo.reward_accuracy_last10", "data.train_tokens"} <= keys
        assert "<!-- results table: demo eval -->" in text, name


@pytest.mark.parametrize("page", [p for p in PAGES if _twin(p)], ids=lambda p: os.path.relpath(p, ROOT))
def test_chinese_twin_quotes_the_same_numbers(page):
    # as sets of quotes, not in order: Chinese word order may put a number earlier ("721 篇文档保留 712 篇")
    zh = sorted((shown, name, key) for _, shown, name, key in markers(_read(page)))
    en = sorted((shown, name, key) for _, shown, name, key in markers(_read(_twin(page))))
    assert zh == en, f"{os.path.relpath(page, ROOT)} and its English original quote different results"


# ----------------------------------------------------------------------------- the checker fails when it should

RESULTS = {"eval": {"base": {"checkpoint": "out/base", "val_loss": 3.75871}}, "data": {"tokens": 3675410}}
SCRATCH = """The loss is 3.76<!-- result: r eval.base.val_loss --> nats on 3,675,410<!-- result: r data.tokens -->
tokens (3.68M<!-- result: r data.tokens -->, 3675k<!-- result: r data.tokens -->).

<!-- results table: r eval -->
```text
metric                      out/base
val_loss                      3.7587
```
"""


def test_checker_accepts_right_numbers_and_rejects_wrong_ones():
    load = {"r": RESULTS}.__getitem__
    assert check(SCRATCH, load) == []
    assert [m[1] for m in markers(SCRATCH)] == ["3.76", "3,675,410", "3.68M", "3675k"]
    assert check(SCRATCH.replace("3.76<", "3.77<"), load)  # a wrong last digit
    assert check(SCRATCH.replace("3.76<", "3.8<"), load) == []  # fewer digits shown: rounded to those
    assert check(SCRATCH.replace("3,675,410<", "3,675,411<"), load)
    assert check(SCRATCH.replace("3.68M", "3.67M"), load)
    assert check(SCRATCH.replace("data.tokens", "data.token", 1), load)  # a key that does not exist
    assert check(SCRATCH.replace("3.76<", "about <"), load)  # a marker with nothing to check
    assert check(SCRATCH.replace("3.7587", "3.7588"), load)  # an edited table cell
    assert check(SCRATCH.replace("```text", "text\n```text"), load)  # a table marker not followed by the fence
    # eval.py save= files hold a list of entries under "compare": the same table from it
    saved = {"s": {"compare": [RESULTS["eval"]["base"]]}}.__getitem__
    listed = SCRATCH[SCRATCH.index("<!-- results table") :].replace("table: r eval", "table: s compare")
    assert check(listed, saved) == []
    assert check(listed.replace("3.7587", "3.7588"), saved)
    assert check("3.76<!-- result: s compare.0.val_loss -->", saved) == []
    assert check("3.76<!-- result: s compare.1.val_loss -->", saved)  # past the end of the list


def test_a_wrong_number_in_a_copy_of_the_readme_fails():
    text = _read(os.path.join(ROOT, "README.md"))
    line, shown, _, key = markers(text)[0]
    wrong = shown[:-1] + str((int(shown[-1]) + 1) % 10)  # the same number with its last digit changed
    copy = text.replace(f"{shown}<!-- result:", f"{wrong}<!-- result:", 1)
    problems = check(copy, _load)
    assert len(problems) == 1 and f"shows {wrong}" in problems[0] and key in problems[0], problems


# ----------------------------------------------------------------------------- docs/make_results.py


def test_make_results_gathers_what_the_runs_wrote(tmp_path):
    """On a hand-made out/ directory: first and last val rows, the mean of the last 10 DPO steps, DONE gaps."""
    out, data = tmp_path / "out", tmp_path / "data"
    for stage, time in (("pretrain", 100.0), ("sft", 160.5), ("dpo", 200.0)):
        (out / stage).mkdir(parents=True)
        (out / stage / "DONE").write_text(json.dumps({"stage": stage, "step": 1, "time": time}))
    (out / "pretrain" / "train_config.json").write_text(json.dumps({"steps": 300, "batch_size": 16, "seq_len": 256}))
    rows = [{"step": 100, "val_loss": 5.0, "val_bpb": 2.5}, {"step": 200, "loss": 4.0}, {"step": 300, "val_loss": 4.0,
            "val_bpb": 2.0}]  # fmt: skip
    (out / "pretrain" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sft = [
        {"step": 0, "task_acc": 0.0},
        {"step": 10, "loss": 1.0},
        {"step": 20, "task_acc": 0.25, "task_acc/easy": 0.5},
    ]
    (out / "sft" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in sft))
    dpo = [{"step": 0, "task_acc": 0.25}] + [
        {"step": s, "rewards/accuracy": s / 100, "rewards/margin": s / 1000} for s in range(1, 13)
    ]
    (out / "dpo" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in dpo + [{"step": 12, "task_acc": 0.3}]))
    evaluated = {"compare": [{"checkpoint": "out/pretrain", "val_loss": 3.7}, {"checkpoint": "out/sft"}]}
    (out / "eval.json").write_text(json.dumps(evaluated))
    data.mkdir()
    meta = {"removed": {"read": 9, "kept": 7, "empty": 1, "too_short": 1, "non_text": 0, "duplicate": 0},
            "splits": {"train": {"docs": 6, "tokens": 60, "text_bytes": 2_000_000},
                       "val": {"docs": 1, "tokens": 10, "text_bytes": 500_000}},
            "bytes_per_token": 3.1, "vocab_size": 4096}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    path = tmp_path / "results" / "demo.json"
    argv = [f"out_dir={out}", f"data_dir={data}", f"path={path}"]
    got = run_cli(make_results.main, make_results.ResultsConfig, argv=argv, show_config=False)
    assert json.loads(path.read_text()) == got
    assert got["data"]["text_mb"] == 2.5 and got["data"]["train_tokens"] == 60
    assert got["pretrain"] == {"steps": 300, "tokens_per_step": 4096, "first_val_step": 100, "first_val_loss": 5.0,
                               "first_val_bpb": 2.5, "val_loss": 4.0, "val_bpb": 2.0}  # fmt: skip
    assert got["sft"] == {"task_acc_before": 0.0, "task_acc": 0.25, "task_acc/easy": 0.5, "seconds": 60.5}
    assert got["dpo"]["reward_accuracy_first"] == 0.01 and got["dpo"]["seconds"] == 39.5
    assert got["dpo"]["reward_accuracy_last10"] == pytest.approx(sum(range(3, 13)) / 10 / 100, rel=1e-12)
    assert got["dpo"]["margin_last10"] == pytest.approx(sum(range(3, 13)) / 10 / 1000, rel=1e-12)
    assert got["dpo"]["task_acc_before"] == 0.25 and got["dpo"]["task_acc"] == 0.3
    assert list(got["eval"]) == ["pretrain", "sft"] and got["eval"]["pretrain"]["val_loss"] == 3.7
    (out / "eval.json").unlink()
    with pytest.raises(SystemExit) as e:  # no eval.json yet: one line naming the file, exit 2
        run_cli(make_results.main, make_results.ResultsConfig, argv=argv, show_config=False)
    assert e.value.code == 2
