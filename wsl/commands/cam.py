"""`wsl cam`: export CAMs, overlays, points, boxes and pseudo-masks of a dataset or an image folder."""
from __future__ import annotations

import argparse

from wsl.cam.postprocess import BOX_MODES, DEFAULT_MASK_SETTINGS, PSEUDO_MASK_METHODS
from wsl.commands._flags import (add_device_flag, add_inference_flags, add_loader_flags, add_method_flags,
                                 add_shards_flag, inference_device)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cam", help="export CAMs, points, boxes and pseudo-masks",
        description="Run a trained classifier over a dataset split or a folder of images and write, per "
                    "image, the CAMs (ID.npz), a heatmap overlay, points, boxes and a pseudo-mask. Under "
                    "`torchrun --nproc_per_node N -m wsl cam ...` the images are split between the N processes.")
    add_inference_flags(p, checkpoint_help="classifier checkpoint (wsl train)",
                        images_help="a folder of images (no labels: the predicted classes are used)",
                        split_help="split of --data (e.g. train, val)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted export in --out (same settings): images already written "
                           "are skipped, the result is identical to an uninterrupted run")
    add_method_flags(p)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="input scales to average (default: 1.0; --method cam only)")
    p.add_argument("--flip", action="store_true", help="also average the maps of mirrored images (--method cam only)")
    p.add_argument("--tau", type=float, default=0.5, help="box threshold as a fraction of the map max (default 0.5)")
    p.add_argument("--box-mode", choices=BOX_MODES, default="largest",
                   help="box of the largest component or of every component (default largest)")
    p.add_argument("--mask-method", choices=PSEUDO_MASK_METHODS, default="threshold",
                   help="pseudo-mask background: CAM threshold or PSA's (1 - max cam)^alpha")
    defaults = ", ".join(f"{m}: fg={fg:g} bg={bg:g}" for m, (fg, bg) in DEFAULT_MASK_SETTINGS.items())
    p.add_argument("--mask-fg", type=float, help=f"confident-foreground setting ({defaults})")
    p.add_argument("--mask-bg", type=float, help="confident-background setting; pixels in between are 255")
    p.add_argument("--crf", action="store_true", help="refine pseudo-masks with the dense CRF (DeepLab parameters)")
    p.add_argument("--crf-max-pixels", type=int, help="CRF working-resolution cap in pixels (default: full size)")
    p.add_argument("--predicted", action="store_true",
                   help="use the predicted classes even when the dataset has labels")
    p.add_argument("--full-maps", action="store_true",
                   help="CAM files with every class's map at image resolution (wsl-cams/1: np.load(f)['cams'] is "
                        "(C, H, W)) instead of the used classes' maps and every class's few-cell raw maps "
                        "(wsl-cams/2, read with wsl.cam.files.load_cam_npz); far larger with many classes")
    add_shards_flag(p, "KEY.cams.npz, KEY.overlay.png, KEY.mask.png, KEY.json")
    add_loader_flags(p)
    add_device_flag(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.utils.job import job

    device = inference_device(args)
    with job(str(device)):  # under torchrun: join the job; the images are split between its processes
        return _export(args, device)


def _export(args: argparse.Namespace, device: object) -> int:
    from wsl.cam.crf import DenseCRF
    from wsl.cam.export import export_cams
    from wsl.data.images import ImageFolderDataset
    from wsl.models import load_classifier

    model, classes = load_classifier(args.checkpoint)
    model.to(device)
    if args.data:
        from wsl.data.spec import build_dataset

        dataset = build_dataset(args.data, args.split)
    else:
        dataset = ImageFolderDataset(args.images, classes)
    crf = DenseCRF(max_pixels=args.crf_max_pixels) if args.crf else None
    # export_cams logs the one summary line (images, boxes, folder): repeating it here printed it twice.
    export_cams(
        model, classes, dataset, args.out, batch_size=args.batch_size, scales=args.scales, flip=args.flip,
        tau=args.tau, box_mode=args.box_mode, mask_method=args.mask_method, mask_fg=args.mask_fg,
        mask_bg=args.mask_bg, crf=crf, use_labels=not args.predicted, num_workers=args.workers,
        overwrite=args.overwrite, resume=args.resume, progress=not getattr(args, "quiet", False),
        inputs=[args.checkpoint], method=args.method or "cam", target_layer=args.target_layer, shards=args.shards,
        full_maps=args.full_maps)
    return 0
