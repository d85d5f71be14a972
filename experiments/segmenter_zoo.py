"""Every registered segmenter on the demo's scenes: the zoo stages of ``experiments/segmenter.py``.

For each name in ``wsl.models.SEGMENTERS`` (CPU-sized, :data:`ZOO`), on the scenes, classifier and CRF
pseudo-masks that ``segmenter.py`` made:

1. train on the CRF pseudo-masks (the demo's masks) with the demo's segmenter config
   (``wsl.pipeline.demo_config().segmenter``: AdamW, poly, 128 px crops, backbone started from the
   classifier where it is the classifier's vgg_tiny) for ``epochs`` epochs, once per learning rate in
   :data:`LR_TRIES` (default: the demo's lr only); the lr with the best one-scale val mIoU is kept;
2. train the same configuration on the ground-truth masks (the upper bound);
3. score both final checkpoints (``last.pt``, as the pipeline uses) on val with
   ``wsl.segment.segment_dataset``: one scale, and 3 scales + flip + the dense CRF (as ``make demo``);
4. measure inference speed (images/s, batches of 16 val images at 128 px, float32) and peak memory;
5. on a 4000x3000 mosaic of val images, time and measure whole-image against tiled inference
   (:data:`BIG_IMAGE_MODELS`, ``wsl.segment.Segmenter(tile=...)``).

Every training and every measurement runs in its own spawned process, whose peak resident memory
(``VmHWM``) is recorded: no model's memory is measured on top of another's, and the 1-minute load
average is sampled during training (the 2 cores are shared with other jobs).
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.cam.crf import DenseCRF
from wsl.data.spec import build_dataset
from wsl.models import SEGMENTERS
from wsl.segment import Segmenter, load_for_inference, segment_dataset
from wsl.train.config import with_overrides
from wsl.train.segmenter import SegTrainConfig, train_segmenter
from wsl.utils.io import atomic_write_json, read_jsonl

log = logging.getLogger("experiments.segmenter_zoo")

#: Epochs of every zoo model except :data:`ZOO`'s own ``schedule.epochs``: fewer than the demo's 24 so
#: that 20 trainings fit the hour the experiment may take on the shared 2-core machine.
ZOO_EPOCHS = 6
#: deeplabv3_resnet50 exists only on ResNet-50 (40M parameters, ~60x the vgg_tiny models' training
#: step); from scratch, since no ImageNet weights can be downloaded here.
RESNET50_EPOCHS = 2

#: Overrides of the demo's segmenter config per registered segmenter (``model.name`` is the key).
#: The demo's backbone is the classifier's vgg_tiny, started from its weights; each builder's
#: vgg_tiny defaults are its CPU-sized variant (rates and widths scaled to 128 px scenes).
ZOO: Dict[str, Dict[str, Any]] = {
    "fcn32s": {}, "fcn16s": {}, "fcn8s": {},
    "deconvnet": {}, "deconvnet_shortcut": {},
    # vgg_tiny as the encoder. base_channels sets only the stride-1 level, where vgg_tiny has no tap:
    # 16 like vgg_tiny's first convolutions instead of the paper's 64 (4x less full-resolution memory).
    "unet": {"model.options": {"base_channels": 16}},
    "deeplab_largefov": {}, "deeplab_aspp": {}, "deeplabv3plus": {},
    "deeplabv3_resnet50": {"model.backbone": "resnet50", "model.backbone_weights": None,
                           "schedule.epochs": RESNET50_EPOCHS},
}
#: Learning rates tried on the pseudo-masks (default: the demo's 1e-3 alone), with why.
#: DeconvNets: before issue 14 both predicted background everywhere at 1e-3 after 6 epochs (12.4 val mIoU)
#: and deconvnet at 1e-2 too: their classifier, initialised with the paper's std 0.01, reads 16 BatchNorm +
#: ReLU maps, and Adam kept its foreground rows alike (DeconvNet.reset_parameters says why). It now starts
#: LeCun-normal; both rates are still tried, as for the other models whose classifier reads BatchNorm + ReLU.
#: deeplabv3plus (vgg_tiny): at 1e-3 trained on the ground truth it never predicted triangle, star or cross
#: in 6 epochs (49.2 val mIoU, below its 67.1 on pseudo-masks); its classifier also reads BatchNorm + ReLU
#: features. A one-off check (74 steps on the ground truth, not recorded elsewhere): loss 0.17 at lr 1e-2, 0.23 at 3e-3, 0.35 at 1e-3.
LR_TRIES: Dict[str, Tuple[float, ...]] = {"deconvnet": (1e-3, 1e-2), "deconvnet_shortcut": (1e-3, 1e-2),
                                          "deeplabv3plus": (1e-3, 1e-2)}
#: Registered names that are presets of a ZOO model (the same network on its paper backbone), not trained
#: here: deeplabv3plus_resnet50 is deeplabv3plus on ResNet-50, as costly as deeplabv3_resnet50.
PRESETS: Dict[str, str] = {"deeplabv3plus_resnet50": "deeplabv3plus"}
#: Models timed on the 4000x3000 image, whole and in tiles of BIG_TILE px (overlap: their receptive margin).
BIG_IMAGE_MODELS = ("deeplab_largefov", "unet")
BIG_SIZE = (3000, 4000)  # H, W
BIG_TILE = 512
#: Test-time options scored for every model: one scale, and what `make demo` runs (3 scales + flip + CRF).
TEST_TIME: Dict[str, Dict[str, Any]] = {
    "single_scale": {}, "multiscale_flip_crf": {"scales": (0.75, 1.0, 1.25), "flip": True, "crf": True}}


# ------------------------------------------------------------------------------------ child processes
def _status_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _child(send: Any, fn: Callable[..., Dict[str, Any]], args: Tuple[Any, ...], threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    try:
        out = fn(*args)
        out["peak_rss_mb"] = _status_mb("VmHWM")
        send.send((True, out))
    except BaseException:  # the parent re-raises it with the traceback
        send.send((False, traceback.format_exc()))
    finally:
        send.close()


def in_child(fn: Callable[..., Dict[str, Any]], *args: Any) -> Dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process: its result plus ``peak_rss_mb``, that process's peak
    resident memory (its DataLoader workers not included). It uses as many torch threads as this process."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, torch.get_num_threads()))
    proc.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, "the process ended without a result (killed, e.g. out of memory?)"
    proc.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its child process (exit code {proc.exitcode}):\n{value}")
    return value


class LoadSampler:
    """Mean of the 1-minute load average sampled every ``every`` seconds while the block runs."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples, self._stop = every, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return round(statistics.fmean(self.samples), 2)


def _train(cfg: SegTrainConfig, out: str, overwrite: bool) -> Dict[str, Any]:
    # Quiet: no progress bars or epoch lines in the experiment's log (metrics.jsonl holds every epoch).
    logging.getLogger("wsl").setLevel(logging.WARNING)
    with LoadSampler() as load:
        t0 = time.perf_counter()
        train_segmenter(cfg, out, overwrite=overwrite)
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "mean_load": load.mean}


def _speed(checkpoint: str, spec: str, batch: int = 16, min_seconds: float = 5.0) -> Dict[str, Any]:
    """Images/s of one-scale float32 inference on ``batch`` val images (median of repeats after one
    warm-up), the parameter count and the resident memory before the first forward pass."""
    model, classes, size = load_for_inference(checkpoint)
    val = build_dataset(spec, "val", classes=classes)
    images = torch.stack([val[i]["image"] for i in range(batch)])
    seg = Segmenter(model, input_size=size)
    rss_before = _status_mb("VmRSS")
    seg.probabilities(images)  # warm-up: oneDNN picks its kernels on the first call
    times: List[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 30):
        t0 = time.perf_counter()
        seg.probabilities(images)
        times.append(time.perf_counter() - t0)
    return {"images_per_second": round(batch / statistics.median(times), 1), "batch": batch,
            "image_size": list(images.shape[-2:]), "repeats": len(times),
            "parameters": sum(p.numel() for p in model.parameters()), "rss_before_forward_mb": rss_before,
            "load_average": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}


def big_image(spec: str, size: Tuple[int, int] = BIG_SIZE) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 mosaic of the val images, row by row (scenes' content at any size)."""
    val = build_dataset(spec, "val")
    first = val[0]["image"]
    h, w = first.shape[-2:]
    rows, cols = math.ceil(size[0] / h), math.ceil(size[1] / w)
    tiles = [val[i % len(val)]["image"] for i in range(rows * cols)]
    grid = torch.cat([torch.cat(tiles[r * cols:(r + 1) * cols], dim=-1) for r in range(rows)], dim=-2)
    return grid[:, :size[0], :size[1]].contiguous()


def _big(checkpoint: str, spec: str, size: Tuple[int, int], tile: Optional[int], labels_out: str) -> Dict[str, Any]:
    """One-scale float32 inference of a ``size`` mosaic at its own resolution, whole or tiled."""
    model, _, _ = load_for_inference(checkpoint)
    image = big_image(spec, size)[None]
    seg = Segmenter(model, tile=tile)  # input_size None: the image's own resolution
    rss_before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    labels = seg.probabilities(image).argmax(1)[0].to(torch.uint8)
    seconds = time.perf_counter() - t0
    np.save(labels_out, labels.numpy())
    return {"seconds": round(seconds, 2), "tile": tile, "overlap": seg.tile_overlap,
            "windows": None if seg.tiler is None else len(seg.tiler.tiles(*image.shape[-2:])),
            "image_hw": list(image.shape[-2:]), "rss_before_forward_mb": rss_before,
            "load_average": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------------- stages
def _write(path: Path, record: Dict[str, Any]) -> None:
    atomic_write_json(path, record)


def _score(stages: Any, stage: str, checkpoint: Path, target: Path, opts: Dict[str, Any], spec: str,
           overwrite: bool) -> float:
    """Val mIoU of ``checkpoint`` with test-time ``opts`` (``segment_dataset`` into ``target``)."""
    def run() -> None:
        model, classes, size = load_for_inference(checkpoint)
        val = build_dataset(spec, "val", classes=classes, masks=True)
        segment_dataset(model, classes, val, target, input_size=size, batch_size=16, overwrite=overwrite,
                        progress=False, **{**opts, "crf": DenseCRF() if opts.get("crf") else None})

    stages(stage, target / "metrics.json", run)
    return json.loads((target / "metrics.json").read_text())["miou"]


def _train_and_score(stages: Any, cfg: SegTrainConfig, folder: Path, run: str, spec: str,
                     overwrite: bool) -> Dict[str, Any]:
    """Train ``cfg`` into ``folder/run`` (child process; ``folder/run.train.json``, written last, holds
    its peak memory and load) and score its ``last.pt`` on val with each :data:`TEST_TIME` option."""
    tag = f"{folder.name}/{run}"
    stage = f"zoo {tag} train"
    stages(stage, folder / f"{run}.train.json",
           lambda: _write(folder / f"{run}.train.json", in_child(_train, cfg, str(folder / run), overwrite)))
    # CPU seconds of the training process and its DataLoader worker (validation included): with one
    # torch thread they hardly grow when other jobs share the cores, unlike wall time.
    out: Dict[str, Any] = {"run": str(folder / run), "lr": cfg.optim.lr, "epochs": cfg.schedule.epochs,
                           "cpu_seconds": stages.cpu.get(stage), "stage_seconds": stages.seconds.get(stage),
                           **json.loads((folder / f"{run}.train.json").read_text()), **epochs_summary(folder / run)}
    for name, opts in TEST_TIME.items():
        out[name] = _score(stages, f"zoo {tag} {name}", folder / run / "last.pt", folder / f"{run}_{name}", opts,
                           spec, overwrite)
    return out


def epochs_summary(run: Path) -> Dict[str, Any]:
    records = read_jsonl(run / "metrics.jsonl")
    return {"train_seconds": round(sum(r["train_seconds"] for r in records), 1),
            "epoch_seconds": round(sum(r["seconds"] for r in records), 1),
            "curve": [round(r["val_miou"], 4) for r in records], "final_val_iou": records[-1]["val_iou"]}


def check_zoo_covers_registry() -> None:
    missing = [n for n in SEGMENTERS.names() if n not in ZOO and n not in PRESETS]
    if missing:
        raise ValueError(f"segmenters {', '.join(missing)} are registered but have no entry in "
                         "experiments/segmenter_zoo.py ZOO; add their CPU-sized settings there")


def run_zoo(stages: Any, work: Path, spec: str, base: SegTrainConfig, *, overwrite: bool,
            epochs: int = ZOO_EPOCHS, names: Sequence[str] = ()) -> Dict[str, Any]:
    """The zoo's stages (module docstring) under ``work/zoo``; ``base`` is the demo's segmenter config
    on the scenes with the CRF pseudo-masks (``data.masks``) and the classifier's backbone. Returns
    the figures of every model and the 4000x3000 comparison."""
    check_zoo_covers_registry()
    root = work / "zoo"
    pseudo_masks = base.data.masks
    models: Dict[str, Any] = {}
    for key in names or ZOO:
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True)
        cfg = with_overrides(base, {"model.name": key, "schedule.epochs": epochs, **ZOO[key]})
        tries = {}
        for lr in LR_TRIES.get(key, (cfg.optim.lr,)):
            tries[lr] = _train_and_score(stages, with_overrides(cfg, {"optim.lr": lr}), folder,
                                         f"pseudo_crf_lr{lr:g}", spec, overwrite)
        lr = max(tries, key=lambda v: tries[v]["single_scale"])
        cfg = with_overrides(cfg, {"optim.lr": lr})
        gt = _train_and_score(stages, with_overrides(cfg, {"data.masks": None}), folder, f"gt_lr{lr:g}", spec,
                              overwrite)
        speed = folder / "speed.json"
        stages(f"zoo {key} speed", speed, lambda speed=speed, run=tries[lr]["run"]: _write(
            speed, in_child(_speed, str(Path(run) / "last.pt"), spec)))
        models[key] = {"config": cfg.to_dict(), "pseudo_crf": tries[lr], "gt": gt,
                       "lr_tries": {f"{v:g}": tries[v]["single_scale"] for v in tries},
                       "speed": json.loads(speed.read_text())}

    big: Dict[str, Any] = {}
    for key in BIG_IMAGE_MODELS:
        if key not in models:
            continue
        checkpoint = str(Path(models[key]["pseudo_crf"]["run"]) / "last.pt")
        for mode, tile in (("whole", None), ("tiled", BIG_TILE)):
            record, labels = root / "big" / f"{key}_{mode}.json", root / "big" / f"{key}_{mode}.npy"
            labels.parent.mkdir(parents=True, exist_ok=True)
            stages(f"zoo big {key} {mode}", record, lambda record=record, labels=labels, tile=tile: _write(
                record, in_child(_big, checkpoint, spec, BIG_SIZE, tile, str(labels))))
            big.setdefault(key, {})[mode] = json.loads(record.read_text())
        whole, tiled = (np.load(root / "big" / f"{key}_{m}.npy") for m in ("whole", "tiled"))
        big[key]["label_agreement"] = float((whole == tiled).mean())
    return {"epochs": epochs, "models": models, "big_image": big, "big_image_hw": list(BIG_SIZE),
            "pseudo_masks": pseudo_masks, "lr_tries": {k: list(v) for k, v in LR_TRIES.items()},
            "test_time": {k: {o: list(v) if isinstance(v, tuple) else v for o, v in opts.items()}
                          for k, opts in TEST_TIME.items()}}



def score_reference(stages: Any, work: Path, spec: str, runs: Dict[str, Path], *, overwrite: bool) -> Dict[str, Any]:
    """The demo's own segmenter runs (``segmenter.py``'s, ``{"pseudo_crf": run, "gt": run}``) scored as
    the zoo's models are."""
    return {masks: {"run": str(run), **epochs_summary(run), **{
        name: _score(stages, f"zoo reference {masks} {name}", run / "last.pt",
                     work / "zoo" / "reference" / f"{masks}_{name}", opts, spec, overwrite)
        for name, opts in TEST_TIME.items()}} for masks, run in runs.items()}

# --------------------------------------------------------------------------------------------- report
def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: Any, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


MIOU_COLUMNS = (("pseudo_crf", "single_scale"), ("pseudo_crf", "multiscale_flip_crf"),
                ("gt", "single_scale"), ("gt", "multiscale_flip_crf"))


def _backbone(cfg: Dict[str, Any]) -> str:
    m = cfg["model"]
    init = "from the classifier" if m["backbone_weights"] else "from scratch"
    options = ", ".join(f"{k}={v}" for k, v in m["options"].items())
    return f"{m['backbone']}{f' ({options})' if options else ''}, {init}"


def zoo_rows(z: Dict[str, Any]) -> List[str]:
    models, ref = z["models"], z["reference"]
    best = {col: max((m[col[0]][col[1]] for m in models.values()), default=None) for col in MIOU_COLUMNS}

    def miou(m: Dict[str, Any], col: Tuple[str, str]) -> str:
        v = m.get(col[0], {}).get(col[1])
        return f"**{_pct(v)}**" if v is not None and v == best[col] else _pct(v)

    lines = ["| segmenter | backbone | epochs | lr | params (M) | (a) pseudo-masks: 1 scale | (a) 3 scales + flip "
             "+ CRF | (b) ground truth: 1 scale | (b) 3 scales + flip + CRF | training CPU s (a) | training wall s "
             "(a) | load during (a) | inference img/s | load at inference | peak RSS training (MB) | peak RSS "
             "inference (MB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, m in models.items():
        a, s = m["pseudo_crf"], m["speed"]
        flag = " ⚠" if a["epochs"] != z["epochs"] else ""
        lines.append(f"| {key} | {_backbone(m['config'])} | {a['epochs']}{flag} | {a['lr']:g} | "
                     f"{s['parameters'] / 1e6:.2f} | " + " | ".join(miou(m, c) for c in MIOU_COLUMNS) +
                     f" | {_num(a.get('cpu_seconds'))} | {a['train_seconds']:.0f} | {a['mean_load']:.1f} | "
                     f"{s['images_per_second']:.0f} | {s['load_average']:.1f} | {a['peak_rss_mb']:.0f} | "
                     f"{s['peak_rss_mb']:.0f} |")
    if ref:
        r = {"pseudo_crf": ref.get("pseudo_crf", {}), "gt": ref.get("gt", {})}
        epochs = len(r["pseudo_crf"].get("curve", []))
        lines.append(f"| deeplab_largefov, the demo's {epochs} epochs (trained above, in-process) | vgg_tiny, from the "
                     f"classifier | {epochs} | as above | as above | " +
                     " | ".join(_pct(r[c[0]].get(c[1])) for c in MIOU_COLUMNS) +
                     f" | – | {_num(r['pseudo_crf'].get('train_seconds'))} | – | as above | | – | as above |")
    return lines


def zoo_report(r: Dict[str, Any]) -> str:
    z = r["zoo"]
    models = z["models"]
    seg = r["segmenter_config"]
    lines = [
        "## Every registered segmenter",
        "",
        f"Command: the one above (`experiments/segmenter.py` trains and measures every segmenter registered in "
        f"`wsl.models.SEGMENTERS`; `--reuse` skips finished runs). Each model: the demo's segmenter config "
        f"({seg['optim']['optimizer']} lr {seg['optim']['lr']:g}, {seg['schedule']['schedule']}, batch "
        f"{seg['optim']['batch_size']}, {seg['data']['size']} px crops) with its own name and backbone, trained "
        f"**{z['epochs']} epochs instead of the demo's {seg['schedule']['epochs']}** (all of them, so that the "
        f"comparison fits about an hour on the shared 2-core machine) (a) on the demo's CRF pseudo-masks and (b) "
        "on the "
        "ground-truth masks (upper bound). ⚠ marks a model trained fewer epochs than the others (an epoch of it "
        "costs several times theirs). vgg_tiny is "
        "each builder's CPU-sized variant (rates and widths scaled to 128 px scenes), started from the demo "
        "classifier's backbone as the demo's segmenter is.",
        "",
        "Val mIoU (%, 7 labels, final epoch's weights, float32) at one scale (the 128 px training size) and "
        "with 3 scales (0.75, 1, 1.25) + flip + the dense CRF (as `make demo`); best of each column in bold. "
        "Training CPU s: CPU time of the training process and its DataLoader worker (per-epoch validation and "
        "process start included), the cost least changed by other jobs; training wall s: the epochs' training "
        "time without validation. Inference: batches of 16 val images of "
        "128 px, one scale, float32, median of repeats after a warm-up. Peak RSS: `VmHWM` of the process "
        "that trained (DataLoader worker not included) or measured the model, each model in its own "
        "spawned process; the inference figure includes Python, torch and the model "
        f"({min(m['speed']['rss_before_forward_mb'] for m in models.values()):.0f}-"
        f"{max(m['speed']['rss_before_forward_mb'] for m in models.values()):.0f} MB before the first forward "
        f"pass). Every process ran {r['machine']['torch_threads']} torch thread(s). Load: the mean 1-minute load "
        "average sampled during the training (2 cores; above 2 the training shared them with other jobs and its "
        "wall time is inflated accordingly)." if models else "",
        "",
        *zoo_rows(z),
        "",
    ]
    background = [k for k, m in models.items()
                  if not any(v for c, v in m["pseudo_crf"]["final_val_iou"].items() if c != "background")]
    if background:
        lines += [f"{', '.join(background)} predicted background everywhere on val after "
                  f"{models[background[0]]['pseudo_crf']['epochs']} epochs (every foreground IoU 0) at every learning "
                  "rate tried below: the row is the all-background score, not a trained model's.", ""]
    presets = [f"{p} (the {z} row's network on ResNet-50)" for p, z in PRESETS.items() if z in models]
    if presets:
        lines += ["Not trained here: " + ", ".join(presets) + "; on a CPU it costs what deeplabv3_resnet50 does.", ""]
    tries = {k: m["lr_tries"] for k, m in models.items() if len(m["lr_tries"]) > 1}
    if tries:
        lines += ["Learning rates tried on the pseudo-masks (one-scale val mIoU; the best was kept, so these rows "
                  "are chosen on val): " + "; ".join(
                      f"{k}: " + ", ".join(f"lr {lr} {_pct(v)}" for lr, v in t.items())
                      for k, t in tries.items()) + ".",
                  ""]
    big = z["big_image"]
    if big:
        h, w = z["big_image_hw"]
        lines += [f"### {w}x{h} image: whole against tiled",
                  "",
                  f"A {w}x{h} mosaic of val images at its own resolution (no resizing), one scale, float32, the "
                  "models trained on pseudo-masks above; each run in its own process. Tiled: "
                  "`Segmenter(model, tile=...)` (`wsl.models.tiling`), overlap = the model's receptive margin "
                  "rounded to its pooling grid.",
                  "",
                  "| segmenter | inference | tile / overlap (px) | windows | seconds | load | peak RSS (MB) | "
                  "RSS before forward (MB) | labels equal to whole-image |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, b in big.items():
            for mode in ("whole", "tiled"):
                x = b[mode]
                tile = "–" if x["tile"] is None else f"{x['tile']} / {x['overlap']}"
                agree = "–" if mode == "whole" else f"{100 * b['label_agreement']:.3f}%"
                lines.append(f"| {key} | {mode} | {tile} | {_num(x['windows'])} | {x['seconds']:.1f} | "
                             f"{x['load_average']:.1f} | {x['peak_rss_mb']:.0f} | {x['rss_before_forward_mb']:.0f} | "
                             f"{agree} |")
        h, w = z["big_image_hw"]
        labels = 1 + len(r["dataset"]["classes"]) if "dataset" in r else None
        found = []
        for key, b in big.items():
            whole, tiled = b["whole"], b["tiled"]
            found.append(f"{key}: tiled {whole['seconds'] / tiled['seconds']:.2f}x the speed of whole-image, peak "
                         f"{tiled['peak_rss_mb'] - whole['peak_rss_mb']:+.0f} MB")
        lines += ["", "; ".join(found) + "." + (
            f" Tiling bounds the network's activations, not what `Segmenter.probabilities` keeps at image size: "
            f"the logits, their softmax and the running sum over scales, each {labels} x {h} x {w} float32 = "
            f"{labels * h * w * 4 / 2 ** 20:.0f} MB, so it saves memory where the network's own full-resolution "
            "maps dominate (the U-Net's decoder) and little for LargeFOV, whose only full-resolution map is its "
            "first 16-channel convolution." if labels else "")]
        lines.append("")
    lines += [recommendation(r), ""]
    return "\n".join(lines)


def recommendation(r: Dict[str, Any]) -> str:
    """The paragraph on which segmenter to use, from the table's figures (the GPU part is reasoned from the
    architectures and these CPU figures: no GPU was measured)."""
    z = r["zoo"]
    models = z["models"]
    same = {k: m for k, m in models.items() if m["pseudo_crf"]["epochs"] == z["epochs"]}
    if not same:
        return ""

    def a(key: str, col: str = "multiscale_flip_crf", masks: str = "pseudo_crf") -> float:
        return models[key][masks][col]

    def cpu(key: str) -> float:
        return models[key]["pseudo_crf"].get("cpu_seconds") or math.inf

    def fig(key: str) -> str:
        m = models[key]
        return (f"{_pct(a(key))} val mIoU with 3 scales + flip + CRF ({_pct(a(key, 'single_scale'))} at one scale; "
                f"{_pct(a(key, masks='gt'))} when trained on the ground truth), {_num(cpu(key))} CPU s of training, "
                f"{m['speed']['images_per_second']:.0f} img/s, {m['pseudo_crf']['peak_rss_mb']:.0f} MB peak in "
                "training")

    def gain(better: str, worse: str, col: str, masks: str) -> str:
        d = 100 * (a(better, col, masks) - a(worse, col, masks))
        return f"{'+' if d >= 0 else '-'}{abs(d):.1f}"

    best = max(same, key=a)
    near = [k for k in same if a(k) >= a(best) - 0.01]  # within a point of the best: a tie on 200 images
    pick = min(near, key=cpu)
    demo = "deeplab_largefov"
    cpu_text = [f"**For the CPU demo: {pick}** ({fig(pick)}). "]
    cpu_text.append(f"Of the models within a point of the best pseudo-mask-trained result ({', '.join(sorted(near))}) "
                    "it is the cheapest to train. " if len(near) > 1 else
                    "No other model comes within a point of it on the pseudo-masks with the demo's test-time "
                    "options. ")
    one_scale = max(same, key=lambda k: a(k, "single_scale"))
    if one_scale != pick:
        cpu_text.append(f"At one scale {one_scale} is ahead ({_pct(a(one_scale, 'single_scale'))}). ")
    if demo in models and pick != demo:
        cpu_text.append(f"The demo's {demo}: {fig(demo)}; {pick} costs {cpu(pick) / cpu(demo):.2f}x its training "
                        "CPU time. ")
    elif pick == demo:
        cpu_text.append("That is the demo's current choice: keep it. ")
    ref = z.get("reference", {}).get("pseudo_crf")
    tuned = [k for k in same if models[k]["pseudo_crf"]["lr"] != r["segmenter_config"]["optim"]["lr"]]
    if pick in tuned:
        base_lr = r["segmenter_config"]["optim"]["lr"]
        at_base = models[pick]["lr_tries"].get(f"{base_lr:g}")
        cpu_text.append(f"Its learning rate ({models[pick]['pseudo_crf']['lr']:g}) was chosen on val among "
                        f"{len(models[pick]['lr_tries'])} tried (at the demo's {base_lr:g}: "
                        f"{_pct(at_base)} at one scale), while most models kept the demo's rate untried against "
                        "others, so part of its lead may be the rate. ")
    if demo in models and ref:
        cpu_text.append(f"The ranking is at {z['epochs']} epochs; with the demo's full schedule {demo} gains "
                        f"{gain_points(ref['multiscale_flip_crf'], a(demo))} points (last row, "
                        f"{_pct(ref['multiscale_flip_crf'])}; {pick} at {z['epochs']} epochs: {_pct(a(pick))}). "
                        "So: confirm the choice at the full schedule, with the demo's and the tuned rate, before "
                        "the demo switches. ")

    parts, big = [], z.get("big_image", {})
    if all(k in models for k in ("fcn32s", "fcn8s")):
        parts.append(f"restoring resolution pays even on 128 px scenes: FCN-8s's skips give "
                     f"{gain('fcn8s', 'fcn32s', 'single_scale', 'gt')} points over FCN-32s on the ground truth at "
                     "one scale")
    if all(k in models for k in ("unet", demo)):
        parts.append(f"the U-Net's full-resolution decoder scores {gain('unet', demo, 'multiscale_flip_crf', 'gt')} "
                     f"points against LargeFOV's stride-8 output (ground truth, 3 scales + flip + CRF)")
    if all(k in models for k in ("deeplabv3plus", demo)):
        parts.append(f"DeepLab v3+'s stride-4 decoder on the same vgg_tiny scores "
                     f"{gain('deeplabv3plus', demo, 'single_scale', 'gt')} points against LargeFOV (ground "
                     "truth, one scale)")
    v3 = "deeplabv3_resnet50"
    if all(k in models for k in (v3, demo)):
        ratio = (cpu(v3) / models[v3]["pseudo_crf"]["epochs"]) / (cpu(demo) / models[demo]["pseudo_crf"]["epochs"])
        parts.append(f"a ResNet-50 ({models[v3]['speed']['parameters'] / 1e6:.0f}M parameters against "
                     f"{models[demo]['speed']['parameters'] / 1e6:.1f}M) costs {ratio:.0f}x LargeFOV's CPU time per "
                     "epoch "
                     f"and, from scratch in {models[v3]['pseudo_crf']['epochs']} epochs, reaches "
                     f"{_pct(a(v3, 'single_scale', 'gt'))} on the ground truth at one scale: out of reach on a CPU, "
                     "and nothing without ImageNet weights")
    gpu_text = ("**For VOC on a GPU: deeplabv3plus_resnet50 (deeplabv3plus on ResNet-50) with ImageNet weights** "
                "(`backbone_weights=\"IMAGENET1K_V2\"`, output stride 16), and deeplab_largefov or deeplab_aspp on "
                "ImageNet VGG16 where a result must be comparable with the weakly-supervised papers that train "
                "DeepLab v1/v2 (SEC: LargeFOV on VGG16). This is reasoned from the architectures and the CPU "
                "figures above, not measured on a GPU: " + "; ".join(parts) + (". " if parts else "")
                + "On a GPU the ResNet-50's cost does not matter, ImageNet weights exist for it (none could be "
                "used here), and on VOC's 321-513 px crops object boundaries span more pixels than a stride-8 "
                "output resolves, which is what v3+'s stride-4 decoder and ASPP's multi-scale context are for; "
                "the U-Net's full-resolution decoder costs memory at large sizes"
                + (f" (whole {z['big_image_hw'][1]}x{z['big_image_hw'][0]} image: "
                   f"{big['unet']['whole']['peak_rss_mb']:.0f} MB peak against "
                   f"LargeFOV's {big[demo]['whole']['peak_rss_mb']:.0f} MB)" if all(k in big for k in ("unet", demo))
                   else "") + ".")
    return "".join(cpu_text) + "\n\n" + gpu_text


def gain_points(new: float, old: float) -> str:
    return f"{'+' if new >= old else '-'}{abs(100 * (new - old)):.1f}"
