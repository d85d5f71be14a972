"""The README holds what the code does: its Python API block and its step-by-step CLI lines run as written
(in a scratch directory), and its table of registered components is the one the registries generate.
The worked example of scoring another tool's maps is tests/test_readme_example.py's."""
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


def test_the_component_table_is_up_to_date():
    from wsl.components import BEGIN, END, component_table

    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README.md lost the component table's marker comments"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    assert current == component_table(), ("README.md's table of backbones, pooling heads and segmenters is stale "
                                           "(a builder or its docstring changed): run `python -m wsl.components "
                                           "README.md` and commit the result")
    from wsl.models import BACKBONES, POOLINGS, SEGMENTERS

    for registry in (BACKBONES, POOLINGS, SEGMENTERS):  # every registered name has its row
        for name in registry.names():
            assert f"| {registry.kind} | `{name}` |" in current, name


STEP_MARK = "<!-- readme-example: step-by-step -->"
#: Smaller sizes, each through a flag the command documents (`wsl COMMAND --help`), appended to the
#: README's line: the defaults train for minutes, this keeps the whole road to seconds.
TINY = {"synth": ["--train", "16", "--val", "8", "--size", "64", "--classes", "4"],
        "train": ["--epochs", "1", "--size", "64", "--batch-size", "8", "--workers", "0", "--device", "cpu"],
        "train-seg": ["--epochs", "1", "--size", "64", "--batch-size", "8", "--workers", "0", "--device", "cpu"],
        "cam": ["--device", "cpu"], "segment": ["--device", "cpu"]}


def test_step_by_step_cli_lines_run_as_written(tmp_path, monkeypatch, one_thread):
    """The README's step-by-step block (marked ``readme-example: step-by-step``), every line run as
    written in a scratch directory, with only smaller sizes appended through documented flags
    (:data:`TINY`: fewer and smaller scenes, one epoch, CPU). Each command's output is what the next reads."""
    import shlex

    from wsl.cli import main

    text = README.read_text(encoding="utf-8")
    assert STEP_MARK in text, "README.md lost its step-by-step block"
    block = re.search(re.escape(STEP_MARK) + r"\n```bash\n(.*?)```", text, re.S)
    assert block, "the step-by-step marker is not followed by a bash block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) >= 5
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "wsl", line
        assert main(["-q", *argv[1:], *TINY.get(argv[1], [])]) == 0, line
    assert (tmp_path / "runs/bench/metrics.json").is_file()
    assert len(list((tmp_path / "runs/pred").glob("*.png"))) == 8
    assert len(list((tmp_path / "runs/pred/overlays").glob("*.png"))) == 8
