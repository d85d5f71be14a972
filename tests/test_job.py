"""`wsl cam`, `wsl segment`, `wsl bench` and the pipeline under torchrun (wsl.utils.job), with 2 gloo
processes on the CPU: the same files and numbers as one process, `--resume` with another number of
processes, a killed process ending the job with one line, and one run per output directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from conftest import CHILD_ENV
from wsl.cli import main as cli_main
from wsl.data.spec import build_dataset
from wsl.errors import OutputExistsError
from wsl.models import build_classifier, build_segmenter, classifier_checkpoint, segmenter_checkpoint
from wsl.utils.io import save_checkpoint
from wsl.utils.job import OutputLock

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], world: int = 2) -> List[subprocess.Popen]:
    """``python -m wsl -q ARGV`` as ranks 0..world-1 of one gloo job (the variables torchrun sets)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "wsl", "-q", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**CHILD_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                  "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)})
            for r in range(world)]


def finish(procs: Sequence[subprocess.Popen], timeout: float = 240) -> List[Tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        out.append((p.returncode, err))
    return out


def torchrun(argv: Sequence[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                             f"--master_port={free_port()}", "-m", "wsl", "-q", *argv], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tree(root: Path) -> Dict[str, bytes]:
    """Relative path -> bytes of every file under ``root`` but the manifest (it records the world size)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def manifest(root: Path) -> Tuple[dict, dict]:
    """``(manifest without its "distributed" entry, that entry)``."""
    m = json.loads((root / "manifest.json").read_text())
    return m, m.pop("distributed")


@pytest.fixture(scope="module")
def checkpoints(scenes_root, tmp_path_factory) -> Dict[str, Path]:
    out = tmp_path_factory.mktemp("ckpt")
    classes = build_dataset(f"voc:{scenes_root}", "train").classes
    torch.manual_seed(0)
    save_checkpoint(out / "cls.pt", classifier_checkpoint(
        build_classifier(backbone="vgg_tiny", num_classes=len(classes), pooling="lse"), classes))
    torch.manual_seed(0)
    seg = build_segmenter("deeplab_largefov", num_classes=len(classes) + 1, backbone="vgg_tiny")
    save_checkpoint(out / "seg.pt", segmenter_checkpoint(seg, classes, input_size=64))
    return {"cls": out / "cls.pt", "seg": out / "seg.pt"}


def cam_args(scenes_root: Path, ckpt: Path, *extra: str) -> List[str]:
    return ["cam", "--checkpoint", str(ckpt), "--data", f"voc:{scenes_root}", "--split", "train", "--batch-size", "2",
            "--device", "cpu", *extra]


def test_cam_under_torchrun_writes_the_one_process_files_and_resumes_with_any_world_size(scenes_root, checkpoints,
                                                                                         tmp_path):
    args = cam_args(scenes_root, checkpoints["cls"])
    assert cli_main(["-q", *args, "--out", str(tmp_path / "one")]) == 0
    proc = torchrun([*args, "--out", str(tmp_path / "two")])
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    # file for file, byte for byte (CAMs included: the same batches, computed the same way)
    assert tree(two) == tree(one) and "cams/train_000015.npz" in tree(one)
    (m1, d1), (m2, d2) = manifest(one), manifest(two)
    assert m1 == m2 and d1 == {"world_size": 1, "ranks": [{"rank": 0, "images": 16, "units": 8}]}
    # 8 batches of 2 dealt in turn: each rank takes 4, none twice
    assert d2 == {"world_size": 2, "ranks": [{"rank": 0, "images": 8, "units": 4}, {"rank": 1, "images": 8, "units": 4}]}

    # Interrupted by 2 processes, finished by 1, and the other way round: what a kill leaves (JSON files
    # of the end missing, images without their record, a temporary file) is redone, the rest kept.
    for src, dst, world in ((two, tmp_path / "two_then_one", 1), (one, tmp_path / "one_then_two", 2)):
        shutil.copytree(src, dst)
        for name in ("manifest.json", "localization.json", "boxes_coco.json"):
            (dst / name).unlink()
        for i in (2, 5, 6):
            (dst / "records" / f"train_00000{i}.json").unlink()
        (dst / "masks" / "train_000006.png").unlink()
        (dst / "cams" / ".train_000006.k3x9.tmp.npz").write_bytes(b"PK\x03\x04 half")
        if world == 1:
            assert cli_main(["-q", *args, "--out", str(dst), "--resume"]) == 0
        else:
            assert [rc for rc, _ in finish(launch([*args, "--out", str(dst), "--resume"]))] == [0, 0]
        assert tree(dst) == tree(one) and manifest(dst)[0] == m1
        assert manifest(dst)[1]["world_size"] == world


def test_segment_and_sharded_outputs_over_two_processes(scenes_root, checkpoints, tmp_path):
    base = ["segment", "--checkpoint", str(checkpoints["seg"]), "--data", f"voc:{scenes_root}", "--split", "val",
            "--batch-size", "2", "--device", "cpu", "--amp", "none"]
    cam = cam_args(scenes_root, checkpoints["cls"], "--shards", "3")
    for argv, name in ((base, "seg"), ([*base, "--shards", "3"], "seg_shards"), (cam, "cam_shards")):
        assert cli_main(["-q", *argv, "--out", str(tmp_path / f"{name}1")]) == 0
        results = finish(launch([*argv, "--out", str(tmp_path / f"{name}2")]))
        assert [rc for rc, _ in results] == [0, 0], results
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        assert tree(two) == tree(one) and manifest(two)[0] == manifest(one)[0], name
        assert manifest(two)[1]["world_size"] == 2
    assert json.loads((tmp_path / "seg1" / "metrics.json").read_text())["images"] == 8  # scored from both ranks
    assert sorted(p.name for p in (tmp_path / "seg_shards2" / "shards").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar"]  # 4 batches of 2 -> shards of 4 images, one per rank
    # a segment run cut short by 2 processes (a shard and the JSON files missing) is finished by one
    cut = tmp_path / "seg_shards_cut"
    shutil.copytree(tmp_path / "seg_shards2", cut)
    for name in ("manifest.json", "metrics.json", "shards/shard-000001.tar"):
        (cut / name).unlink()
    assert cli_main(["-q", *base, "--shards", "3", "--out", str(cut), "--resume"]) == 0
    assert tree(cut) == tree(tmp_path / "seg_shards1") and manifest(cut)[0] == manifest(tmp_path / "seg_shards1")[0]


def test_bench_over_two_processes_gives_the_one_process_metrics(scenes_root, checkpoints, tmp_path):
    args = ["bench", "--data", f"voc:{scenes_root}", "--split", "train", "--checkpoint", str(checkpoints["cls"]),
            "--batch-size", "2", "--device", "cpu", "--cam-interval", "0.01"]
    assert cli_main(["-q", *args, "--out", str(tmp_path / "one")]) == 0
    results = finish(launch([*args, "--out", str(tmp_path / "two")]))
    assert [rc for rc, _ in results] == [0, 0], results
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two == one and one["num_images"] == 16 and one["maxboxacc"] == one["maxboxacc"]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def _rank1_pid(out: Path) -> int:
    """The pid of the torchrun worker with RANK=1 writing ``out``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmd and b"RANK=1" in env and b"-m" in cmd:
            return int(proc.name)
    raise AssertionError(f"no rank-1 worker writing {out}")


@pytest.mark.parametrize("launcher", ["gloo", "torchrun"])
def test_a_killed_rank_ends_the_job_with_one_line_and_resume_finishes_it(scenes_root, checkpoints, tmp_path,
                                                                         launcher):
    """SIGKILL rank 1 once it has written an image of its own. Alone (no agent), rank 0 learns it from gloo
    at its next collective; under torchrun the agent stops rank 0 with SIGTERM unless gloo tells it first.
    Either way rank 0 ends with one line, no manifest is written, and `--resume` in one process gives the uninterrupted files."""
    args = cam_args(scenes_root, checkpoints["cls"], "--scales", "1", "0.75", "1.25", "0.5", "--flip")
    args[args.index("--batch-size") + 1] = "1"  # one image per unit: rank 1 takes the odd images
    full, out = tmp_path / "full", tmp_path / "killed"
    assert cli_main(["-q", *args, "--out", str(full)]) == 0
    mine = [out / "records" / f"train_{i:06d}.json" for i in range(1, 16, 2)]
    if launcher == "gloo":
        procs = launch([*args, "--out", str(out)])
        rank0, victim = procs[0], procs[1]
    else:
        rank0 = victim = torchrun([*args, "--out", str(out)])
    deadline = time.monotonic() + 120
    while not any(p.exists() for p in mine):
        assert rank0.poll() is None and time.monotonic() < deadline, "rank 1 wrote nothing"
        time.sleep(0.002)
    pid = victim.pid if launcher == "gloo" else _rank1_pid(out)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    rc, err = finish([rank0], timeout=60)[0] if launcher == "gloo" else (rank0.wait(timeout=60), rank0.stdout.read())
    stopped_after = time.monotonic() - killed
    if launcher == "gloo":
        finish([victim])
    assert not (out / "manifest.json").exists(), "the job finished before the kill"
    assert sum(p.exists() for p in mine) < len(mine), "rank 1 had finished its images"
    lines = [line for line in err.splitlines() if line.startswith("wsl cam: error:")]
    assert rc != 0 and len(lines) == 1, err[-3000:]
    if launcher == "gloo":
        assert err.strip() == lines[0], err  # nothing but that line
        assert "rank 0 of 2: another process of the job stopped" in lines[0] and "--resume" in lines[0]
    else:
        # whichever comes first: the agent's SIGTERM, or gloo telling rank 0 at a collective (under load
        # the collective often wins the race)
        assert ("stopped by SIGTERM" in lines[0] or "another process of the job stopped" in lines[0]) and \
            "--resume" in lines[0], lines[0]
    assert stopped_after < 30, f"rank 0 took {stopped_after:.0f} s to stop"
    # nothing half-written is taken for done: the resumed output is the uninterrupted one
    assert cli_main(["-q", *args, "--out", str(out), "--resume"]) == 0
    assert tree(out) == tree(full) and manifest(out) == manifest(full)


def test_one_run_per_output_directory_and_rank0s_refusal_printed_once(scenes_root, checkpoints, tmp_path, capsys):
    from wsl.cam.export import export_cams

    args = cam_args(scenes_root, checkpoints["cls"])
    out = tmp_path / "out"
    lock = OutputLock(out, "cam")  # what a running job's rank 0 holds
    lock.acquire()
    try:
        assert cli_main(["-q", *args, "--out", str(out), "--resume"]) == 1
        assert "is being written by another running `wsl cam`" in capsys.readouterr().err
        train = build_dataset(f"voc:{scenes_root}", "train")
        with pytest.raises(OutputExistsError, match="two runs cannot share an output directory"):
            export_cams(build_classifier(backbone="vgg_tiny", num_classes=4), train.classes, train, out,
                        resume=True, progress=False)
    finally:
        lock.release()
    assert list(out.iterdir()) == []  # refused before anything was written
    assert cli_main(["-q", *args, "--out", str(out)]) == 0  # free again once the other run ends
    # rank 0 refuses a non-empty folder: both ranks stop, only rank 0 says why
    (rank0_rc, rank0_err), (rank1_rc, rank1_err) = finish(launch([*args, "--out", str(out)]))
    assert (rank0_rc, rank1_rc) == (1, 1) and rank1_err == ""
    assert rank0_err.strip().startswith("wsl cam: error: output directory is not empty") and len(
        rank0_err.strip().splitlines()) == 1, rank0_err


def test_the_pipeline_under_torchrun(tmp_path):
    """`torchrun -m wsl demo --quick`: every stage runs on both ranks (DDP training, the inference stages
    split), rank 0 writes the pipeline's files and prints the summary once."""
    out = tmp_path / "demo"
    proc = torchrun(["demo", "--quick", "--out", str(out)])
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log[-3000:]
    assert log.count("segmenter mIoU (val)") == 1  # the summary, from rank 0 alone
    for stage in ("cams", "pseudo_masks", "segment"):
        assert manifest(out / stage)[1]["world_size"] == 2, stage
    assert json.loads((out / "bench" / "config.json").read_text())["world_size"] == 2
    assert json.loads((out / "cams" / "stage.json").read_text())["world_size"] == 2
    assert (out / "report.md").is_file() and not list(out.rglob(".*.tmp*"))
