"""The benchmark loop: stream a dataset once, feed every metric, collect and write the results."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from wsl.bench.metrics import METRIC_ORDER, METRICS
from wsl.bench.record import BenchSettings, ImageRecord
from wsl.bench.report import write_report
from wsl.bench.sources import CamItem
from wsl.cam.files import CamMaps
from wsl.errors import DataError
from wsl.metrics.localization import check_thresholds
from wsl.utils import dist, job

logger = logging.getLogger(__name__)


def _has_masks(dataset) -> bool:
    """VOC-style datasets name mask files; COCO rasterises polygons on demand, so ask for one."""
    if any(a.mask_path is not None for a in dataset.annotations):
        return True
    return len(dataset) > 0 and dataset.load_mask(0) is not None


def _select_metrics(metrics: Optional[Sequence[str]], dataset) -> List[str]:
    has = {"boxes": any(len(a.boxes) for a in dataset.annotations), "masks": _has_masks(dataset)}
    names = [n for n in METRIC_ORDER if n in METRICS] + [n for n in METRICS.names() if n not in METRIC_ORDER]
    if metrics is None:
        chosen = [n for n in names if all(has[r] for r in METRICS.get(n).requires)]
        skipped = sorted(set(names) - set(chosen))
        if skipped:
            logger.info("skipping %s: the dataset has no %s", ", ".join(skipped),
                        " or ".join(r for r in ("boxes", "masks") if not has[r]))
        return chosen
    for n in metrics:
        METRICS.get(n)  # unknown names raise with the known ones
        missing = [r for r in METRICS.get(n).requires if not has[r]]
        if missing:
            raise DataError(f"metric {n!r} needs {' and '.join(missing)}, which {dataset!r} does not have")
    return [n for n in names if n in set(metrics)]


def _check_item(item: Any, ann, num_classes: int, mask: Optional[np.ndarray]) -> CamItem:
    if not isinstance(item, tuple) or len(item) != 2:
        raise DataError(f"image {ann.id!r}: a CAM source must yield (cams, scores) pairs")
    cams, scores = item
    if not isinstance(cams, CamMaps):  # a wsl-cams/2 file's maps stay undecoded until a metric reads them
        cams = np.asarray(cams, dtype=np.float32)
    if len(cams.shape) != 3 or cams.shape[0] != num_classes:
        raise DataError(f"image {ann.id!r}: cams have shape {tuple(cams.shape)}, expected ({num_classes}, H, W)")
    hw = tuple(cams.shape[1:])
    size = tuple(ann.size) if ann.size is not None else (mask.shape if mask is not None else None)
    if size is not None and hw != tuple(size):
        raise DataError(f"image {ann.id!r}: cams are {hw[0]}x{hw[1]} but the image is {size[0]}x{size[1]}; "
                        "CAMs must be at image resolution")
    if mask is not None and mask.shape != hw:
        raise DataError(f"{ann.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but the CAMs of image "
                        f"{ann.id!r} are {hw[0]}x{hw[1]}")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (num_classes,) or not np.isfinite(scores).all():
            raise DataError(f"image {ann.id!r}: scores must be {num_classes} finite numbers, got shape "
                            f"{scores.shape}{'' if np.isfinite(scores).all() else ' with NaN/inf'}")
    return cams, scores


def evaluate(source, dataset, *, metrics: Optional[Sequence[str]] = None,
             thresholds: Optional[Sequence[float]] = None, protocol: Optional[str] = None, out_dir=None,
             settings: Optional[BenchSettings] = None, progress: bool = False,
             info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score every image of ``dataset`` with the CAMs of ``source`` and return the flat metrics dict.

    ``source`` yields ``(cams, scores)`` per dataset index, in order: :class:`NpzCamSource`,
    :class:`ModelCamSource` (anything with ``iter_cams(dataset)``) or any iterable of pairs; a source
    with ``iter_part(dataset, rank, world_size)`` yields ``(index, item)`` pairs of a share instead, in
    any order (:class:`ShardCamSource` streams its shards so). Under ``torchrun`` every rank calls this
    with the same arguments: each scores its share and rank 0 merges the meters (per-image entries go
    back in image order), so the numbers are one process's; every rank returns them, rank 0 writes.
    ``metrics``: names from ``METRICS`` (default: all the dataset supports). ``thresholds``: the CAM
    threshold sweep (default ``0:0.001:1``, wsolevaluation's), overriding ``settings.thresholds``;
    ``protocol``: ``"published"`` (default) or ``"wsl-exact"``, overriding ``settings.protocol``;
    ``settings``: the other protocol knobs (:class:`BenchSettings`). The dict holds the metrics,
    ``num_images``, ``protocol``, ``method`` (the CAM method, when the source has a ``method``) and
    ``per_class/METRIC/CLASS`` entries. With ``out_dir`` the results are
    written there (metrics.json, report.md, config.json and plots; see :func:`write_report`), with
    ``info`` (e.g. the command line) added to config.json. ``progress`` shows a tqdm bar.
    """
    settings = settings or BenchSettings()
    if thresholds is not None:
        settings = replace(settings, thresholds=tuple(check_thresholds(thresholds).tolist()))
    if protocol is not None:
        settings = replace(settings, protocol=protocol)
    classes = list(dataset.classes)
    names = _select_metrics(metrics, dataset)
    meters = [METRICS.build(n, classes=classes, settings=settings) for n in names]
    want_masks = any(m.uses_masks for m in meters)
    t_source = t_score = 0.0
    bad_maps = 0
    start = time.perf_counter()
    anns = dataset.annotations
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(range(rank, len(dataset), world)), desc="bench", unit="img")  # about this rank's share
    counted = np.zeros(len(dataset), dtype=np.int32)
    stream = _indexed(source, dataset, rank, world)
    while True:
        t0 = time.perf_counter()
        try:
            i, item = next(stream)
        except StopIteration:
            break
        ann = anns[i]
        mask = dataset.load_mask(i) if want_masks else None
        t1 = time.perf_counter()
        cams, scores = _check_item(item, ann, len(classes), mask)
        if not (cams.all_finite() if isinstance(cams, CamMaps) else np.isfinite(cams).all()):
            bad_maps += 1
        rec = ImageRecord(i, ann, cams, scores, mask, settings)
        for m in meters:
            m.update(rec)
        counted[i] += 1
        t_source, t_score = t_source + t1 - t0, t_score + time.perf_counter() - t1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:  # rank 0 merges every rank's meters (their per-image entries carry the image index)
        parts = job.gather({"meters": meters, "counted": np.flatnonzero(counted), "bad_maps": bad_maps,
                            "source_s": t_source, "scoring_s": t_score}, "gathering the benchmark's records")
        if rank != 0:
            flat = job.broadcast(None, "waiting for rank 0's results")
            if isinstance(flat, str):
                raise job.EchoedError(flat)
            return flat
        meters = parts[0]["meters"]
        counted = np.zeros(len(dataset), dtype=np.int32)
        for part in parts:
            counted[part["counted"]] += 1
        for part in parts[1:]:
            for mine, theirs in zip(meters, part["meters"]):
                mine.merge(theirs)
        bad_maps = sum(part["bad_maps"] for part in parts)
        t_source, t_score = max(q["source_s"] for q in parts), max(q["scoring_s"] for q in parts)
    missing, twice = np.flatnonzero(counted == 0), np.flatnonzero(counted > 1)
    if len(missing) or len(twice):
        first = anns[int(missing[0] if len(missing) else twice[0])].id
        error = DataError(f"the CAM source {'has no CAMs for' if len(missing) else 'gave twice the CAMs of'} image "
                          f"{first!r}{f' ({len(missing)} images without CAMs)' if len(missing) else ''}; it must "
                          f"give one item per image of the dataset ({len(dataset)})")
        if world > 1:
            job.broadcast(str(error), "sending the error to every rank")
        raise error
    if bad_maps:
        logger.warning("%d image(s) had NaN/inf in their CAMs; those maps count as flat (no localization)", bad_maps)
    results = {n: m.result() for n, m in zip(names, meters)}
    flat: Dict[str, Any] = {}
    for r in results.values():
        flat.update(r.values)
    flat["num_images"] = len(dataset)
    flat["protocol"] = settings.protocol
    method = getattr(source, "method", None)  # the CAM method, when the source knows it (wsl.cam.methods)
    if method:
        flat["method"] = method
    for r in results.values():
        for metric, values in r.per_class.items():
            for cname, v in values.items():
                flat[f"per_class/{metric}/{cname}"] = v
    timing = {"total_s": time.perf_counter() - start, "source_s": t_source, "scoring_s": t_score}
    logger.info("scored %d images in %.1f s (%.1f s reading/computing CAMs and masks, %.1f s metrics)",
                len(dataset), timing["total_s"], t_source, t_score)
    if out_dir is not None:
        write_report(out_dir, flat, results, classes, settings=settings, timing=timing,
                     info={"source": source.describe() if hasattr(source, "describe") else type(source).__name__,
                           **({"method": method} if method else {}),
                           "dataset": repr(dataset), "metrics": names, "world_size": world, **(info or {})})
    if world > 1:
        job.broadcast(flat, "sending the results to every rank")
    return flat


def _indexed(source, dataset, rank: int, world: int) -> Iterator[Tuple[int, Any]]:
    """``(index, item)`` of this process's share: a source's own ``iter_part`` (its batches or shards
    dealt to the ranks in turn; any order), else its ``iter_cams`` or the iterable itself, in dataset
    order, every ``world``-th image from ``rank``."""
    if hasattr(source, "iter_part"):
        yield from source.iter_part(dataset, rank, world)
        return
    stream = iter(source.iter_cams(dataset) if hasattr(source, "iter_cams") else source)
    for i in range(len(dataset)):
        try:
            item = next(stream)
        except StopIteration:
            raise DataError(f"the CAM source ended after {i} images but the dataset has {len(dataset)}") from None
        if i % world == rank:
            yield i, item
