"""Every CAM method of ``wsl.cam.methods`` x every pooling head, on the demo's val scenes (200 images).

One classifier per pooling head, trained as ``experiments/pooling_heads.py`` does: the demo pipeline
(``wsl.pipeline.demo_config()``) up to its ``pooling`` stage, with the heads of ``pooling_heads.HEADS``
(only the head changes; WILDCAT, the demo's head, is the pipeline's own classifier). Then every
method computes the maps of each classifier on val (``wsl.bench.ModelCamSource(method=NAME)``, the
tagged classes) and ``wsl.bench.evaluate`` scores them (published protocol): point localization mAP,
pointing game, MaxBoxAccV2, PxAP, and the seconds per image the method took to compute its maps (the
map computation alone, timed around the method's call; the load average is recorded beside it).

ScoreCAM runs one forward pass per channel of the target layer (256 for the demo's ``vgg_tiny``) per
scored class of each image; ``--scorecam-images N`` scores it on the first N val images only (the
table says so). ``--reuse`` reuses the classifiers of an earlier run in ``--out``. Measured on the
shared 2-core machine: training 53 min at load average up to 10.8 (a head takes about 67 s when the
machine is idle, ``pooling_heads.md``), then the table 30 min at load 1 to 4 with ``--threads 1 --scorecam-images 16``
(one torch thread was 5x faster than two at load 6: ``--threads 1`` on a busy machine).

    python experiments/methods.py --threads 1                  # trains, then the table
    python experiments/methods.py --reuse                      # the classifiers of the last run
    python experiments/methods.py --smoke --out /tmp/m --results /tmp/r   # tiny, proves it works
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooling_heads import HEADS  # noqa: E402  (the same heads and arguments)

from wsl.data.synth import SynthConfig  # noqa: E402
from wsl.pipeline import PoolingSection, demo_config, run_pipeline, stage_complete  # noqa: E402
from wsl.train.config import with_overrides  # noqa: E402
from wsl.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger("methods")

REPO = Path(__file__).resolve().parents[1]
METRICS = ("cls_map", "point_map", "pointing_game", "maxboxacc", "pxap")
COLUMNS = (("point_map", "point-loc mAP"), ("pointing_game", "pointing game"), ("maxboxaccv2", "MaxBoxAccV2"),
           ("pxap", "PxAP"))


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def pipeline_config(smoke: bool = False) -> Any:
    """The demo pipeline with one classifier per head (the pooling stage of ``pooling_heads.py``); its
    pooling stage only scores classification (the localization is what this script measures)."""
    base = demo_config()
    if smoke:
        tiny = {"data.size": 64, "data.workers": 0, "optim.batch_size": 8, "schedule.epochs": 1}
        base = dataclasses.replace(base, data=dataclasses.replace(
            base.data, synth=SynthConfig(train=24, val=8, size=64, num_classes=3)),
            classifier=with_overrides(base.classifier, tiny),
            cams=dataclasses.replace(base.cams, crf=False))
    return dataclasses.replace(base, pooling=PoolingSection(heads=dict(HEADS), metrics=("cls_map",)))


def train(out: Path, reuse: bool, smoke: bool) -> Dict[str, Any]:
    """Train (or, with ``reuse``, reuse) the classifiers; returns the pooling stage's record."""
    config = pipeline_config(smoke)
    if reuse and stage_complete(out, "pooling"):
        log.info("reusing the classifiers in %s", out)
    else:
        run_pipeline(config, out, overwrite=not reuse, resume=reuse, stop_after="pooling", command=command_line(),
                     progress=False)
    return json.loads((out / "pooling" / "pooling_heads.json").read_text(encoding="utf-8"))


class Timed:
    """A map method with the wall and CPU seconds spent inside it (the maps alone: no image decoding,
    no scoring)."""

    def __init__(self, method: Any) -> None:
        self.method, self.name = method, method.name
        self.wall = self.cpu = 0.0
        self.images = 0

    def __call__(self, images: Any, select: Any = None) -> Any:
        w, c = time.perf_counter(), time.process_time()
        out = self.method(images, select)
        self.wall += time.perf_counter() - w
        self.cpu += time.process_time() - c
        self.images += len(images)
        return out

    def describe(self) -> str:
        return self.method.describe()


def first_images(dataset: Any, n: int) -> Any:
    """``dataset`` cut to its first ``n`` images (every reader indexes ``annotations``)."""
    if n >= len(dataset):
        return dataset
    part = copy.copy(dataset)
    part.annotations = dataset.annotations[:n]
    return part


def score_methods(trained: Dict[str, Any], out: Path, methods: List[str],
                  args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every method on every head's classifier; one row each (also kept as ``bench/HEAD/METHOD/row.json``,
    which ``--reuse`` takes instead of recomputing)."""
    import torch

    from wsl.bench import BenchSettings, ModelCamSource, evaluate
    from wsl.cam.methods import build_cam_method, method_library
    from wsl.data.spec import build_dataset
    from wsl.models import load_classifier
    from wsl.utils.io import prepare_output_dir

    spec = trained["config"]["data"]["spec"]
    rows = []
    for head in trained["heads"]:
        model, classes = load_classifier(Path(head["run_dir"]) / "last.pt")
        model.eval()
        dataset = build_dataset(spec, "val", classes=classes)
        for name in methods:
            bench_dir = out / "bench" / head["head"] / name.replace(":", "_")
            row_file = bench_dir / "row.json"
            if args.reuse and row_file.is_file():
                rows.append(json.loads(row_file.read_text(encoding="utf-8")))
                log.info("%s / %s: reused", head["head"], name)
                continue
            costly = "scorecam" in name
            data = first_images(dataset, args.scorecam_images) if costly else dataset
            options = {"batch_size": args.scorecam_batch} if costly else {}
            method = Timed(build_cam_method(name, model, **options))
            source = ModelCamSource(model, data, method=method, batch_size=args.batch_size, device="cpu")
            load_before = os.getloadavg()[0]
            flat = evaluate(source, data, metrics=list(METRICS), settings=BenchSettings(),
                            out_dir=prepare_output_dir(bench_dir, overwrite=True, kind="bench"),
                            info={"command": command_line(), "head": head["head"], "method": name})
            row = {"head": head["head"], "method": name, "library": method_library(name), "images": len(data),
                   "options": options, "describe": method.describe(), "batch_size": args.batch_size,
                   "seconds_per_image": method.wall / max(method.images, 1),
                   "cpu_seconds_per_image": method.cpu / max(method.images, 1),
                   "load_average": round((load_before + os.getloadavg()[0]) / 2, 1),
                   "torch_threads": torch.get_num_threads(), "bench_dir": str(bench_dir),
                   "metrics": {k: v for k, v in flat.items() if "/" not in k}}
            atomic_write_json(row_file, row)
            rows.append(row)
            m = row["metrics"]
            log.info("%s / %s: point mAP %s, pointing %s, MaxBoxAccV2 %s, PxAP %s, %.3f s/img (load %.1f)",
                     head["head"], name, *(pct(m.get(k)) for k, _ in COLUMNS), row["seconds_per_image"],
                     row["load_average"])
    return rows


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(result: Dict[str, Any]) -> str:
    rows, heads = result["rows"], [h["head"] for h in result["heads"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["head"]): r for r in rows}
    cls = {h["head"]: h.get("val_map") for h in result["heads"]}
    env = result["environment"]
    score_rows = [r for r in rows if "scorecam" in r["method"]]
    lines = ["# CAM methods x pooling heads on the demo's val scenes", "",
             f"Command: `{result['command']}` ({result['wall_s'] / 60:.0f} min wall"
             f"{', classifiers reused' if result['reused'] else ', training included'}; the pipeline stages that "
             f"trained them took {result['training']['seconds'] / 60:.0f} min "
             f"({result['training']['cpu_seconds'] / 60:.0f} "
             f"min CPU) at load average {result['training']['load_average']}, as recorded then; load average "
             f"{result['load_average_start']} at the start, {result['load_average_end']} at the end).", "",
             "Classifiers: one per pooling head, the demo's classifier config (`vgg_tiny` from scratch, 128 px, "
             f"{result['epochs']} epochs; only the head changes), as `experiments/pooling_heads.py` trains them; "
             "classification val mAP: " + ", ".join(f"{h} {pct(cls[h])}" for h in heads) + ". "
             "Maps: `wsl bench --checkpoint HEAD/last.pt --method NAME` (the tagged classes of each image, "
             "target layer `backbone`: the features feeding the 1x1 class head; published protocol). "
             f"`cam` is ours; the others are pytorch-grad-cam {result['versions'].get('grad-cam')} and torchcam "
             f"{result['versions'].get('torchcam')} through `wsl.cam.methods`.", ""]
    if score_rows:
        n = sorted({r["images"] for r in score_rows})
        lines += [f"**Score-CAM rows are on the first {', '.join(map(str, n))} of the 200 val images** (one "
                  "forward pass per channel of the target layer, 256, per tagged class of each image; masked "
                  f"inputs batched by {score_rows[0]['options'].get('batch_size')}); every other row on all 200.", ""]
    lines += ["Values in %; bold: the best method for each head (as shown, so ties share it).", "",
              "Why rows coincide: the two libraries' rows of the same method read the same layer with the same "
              "formula (Score-CAM: torchcam subtracts a baseline score inside the softmax, which does not change "
              "it), except Grad-CAM++, whose weight denominator pytorch-grad-cam takes as (sum A) g^3(i, j) and "
              "torchcam as sum A g^3 (eq. 19 of the paper read two ways). For a 1x1 class head, Grad-CAM's "
              "weights are w_ck times the mean gradient of the pooling, so with `avg` pooling Grad-CAM is CAM "
              "without the head's bias (tested in tests/test_cam_methods.py); `torchcam:cam` is CAM without the "
              "bias. LayerCAM weighs each cell by its own gradient: under `max` pooling only the argmax cell has "
              "one, so its maps are single cells, which point well and box poorly. EigenCAM is class-agnostic "
              "(one map per image for all its classes).", ""]
    for key, title in COLUMNS:
        lines += [f"## {title}", "", "| method | " + " | ".join(heads) + " |",
                  "|---|" + "---:|" * len(heads)]
        shown = {(m, h): pct(cell.get((m, h), {}).get("metrics", {}).get(key)) for m in methods for h in heads}
        best = {h: max((float(v) for (_, hh), v in shown.items() if hh == h and v != "-"), default=None)
                for h in heads}
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                (f"**{shown[(m, h)]}**" if best[h] is not None and shown[(m, h)] == f"{best[h]:.1f}"
                 and len(methods) > 1 else shown[(m, h)]) for h in heads) + " |")
        lines.append("")
    lines += ["## Seconds per image (maps only)", "",
              "Wall seconds per image spent computing the maps (the method's call: forward, backward passes, "
              f"upsampling; batches of {rows[0]['batch_size'] if rows else '-'} images), then CPU seconds per "
              f"image in brackets, on {env['cpus']} CPU cores shared with other jobs "
              f"(torch threads: {rows[0]['torch_threads'] if rows else '-'}); the load average during each run is "
              "in the last table.", "",
              "| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            (f"{cell[(m, h)]['seconds_per_image']:.3f} ({cell[(m, h)]['cpu_seconds_per_image']:.3f})"
             if (m, h) in cell else "-") for h in heads) + " |")
    lines += ["", "## Load average during each run", "", "| method | " + " | ".join(heads) + " |",
              "|---|" + "---:|" * len(heads)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(str(cell[(m, h)]["load_average"]) if (m, h) in cell else "-"
                                             for h in heads) + " |")
    env = {k: v for k, v in env.items() if k != "torch_threads"}  # training's; scoring's are stated above
    lines += ["", f"Machine: {json.dumps(env)}.", ""]
    return "\n".join(lines)


def training_record(pipeline: Path) -> Dict[str, Any]:
    """Wall and CPU seconds of the pipeline stages up to ``pooling`` (their ``stage.json``), and the
    largest load average they recorded."""
    stages = [json.loads((pipeline / s / "stage.json").read_text(encoding="utf-8"))
              for s in ("scenes", "classifier", "cams", "bench", "pooling") if (pipeline / s / "stage.json").is_file()]
    return {"seconds": round(sum(s["seconds"] for s in stages), 1),
            "cpu_seconds": round(sum(s["cpu_seconds"] for s in stages), 1),
            "load_average": max((s["load_average"] for s in stages), default=None)}


def versions() -> Dict[str, str]:
    out = {}
    for pkg in ("torch", "grad-cam", "torchcam"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from wsl.cam.methods import CAM_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "methods", help="run directory")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the classifiers (and the finished method rows) of an earlier run in --out")
    p.add_argument("--methods", nargs="+", choices=CAM_METHODS.names(), metavar="NAME",
                   default=["cam"] + [n for n in CAM_METHODS.names() if n != "cam"])
    p.add_argument("--batch-size", type=int, default=16, help="images per call of a method (default 16)")
    p.add_argument("--scorecam-images", type=int, default=10, help="val images the Score-CAMs run on (default 10)")
    p.add_argument("--scorecam-batch", type=int, default=64, help="masked inputs per forward pass of Score-CAM")
    p.add_argument("--threads", type=int, help="torch threads while scoring the methods (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny scenes and one epoch: proves the script works")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0, load_start = time.perf_counter(), round(os.getloadavg()[0], 1)
    trained = train(args.out / "pipeline", args.reuse, args.smoke)
    log.info("classifiers ready after %.0f s: %s", time.perf_counter() - t0, [h["head"] for h in trained["heads"]])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = score_methods(trained, args.out, args.methods, args)
    result = {"command": command_line(), "reused": args.reuse, "wall_s": round(time.perf_counter() - t0, 1),
              "load_average_start": load_start, "load_average_end": round(os.getloadavg()[0], 1),
              "epochs": trained["config"]["schedule"]["epochs"], "environment": trained["environment"],
              "training": training_record(args.out / "pipeline"),
              "versions": versions(), "heads": [{k: h.get(k) for k in ("head", "pooling_kwargs", "val_map", "run_dir")}
                                                for h in trained["heads"]],
              "rows": rows}
    name = "methods_smoke" if args.smoke else "methods"
    atomic_write_json(args.results / f"{name}.json", result)
    atomic_write_text(args.results / f"{name}.md", markdown(result))
    log.info("wrote %s after %.0f s", args.results / f"{name}.md", result["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
