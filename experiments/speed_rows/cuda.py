"""Rows G: phases cam, rivals and train on the GPU under bf16 autocast (only when CUDA is available).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from speed_rows.cam import phase_cam
from speed_rows.report import machine
from speed_rows.rivals import phase_rivals
from speed_rows.settings import Settings
from speed_rows.train import phase_train


def phase_cuda(s: Settings) -> Dict[str, Any]:
    """Phases 1-3 on the GPU under bf16 autocast, with VGG16 at 448 px (the paper setup's size)."""
    if not torch.cuda.is_available():
        return {"rows": [], "info": {}, "skipped": {"cuda": "CUDA is not available on this machine"}}
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    out = {"rows": [], "info": {}, "skipped": {}}
    for name, fn in (("cam", phase_cam), ("rivals", phase_rivals), ("train", phase_train)):
        torch.cuda.reset_peak_memory_stats(dev)
        res = fn(s, dev, dtype)
        for r in res["rows"]:
            r["id"] = "G" + r["id"]
            r["what"] = "CUDA bf16: " + r["what"]
        out["rows"] += res["rows"]
        out["info"][name] = {**res.get("info", {}),
                             "max_memory_allocated_mb": torch.cuda.max_memory_allocated(dev) / 2**20}
        out["skipped"].update(res.get("skipped", {}))
    out["info"]["device_name"] = torch.cuda.get_device_name(dev)
    return out
