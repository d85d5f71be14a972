"""Executed copies of the notebooks, so that browsing docs/notebooks/ shows their figures and tables without
running anything. notebooks/ keeps them without outputs (tests/test_notebooks.py checks that).

Each notebook runs with its quick settings (``WSL_NOTEBOOK_QUICK=1``: a few generated scenes, a tiny model,
one or two epochs) in a kernel of this interpreter, its scratch run in a temporary folder; the executed copy
goes to ``docs/notebooks/NAME.ipynb``. Needs the ``notebooks`` extra (nbclient, ipykernel).

Run::

    .venv/bin/python experiments/render_notebooks.py [NAME ...]     # or: make notebook-outputs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def render(path: Path, out_dir: Path, kernel_dir: Path) -> Path:
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="wsl-render", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    nbclient.NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata.setdefault("wsl", {})["rendered"] = {"quick": True, "command": "experiments/render_notebooks.py"}
    target = out_dir / path.name
    tmp = target.with_suffix(".tmp.ipynb")
    nbformat.write(nb, tmp)
    os.replace(tmp, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook stems (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "notebooks")
    args = parser.parse_args(argv)
    try:
        from ipykernel.kernelspec import write_kernel_spec
    except ImportError:
        print("needs the notebooks extra: pip install -e '.[notebooks]'", file=sys.stderr)
        return 1
    paths = sorted((REPO / "notebooks").glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        kernels = Path(scratch) / "kernels"
        write_kernel_spec(kernels / "wsl-render", overrides={"argv": [sys.executable, "-m", "ipykernel_launcher",
                                                                       "-f", "{connection_file}"]})
        for path in paths:
            os.environ.update(WSL_NOTEBOOK_QUICK="1", WSL_NOTEBOOK_RUN=str(Path(scratch) / path.stem))
            os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
            t0 = time.perf_counter()
            target = render(path, args.out, kernels)
            print(f"{path.name}: {time.perf_counter() - t0:.0f} s -> {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
