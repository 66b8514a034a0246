"""The tutorials in docs/ (English) and docs/zh/ (Simplified Chinese) cannot drift from the code they teach.

Checks, for every docs/*.md and docs/zh/*.md:
- a fenced block preceded by `<!-- source: FILE -->` appears verbatim in FILE (repo-relative) as a
  contiguous run of lines, after removing common indentation and blank lines at the block's ends;
- a fenced block preceded by `<!-- output: python planner.py ARGS -->` is exactly what the
  memory planner prints today for ARGS (the planner builds the model on the meta device: fast);
- every `python SCRIPT.py`, `torchrun ... SCRIPT.py` and `make TARGET` written in code (fenced blocks
  and inline `code`) names a file / Makefile target that exists; so do `configs/*.yaml`,
  `benchmarks/*.py`, `scripts/*.sh`, `docs/*.md` and `tests/test_*.py[::test_name]` references, and every relative link
  (pages, source files, figures) resolves from the page that holds it.
The command, path and link checks also run over README.md and README_zh.md.

The checker itself is tested on a scratch file: changing one quoted line must make it fail.
Run: `python -m pytest -q tests/test_docs.py` (well under a second).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import re
import shlex
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOCS_ZH = sorted(glob.glob(os.path.join(ROOT, "docs", "zh", "*.md")))  # the Chinese twins (tests/test_docs_zh.py)
PAGES = DOCS + DOCS_ZH
READMES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "README_zh.md")]

MARKER = re.compile(r"^<!--\s*(source|output):\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)")


# ----------------------------------------------------------------------------- parsing


def fenced_blocks(text: str) -> list[dict]:
    """Every fenced block: {"start": 1-based line of the opening fence, "lines": body lines, "marker": (kind,
    arg) from an HTML comment on the line right before the fence, or None}."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        blocks.append(
            {
                "start": i + 1,
                "lines": lines[i + 1 : j],
                "marker": (marker.group(1), marker.group(2)) if marker else None,
            }
        )
        i = j + 1
    return blocks


def dangling_markers(text: str) -> list[int]:
    """Lines holding a source/output marker that is not directly followed by a fence (a marker that checks nothing)."""
    lines = text.split("\n")
    return [n + 1 for n, line in enumerate(lines) if MARKER.match(line.strip()) and not (
        n + 1 < len(lines) and FENCE.match(lines[n + 1]))]  # fmt: skip


def code_spans(text: str) -> list[str]:
    """The text of every fenced block and every inline `code` span (where commands are written)."""
    spans, prose = [], []
    for block in fenced_blocks(text):
        spans.append("\n".join(block["lines"]))
    inside = False
    for line in text.split("\n"):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            prose.append(line)
    spans += re.findall(r"`([^`\n]+)`", "\n".join(prose))
    return spans


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images written outside code, without #anchors; web links and bare
    anchors are left out."""
    prose = []
    inside = False
    for line in text.split("\n"):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            prose.append(re.sub(r"`[^`\n]+`", "", line))
    targets = re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose))
    return [t.split("#", 1)[0] for t in targets if t.split("#", 1)[0] and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _dedent(lines: list[str]) -> list[str]:
    return textwrap.dedent("\n".join(line.rstrip() for line in lines)).split("\n")


def find_quote(quote: list[str], source: list[str]) -> tuple[bool, str]:
    """(found, why not): is the dedented quote a contiguous run of the (equally dedented) source lines?"""
    quote = _dedent(_trim(quote))
    if not quote or quote == [""]:
        return False, "empty quoted block"
    n, best = len(quote), (0, None)
    first = quote[0].strip()
    for s in range(len(source) - n + 1):
        if source[s].strip() != first:
            continue
        window = _dedent(source[s : s + n])
        if window == quote:
            return True, ""
        same = next((k for k, (a, b) in enumerate(zip(window, quote, strict=True)) if a != b), n)
        if same > best[0]:
            best = (same, (s + same + 1, window[same], quote[same]))
    if best[1] is None:
        return False, f"first line not found: {quote[0].strip()!r}"
    line, have, want = best[1]
    return False, f"differs at source line {line}: source has {have.strip()!r}, docs quote {want.strip()!r}"


def makefile_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as fh:
        return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", fh.read(), flags=re.M))


def defined_tests(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        return set(re.findall(r"^def (test_\w+)", fh.read(), flags=re.M))


@functools.lru_cache(maxsize=None)  # the Chinese chapters quote the same tables: plan each once
def planner_output(args: str) -> tuple[str, ...]:
    """What `python planner.py ARGS` prints, run in-process."""
    import planner

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        planner.main([os.path.join(ROOT, a) if a.endswith(".yaml") else a for a in shlex.split(args)])
    # the config path is printed as given; show it repo-relative, as the docs write it
    return tuple(out.getvalue().replace(ROOT + os.sep, "").rstrip("\n").split("\n"))


# ----------------------------------------------------------------------------- checks


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _rel(path):
    return os.path.relpath(path, ROOT)


def _placeholder(path: str) -> bool:
    """`python SCRIPT.py --help`, `configs/model/MODEL.yaml`: an upper-case name stands for any file."""
    return bool(re.fullmatch(r"[A-Z_]+\.\w+", os.path.basename(path)))


def test_docs_exist():
    names = [os.path.basename(p) for p in DOCS]
    assert "00-index.md" in names, names
    assert len(names) >= 10, names


@pytest.mark.parametrize("doc", PAGES, ids=_rel)
def test_quoted_code_matches_source(doc):
    text = _read(doc)
    problems = [f"{_rel(doc)}:{n}: marker not directly followed by a fence" for n in dangling_markers(text)]
    cache = {}
    for block in fenced_blocks(text):
        if not block["marker"] or block["marker"][0] != "source":
            continue
        name = block["marker"][1]
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            problems.append(f"{_rel(doc)}:{block['start']}: source file {name} does not exist")
            continue
        if path not in cache:
            cache[path] = _read(path).split("\n")
        found, why = find_quote(block["lines"], cache[path])
        if not found:
            problems.append(f"{_rel(doc)}:{block['start']}: quote of {name} not in the source: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", PAGES, ids=_rel)
def test_every_chapter_quotes_code(doc):
    if os.path.basename(doc).startswith("00-"):
        return
    quotes = [b for b in fenced_blocks(_read(doc)) if b["marker"] and b["marker"][0] == "source"]
    assert quotes, f"{_rel(doc)} quotes no code with a <!-- source: FILE --> marker"


@pytest.mark.parametrize("doc", PAGES, ids=_rel)
def test_quoted_planner_output_is_current(doc):
    problems = []
    for block in fenced_blocks(_read(doc)):
        if not block["marker"] or block["marker"][0] != "output":
            continue
        command = block["marker"][1]
        m = re.fullmatch(r"python planner\.py (.+)", command)
        assert m, f"{_rel(doc)}:{block['start']}: only planner output can be checked, got {command!r}"
        want = list(planner_output(m.group(1)))
        have = _trim([line.rstrip() for line in block["lines"]])
        if have != want:
            problems.append(f"{_rel(doc)}:{block['start']}: `{command}` now prints:\n" + "\n".join(want))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", PAGES + READMES, ids=_rel)
def test_commands_and_paths_exist(doc):
    text = _read(doc)
    targets = makefile_targets()
    problems = []
    for span in code_spans(text):
        for script in re.findall(r"(?:\bpython3?|\btorchrun)\b[^\n|;&]*?\s([\w./-]+\.py)\b", span):
            if not _placeholder(script) and not os.path.isfile(os.path.join(ROOT, script)):
                problems.append(f"script {script} does not exist")
        for target in re.findall(r"(?:^|[\s;&|(])make\s+([A-Za-z][\w.-]*)", span):
            if target not in targets and not target.isupper():  # `make TARGET` is a placeholder
                problems.append(f"make target {target!r} is not in the Makefile ({sorted(targets)})")
        for path in re.findall(r"\b((?:configs|benchmarks|scripts|docs)/[\w./-]+\.(?:yaml|py|sh|md))\b", span):
            if not _placeholder(path) and not os.path.isfile(os.path.join(ROOT, path)):
                problems.append(f"{path} does not exist")
        for path, name in re.findall(r"\b(tests/test_\w+\.py)(?:::(\w+))?", span):
            full = os.path.join(ROOT, path)
            if not os.path.isfile(full):
                problems.append(f"{path} does not exist")
            elif name and name not in defined_tests(full):
                problems.append(f"{path} has no function {name}")
    for link in relative_links(text):
        if not os.path.exists(os.path.join(os.path.dirname(doc), link)):
            problems.append(f"link to {link}: no such file (links resolve from {_rel(os.path.dirname(doc)) or '.'}/)")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(sorted(set(problems)))


# ----------------------------------------------------------------------------- the checker catches drift

_SOURCE = """def f(x):
    # double it
    y = 2 * x

    return y
"""


def test_checker_accepts_an_exact_quote_and_rejects_a_changed_line():
    source = _SOURCE.split("\n")
    doc = "<!-- source: f.py -->\n```python\n    # double it\n    y = 2 * x\n\n    return y\n```\n"
    (block,) = fenced_blocks(doc)
    assert block["marker"] == ("source", "f.py")
    assert find_quote(block["lines"], source) == (True, "")
    changed = [line.replace("2 * x", "3 * x") for line in source]  # the code moved on, the docs did not
    found, why = find_quote(block["lines"], changed)
    assert not found and "y = 2 * x" in why
    # a dropped line inside the quote is not contiguous any more
    assert not find_quote(["# double it", "return y"], source)[0]


def test_checker_sees_commands_in_code_only():
    text = "Make sure to run `make demo`.\n\n```bash\npython nope.py x=1\n```\n"
    spans = code_spans(text)
    assert "make demo" in spans and any("python nope.py" in s for s in spans)
    assert not any(s.startswith("Make sure") for s in spans)
    assert dangling_markers("<!-- source: a.py -->\ntext\n") == [1]


def test_checker_sees_links_outside_code_and_placeholders():
    text = "[a](01-x.md#s), [b](https://x.org), ![f](figures/p.png), [top](#t), `[c](no.md)`\n```\n[d](e.md)\n```\n"
    assert relative_links(text) == ["01-x.md", "figures/p.png"]
    assert _placeholder("configs/model/MODEL.yaml") and _placeholder("SCRIPT.py")
    assert not _placeholder("configs/model/tiny.yaml")
