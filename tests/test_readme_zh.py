"""README_zh.md (the Simplified Chinese README) cannot drift silently from README.md.

Checks:
- every fenced code block of README.md appears byte-identically in README_zh.md, in the same order,
  and README_zh.md has no extra fenced blocks (commands are never translated);
- the tables correspond one to one, in order: same number of rows and of columns
  (headers and descriptive cells are translated, the structure is not);
- README_zh.md links back to README.md on its first line.

The checkers are themselves tested on scratch text: editing one command or dropping one table row
must make them fail. Run: `python -m pytest -q tests/test_readme_zh.py` (milliseconds).
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^\s*(```+|~~~+)")


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(fenced blocks, each including its fence lines; the lines outside any fence)."""
    blocks, prose, lines, i = [], [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(m.group(1)):
            j += 1
        blocks.append("\n".join(lines[i : j + 1]))
        prose.append("")  # a fence breaks any table around it
        i = j + 1
    return blocks, prose


def cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") else row
    # `|` inside inline code (e.g. `parallel=none|ddp`) does not separate cells
    return re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", row)


def tables(text: str) -> list[tuple[int, int]]:
    """(rows, columns) of every Markdown table outside fenced blocks, in order; rows include the
    header and the |---| separator; columns must agree on every row (else columns = -1)."""
    found, run = [], []
    for line in split_fences(text)[1] + [""]:
        if line.lstrip().startswith("|"):
            run.append(line)
            continue
        if len(run) >= 2 and set(run[1].replace("|", "").strip()) <= set("-: "):
            widths = {len(cells(r)) for r in run}
            found.append((len(run), widths.pop() if len(widths) == 1 else -1))
        run = []
    return found


def drift(en: str, zh: str) -> list[str]:
    """Human-readable differences between the two READMEs' code and table structure (empty: in sync)."""
    problems = []
    en_blocks, zh_blocks = split_fences(en)[0], split_fences(zh)[0]
    for n, (a, b) in enumerate(zip(en_blocks, zh_blocks, strict=False), 1):  # unequal counts are reported below
        if a != b:
            problems.append(f"code block {n} differs:\n--- README.md\n{a}\n--- README_zh.md\n{b}")
    if len(en_blocks) != len(zh_blocks):
        problems.append(f"README.md has {len(en_blocks)} code blocks, README_zh.md {len(zh_blocks)}")
    en_tables, zh_tables = tables(en), tables(zh)
    if len(en_tables) != len(zh_tables):
        problems.append(f"README.md has {len(en_tables)} tables, README_zh.md {len(zh_tables)}")
    for n, (a, b) in enumerate(zip(en_tables, zh_tables, strict=False), 1):
        if a != b or -1 in a or -1 in b:
            problems.append(f"table {n}: README.md (rows, cols) = {a}, README_zh.md = {b}")
    return problems


def test_readme_zh_matches_readme():
    problems = drift(read("README.md"), read("README_zh.md"))
    assert not problems, "README_zh.md is out of sync with README.md:\n" + "\n\n".join(problems)


def test_readme_zh_links_to_english():
    first = read("README_zh.md").split("\n", 1)[0]
    assert first.startswith("English:") and "README.md" in first, first


def test_readme_has_code_and_tables():
    # guard against the parser silently finding nothing (which would make the check above vacuous)
    en = read("README.md")
    assert len(split_fences(en)[0]) >= 5 and len(tables(en)) >= 3


SCRATCH = """# t

```bash
make demo    # comment
```

| a | b |
|---|---|
| `x|y` | 1 |
| z | 2 |

```
two
```
"""


def test_checker_catches_drift():
    assert drift(SCRATCH, SCRATCH) == []
    assert tables(SCRATCH) == [(4, 2)]
    # prose and cells translated: still in sync
    assert drift(SCRATCH, SCRATCH.replace("| z | 2 |", "| 字 | 2 |").replace("# t", "# 标题")) == []
    # one command edited
    assert drift(SCRATCH, SCRATCH.replace("make demo", "make  demo"))
    # one comment in a code block translated
    assert drift(SCRATCH, SCRATCH.replace("# comment", "# 注释"))
    # a block dropped
    assert drift(SCRATCH, SCRATCH.replace("```\ntwo\n```\n", ""))
    # a table row dropped
    assert drift(SCRATCH, SCRATCH.replace("| z | 2 |\n", ""))
    # a column added
    assert drift(SCRATCH, SCRATCH.replace("| z | 2 |", "| z | 2 | 3 |"))
