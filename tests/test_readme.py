"""The README's examples run as written: its Python API block, executed in a scratch directory."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after_heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


def test_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    scope: dict = {}
    try:
        exec(compile(_python_block("## The Python API"), "README.md", "exec"), scope)  # noqa: S102
    finally:
        torch.set_num_threads(before)
    n, c = scope["labels"].shape
    assert scope["maps"].shape[:2] == (n, c) and scope["scores"].shape == (n, c)
    assert scope["out"].cams.shape == (n, c, 224, 224)
    assert len(scope["boxes"]) == n and scope["masks"].shape == (n, 224, 224)
