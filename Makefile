# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch is installed first, on its own: celltwin asks only for torch>=2.4, and with no torch installed
# pip resolves that to the newest PyPI build, on Linux a CUDA build of several GB. The default takes
# the CPU wheel the project's machines have cached (elsewhere PyPI's torch==2.13.0, a CUDA build on
# Linux). Any pip arguments can replace it (for a new venv: `make clean` first), e.g. CPU only:
#   TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu' make demo
# The later steps keep the installed torch (it satisfies torch>=2.4).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv venv-dev bench clean

$(VENV)/.stamp-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e '.[models]'
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) install -e '.[models,genes,dev]'
	touch $@

venv: $(VENV)/.stamp-base
venv-dev: $(VENV)/.stamp-dev

# Main job on the embedded (simulated) data: simulate -> split -> train -> predict -> eval -> report.
demo: $(VENV)/.stamp-base
	$(VENV)/bin/celltwin demo -o demo_out

# Lint (ruff, the rule set in pyproject.toml), then the test suite (CPU only). CI calls exactly this target.
test: $(VENV)/.stamp-dev
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) demo_out .pytest_cache
