# Two commands do everything on a fresh clone:  make run  |  make test
# (cookiecutter-data-science style; every target sets up the environment first if it is missing.)

PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
PROFILE ?= demo
# Local wheels (e.g. torch 2.13.0+cpu) are used when WHEELS names an existing folder; otherwise uv takes them from
# the registry.
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0
# One BLAS/OpenMP thread per process: 2-core machines oversubscribe badly otherwise (10x slower training).
export OMP_NUM_THREADS ?= 1

.PHONY: run test env data lint smoke unit nbval clean-scratch

run: env  ## the main job: data, every notebook with papermill (demo profile), HTML report
	$(PY) -m lib.synth --profile $(PROFILE)
	$(PY) -m lib.pipeline --profile $(PROFILE)

test: env  ## every test: unit tests, notebook hygiene, nbval of every notebook (smoke profile)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -n 2 --timeout 900
	$(PY) -m pytest --nbval-lax notebooks -p no:xdist --timeout 900

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock constraints.txt pyproject.toml tools/torchvision_compat.py
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(UV) pip install --python $(PY) $(FIND_LINKS) -c constraints.txt -c requirements.lock -r requirements.txt
	$(UV) pip install --python $(PY) --no-deps -e .
	$(PY) tools/install_torchvision_compat.py
	$(PY) -m compileall -q -j 2 $(VENV)/lib >/dev/null 2>&1 || true  # bytecode once: PYTHONDONTWRITEBYTECODE may be set
	$(PY) -c "import timm, torchvision, monai; print('environment ok: torch', __import__('torch').__version__)"
	touch $@

data: env  ## generate the synthetic cohort for PROFILE (cached; same seed, same bytes)
	$(PY) -m lib.synth --profile $(PROFILE)

smoke: env  ## the whole pipeline on the smoke profile (seconds per notebook)
	$(PY) -m lib.pipeline --profile smoke

lint: env  ## ruff + notebook hygiene (one parameters cell, no defs, no outputs)
	$(PY) -m ruff check .
	$(PY) -m pytest tests/test_notebooks_static.py -q

clean-scratch:  ## scratch outputs of hand/nbval runs (never touches outputs/runs)
	rm -rf outputs/scratch
