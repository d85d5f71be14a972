# Two commands do everything on a fresh machine:
#   make demo   - build .venv, then run the whole pipeline on generated scenes (runs/demo/report.md)
#   make test   - build .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Keep large freed tensors in the heap instead of returning them to the OS. Reported to cost 15-35% on
# some CPUs; experiments/results/speed.md measured no difference (0.94-1.05x) on the dev machine.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: demo test venv clean notebooks notebook-outputs

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m wsl demo --out runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

# JupyterLab on notebooks/ (installs the notebooks extra, exact versions from constraints.txt).
notebooks: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[notebooks]'
	$(VENV)/bin/jupyter lab notebooks/

# Executed copies of the notebooks (quick settings) in docs/notebooks/, viewable without running them.
notebook-outputs: $(VENV)/.installed
	$(PY) experiments/render_notebooks.py

clean:
	rm -rf $(VENV) runs
