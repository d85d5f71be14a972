"""Speed: the toolkit against its floor (a plain forward pass, a bare torch loop) and its rivals.

Every number is a ratio of medians of repeated runs. Warm-up runs are excluded, and the two sides of
a ratio are timed alternately (A B B A ...), so load from other processes on a shared machine hits
both alike; process CPU times are recorded beside wall times for the same reason. Each phase runs in
its own child process, so its peak RSS is its own (freed memory often stays in the heap).

1. CAM export cost: one batch through ``CAMExtractor.class_maps`` + ``wsl.cam.export.localize`` (the used
   classes' maps upsampled, argmax points, local maxima, boxes and pseudo-masks: what ``wsl cam`` does
   per batch, ``ExportOptions`` defaults, files aside) / a plain forward pass of the same model on the
   same batch. Target <= 1.10 (1a-1c); at 20, 80 and 1000 classes on the demo model and VGG16 at 448 px
   <= 1.05 (1d, 1e); 1f: one image's CAM file (every class at image resolution) / its forward pass.
   The batch is channels-last, as ``CAMExtractor`` feeds it by default, for the forward pass and the
   rivals too.
2. Post-hoc rivals on the same VGG16 and batch, maps of every positive class of every image /
   our whole CAM pipeline. Target >= 2. (pytorch-grad-cam and torchcam are optional.)
3. A ``wsl train`` step (``Trainer._step``: device move, autocast, NaN guard, scaler, scheduler) and a
   whole epoch loop (sampler, seeded per-sample RNG, collate, progress bar) / a bare torch loop
   (forward, BCE, backward, SGD) on the same model and data: bare time / engine time >= 0.95; in fp32
   NCHW (3a, 3b) and at ``wsl train``'s defaults, amp=auto + channels_last (3c); 3d: what torch's
   NaN-filling of new tensors in deterministic mode (switched off by the engine) would cost.
4. Data loading (JPEG decode + the demo's augmentation, through the engine's DataLoader with workers)
   img/s / training img/s of the demo model. Target >= 3.
5. Benchmark threshold sweeps (``wsl.metrics.box_sweep``, ``PixelAP``) / the naive per-threshold loops
   of ``tests/reference_metrics.py``, identical values asserted. Target >= 10.

C. The dense CRF (``wsl.cam.DenseCRF``) / pydensecrf2 (Krähenbühl's C++ code, the optional extra
   ``crf-reference``; rows skipped without it) on a 500x375 photograph with 21, 3 and 2 labels, torch on
   one thread and on all usable cores, the label agreement and the load average beside each ratio.
   Target <= 1. Also the CRF work of the demo's pseudo-mask stage, now / before issue 17 (that code is
   read from git).
B. ``wsl bench``'s per-image pseudo-mask mIoU update / decoding the image's .npz (target <= 1), and
   the torch route it replaced / the numpy one; reading an ImageNet-size ``wsl-cams/2`` file (1000 classes)
   as ``wsl bench`` does, the tagged class's map only / decoding every class; ``wsl bench --checkpoint``
   on a 1000-class model, forward + the tagged maps / forward + every class's map; the whole benchmark per
   image (every metric) and its MaxBoxAcc alone / decoding the image's .npz (no target).

Also: channels_last and bf16 autocast, ``GLIBC_TUNABLES`` (child processes with and without), peak RSS
per phase, and a CUDA section (448 px, bf16 autocast) that runs when CUDA is available.

Layout: this file is the command line; each row family is a module of ``experiments/speed_rows/``
(``cam``, ``rivals``, ``train``, ``precision``, ``data``, ``metrics``, ``crf``, ``bench``, ``glibc``, ``cuda``),
measured with the shared helpers of ``speed_rows/timing.py`` on the inputs of ``speed_rows/settings.py``;
``speed_rows/report.py`` writes the results.

    python experiments/speed.py                                # full run: experiments/results/speed.{md,json}
    python experiments/speed.py --threads 1                     # steadier on a CPU shared with other jobs
    python experiments/speed.py --smoke --results /tmp/speed    # tiny sizes, in-process: proves it works
    python experiments/speed.py --only cam metrics --repeats 3  # a subset
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed_rows/ beside this file, however it is started

from speed_rows.bench import phase_bench  # noqa: E402
from speed_rows.cam import phase_cam, phase_classes  # noqa: E402
from speed_rows.child import in_child  # noqa: E402
from speed_rows.crf import phase_crf  # noqa: E402
from speed_rows.cuda import phase_cuda  # noqa: E402
from speed_rows.data import phase_data  # noqa: E402
from speed_rows.glibc import glibc_work, phase_glibc  # noqa: E402
from speed_rows.metrics import phase_metrics  # noqa: E402
from speed_rows.precision import phase_precision  # noqa: E402
from speed_rows.report import machine, markdown, merge_results, row_phase  # noqa: E402,F401 (tests use row_phase)
from speed_rows.rivals import phase_rivals  # noqa: E402
from speed_rows.settings import FULL, PHASES, REPO, SMOKE, Settings  # noqa: E402
from speed_rows.timing import cpu_seconds, peak_rss_mb, set_threads  # noqa: E402
from speed_rows.train import phase_train  # noqa: E402
from wsl.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger("speed")


def run_phase(name: str, s: Settings, args: argparse.Namespace) -> Dict[str, Any]:
    cpu = torch.device("cpu")
    phases: Dict[str, Callable[[], Dict[str, Any]]] = {
        "cam": lambda: phase_cam(s, cpu), "classes": lambda: phase_classes(s, cpu),
        "rivals": lambda: phase_rivals(s, cpu), "train": lambda: phase_train(s, cpu),
        "precision": lambda: phase_precision(s, cpu), "data": lambda: phase_data(s, cpu, args.scenes),
        "metrics": lambda: phase_metrics(s), "crf": lambda: phase_crf(s), "bench": lambda: phase_bench(s),
        "glibc-work": lambda: glibc_work(s, cpu), "cuda": lambda: phase_cuda(s)}
    return phases[name]()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and one repeat: checks that the script works, measures nothing")
    p.add_argument("--only", nargs="+", choices=PHASES, help="run these phases only")
    p.add_argument("--skip", nargs="+", choices=PHASES, default=[], help="leave these phases out")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="cuda/auto add the CUDA section when CUDA is available (skipped otherwise)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default 7, training steps 2N+1; smoke 1)")
    p.add_argument("--heavy-repeats", type=int, help="timed runs of VGG16 measurements (default 3; smoke 1)")
    p.add_argument("--scenes", type=Path, help="existing generated scenes for the data phase (default: generate)")
    p.add_argument("--in-process", action="store_true",
                   help="run phases in this process (peak RSS is then cumulative; default with --smoke)")
    p.add_argument("--threads", type=int, help="torch's intra-op threads and OpenCV's (default: their choice; smoke 1)")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results", help="output directory")
    p.add_argument("--merge", action="store_true",
                   help="replace only the phases run now in an existing RESULTS/speed.json (e.g. with --only), "
                        "keeping the others and noting which command measured what")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = SMOKE if args.smoke else FULL
    if args.repeats:
        s = dataclasses.replace(s, repeats=args.repeats, step_repeats=2 * args.repeats + 1)
    if args.heavy_repeats:
        s = dataclasses.replace(s, heavy_repeats=args.heavy_repeats)
    if args.smoke:
        args.in_process = True
        args.threads = args.threads or 1
    if args.threads:
        set_threads(args.threads)

    if args.child:
        t0 = time.perf_counter()
        result = run_phase(args.child, s, args)
        atomic_write_json(args.child_out, {"result": result, "peak_rss_mb": peak_rss_mb(),
                                           "wall_s": time.perf_counter() - t0})
        return 0

    phases = [ph for ph in (args.only or PHASES) if ph not in args.skip]
    if args.device == "cpu" and "cuda" in phases:
        phases.remove("cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda: CUDA is not available here, the CUDA section is skipped")
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()),
                          *(sys.argv[1:] if argv is None else argv)])
    result: Dict[str, Any] = {"command": command,
                              "smoke": args.smoke, "in_process": args.in_process, "machine": machine(),
                              "settings": json.loads(json.dumps(dataclasses.asdict(s))),
                              "load_start": [round(x, 2) for x in os.getloadavg()], "rows": [], "phases": {},
                              "skipped": {}}
    failed = []
    for name in phases:
        log.info("phase %s ...", name)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            if name == "glibc":
                res, rss = phase_glibc(s, args), peak_rss_mb()
            elif args.in_process:
                res, rss = run_phase(name, s, args), peak_rss_mb()
            else:
                child = in_child(args, name)
                res, rss = child["result"], child["peak_rss_mb"]
        except Exception as e:  # keep the other phases' results; the exit code reports the failure
            log.exception("phase %s failed", name)
            failed.append(name)
            result["skipped"][name] = f"FAILED: {type(e).__name__}: {e}"
            continue
        result["rows"] += [{**r, "phase": name} for r in res["rows"]]
        result["skipped"].update(res.get("skipped", {}))
        result["phases"][name] = {"peak_rss_mb": rss, "wall_s": time.perf_counter() - t0,
                                  "cpu_s": cpu_seconds() - c0,
                                  "info": res.get("info", {})}
        for r in res["rows"]:
            log.info("  %s %s: %.3f %s", r["id"], r["what"], r["ratio"],
                     "" if r["op"] is None else f"(target {r['op']} {r['target']:g}: "
                     f"{'pass' if r['passed'] else 'FAIL'})")
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    previous = args.results / "speed.json"
    if args.merge and previous.is_file():
        result = merge_results(json.loads(previous.read_text(encoding="utf-8")), result)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "speed.json", result)
    atomic_write_text(args.results / "speed.md", markdown(result))
    log.info("wrote %s", args.results / "speed.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
