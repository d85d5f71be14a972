"""``wsl pipeline``: the whole pipeline on any dataset, configured by a JSON file.

The config (:class:`wsl.pipeline.PipelineConfig`) has the sections ``data`` (``spec``: ``voc:DIR``,
``coco:ANN_JSON:IMAGE_DIR``, ``synth:DIR``; empty = generate scenes), ``classifier`` and ``segmenter``
(trainer configs, or the path of one, e.g. ``"classifier": "voc2012_vgg16.json"``), ``cams``, ``bench``,
``pooling``, ``segment``, ``report`` and ``skip``. Examples are in ``experiments/configs/pipeline_*.json``.
``--set KEY=VALUE`` overrides one field by its dotted name (e.g. ``--set data.spec=voc:/data/VOC``
``--set classifier.schedule.epochs=2``); VALUE is read as JSON, else as a string.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from wsl.pipeline import STAGES

    p = subparsers.add_parser("pipeline", help="run the whole pipeline from a JSON config",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="pipeline config (JSON)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (report: DIR/report.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field by dotted name, repeatable")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mode.add_argument("--resume", action="store_true", help="skip the stages --out already holds complete")
    p.add_argument("--stop-after", choices=STAGES, metavar="STAGE",
                   help=f"end after this stage ({', '.join(STAGES)})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.commands._flags import parse_kv
    from wsl.pipeline import PipelineConfig, format_summary, run_pipeline
    from wsl.train.config import with_overrides

    config = PipelineConfig.load(args.config)
    if args.overrides:  # "a.b=2" -> {"a.b": 2}: dotted field names, JSON values (else strings)
        config = with_overrides(config, parse_kv(args.overrides, "--set"))
    summary = run_pipeline(config, args.out, overwrite=args.overwrite, resume=args.resume,
                           stop_after=args.stop_after, progress=not getattr(args, "quiet", False),
                           inputs=[args.config])
    from wsl.utils.dist import is_main

    if is_main():  # under torchrun every rank ran the pipeline; rank 0 reports
        print(format_summary(summary))
    return 0
