"""experiments/speed.py runs end to end in its --smoke mode and writes a well-formed report.

Only the structure of the output is checked: timings on a shared CPU mean nothing at smoke sizes. The
glibc phase is left out here because it starts two more interpreters (it is exercised by the full run).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "speed.py"
RATIO_IDS = {"1a", "1b", "1d", "1e", "1f", "3a", "3b", "3c", "3d", "4a", "4d", "5a", "5b", "B"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--skip", "glibc", "--device", "auto",
                           "--results", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "speed.json").read_text()), (out / "speed.md").read_text()


def test_json_rows_have_ratios_targets_and_medians(smoke):
    _, result, _ = smoke
    rows = {r["id"]: r for r in result["rows"]}
    assert RATIO_IDS <= set(rows)
    for r in result["rows"]:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(r["num"]["median"] / r["den"]["median"])
        if r["op"] is None:
            assert r["passed"] is None and r["target"] is None
        else:
            assert r["op"] in ("<=", ">=") and isinstance(r["passed"], bool)
            assert r["passed"] == (r["ratio"] <= r["target"] if r["op"] == "<=" else r["ratio"] >= r["target"])
        for side in ("num", "den"):
            assert r[side]["n"] == len(r[side]["values"]) >= 1
            assert r[side]["q1"] <= r[side]["median"] <= r[side]["q3"]
    assert rows["1a"]["op"] == "<=" and rows["1a"]["target"] == 1.10
    for rid in ("1d", "1e"):  # CAM export at 20, 80 and 1000 classes, each with its CAM file's cost (1f)
        counts = [r["what"].rsplit(", ", 1)[1] for r in result["rows"] if r["id"] == rid]
        assert counts == ["20 classes", "80 classes", "1000 classes"]
        assert all(r["target"] == 1.05 for r in result["rows"] if r["id"] == rid)
    assert sum(r["id"] == "1f" for r in result["rows"]) == 12  # both CAM file layouts
    assert rows["3a"]["target"] == 0.95 and rows["4a"]["target"] == 3.0 and rows["5a"]["target"] == 10.0
    assert rows["3c"]["target"] == 0.95 and "amp=auto" in rows["3c"]["what"]
    bench = [r for r in result["rows"] if r["id"] == "B"]
    assert bench[0]["op"] == "<=" and bench[0]["target"] == 1.0 and "npz" in bench[0]["what"]
    assert any(r["id"] == "P" and "bf16" in r["what"] for r in result["rows"])  # precision variants


def test_rivals_are_measured_or_skipped_with_a_reason(smoke):
    _, result, _ = smoke
    rivals = [r for r in result["rows"] if r["id"].startswith("2")]
    for r in rivals:
        assert r["op"] == ">=" and r["target"] == 0.95
    names = {r["num"]["label"] for r in rivals} | set(result["skipped"])
    assert any("grad-cam" in n for n in names) and any("torchcam" in n for n in names)


def test_phases_machine_and_cuda_section(smoke):
    _, result, _ = smoke
    assert set(result["phases"]) == {"cam", "classes", "rivals", "train", "precision", "data", "metrics", "crf", "bench", "cuda"}
    for phase in result["phases"].values():
        assert phase["peak_rss_mb"] > 0 and phase["wall_s"] >= 0
    m = result["machine"]
    assert m["cpus"] >= 1 and m["versions"]["torch"] and isinstance(m["amx"], bool)
    assert result["smoke"] is True and len(result["load_start"]) == 3
    breakdown = result["phases"]["cam"]["info"]["tiny"]["breakdown_s"]
    assert {"argmax_points", "local_maxima", "cam_boxes", "pseudo_masks"} <= set(breakdown)
    import torch
    if not torch.cuda.is_available():
        assert "CUDA" in result["skipped"]["cuda"]


def test_markdown_report(smoke):
    _, result, md = smoke
    assert "--smoke" in result["command"] and f"`{result['command']}`" in md
    assert "| # | measurement | ratio | target | pass |" in md
    for rid in RATIO_IDS:
        assert f"| {rid} |" in md
    assert result["machine"]["cpu"] in md and "Peak RSS" in md and "SMOKE" in md


def test_merge_replaces_only_the_phases_run_again(smoke, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_script", SCRIPT)
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "speed_script", speed)  # its dataclasses look their module up
    spec.loader.exec_module(speed)
    _, result, _ = smoke
    old = json.loads(json.dumps(result))
    for r in old["rows"]:
        if r["phase"] != "classes":  # rows 1d-1f came after rows named their phase
            r.pop("phase")  # results written before rows named their phase
        r["ratio"] = -1.0
    old.update(command="python experiments/speed.py (full)", load_start=[9, 9, 9], load_end=[8, 8, 8])
    new = json.loads(json.dumps(result))
    new["rows"] = [r for r in new["rows"] if r["phase"] in ("cam", "metrics")]
    new["phases"] = {k: v for k, v in new["phases"].items() if k in ("cam", "metrics")}
    new["skipped"] = {}
    merged = speed.merge_results(old, new)
    assert [r["id"] for r in merged["rows"]] == [r["id"] for r in result["rows"]]  # phase order kept
    for r in merged["rows"]:
        assert (r["ratio"] == -1.0) == (speed.row_phase(r) not in ("cam", "metrics")), r["id"]
    assert set(merged["phases"]) == set(result["phases"])
    assert [(r["command"], r["phases"]) for r in merged["runs"]] == [
        (old["command"], [p for p in result["phases"] if p not in ("cam", "metrics")]), (new["command"], ["cam", "metrics"])]
    md = speed.markdown(merged)
    assert "Merged from several runs" in md and old["command"] in md and "| 1a |" in md


def test_crf_rows_give_the_label_agreement_or_say_why_not(smoke):
    """The CRF is timed against pydensecrf2 when it is installed (an optional extra): every such row
    names the label agreement and the load; without it the phase says how to get it."""
    _, result, md = smoke
    crf = [r for r in result["rows"] if r["id"] == "C"]
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        assert not crf and "crf-reference" in result["skipped"]["crf"]
        return
    versus = [r for r in crf if "pydensecrf2" in r["what"]]
    import os
    threads = {"1 thread" in r["what"] for r in versus}
    assert threads == ({True, False} if len(os.sched_getaffinity(0)) > 1 else {True})  # one thread, all cores
    for r in versus:
        assert "labels agree on" in r["note"] and "load [" in r["note"]
    assert any(r["op"] == "<=" and r["target"] == 1.0 for r in versus)
    demo = [r for r in crf if "pseudo-mask stage" in r["what"]]
    assert demo or "crf demo workload" in result["skipped"]
    assert "| C |" in md


def test_each_row_family_is_a_small_module():
    """speed.py is the command line only; every row family and the shared helpers are small modules."""
    rows = REPO / "experiments" / "speed_rows"
    families = {"cam", "rivals", "train", "precision", "data", "metrics", "crf", "bench", "glibc", "cuda"}
    assert families | {"timing", "settings", "report", "child"} <= {p.stem for p in rows.glob("*.py")}
    for path in [SCRIPT, *rows.glob("*.py")]:
        assert len(path.read_text().splitlines()) < 250, path.name
    for name in families:  # each defines its phase
        assert f"def phase_{name}(" in (rows / f"{name}.py").read_text()


# ------------------------------------------------------------------------------ experiments/gpu_check.py
GPU_CHECK = REPO / "experiments" / "gpu_check.py"


def test_gpu_check_imports_and_lists_its_checks(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check_script", gpu_check)
    spec.loader.exec_module(gpu_check)
    for name in ("check_train", "check_cam", "check_crf", "check_nccl", "main"):
        assert callable(getattr(gpu_check, name))


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the script would measure")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
    assert not out.exists()


def test_gpu_check_runs_every_check_on_the_cpu_with_smoke(tmp_path):
    # The GPU script has had no GPU yet: --smoke runs all of its code (tiny sizes, on the CPU), so a session
    # that gets a GPU for a few minutes finds a script that runs to the end.
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--smoke", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu (--smoke")
    checks = [r["check"] for r in result["rows"]]
    assert checks[:2] == ["train step"] * 2 and checks.count("CAM export / forward") == 2
    crf = [r for r in result["rows"] if r["check"].startswith("dense CRF")]
    assert crf and all("skipped" in r or r["label_agreement"] > 0.99 for r in crf)
    assert result["rows"][-1] == {"check": "NCCL all-reduce", "skipped": "0 GPU: needs two"}
    assert set(result["check_seconds"]) == {"train", "cam", "crf", "nccl"}
