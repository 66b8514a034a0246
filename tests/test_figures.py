"""docs/make_figures.py draws every figure, and every committed figure is used by a chapter.

- The script runs on a tiny synthetic out dir (log.jsonl files written here, two logged steps each) into a
  temporary folder: every PNG must appear, open as a PNG and stay under the 150 KB budget.
- A missing run is skipped with a message, not an error; an unknown figure name is a one-line user error.
- Every PNG in docs/img/ is referenced by some chapter (docs/*.md or docs/zh/*.md), so no figure rots unused,
  and every image a chapter references exists.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_figures.py   (about 10 s on a loaded 2-core machine)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("pipeline", "blocks", "rope", "flash_tiling", "ddp_fsdp", "lora", "packed_mask", "vlm", "loss_curves",
           "vlm_curves")  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_figures", os.path.join(ROOT, "docs", "make_figures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_figures"] = module  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _write_log(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def figures():
    return _load_script()


def test_every_figure_is_drawn_from_a_synthetic_run(figures, tmp_path):
    out = tmp_path / "out"
    _write_log(str(out / "pretrain" / "log.jsonl"), [{"step": 10, "loss": 6.0}, {"step": 20, "loss": 5.0},
                                                     {"step": 20, "val_loss": 5.2}])  # fmt: skip
    _write_log(str(out / "sft" / "log.jsonl"), [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5, "task_acc": 0.3}])
    _write_log(str(out / "dpo" / "log.jsonl"), [{"step": 5, "loss": 0.69, "rewards/accuracy": 0.5},
                                                {"step": 10, "loss": 0.6, "rewards/accuracy": 0.7}])  # fmt: skip
    _write_log(str(out / "vlm" / "stage1" / "log.jsonl"), [{"step": 10, "loss": 3.0}, {"step": 10, "caption_acc": 0}])
    _write_log(str(out / "vlm" / "log.jsonl"), [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5, "vqa_acc": 0.6}])
    img = tmp_path / "img"
    written = figures.main(figures.FiguresConfig(out_dir=str(out), img_dir=str(img)))
    assert sorted(os.path.basename(p) for p in written) == sorted(f"{n}.png" for n in FIGURES)
    for name in FIGURES:
        path = img / f"{name}.png"
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC, name
        assert 5_000 < os.path.getsize(path) < 150_000, (name, os.path.getsize(path))


def test_a_missing_run_is_skipped_with_a_message(figures, tmp_path, capsys):
    cfg = figures.FiguresConfig(out_dir=str(tmp_path / "nothing"), img_dir=str(tmp_path / "img"), only="loss_curves")
    assert figures.main(cfg) == []
    assert "skip loss_curves.png" in capsys.readouterr().out
    with pytest.raises(figures.UserError, match="only: unknown figure"):
        figures.main(figures.FiguresConfig(img_dir=str(tmp_path / "img"), only="nope"))


def test_read_log_keeps_the_last_value_of_a_repeated_step(figures, tmp_path):
    path = str(tmp_path / "log.jsonl")
    _write_log(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5, "lr": 0.1}])
    log = figures.read_log(path)
    assert log["loss"][0].tolist() == [1, 2] and log["loss"][1].tolist() == [3.0, 1.5]
    assert log["lr"][0].tolist() == [2]


def test_every_committed_png_is_used_by_a_chapter_and_every_used_png_exists():
    chapters = glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "docs", "zh", "*.md"))
    chapters += [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "README_zh.md")]  # the demo's results figures
    used, broken = set(), []
    for chapter in chapters:
        with open(chapter, encoding="utf-8") as fh:
            for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", fh.read()):
                path = os.path.normpath(os.path.join(os.path.dirname(chapter), link))
                used.add(path)
                if not os.path.isfile(path):
                    broken.append(f"{os.path.relpath(chapter, ROOT)}: {link}")
    committed = {os.path.normpath(p) for p in glob.glob(os.path.join(ROOT, "docs", "img", "*.png"))}
    assert committed, "docs/img/ holds no figures: run `make figures`"
    unused = sorted(os.path.relpath(p, ROOT) for p in committed - used)
    assert not unused, f"figures no chapter or README shows: {unused}"
    assert not broken, f"chapters show missing figures: {broken}"
