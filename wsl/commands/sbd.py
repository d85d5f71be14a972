"""``wsl sbd``: build VOC 2012 train_aug (``SegmentationClassAug/`` + ``train_aug.txt``) from the SBD
download, the layout weakly supervised segmentation trains on (:mod:`wsl.data.sbd`).

    wsl sbd --sbd data/benchmark_RELEASE --voc data/voc
    wsl train --data voc:data/voc --train-split train_aug ...     # the 10,582 images' tags
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sbd", help="build VOC 2012 train_aug (SegmentationClassAug) from SBD",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sbd", required=True, type=Path, metavar="DIR",
                   help="the unpacked benchmark.tgz (benchmark_RELEASE, its dataset/ folder, or the folder holding it)")
    p.add_argument("--voc", required=True, type=Path, metavar="DIR",
                   help="VOC 2012 trainval: the folder holding VOCdevkit, or VOCdevkit/VOC2012; the masks and "
                        "the list are written into VOC2012/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a SegmentationClassAug/ this command wrote, and a different train_aug.txt")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.data.sbd import build_train_aug

    s = build_train_aug(args.sbd, args.voc, overwrite=args.overwrite, progress=not getattr(args, "quiet", False))
    print(f"{s['mask_dir']}: {s['masks']} masks ({s['masks_from_sbd']} from SBD, {s['masks_from_voc']} from VOC 2012)")
    print(f"{s['list']}: {s['train_aug']} images (SBD train + val + VOC train, minus VOC val)")
    return 0
