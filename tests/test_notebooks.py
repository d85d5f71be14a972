"""Every notebook in notebooks/ runs end to end with its quick settings (WSL_NOTEBOOK_QUICK=1) in a kernel
of this interpreter, and is stored without outputs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts *this* interpreter, whatever kernels the machine has installed."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / "wsl-test", overrides={"argv": [sys.executable, "-m", "ipykernel_launcher",
                                                             "-f", "{connection_file}"]})
    return root


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_explore_cams.ipynb", "02_compare_pooling.ipynb",
                                           "03_pseudo_masks_to_segmenter.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    assert "WSL_NOTEBOOK_QUICK" in source and "from wsl" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_quick(path, kernel_dir, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("WSL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("WSL_NOTEBOOK_RUN", str(tmp_path / "run"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="wsl-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=240, resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any failure
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "run" / "classifier" / "last.pt").is_file()
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "the notebook shows no figure"
