"""The Simplified Chinese chapters (docs/zh/) cannot drift silently from the English ones (docs/).

Every docs/*.md has a twin docs/zh/*.md of the same name, and for each pair:
- the headings have the same levels, in the same order (titles are translated, the outline is not);
- the tables correspond one to one: same number of rows and of columns;
- every fenced code block is byte-identical, in the same order (commands, quoted code and printed output are
  never translated), and carries the same `<!-- source: ... -->` / `<!-- output: ... -->` marker, so
  tests/test_docs.py checks the Chinese quotes against the code exactly as it checks the English ones;
- links to other chapters stay inside docs/zh/ (a Chinese reader is never sent to an English page by accident;
  the one exception is the link to the page's own English original);
- the prose is actually Chinese (a copied English page fails).

The checkers are tested on scratch text: dropping a heading, changing a command or a marker must make them fail.
Run: `python -m pytest -q tests/test_docs_zh.py` (milliseconds).
"""

from __future__ import annotations

import os
import re

import pytest
from test_docs import MARKER, fenced_blocks, relative_links
from test_readme_zh import split_fences, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
ZH = os.path.join(DOCS, "zh")
NAMES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))
TWINS = [n for n in NAMES if os.path.isfile(os.path.join(ZH, n))]
CJK = re.compile(r"[\u4e00-\u9fff]")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def headings(text: str) -> list[int]:
    """The level (number of #) of every ATX heading outside fenced blocks, in order."""
    return [len(m.group(1)) for line in split_fences(text)[1] if (m := re.match(r"(#{1,6})\s", line))]


def chinese_share(text: str) -> float:
    """Chinese characters / (Chinese characters + Latin letters) in the prose, code spans and links left out."""
    prose = "\n".join(split_fences(text)[1])
    prose = re.sub(r"`[^`\n]+`|\]\([^)]*\)|<!--.*?-->", "", prose)
    cjk = len(CJK.findall(prose))
    latin = len(re.findall(r"[A-Za-z]", prose))
    return cjk / max(1, cjk + latin)


def drift(en: str, zh: str) -> list[str]:
    """Human-readable differences in outline, tables, code and markers between an English page and its twin."""
    problems = []
    if headings(en) != headings(zh):
        problems.append(f"heading levels differ: English {headings(en)}, Chinese {headings(zh)}")
    if tables(en) != tables(zh) or any(-1 in t for t in tables(en) + tables(zh)):
        problems.append(f"tables (rows, cols) differ: English {tables(en)}, Chinese {tables(zh)}")
    en_blocks, zh_blocks = split_fences(en)[0], split_fences(zh)[0]
    for n, (a, b) in enumerate(zip(en_blocks, zh_blocks, strict=False), 1):  # unequal counts reported below
        if a != b:
            problems.append(f"code block {n} differs:\n--- English\n{a}\n--- Chinese\n{b}")
    if len(en_blocks) != len(zh_blocks):
        problems.append(f"English has {len(en_blocks)} code blocks, Chinese {len(zh_blocks)}")
    en_markers = [b["marker"] for b in fenced_blocks(en)]  # the marker in front of block n, or None
    zh_markers = [b["marker"] for b in fenced_blocks(zh)]
    if en_markers != zh_markers:
        problems.append(f"source/output markers differ:\n  English {en_markers}\n  Chinese {zh_markers}")
    markers = [[m.group(0) for line in t.split("\n") if (m := MARKER.match(line.strip()))] for t in (en, zh)]
    if markers[0] != markers[1]:
        problems.append(f"marker lines differ: English {markers[0]}, Chinese {markers[1]}")
    return problems


def test_every_chapter_has_a_chinese_twin():
    missing = [n for n in NAMES if n not in TWINS]
    extra = sorted(set(f for f in os.listdir(ZH) if f.endswith(".md")) - set(NAMES)) if os.path.isdir(ZH) else []
    assert not missing and not extra, f"docs/zh/ lacks {missing}; docs/zh/ pages with no English original: {extra}"


@pytest.mark.parametrize("name", TWINS)
def test_twin_has_same_outline_tables_code_and_markers(name):
    problems = drift(read(os.path.join(DOCS, name)), read(os.path.join(ZH, name)))
    assert not problems, f"docs/zh/{name} is out of step with docs/{name}:\n" + "\n\n".join(problems)


@pytest.mark.parametrize("name", TWINS)
def test_twin_links_stay_in_chinese_and_prose_is_chinese(name):
    text = read(os.path.join(ZH, name))
    english_pages = [
        link
        for link in relative_links(text)
        if link.endswith(".md")
        and os.path.dirname(os.path.normpath(os.path.join(ZH, link))) == DOCS
        and os.path.basename(link) != name  # the "English:" link to the page's own original is the one allowed
    ]
    assert not english_pages, f"docs/zh/{name} links English chapters {english_pages}: link the docs/zh/ twin"
    share = chinese_share(text)
    assert share > 0.3, f"docs/zh/{name}: only {share:.0%} of the prose letters are Chinese; is it translated?"


SCRATCH = """# Title

Some prose.

## Part

<!-- source: model.py -->
```python
x = 1
```

| a | b |
|---|---|
| 1 | 2 |
"""

SCRATCH_ZH = SCRATCH.replace("# Title", "# 标题").replace("Some prose.", "一些说明文字。").replace("## Part", "## 部分")


def test_checker_catches_drift():
    assert drift(SCRATCH, SCRATCH_ZH) == []
    assert headings(SCRATCH) == [1, 2]
    assert chinese_share(SCRATCH_ZH) > 0.3 > chinese_share(SCRATCH)
    assert drift(SCRATCH, SCRATCH_ZH.replace("## 部分", "### 部分"))  # a heading level changed
    assert drift(SCRATCH, SCRATCH_ZH.replace("## 部分\n", ""))  # a heading dropped
    assert drift(SCRATCH, SCRATCH_ZH.replace("x = 1", "x = 2"))  # code edited
    assert drift(SCRATCH, SCRATCH_ZH.replace("source: model.py", "source: moe.py"))  # marker changed
    assert drift(SCRATCH, SCRATCH_ZH.replace("<!-- source: model.py -->\n", ""))  # marker dropped
    assert drift(SCRATCH, SCRATCH_ZH.replace("| 1 | 2 |\n", ""))  # table row dropped
