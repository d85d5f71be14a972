"""The stage records of a pipeline output directory: which stages there are, which files mean "done",
and how a stage's ``stage.json`` is read back.

:mod:`wsl.pipeline` writes these records and :mod:`wsl.report` reads them; both import them from here,
so the report can be rebuilt from a run directory without importing the pipeline (the dependency goes
one way: ``pipeline -> report -> stages``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from wsl.utils.io import PathLike

STAGES = ("scenes", "classifier", "cams", "bench", "pooling", "pseudo_masks", "segmenter", "segment", "report")
#: Outputs (relative to the output directory) whose presence, with ``<stage>/stage.json``, means
#: "complete". The report is the exception to "everything under <stage>/": it is the run's front page.
OUTPUTS = {
    "scenes": ("scenes/synth.json",), "classifier": ("classifier/last.pt", "classifier/metrics.jsonl"),
    "cams": ("cams/manifest.json", "cams/localization.json"), "bench": ("bench/metrics.json",),
    "pooling": ("pooling/pooling_heads.json",), "pseudo_masks": ("pseudo_masks/manifest.json",),
    "segmenter": ("segmenter/last.pt", "segmenter/metrics.jsonl"), "segment": ("segment/manifest.json",),
    "report": ("report.md", "report.html"),
}
#: A stage's record, written last: wall and CPU seconds, load average, a summary of its results.
STAGE_FILE = "stage.json"


def stage_complete(out_dir: PathLike, stage: str) -> bool:
    """Whether ``out_dir/<stage>`` holds a finished stage (``stage.json`` and its main outputs)."""
    out = Path(out_dir)
    return (out / stage / STAGE_FILE).is_file() and all((out / f).exists() for f in OUTPUTS[stage])


def read_stage(out_dir: PathLike, stage: str) -> Optional[Dict[str, Any]]:
    """The ``stage.json`` record of a finished stage (None when it has none)."""
    path = Path(out_dir) / stage / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # torn by a kill: the stage counts as incomplete


__all__ = ["STAGES", "OUTPUTS", "STAGE_FILE", "stage_complete", "read_stage"]
