"""``wsl bench``: score CAMs (from a checkpoint or a directory of ``.npz`` files) on a dataset split."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsl.bench import (CORLOC_THRESHOLD, DEFAULT_PROTOCOL, MASK_THRESHOLD, METRIC_ORDER, METRICS, PROTOCOL_NAMES,
                       RANK_BY, BenchSettings)
from wsl.commands._flags import add_method_flags, data_help
from wsl.metrics.localization import CAM_CURVE_INTERVAL, default_thresholds


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="localization metrics of a model or of CAM files",
        description="Score class activation maps against a split's boxes and masks: classification mAP, "
                    "point localization mAP, pointing game, CorLoc, MaxBoxAcc(V2), top-1 localization, PxAP "
                    "and pseudo-mask mIoU. Writes OUT/metrics.json, report.md, config.json and plots. Under "
                    "`torchrun --nproc_per_node N -m wsl bench ...` the images are split between the N processes "
                    "and the metrics are those of one process.")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help=data_help("dataset (boxes or masks for the localization metrics)"))
    p.add_argument("--split", required=True, metavar="NAME", help="split to score, e.g. val")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="classifier checkpoint (maps computed here)")
    src.add_argument("--cams", metavar="DIR",
                     help="directory of ID.npz CAM files (cams, classes, scores), or a `wsl cam --out` directory "
                          "(one file per image, or tar shards written with --shards)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="earlier `wsl bench` outputs to put side by side with this run (OUT/compare.md)")
    g = p.add_argument_group("protocol")
    g.add_argument("--metrics", nargs="+", choices=METRICS.names(), metavar="NAME",
                   help=f"metrics to compute (default: all the dataset supports): {', '.join(METRIC_ORDER)}")
    g.add_argument("--protocol", choices=PROTOCOL_NAMES, default=DEFAULT_PROTOCOL,
                   help="published: MaxBoxAcc(V2) and PxAP as wsolevaluation, the pointing game as TorchRay; "
                        "wsl-exact: exact component boxes and IoU, pointing game on masks averaged over the "
                        f"classes with pairs (default: {DEFAULT_PROTOCOL})")
    g.add_argument("--cam-interval", type=float, default=CAM_CURVE_INTERVAL, metavar="STEP",
                   help=f"CAM threshold sweep step (default: {CAM_CURVE_INTERVAL})")
    g.add_argument("--rank-by", choices=RANK_BY, default="score",
                   help="point_map ranking: the image score, or the maximum of unnormalised maps (default: score)")
    g.add_argument("--corloc-threshold", type=float, default=CORLOC_THRESHOLD, metavar="T",
                   help=f"CorLoc box: largest component above T x max (default: {CORLOC_THRESHOLD})")
    g.add_argument("--mask-threshold", type=float, default=MASK_THRESHOLD, metavar="T",
                   help=f"pseudo-mask background score (default: {MASK_THRESHOLD})")
    g = p.add_argument_group("model (with --checkpoint)")
    add_method_flags(g)
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S", help="multi-scale CAMs (default: 1)")
    g.add_argument("--flip", action="store_true", help="average with horizontally flipped images")
    g.add_argument("--batch-size", type=int, default=1, help="images per forward pass (equal sizes only)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.bench import ModelCamSource, cam_files_source, compare_runs, evaluate, read_npz_classes
    from wsl.data.spec import build_dataset, spec_paths
    from wsl.utils.io import atomic_write_text, prepare_output_dir
    from wsl.utils.job import job, main_only, prepared_output

    settings = BenchSettings(thresholds=tuple(default_thresholds(args.cam_interval).tolist()),
                             rank_by=args.rank_by, corloc_threshold=args.corloc_threshold,
                             mask_threshold=args.mask_threshold, protocol=args.protocol)
    if args.cams and (args.method or args.target_layer):
        raise ValueError("--method / --target-layer choose how a --checkpoint's maps are computed; CAM files "
                         "(--cams) already hold theirs")
    if args.rank_by == "map" and (args.method or "cam") != "cam":
        raise ValueError(f"--rank-by map ranks by every class's map maximum, but --method {args.method} computes only "
                         "the tagged classes' maps (the others are zero); rank by image scores (the default)")
    compare = [Path(d) for d in args.compare]
    for d in compare:
        if not (d / "metrics.json").is_file():
            raise FileNotFoundError(f"--compare {d}: no metrics.json there (not a `wsl bench --out` directory)")
    reads = [*spec_paths(args.data), args.cams, args.checkpoint, *compare]
    # Under torchrun the images are split between the processes and rank 0 writes (wsl.utils.job);
    # scoring CAM files needs no GPU, so those jobs talk over gloo.
    with job("cpu" if args.cams else args.device), \
            prepared_output(args.out, "bench", lambda: prepare_output_dir(args.out, args.overwrite, kind="bench",
                                                                          inputs=reads)) as out:
        if args.cams:
            classes = read_npz_classes(args.cams)  # the dataset takes the CAM files' class order
            dataset = build_dataset(args.data, args.split, classes=classes)
            source = cam_files_source(args.cams, dataset.classes)  # .npz files or tar shards (wsl cam --shards)
        else:
            from wsl.models import load_classifier

            model, classes = load_classifier(args.checkpoint)
            dataset = build_dataset(args.data, args.split, classes=classes)
            source = ModelCamSource(model, dataset, scales=args.scales, flip=args.flip, batch_size=args.batch_size,
                                    device=None if args.device == "auto" else args.device,
                                    method=args.method or "cam", target_layer=args.target_layer)
        evaluate(source, dataset, metrics=args.metrics, out_dir=out, settings=settings,
                 progress=not getattr(args, "quiet", False),
                 info={"command": " ".join(["wsl"] + sys.argv[1:]), "data": args.data, "split": args.split})
        if not main_only():
            return 0
    print(compare_runs([out]))
    if compare:
        table = compare_runs([out] + compare)
        atomic_write_text(out / "compare.md", "# wsl bench comparison\n\n" + table + "\n")
        print("\n" + table)
    print(f"\nreport: {out / 'report.md'}")
    return 0
