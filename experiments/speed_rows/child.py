"""Each phase runs in a fresh interpreter (its peak RSS is its own): the command line of a child.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from speed_rows.settings import REPO

SCRIPT = REPO / "experiments" / "speed.py"  # the command line every child runs


def child_argv(args: argparse.Namespace, phase: str, out: Path) -> List[str]:
    argv = [sys.executable, str(SCRIPT), "--child", phase, "--child-out", str(out)]
    if args.smoke:
        argv.append("--smoke")
    for flag in ("repeats", "heavy_repeats"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.scenes is not None:
        argv += ["--scenes", str(args.scenes)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def in_child(args: argparse.Namespace, phase: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run one phase in a fresh interpreter; its result carries the child's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(child_argv(args, phase, out), env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"phase {phase!r} failed in its child process (exit {proc.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))
