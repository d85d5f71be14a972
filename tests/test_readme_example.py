"""README.md's worked example ("Scoring another tool's maps"), run as written on a small stand-in for runs/demo."""
from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- readme-example: other-tool -->"


def example_blocks():
    """The README's marked code blocks, as (language, code)."""
    blocks = re.findall(re.escape(MARK) + r"\n```(\w+)\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert [lang for lang, _ in blocks] == ["python", "bash"], "README example blocks moved or were renamed"
    return blocks


@pytest.mark.usefixtures("one_thread")
def test_readme_example_runs_as_written(scenes_root, tmp_path, monkeypatch):
    pytest.importorskip("pytorch_grad_cam")
    from wsl.bench import load_run
    from wsl.cli import main
    from wsl.data.spec import build_dataset
    from wsl.models import build_classifier, classifier_checkpoint
    from wsl.utils.io import save_checkpoint

    (python, script), (_, shell) = example_blocks()
    # runs/demo as `make demo` leaves it, as far as the example reads it: the scenes and the classifier
    demo = tmp_path / "runs" / "demo"
    (demo / "classifier").mkdir(parents=True)
    (demo / "scenes").symlink_to(scenes_root, target_is_directory=True)
    classes = build_dataset(f"synth:{scenes_root}", "val").classes
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=len(classes), pooling="avg")
    save_checkpoint(demo / "classifier" / "last.pt", classifier_checkpoint(model, classes))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export_gradcampp.py").write_text(script, encoding="utf-8")

    lines = [line for line in shell.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "python export_gradcampp.py"
    runpy.run_path("export_gradcampp.py", run_name="__main__")
    for line in lines[1:]:
        argv = shlex.split(line)
        assert argv[0] == "wsl"
        assert main(argv[1:]) == 0, line

    val = build_dataset(f"synth:{scenes_root}", "val")
    for ann in val.annotations:
        with np.load(tmp_path / "runs" / "gradcampp_cams" / f"{ann.id}.npz") as z:
            assert z["cams"].dtype == np.float16 and z["cams"].shape[0] == len(classes)
            assert not z["cams"][ann.labels < 0.5].any()
    files, adapter = load_run(tmp_path / "runs/bench_gradcampp"), load_run(tmp_path / "runs/bench_gradcampp_wsl")
    assert adapter["method"] == "gradcam++" and "method" not in files  # files of another tool: method unknown
    for key in ("cls_map", "point_map", "pointing_game", "maxboxaccv2", "pxap"):
        assert files[key] == pytest.approx(adapter[key], abs=0.02), key  # the same maps, float16 files
    table = (tmp_path / "runs/bench_gradcampp_wsl/compare.md").read_text()
    assert "| method | gradcam++ | – |" in table
