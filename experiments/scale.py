"""Scale: `wsl cam` and `wsl segment` with 1 and 2 processes, projected to VOC, COCO and ImageNet, and
the benchmark's peak memory as the number of images grows.

Every number comes from a `python -m wsl` child process timed here (torchrun for 2 processes, gloo on
this CPU), one OpenMP thread per process:

1. Throughput of `wsl cam` (one file per image, and tar shards) and `wsl segment` on generated scenes
   (the demo's 64 px images, `vgg_tiny` classifier and DeepLab-LargeFOV segmenter, random weights: the
   cost does not depend on the weights). The per-image cost is (T(N) - T(n)) / (N - n), the wall time of
   N images less that of a tiny run of n images, so interpreter start, model load and the final JSON
   files are left out; images/s = 1 / cost.
2. The same per-image cost of the paper-sized setting, VGG16 classifier and VGG16 DeepLab-LargeFOV on
   500x375 images (VOC's usual size), one process (a few images: it is slow on a CPU).
3. Projected wall times for VOC 2012 (10k images; its detection trainval has 11,540), COCO 2014 train
   + val (123k, rounded to 120k) and ImageNet train (1.28M) on 1 and 8 devices:
   N x cost / devices, i.e. the CPU per-image cost measured here, one process per device, perfect
   scaling (each rank works alone; one gather at the end). No GPU rate is measured here: these are CPU
   figures, and the same arithmetic with a per-image cost measured on a GPU gives the GPU projection.
4. Peak RSS of `wsl bench --cams` over 200 and 2000 images, for one-file-per-image CAMs and for tar
   shards (the benchmark streams: one image's CAMs in memory at a time).

    python experiments/scale.py                        # writes experiments/results/scale.{md,json}
    python experiments/scale.py --smoke --results /tmp/scale   # tiny sizes: proves it runs

The load average (other jobs on the machine) is recorded before and after every timed command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"VOC 2012 (10k)": 10_000, "COCO 2014 (120k)": 120_000, "ImageNet (1.28M)": 1_281_167}
DEVICES = (1, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: Sequence[str], procs: int = 1) -> Dict[str, Any]:
    """Run ``wsl ARGV`` (under torchrun when ``procs`` > 1); wall seconds, peak RSS (KiB, the largest
    child), load average before and after."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wsl = ["-m", "wsl", "-q", *argv]
    cmd = [sys.executable, *wsl] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}", *wsl]
    # A wrapper process per run, so that RUSAGE_CHILDREN is this command's own peak.
    wrapper = ("import resource, subprocess, sys, json\n"
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
               "print(json.dumps({'rc': rc, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stderr[-2000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {info['rc']}: {done.stderr[-2000:]}")
    return {"command": ("torchrun --nproc_per_node 2 " if procs > 1 else "") + "wsl " + shlex.join(argv),
            "processes": procs, "seconds": round(seconds, 2), "maxrss_mib": round(info["maxrss_kib"] / 1024, 1),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def make_data(root: Path, sizes: Dict[str, int], vgg_images: int) -> Dict[str, Path]:
    """Scenes (tiny run, big run, VOC-sized) and random-weight checkpoints."""
    from wsl.data.synth import SynthConfig, generate_scenes
    from wsl.models import build_classifier, build_segmenter, classifier_checkpoint, segmenter_checkpoint
    from wsl.utils.io import save_checkpoint

    paths = {"tiny": generate_scenes(root / "tiny", SynthConfig(seed=1, train=sizes["tiny"], val=sizes["tiny"],
                                                                 size=64, num_classes=4), progress=False),
             "big": generate_scenes(root / "big", SynthConfig(seed=0, train=sizes["large"], val=sizes["small"],
                                                               size=64, num_classes=4), progress=False),
             "voc": generate_scenes(root / "voc", SynthConfig(seed=2, train=1, val=vgg_images, size=500,
                                                               aspect=500 / 375, num_classes=4), progress=False)}
    classes = ["disc", "square", "triangle", "star"]
    for name, backbone in (("tiny", "vgg_tiny"), ("vgg16", "vgg16")):
        torch.manual_seed(0)
        cls = build_classifier(backbone=backbone, num_classes=4, pooling="lse")
        save_checkpoint(root / f"cls_{name}.pt", classifier_checkpoint(cls, classes))
        torch.manual_seed(0)
        seg = build_segmenter("deeplab_largefov", num_classes=5, backbone=backbone)
        save_checkpoint(root / f"seg_{name}.pt", segmenter_checkpoint(seg, classes, input_size=None))
        paths[f"cls_{name}"], paths[f"seg_{name}"] = root / f"cls_{name}.pt", root / f"seg_{name}.pt"
    return paths


def per_image(big: Dict[str, Any], tiny: Dict[str, Any], n_big: int, n_tiny: int) -> float:
    return max(big["seconds"] - tiny["seconds"], 1e-9) / (n_big - n_tiny)


def hms(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def measure(work: Path, sizes: Dict[str, int], vgg_images: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    d = make_data(work, sizes, vgg_images)
    out: Dict[str, Any] = {"runs": [], "throughput": {}, "rss": {}}
    tiny, big, voc = (f"voc:{d[k]}" for k in ("tiny", "big", "voc"))

    def timed(name: str, argv: List[str], procs: int = 1) -> Dict[str, Any]:
        r = run(argv, procs)
        r["name"] = name
        out["runs"].append(r)
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['maxrss_mib']} MiB, load {r['load_before']}->{r['load_after']}",
              flush=True)
        return r

    cam = ["cam", "--batch-size", "16", "--device", "cpu"]
    seg = ["segment", "--batch-size", "16", "--device", "cpu", "--amp", "none"]
    n_large, n_small, n_tiny = sizes["large"], sizes["small"], sizes["tiny"]
    for procs in (1, 2):
        for label, extra in (("files", []), ("shards", ["--shards", "100"])):
            if label == "shards" and procs == 1:
                continue
            argv = [*cam, "--checkpoint", str(d["cls_tiny"]), *extra]
            small = timed(f"cam {label} {procs}p tiny", [*argv, "--data", tiny, "--split", "train", "--out",
                                                        str(work / f"cam_tiny_{label}_{procs}")], procs)
            large = timed(f"cam {label} {procs}p", [*argv, "--data", big, "--split", "train", "--out",
                                                    str(work / f"cam_train_{label}_{procs}")], procs)
            out["throughput"][f"cam_{label}_{procs}p"] = {"images": n_large, "seconds_per_image": per_image(
                large, small, n_large, n_tiny)}
        argv = [*seg, "--checkpoint", str(d["seg_tiny"])]
        small = timed(f"segment {procs}p tiny", [*argv, "--data", tiny, "--split", "train", "--out",
                                                 str(work / f"seg_tiny_{procs}")], procs)
        large = timed(f"segment {procs}p", [*argv, "--data", big, "--split", "train", "--out",
                                            str(work / f"seg_train_{procs}")], procs)
        out["throughput"][f"segment_{procs}p"] = {"images": n_large, "seconds_per_image": per_image(
            large, small, n_large, n_tiny)}
    # VGG16 at VOC size, one process: the tiny run (n_tiny 64 px images) is the start-up cost's estimate
    # only for the tiny model, so VGG16's own start-up is measured on one image.
    for kind, ckpt in (("cam", "cls_vgg16"), ("segment", "seg_vgg16")):
        base = [*(cam if kind == "cam" else seg), "--checkpoint", str(d[ckpt]), "--data", voc]
        one = timed(f"{kind} vgg16 1 image", [*base, "--split", "train", "--out", str(work / f"{kind}_vgg1")])
        many = timed(f"{kind} vgg16 {vgg_images} images", [*base, "--split", "val", "--out", str(work / f"{kind}_vggn")])
        out["throughput"][f"{kind}_vgg16_500x375_1p"] = {"images": vgg_images,
                                                        "seconds_per_image": per_image(many, one, vgg_images, 1)}
    # the benchmark's peak memory: 200 vs 2000 images, CAM files and shards
    small_cams = {"files": work / "bench_val_files", "shards": work / "bench_val_shards"}
    timed("cam files 1p val", [*cam, "--checkpoint", str(d["cls_tiny"]), "--data", big, "--split", "val",
                               "--out", str(small_cams["files"])])
    timed("cam shards 1p val", [*cam, "--checkpoint", str(d["cls_tiny"]), "--data", big, "--split", "val",
                                "--shards", "100", "--out", str(small_cams["shards"])])
    for label in ("files", "shards"):
        for split, cams, n in (("val", small_cams[label], n_small), ("train", work / f"cam_train_{label}_2", n_large)):
            r = timed(f"bench {label} {n}", ["bench", "--data", big, "--split", split, "--cams", str(cams),
                                             "--out", str(work / f"bench_{label}_{split}")])
            out["rss"][f"{label}_{n}"] = r["maxrss_mib"]
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(res: Dict[str, Any], sizes: Dict[str, int]) -> str:
    t, env = res["throughput"], res["environment"]
    lines = ["# Scale: inference over processes, projected to VOC, COCO and ImageNet", "",
             f"Measured by `{res['command']}` on {res['date']} ({env['cpus']} CPUs, no GPU, one OpenMP thread "
             f"per process, torch {env['torch']}); the whole experiment took {res['wall_seconds'] / 60:.1f} min. "
             f"Load average (other jobs on this shared machine) from {min(r['load_before'] for r in res['runs']):.1f} "
             f"to {max(r['load_after'] for r in res['runs']):.1f} during the runs: the rates below are this "
             "machine's under that load, not a clean benchmark.", "",
             "## Throughput here (CPU)", "",
             "Per-image cost = (wall time of N images - wall time of a tiny run) / (N - tiny), so process "
             "start, model load and the final JSON files are left out.", "",
             "| command | processes | images | s / image | images / s |", "|---|---:|---:|---:|---:|"]
    names = {"cam_files": "`wsl cam` (one file per output), 64 px, vgg_tiny",
             "cam_shards": "`wsl cam --shards 100`, 64 px, vgg_tiny",
             "segment": "`wsl segment`, 64 px, DeepLab-LargeFOV vgg_tiny",
             "cam_vgg16_500x375": "`wsl cam`, 500x375, VGG16",
             "segment_vgg16_500x375": "`wsl segment`, 500x375, DeepLab-LargeFOV VGG16"}
    for key, v in t.items():
        base, procs = key.rsplit("_", 1)
        lines.append(f"| {names[base]} | {procs[:-1]} | {v['images']} | {v['seconds_per_image']:.4f} | "
                     f"{1 / v['seconds_per_image']:.1f} |")
    for kind in ("cam_files", "segment"):
        one, two = t[f"{kind}_1p"]["seconds_per_image"], t[f"{kind}_2p"]["seconds_per_image"]
        lines.append("")
        lines.append(f"{names[kind]}: 2 processes run {one / two:.2f}x as fast as 1 ({100 * one / two / 2:.0f}% of "
                     "linear) on this 2-core machine shared with other jobs.")
    lines += ["", "## Projected wall time", "",
              "N images x the per-image cost measured here / devices: one process per device, perfect scaling "
              "(the ranks never talk while they work; one gather at the end), start-up left out. **No GPU rate "
              "is measured here** (no GPU on this machine): a \"device\" below is one process on this CPU, so "
              "these are CPU figures, not GPU ones. With a per-image cost measured on a GPU (this script run "
              "there) the same arithmetic gives the GPU projection. Image counts: VOC 2012 rounded to 10k "
              "(its detection trainval has 11,540), COCO 2014 train + val (123,287) rounded to 120k, ImageNet "
              "train 1,281,167.", ""]
    header = "| setting | " + " | ".join(f"{name}, {dev} device{'s' if dev > 1 else ''}"
                                          for name in DATASETS for dev in DEVICES) + " |"
    lines += [header, "|---|" + "---:|" * (len(DATASETS) * len(DEVICES))]
    for key in ("cam_files_1p", "segment_1p", "cam_vgg16_500x375_1p", "segment_vgg16_500x375_1p"):
        cost = t[key]["seconds_per_image"]
        cells = [hms(n * cost / dev) for n in DATASETS.values() for dev in DEVICES]
        lines.append(f"| {names[key.rsplit('_', 1)[0]]} | " + " | ".join(cells) + " |")
    rss = res["rss"]
    lines += ["", "## Benchmark memory", "",
              f"Peak RSS of `wsl bench --cams` (published protocol, thresholds 0:0.001:1, all metrics) over "
              f"{sizes['small']} and {sizes['large']} generated 64 px images:", "",
              f"| CAMs | {sizes['small']} images | {sizes['large']} images |", "|---|---:|---:|",
              f"| one `.npz` per image | {rss['files_' + str(sizes['small'])]} MiB | {rss['files_' + str(sizes['large'])]} MiB |",
              f"| tar shards of 100 images | {rss['shards_' + str(sizes['small'])]} MiB | "
              f"{rss['shards_' + str(sizes['large'])]} MiB |", "",
              "The CAMs stream through one image at a time; what grows with the images is the per-image "
              "rows the ranking metrics keep (classification and point-localization AP: a few numbers per "
              "image and class).", "",
              "## Every run", "", "| run | command | s | peak RSS MiB | load before | load after |",
              "|---|---|---:|---:|---:|---:|"]
    for r in res["runs"]:
        lines.append(f"| {r['name']} | `{r['command'][:90]}{'...' if len(r['command']) > 90 else ''}` | "
                     f"{r['seconds']} | {r['maxrss_mib']} | {r['load_before']} | {r['load_after']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the script runs")
    args = parser.parse_args(list(argv) or None)
    sizes = {"tiny": 8, "small": 24, "large": 48} if args.smoke else {"tiny": 20, "small": 200, "large": 2000}
    vgg_images = 2 if args.smoke else 6
    with tempfile.TemporaryDirectory(prefix="wsl-scale-") as tmp:
        res = measure(Path(tmp), sizes, vgg_images)
    res.update(command="python experiments/scale.py" + (" --smoke" if args.smoke else ""),
               date=time.strftime("%Y-%m-%d %H:%M"), sizes=sizes,
               environment={"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform()})
    from wsl.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(args.results / "scale.json", res)
    atomic_write_text(args.results / "scale.md", markdown(res, sizes))
    print(f"wrote {args.results / 'scale.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
