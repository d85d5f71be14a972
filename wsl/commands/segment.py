"""``wsl segment``: run a trained segmenter over a dataset split or a folder of images.

Writes ``OUT/ID.png`` (VOC palette class-index masks at each image's size) and ``OUT/overlays/ID.png`` (the
mask blended into the image, with a legend naming the classes found); with ``--shards N`` tar shards
``OUT/shards/shard-XXXXXX.tar`` of ``KEY.overlay.png`` and ``KEY.mask.png`` members instead; ``OUT/options.json``,
``OUT/manifest.json`` and, when the split has ground-truth masks, ``OUT/metrics.json`` with the mIoU.
Under ``torchrun --nproc_per_node N -m wsl segment ...`` the images are split between the N processes.
"""
from __future__ import annotations

import argparse
from typing import Any

from wsl.commands._flags import add_device_flag, add_inference_flags, add_loader_flags, add_shards_flag, inference_device
from wsl.train.config import AMP_MODES


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("segment", help="segment images with a trained segmenter", description=__doc__)
    add_inference_flags(p, checkpoint_help="segmenter checkpoint (wsl train-seg)", images_help="a folder of images",
                        split_help="split of --data (e.g. val)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted run in --out (same settings, any number of processes): the "
                           "masks already written are kept, the result is identical to an uninterrupted run")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="input scales whose probabilities are averaged (default: 1.0)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored images")
    p.add_argument("--size", type=int, metavar="PX",
                   help="scale images to fit in PX before --scales (default: the checkpoint's training size; "
                        "0 = native resolution)")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF (DeepLab parameters)")
    p.add_argument("--crf-max-pixels", type=int, help="CRF working-resolution cap in pixels (default: full size)")
    p.add_argument("--tile", type=int, metavar="PX",
                   help="predict in tiles of PX px (overlap-tile inference: memory bounded by the tiles; "
                        "a multiple of the model's pooling grid)")
    p.add_argument("--tile-overlap", type=int, metavar="PX",
                   help="context px on each side of a tile (default: the model's receptive margin)")
    add_shards_flag(p, "KEY.overlay.png, KEY.mask.png")
    add_loader_flags(p)
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast precision (default auto: bfloat16 where the hardware computes it natively)")
    add_device_flag(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.utils.job import job

    device = inference_device(args)
    with job(str(device)):  # under torchrun: join the job; the images are split between its processes
        return _segment(args, device)


def _segment(args: argparse.Namespace, device: Any) -> int:
    from wsl.segment import has_ground_truth, load_for_inference, segment_dataset, segment_folder

    model, classes, trained_size = load_for_inference(args.checkpoint, device)
    size = trained_size if args.size is None else (args.size or None)
    crf = None
    if args.crf:
        from wsl.cam.crf import DenseCRF

        crf = DenseCRF(max_pixels=args.crf_max_pixels)
    options = dict(scales=args.scales, flip=args.flip, crf=crf, input_size=size, batch_size=args.batch_size,
                   workers=args.workers, amp=args.amp, tile=args.tile, tile_overlap=args.tile_overlap,
                   overwrite=args.overwrite, resume=args.resume, shards=args.shards, inputs=[args.checkpoint],
                   progress=not getattr(args, "quiet", False))
    if args.data:
        from wsl.data.spec import build_dataset

        dataset = build_dataset(args.data, args.split, classes=classes,
                                masks=has_ground_truth(args.data, args.split))
        segment_dataset(model, classes, dataset, args.out, **options)
    else:
        segment_folder(model, classes, args.images, args.out, **options)
    return 0  # the library logged the one summary line (count, folder, mIoU)
