"""The whole pipeline (`wsl demo --quick`) end to end in a temporary directory: report, figures and metrics;
refusing a non-empty output; resuming without redoing finished stages; the JSON configs."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_wsl_at
from wsl import cli
from wsl.pipeline import (STAGES, PipelineConfig, active_stages, demo_config, read_stage, run_pipeline,
                          stage_complete)
from wsl.train.classifier import TrainConfig
from wsl.train.config import with_overrides
from wsl.utils.io import load_checkpoint, read_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
FIGURES = ("examples", "per_class", "thresholds", "training", "segmenter_vs_pseudo")
QUICK_STAGES = ["scenes", "classifier", "cams", "bench", "pseudo_masks", "segmenter", "segment", "report"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    # One thread, as the `python -m wsl` children of the kill test run (CHILD_ENV): same sums, same bits.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert cli.main(["-q", "demo", "--out", str(out), "--quick"]) == 0
    finally:
        torch.set_num_threads(before)
    (out.parent / "printed.txt").write_text(printed.getvalue(), encoding="utf-8")  # what the user saw
    return out


def test_demo_quick_writes_report_with_figures(demo_dir):
    report = (demo_dir / "report.md").read_text(encoding="utf-8")
    page = (demo_dir / "report.html").read_text(encoding="utf-8")
    for name in FIGURES:
        path = demo_dir / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as im:
            assert im.width > 300 and im.height > 200, name
            assert len(np.unique(np.asarray(im.convert("L")))) > 20, f"{name} is blank"
        assert f"figures/{name}.png" in report and f"figures/{name}.png" in page
    for heading in ("## Results", "## Examples", "## Per class", "## Threshold curves", "## Training curves",
                    "## Segmenter vs pseudo-masks", "## Pooling heads", "## Time per stage"):
        assert heading in report
    assert "<table>" in page and "<h2>Results</h2>" in page
    assert not list(demo_dir.rglob(".*.tmp*")), "a temporary file was left behind"


def test_demo_quick_metrics_and_stage_records(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert list(summary["stages"]) == QUICK_STAGES
    for stage in QUICK_STAGES:
        record = read_stage(demo_dir, stage)
        assert stage_complete(demo_dir, stage) and record["seconds"] > 0 and record["cpu_seconds"] >= 0
    res = summary["results"]
    values = [res["classifier"]["val_map"], res["bench"]["cls_map"], res["bench"]["point_map"],
              res["bench"]["maxboxacc"], res["pseudo_masks"]["train"]["miou"], res["pseudo_masks"]["val"]["miou"],
              res["segment"]["miou"]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert set(res["segment"]["iou"]) == {"background", "disc", "square", "triangle", "star"}
    # The segment stage scored the same files the report shows.
    assert len(list((demo_dir / "segment").glob("val_*.png"))) == 16
    assert len(list((demo_dir / "pseudo_masks" / "masks").glob("train_*.png"))) == 48


def test_the_printed_total_is_the_reports(demo_dir):
    """One figure: the total time `wsl demo` prints is the report's, its report stage included (the report
    used to leave out its own stage, which the printed total counted)."""
    printed = (demo_dir.parent / "printed.txt").read_text(encoding="utf-8")
    report = (demo_dir / "report.md").read_text(encoding="utf-8").split("## Time per stage")[1]
    total = re.search(r"^total\s+([0-9.]+)", printed, re.M)
    rows = dict(re.findall(r"^\| ([a-z_]+|total \(stages above\)) \| ([0-9.]+) \|", report, re.M))
    assert total and rows, (printed, report[-1500:])
    assert rows["total (stages above)"] == total.group(1)
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(rows) - {"total (stages above)"} == set(QUICK_STAGES)
    assert float(rows["report"]) == pytest.approx(read_stage(demo_dir, "report")["seconds"], abs=0.051)
    assert f"{summary['seconds']:.1f}" == total.group(1)


def test_pooling_heads_count_each_second_once(tmp_path, one_thread):
    """A head's wall time is its epochs' seconds plus its benchmark's: the heads trained by the stage
    cost no more than the stage itself (the epochs used to be counted twice)."""
    config = with_overrides(demo_config(quick=True), {"pooling.heads": {"max": {}, "avg": {}}, "pooling.epochs": 1})
    out = tmp_path / "run"
    run_pipeline(config, out, stop_after="pooling", progress=False)
    heads = json.loads((out / "pooling" / "pooling_heads.json").read_text())["heads"]
    assert [h["head"] for h in heads] == ["max", "avg"] and all(h["wall_s"] > 0 for h in heads)
    for h in heads:
        epochs = sum(r["seconds"] for r in read_jsonl(Path(h["run_dir"]) / "metrics.jsonl"))
        bench = json.loads((Path(h["bench_dir"]) / "config.json").read_text())["timing"]["total_s"]
        assert h["wall_s"] == pytest.approx(epochs + bench, abs=0.051)
    assert sum(h["wall_s"] for h in heads) <= read_stage(out, "pooling")["seconds"] + 0.1


def test_demo_refuses_a_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["-q", "demo", "--out", str(tmp_path), "--quick"]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_resume_skips_complete_stages_and_reruns_from_the_first_missing(demo_dir, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(demo_dir, out)
    before = {s: read_stage(out, s)["finished"] for s in QUICK_STAGES}
    caplog.set_level("INFO", logger="wsl.pipeline")
    summary = run_pipeline(demo_config(quick=True), out, resume=True, progress=False)
    assert all(r["skipped"] for r in summary["stages"].values())
    assert sum("complete, skipped" in m for m in caplog.messages) == len(QUICK_STAGES)
    assert {s: read_stage(out, s)["finished"] for s in QUICK_STAGES} == before

    (out / "segment" / "stage.json").unlink()  # as if killed during the segment stage
    caplog.clear()
    assert cli.main(["-q", "demo", "--out", str(out), "--quick", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ran = [s for s, r in summary["stages"].items() if not r["skipped"]]
    assert ran == ["segment", "report"]
    assert read_stage(out, "segmenter")["finished"] == before["segmenter"]


def test_resume_removes_the_temporaries_of_writes_a_kill_interrupted(demo_dir, tmp_path, caplog):
    # A kill between atomic_path's temporary and its rename leaves the temporary (the kill test below met
    # one: a report figure); the stage that writes the file again picks a new name, so resume removes them.
    out = tmp_path / "run"
    shutil.copytree(demo_dir, out)
    left = [out / "figures" / ".examples.ab12cd34.tmp.png", out / "cams" / "cams" / ".0001.x1y2z3w4.tmp.npz",
            out / ".summary.q1w2e3r4.tmp.json"]
    for p in left:
        p.write_bytes(b"half")
    keep = out / "figures" / ".hidden_but_mine"
    keep.write_text("not a temporary")
    caplog.set_level("INFO", logger="wsl.pipeline")
    run_pipeline(demo_config(quick=True), out, resume=True, progress=False)
    assert not any(p.exists() for p in left) and keep.read_text() == "not a temporary"
    assert any(f"removed {len(left)} temporary file(s)" in m for m in caplog.messages)


def test_pipeline_killed_mid_stage_resumes_to_the_uninterrupted_outputs(demo_dir, tmp_path):
    """SIGKILL at a random point from the segmenter stage on (the classifier, CAM and pseudo-mask stages
    wrote their files; the segmenter takes about a second here), then --resume: every result equals the
    uninterrupted run's."""
    out = tmp_path / "run"
    argv = ["demo", "--quick", "--out", str(out)]
    seed = int(os.environ.get("WSL_KILL_SEED", random.SystemRandom().randrange(2**31)))  # replay with it
    delay = random.Random(seed).uniform(0.0, 0.8)
    kill_wsl_at(argv, out / "segmenter", None, delay=delay, why=f"the segmenter stage (WSL_KILL_SEED={seed})")
    assert stage_complete(out, "pseudo_masks") and not stage_complete(out, "report"), f"WSL_KILL_SEED={seed}"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed child ran
    try:
        assert cli.main(["-q", *argv, "--resume"]) == 0
    finally:
        torch.set_num_threads(before)
    got, want = json.loads((out / "summary.json").read_text()), json.loads((demo_dir / "summary.json").read_text())
    for stage in ("classifier", "bench", "pseudo_masks", "segmenter", "segment"):
        assert got["results"][stage] == want["results"][stage], stage
    for pattern in ("cams/cams/*.npz", "pseudo_masks/masks/*.png", "segment/*.png"):
        names = sorted(p.relative_to(demo_dir) for p in demo_dir.glob(pattern))
        assert names and names == sorted(p.relative_to(out) for p in out.glob(pattern)), pattern
        for name in names:
            if name.suffix == ".npz":
                assert (out / name).read_bytes() == (demo_dir / name).read_bytes(), name
            else:
                assert (out / name).read_bytes() == (demo_dir / name).read_bytes(), name
    a, b = load_checkpoint(out / "segmenter" / "last.pt"), load_checkpoint(demo_dir / "segmenter" / "last.pt")
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), key
    assert not list(out.rglob(".*.tmp*")), "a temporary file was left behind"


def test_resume_refuses_another_config(demo_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo_dir, out, ignore=shutil.ignore_patterns("scenes", "cams", "pseudo_masks", "segment"))
    other = with_overrides(demo_config(quick=True), {"classifier.schedule.epochs": 3})
    with pytest.raises(ValueError, match=r"classifier\.schedule\.epochs=2.*epochs=3"):
        run_pipeline(other, out, resume=True)
    with pytest.raises(ValueError, match="contradict"):
        run_pipeline(demo_config(quick=True), out, resume=True, overwrite=True)


def test_demo_config_file_matches_the_code():
    # The file is written from the code; after changing a default (here or in a trainer) regenerate it:
    # python -c "from wsl.pipeline import demo_config; from wsl.utils.io import atomic_write_json;
    #            atomic_write_json('experiments/configs/pipeline_demo.json', demo_config().to_dict())"
    assert PipelineConfig.load(CONFIGS / "pipeline_demo.json") == demo_config(), \
        "experiments/configs/pipeline_demo.json is out of date (regenerate it, see the comment above)"
    assert active_stages(demo_config()) == QUICK_STAGES


@pytest.mark.parametrize("name, classifier", [("pipeline_voc2012_vgg16.json", "voc2012_vgg16.json"),
                                               ("pipeline_coco2014_vgg16.json", "coco2014_vgg16.json")])
def test_dataset_configs_compose_the_trainer_configs(name, classifier):
    config = PipelineConfig.load(CONFIGS / name)
    assert config.data.spec and config.classifier == TrainConfig.load(CONFIGS / classifier)
    assert config.segmenter.model.backbone == "vgg16" and "scenes" not in active_stages(config)


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"cams": {"tua": 0.5}}))
    with pytest.raises(ValueError, match=r"bad\.json.*'tua'"):
        PipelineConfig.load(path)
    path.write_text(json.dumps({"classifier": "missing.json"}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PipelineConfig.load(path)
    with pytest.raises(ValueError, match="'segment' needs 'segmenter'"):
        PipelineConfig(skip=("segmenter",))
    with pytest.raises(ValueError, match="unknown head 'maxx'"):
        with_overrides(demo_config(quick=True), {"pooling.heads": {"maxx": {}}})
    with pytest.raises(ValueError, match="not a stage"):
        run_pipeline(demo_config(quick=True), tmp_path / "x", stop_after="pooling")
    assert set(STAGES) >= set(QUICK_STAGES)


def test_the_report_is_rebuilt_without_importing_the_pipeline(demo_dir, tmp_path):
    """wsl.report reads the stage records from wsl.stages: a fresh interpreter rebuilds the report of a
    run directory and never imports wsl.pipeline (the dependency goes pipeline -> report -> stages)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    (run / "report.md").unlink()
    code = ("import sys\nfrom wsl.report import write_report\nwrite_report(sys.argv[1], pooling_results=None)\n"
            "assert 'wsl.pipeline' not in sys.modules, 'the report imported the pipeline'\n")
    done = subprocess.run([sys.executable, "-c", code, str(run)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## Results" in (run / "report.md").read_text(encoding="utf-8")
    from wsl.stages import STAGES as RECORDED

    assert RECORDED is STAGES  # the pipeline's stage list is the records' own
