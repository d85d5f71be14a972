"""Score class activation maps from a model or from ``.npz`` files against a dataset's boxes and masks.

- :mod:`wsl.bench.sources`: where CAMs come from (:class:`NpzCamSource`, :class:`ShardCamSource` for
  ``wsl cam --shards`` outputs, :class:`ModelCamSource`);
- :mod:`wsl.bench.record`: protocol knobs (:class:`BenchSettings`; ``protocol="published"``, the
  default, reproduces wsolevaluation's and TorchRay's numbers, ``"wsl-exact"`` keeps exact geometry)
  and the per-image :class:`ImageRecord`, which caches the work metrics share (normalised maps,
  threshold sweeps);
- :mod:`wsl.bench.metrics`: the registered metrics (``METRICS``); protocols and citations live with
  the formulas in :mod:`wsl.metrics`;
- :mod:`wsl.bench.scoring`: :func:`evaluate` streams the dataset once and feeds every metric;
- :mod:`wsl.bench.report`: metrics.json, config.json, report.md, plots, and runs side by side.

Example::

    from wsl.bench import NpzCamSource, evaluate
    metrics = evaluate(NpzCamSource("runs/cam/cams", dataset.classes), dataset, out_dir="runs/bench")
"""
from wsl.bench.metrics import METRIC_ORDER, METRICS, Metric, MetricResult
from wsl.bench.record import CORLOC_THRESHOLD, MASK_THRESHOLD, RANK_BY, BenchSettings, ImageRecord
from wsl.bench.report import PROTOCOL_SUMMARY, PROTOCOLS, compare_runs, load_run, write_report
from wsl.bench.scoring import evaluate
from wsl.bench.sources import (CamItem, ModelCamSource, NpzCamSource, ShardCamSource, cam_file_stem, cam_files_source,
                                read_npz_classes)
from wsl.metrics.localization import DEFAULT_PROTOCOL, PROTOCOL_NAMES

__all__ = [
    "METRICS", "METRIC_ORDER", "Metric", "MetricResult", "BenchSettings", "ImageRecord", "RANK_BY",
    "CORLOC_THRESHOLD", "MASK_THRESHOLD", "DEFAULT_PROTOCOL", "PROTOCOL_NAMES", "PROTOCOL_SUMMARY", "PROTOCOLS",
    "compare_runs", "load_run", "write_report", "evaluate",
    "CamItem", "ModelCamSource", "NpzCamSource", "ShardCamSource", "cam_file_stem", "cam_files_source",
    "read_npz_classes",
]
