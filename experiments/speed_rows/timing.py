"""How every figure of experiments/speed.py is taken: interleaved repeats (A B, B A, ...) after warm-up
runs, medians of wall and process CPU time, one table row per ratio, peak RSS, thread settings.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import cv2
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], Any]], *, repeats: int, warmup: int,
                device: torch.device = torch.device("cpu")) -> Dict[str, Dict[str, List[float]]]:
    """Wall and process CPU times of ``repeats`` calls of each function, after ``warmup`` untimed calls
    of each. The order alternates every round (A B, B A, ...) so a load change hits all alike. CPU time
    (this process's threads, not DataLoader workers) is the steadier measure on a shared machine: time
    spent waiting for a core does not count."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, Dict[str, List[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def stats(times: Dict[str, List[float]], scale: float = 1.0, cpu: bool = True) -> Dict[str, Any]:
    """Median, quartiles and raw values of the wall times ``* scale``, and the median CPU time (left
    out with ``cpu=False``: where worker processes or a GPU do the work, it measures nothing)."""
    t = sorted(x * scale for x in times["wall"])
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
    out = {"median": statistics.median(t), "min": t[0], "q1": q[0], "q3": q[2], "n": len(t), "values": t}
    out["cpu_median"] = statistics.median(x * scale for x in times["cpu"]) if cpu else None
    return out


def row(rid: str, what: str, num: str, num_stats: Dict[str, Any], den: str, den_stats: Dict[str, Any],
        op: Optional[str] = None, target: Optional[float] = None, unit: str = "s", note: str = "") -> Dict[str, Any]:
    """One line of the results table: ``ratio = median(num) / median(den)`` of wall times, checked against
    ``op target``; ``cpu_ratio`` is the same ratio of CPU times where both sides have one."""
    ratio = num_stats["median"] / den_stats["median"]
    passed = None if op is None else (ratio <= target if op == "<=" else ratio >= target)
    cpu_ratio = (num_stats["cpu_median"] / den_stats["cpu_median"]
                 if num_stats.get("cpu_median") and den_stats.get("cpu_median") else None)
    return {"id": rid, "what": what, "ratio": ratio, "op": op, "target": target, "passed": passed,
            "cpu_ratio": cpu_ratio, "num": {"label": num, "unit": unit, **num_stats},
            "den": {"label": den, "unit": unit, **den_stats}, "note": note}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the address space, which ``exec`` replaces; the
    ``ru_maxrss`` fallback survives ``exec`` on Linux, so a child would report its parent's peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def set_threads(n: int) -> None:
    """torch's intra-op threads and OpenCV's (the CAM post-processing runs in OpenCV), so that a ratio
    compares work done with the same number of threads."""
    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def with_threads(n: int, fn: Callable[[], Any]) -> Any:
    previous = torch.get_num_threads(), cv2.getNumThreads()
    set_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous[0])
        cv2.setNumThreads(previous[1])


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
