"""GPU check: the figures no CPU run can give, in one command of a few minutes on a CUDA machine.

1. A ``wsl train`` step (``Trainer._step``: autocast, NaN guard, loss scaling, scheduler) of VGG16
   (random weights) at 448 px, batch 8, channels_last: bf16 and fp16 autocast against fp32.
2. CAM export (``CAMExtractor.class_maps`` + ``wsl.cam.export.localize``: the tagged classes' maps
   upsampled, argmax points, local maxima, boxes, pseudo-masks: what ``wsl cam`` computes per batch)
   against a plain forward pass, VGG16 at 448 px, batch 8, with 20, 80 and 1000 classes, in fp32 and
   under bf16 autocast.
3. The dense CRF (``wsl.cam.DenseCRF``) on the GPU against pydensecrf2 on the CPU (one thread, as it
   runs): a 500x375 photograph, 21 and 3 labels, with the label agreement (skipped without pydensecrf2).
4. With more than one GPU: an NCCL all-reduce between two processes (bus bandwidth, sum checked).

Timings are medians of interleaved runs after warm-up runs, with ``torch.cuda.synchronize`` around
each. The results are printed and written as JSON::

    python experiments/gpu_check.py                         # experiments/results/gpu_check.json
    python experiments/gpu_check.py --out /tmp/gpu.json --repeats 5

Without CUDA the script says so in one line and exits with status 1. ``--smoke`` runs every check's
code on the CPU at tiny sizes (vgg_tiny, 32 px), so that a session with a GPU finds a script that runs
(tests/test_speed_script.py); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "experiments"):  # run as a file from anywhere: the package and speed_rows/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from speed_rows.timing import interleaved  # noqa: E402
from wsl.cam import CAMExtractor, DenseCRF  # noqa: E402
from wsl.cam.export import ExportOptions, imagenet_normalizer, localize  # noqa: E402
from wsl.data.base import collate  # noqa: E402
from wsl.data.synth import SynthConfig, render_scene  # noqa: E402
from wsl.models import build_classifier  # noqa: E402
from wsl.train.classifier import multilabel_loss, param_groups  # noqa: E402
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig  # noqa: E402
from wsl.train.engine import RunDir, Trainer, determinism  # noqa: E402
from wsl.utils.dist import DistInfo  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """What the checks run on: the real measurement on CUDA, or ``--smoke`` on the CPU."""

    device: torch.device
    backbone: str = "vgg16"
    size: int = 448
    batch: int = 8
    class_counts: Sequence[int] = (20, 80, 1000)
    crf_size: Tuple[int, int] = (375, 500)


def smoke_plan() -> Plan:
    return Plan(torch.device("cpu"), backbone="vgg_tiny", size=32, batch=2, class_counts=(20,), crf_size=(24, 32))


# ------------------------------------------------------------------------------------------- timing
def timed(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> Dict[str, float]:
    """Median wall seconds per function, timed as experiments/speed.py times (interleaved rounds after
    warm-up, the GPU synchronised around each call: ``speed_rows.timing.interleaved``)."""
    times = interleaved(fns, repeats=repeats, warmup=warmup, device=device)
    return {name: statistics.median(t["wall"]) for name, t in times.items()}


def scenes(size: int, batch: int, classes: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """Generated scenes at ``size`` px: uint8 images, normalised images and multi-hot tags."""
    cfg = SynthConfig(seed=1, train=0, val=batch, size=size, max_objects=2, num_classes=min(classes, 12))
    drawn = [render_scene(cfg, "val", i) for i in range(batch)]
    images = torch.from_numpy(np.stack([s.image for s in drawn])).permute(0, 3, 1, 2).contiguous()
    labels = torch.zeros(batch, classes)
    for i, s in enumerate(drawn):
        for obj in s.objects:
            labels[i, obj["cls"]] = 1.0
    return {"uint8": images.to(device), "image": imagenet_normalizer(images).to(device), "labels": labels.to(device)}


def classifier(plan: Plan, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(backbone=plan.backbone, num_classes=classes, pooling="lse").to(plan.device)


def _label(plan: Plan) -> str:
    return f"{'VGG16' if plan.backbone == 'vgg16' else plan.backbone} {plan.size} px batch {plan.batch}"


# ------------------------------------------------------------------------------------------- checks
def check_train(plan: Plan, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    device, n = plan.device, plan.batch
    batch = scenes(plan.size, n, 20, device)
    data = [{"image": batch["image"][i].cpu(), "labels": batch["labels"][i].cpu(), "index": i} for i in range(n)]
    steps, counter = {}, iter(range(10**9))
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("none", "bf16", "fp16"):
            if (amp == "bf16" and cuda and not torch.cuda.is_bf16_supported()) or (amp == "fp16" and not cuda):
                continue  # fp16 autocast with loss scaling is a GPU setting
            trainer = Trainer(model=classifier(plan, 20), param_groups=lambda net: param_groups(net, 0.1, False),
                              train_set=data, collate_fn=collate,
                              loss_fn=lambda net, b: multilabel_loss(net(b["image"]), b["labels"]),
                              evaluate=lambda net: {}, payload=lambda net: {}, optim=OptimConfig(batch_size=n),
                              schedule=ScheduleConfig(epochs=10_000), run_cfg=RunConfig(amp=amp, channels_last=True),
                              workers=0, run=RunDir(Path(tmp) / amp), info=DistInfo(0, 0, 1, device))
            trainer.net.train()

            def step(trainer: Trainer = trainer) -> None:
                with determinism(trainer.run_cfg.deterministic):
                    trainer._step(batch, 0, next(counter))
            steps[amp] = step
        t = timed(steps, repeats, warmup, device)
    rows = [{"check": "train step", "what": f"{_label(plan)}, channels_last, amp={amp}",
             "seconds": t[amp], "img_per_s": n / t[amp], "vs_fp32": t[amp] / t["none"]} for amp in t]
    return rows


def check_cam(plan: Plan, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    opt, rows, device = ExportOptions(), [], plan.device
    for classes in plan.class_counts:
        model = classifier(plan, classes).eval()
        batch = scenes(plan.size, plan.batch, classes, device)
        x = batch["image"].contiguous(memory_format=torch.channels_last)
        positive = batch["labels"] > 0.5
        extractor = CAMExtractor(model)

        def export() -> Any:  # wsl cam's per-batch work: only the used classes' maps are upsampled
            return localize(extractor.class_maps(x), positive, opt)

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)
        for precision, ctx in (("fp32", contextlib.nullcontext),
                               ("bf16 autocast", lambda: torch.autocast(device.type, dtype=torch.bfloat16))):
            with ctx():
                t = timed({"forward": forward, "export": export}, repeats, warmup, device)
            rows.append({"check": "CAM export / forward", "what": f"{_label(plan)}, {classes} classes, "
                         f"{precision}", "ratio": t["export"] / t["forward"], "export_s": t["export"],
                         "forward_s": t["forward"]})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def photo_and_unaries(labels: int, h: int = 375, w: int = 500) -> Any:
    """matplotlib's sample photograph (centre crop) and smooth random unaries (as experiments/speed.py)."""
    from matplotlib import cbook
    from PIL import Image

    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
    image = np.ascontiguousarray(photo[top:top + h, left:left + w])
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(2.5 * torch.randn(1, labels, 6, 8, generator=g), size=(h, w), mode="bicubic",
                           align_corners=False)
    return image, torch.softmax(logits, 1)


def check_crf(plan: Plan, repeats: int, warmup: int) -> List[Dict[str, Any]]:
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        return [{"check": "dense CRF", "skipped": f"pydensecrf2 not importable ({e}); "
                 "pip install 'wsl[crf-reference]'"}]
    crf, rows, device = DenseCRF(), [], plan.device
    h, w = plan.crf_size
    for k in (21, 3):
        image, probs = photo_and_unaries(k, h, w)
        img_gpu, probs_gpu = torch.from_numpy(image).permute(2, 0, 1)[None].to(device), probs.to(device)

        def reference() -> np.ndarray:
            d = dcrf.DenseCRF2D(image.shape[1], image.shape[0], k)
            d.setUnaryEnergy(unary_from_softmax(probs[0].numpy()))
            d.addPairwiseGaussian(sxy=crf.pos_xy_std, compat=crf.pos_w)
            d.addPairwiseBilateral(sxy=crf.bi_xy_std, srgb=crf.bi_rgb_std, rgbim=image, compat=crf.bi_w)
            return np.asarray(d.inference(crf.iterations)).reshape(k, *image.shape[:2])

        agree = float((crf(img_gpu, probs_gpu)[0].argmax(0).cpu().numpy() == reference().argmax(0)).mean())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # pydensecrf is single-threaded; the GPU side needs no CPU threads
        try:
            t = timed({"gpu": lambda: crf(img_gpu, probs_gpu), "ref": reference}, repeats, warmup, device)
        finally:
            torch.set_num_threads(threads)
        rows.append({"check": f"dense CRF: {device.type} / pydensecrf2 (CPU, 1 thread)",
                     "what": f"{w}x{h} photograph, {k} labels, 10 iterations, DeepLab parameters",
                     "ratio": t["gpu"] / t["ref"], "gpu_s": t["gpu"], "pydensecrf2_s": t["ref"],
                     "label_agreement": agree})
    return rows


def _all_reduce_worker(rank: int, port: int, elements: int, repeats: int, out: str) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    td.init_process_group("nccl", rank=rank, world_size=2)
    x = torch.full((elements,), float(rank + 1), device=f"cuda:{rank}")
    for _ in range(3):
        td.all_reduce(x.fill_(float(rank + 1)))
    times = []
    for _ in range(repeats):
        x.fill_(float(rank + 1))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        td.all_reduce(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ok = bool((x == 3.0).all())
    if rank == 0:
        seconds = statistics.median(times)
        nbytes = elements * 4
        Path(out).write_text(json.dumps({"seconds": seconds, "bytes": nbytes, "sum_correct": ok,
                                         "bus_gb_per_s": nbytes / seconds / 1e9}))  # 2(n-1)/n = 1 for n = 2
    td.destroy_process_group()


def check_nccl(repeats: int) -> List[Dict[str, Any]]:
    if torch.cuda.device_count() < 2:
        return [{"check": "NCCL all-reduce", "skipped": f"{torch.cuda.device_count()} GPU: needs two"}]
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "nccl.json")
        mp.spawn(_all_reduce_worker, args=(port, 64 * 2**20, repeats, out), nprocs=2, join=True)
        result = json.loads(Path(out).read_text())
    return [{"check": "NCCL all-reduce, 2 processes", "what": "256 MiB float32", **result}]


# --------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "gpu_check.json")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="run every check's code on the CPU at tiny sizes (proves the script works; no figures)")
    args = p.parse_args(argv)
    if args.smoke:
        plan = smoke_plan()
        args.repeats, args.warmup = 1, 1
        device_info: Dict[str, Any] = {"device": "cpu (--smoke: tiny sizes, the figures mean nothing)"}
    elif not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing was measured", file=sys.stderr)
        return 1
    else:
        plan = Plan(torch.device("cuda"))
        device_info = {"device": torch.cuda.get_device_name(plan.device), "devices": torch.cuda.device_count(),
                       "capability": list(torch.cuda.get_device_capability(plan.device)), "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version()}
    result: Dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]), **device_info,
        "torch": torch.__version__, "python": platform.python_version(),
        "load_start": [round(x, 2) for x in os.getloadavg()], "rows": []}
    for name, check in (("train", lambda: check_train(plan, args.repeats, args.warmup)),
                        ("cam", lambda: check_cam(plan, args.repeats, args.warmup)),
                        ("crf", lambda: check_crf(plan, max(3, args.repeats // 2) if not args.smoke else 1, 1)),
                        ("nccl", lambda: check_nccl(args.repeats))):
        t0 = time.perf_counter()
        rows = check()
        for r in rows:
            print(json.dumps(r), flush=True)
        result["rows"] += rows
        result.setdefault("check_seconds", {})[name] = time.perf_counter() - t0
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
