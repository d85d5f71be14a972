"""``wsl demo``: the whole pipeline on generated scenes with the demo settings (``make demo``).

generate scenes -> train the classifier from tags -> CAMs -> benchmark -> pseudo-masks -> segmenter ->
segment val -> ``OUT/report.md``. The settings are :func:`wsl.pipeline.demo_config` (also in
``experiments/configs/pipeline_demo.json``): about 5 to 7 minutes on 2 CPU cores (measured: README.md);
``--quick`` is a smoke test with tiny sizes that runs every stage in well under a minute.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the whole pipeline on generated scenes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (report: DIR/report.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mode.add_argument("--resume", action="store_true", help="skip the stages --out already holds complete")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every stage in seconds (smoke test)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from wsl.pipeline import demo_config, format_summary, run_pipeline

    summary = run_pipeline(demo_config(quick=args.quick), args.out, overwrite=args.overwrite, resume=args.resume,
                           progress=not getattr(args, "quiet", False))
    from wsl.utils.dist import is_main

    if is_main():  # under torchrun every rank ran the pipeline; rank 0 reports
        print(format_summary(summary))
    return 0
