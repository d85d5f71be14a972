"""The results files: merging a partial run into an earlier one, the machine, speed.md.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Dict, Optional

import cv2
import torch

from speed_rows.glibc import GLIBC_TUNABLES
from speed_rows.settings import PHASES
from speed_rows.timing import peak_rss_mb


ROW_PHASE = {"1": "cam", "2": "rivals", "3": "train", "P": "precision", "4": "data", "5": "metrics", "M": "glibc",
             "G": "cuda"}  # row id prefix -> phase, for results written before rows named their phase


def row_phase(r: Dict[str, Any]) -> Optional[str]:
    return r.get("phase") or ROW_PHASE.get(r["id"][:1])


def merge_results(previous: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """``previous`` with the phases ``current`` measured replaced (rows, RSS, times, skip notes); the
    other phases keep their numbers, and ``runs`` says which command measured which phases."""
    fresh = set(current["phases"]) | {k for k in current["skipped"] if k in PHASES}
    order = {name: i for i, name in enumerate(PHASES)}
    rows = [r for r in previous["rows"] if row_phase(r) not in fresh] + current["rows"]
    rows.sort(key=lambda r: order.get(row_phase(r) or "", len(order)))  # stable within a phase
    runs = previous.get("runs") or [{"command": previous["command"], "phases": list(previous["phases"]),
                                     "load_start": previous["load_start"], "load_end": previous["load_end"]}]
    runs = [{**r, "phases": [ph for ph in r["phases"] if ph not in fresh]} for r in runs]
    runs = [r for r in runs if r["phases"]] + [{"command": current["command"], "phases": list(current["phases"]),
                                               "load_start": current["load_start"], "load_end": current["load_end"],
                                               "opencv_threads": current["machine"]["opencv_threads"]}]
    phases = {name: ph for name, ph in previous["phases"].items() if name not in fresh}
    phases.update(current["phases"])
    skipped = {k: v for k, v in previous["skipped"].items() if k not in fresh}
    skipped.update(current["skipped"])
    return {**current, "rows": rows, "phases": dict(sorted(phases.items(), key=lambda kv: order.get(kv[0], 99))),
            "skipped": skipped, "runs": runs}


def machine() -> Dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "opencv-python-headless", "grad-cam", "torchcam"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": any(f.startswith("amx") for f in flags), "avx512_bf16": "avx512_bf16" in flags,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}


def _fmt_time(st: Dict[str, Any]) -> str:
    v = st["median"]
    if st["unit"] == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.3g} {st['unit']}"


def markdown(result: Dict[str, Any]) -> str:
    m, st = result["machine"], result["settings"]
    runs = result.get("runs", [])
    provenance = ([f"Command: `{result['command']}` (OpenCV threads: {m.get('opencv_threads', 'not recorded')})", ""]
                  if len(runs) < 2 else
                  ["Merged from several runs (`--merge`), the load average given at their start and end "
                   "(torch threads: the command's `--threads`):", ""]
                  + [f"- `{r['command']}`: {', '.join(r['phases'])} (load {r['load_start']} -> {r['load_end']}; "
                     f"OpenCV threads: {r.get('opencv_threads', 'its default, not recorded')})"
                     for r in runs] + [""])
    lines = ["# Speed: wsl against its floor and its rivals", "", *provenance,
             f"Machine: {m['cpu']}, {m['cpus_usable']} usable of {m['cpus']} CPUs, torch {m['versions']['torch']} "
             f"({m['torch_threads']} threads, {m['cpu_capability']}, "
             f"AMX {'yes' if m['amx'] else 'no'}, "
             f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}), Python {m['python']}, CUDA: "
             f"{m['cuda'] or 'none'}. GLIBC_TUNABLES in the parent: `{m['GLIBC_TUNABLES'] or 'unset'}`.", "",
             ("Load average (1/5/15 min): see above" if len(runs) > 1 else
              f"Load average (1/5/15 min) at start {result['load_start']}, at end {result['load_end']}")
             + ": other processes shared the CPUs, so absolute times are inflated; the ratios compare "
             "interleaved runs under the same load.", "",
             f"Settings: {'SMOKE (tiny sizes, not a measurement)' if result['smoke'] else 'full'}; medians of "
             f"{st['repeats']} runs ({st['step_repeats']} for the training step, {st['heavy_repeats']} for "
             f"VGG16), {st['warmup']} warm-up run(s) excluded. Ratio = median(numerator) / median(denominator) "
             "of wall times; the CPU-time ratio is the same for this process's CPU time (steadier under load; "
             "left out where worker processes or a GPU do part of the work).", "",
             "| # | measurement | ratio | target | pass | CPU-time ratio | numerator (median) | denominator (median) "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        target = "-" if r["op"] is None else f"{r['op']} {r['target']:g}"
        ok = "-" if r["passed"] is None else ("PASS" if r["passed"] else "**FAIL**")
        cpu = "-" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.3f}"
        lines.append(f"| {r['id']} | {r['what']} | {r['ratio']:.3f} | {target} | {ok} | {cpu} | "
                     f"{r['num']['label']}: {_fmt_time(r['num'])} | {r['den']['label']}: {_fmt_time(r['den'])} | "
                     f"{r['note']} |")
    where = ("cumulative: all phases ran in one process" if result["in_process"]
             else "each phase in its own process")
    lines += ["", f"Peak RSS per phase ({where}; includes the interpreter and torch):", "",
              "| phase | peak RSS | wall time |", "|---|---|---|"]
    for name, ph in result["phases"].items():
        lines.append(f"| {name} | {ph['peak_rss_mb']:.0f} MB | {ph['wall_s']:.0f} s |")
    breakdown = {k: v for k, v in result["phases"].get("cam", {}).get("info", {}).items()}
    if breakdown:
        lines += ["", "Where the CAM export time goes (medians, same maps):", "",
                  "| model | " + " | ".join(next(iter(breakdown.values()))["breakdown_s"]) + " |",
                  "|---|" + "---|" * len(next(iter(breakdown.values()))["breakdown_s"])]
        for key, info in breakdown.items():
            lines.append(f"| {info['spec']['label']} | " + " | ".join(
                f"{v['median'] * 1e3:.1f} ms" for v in info["breakdown_s"].values()) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"
