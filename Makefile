# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test venv venv-dev bench clean

$(VENV)/.stamp-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[models]'
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) install -e '.[models,dev]'
	touch $@

venv: $(VENV)/.stamp-base
venv-dev: $(VENV)/.stamp-dev

# Main job on the embedded (simulated) data: simulate -> split -> train -> predict -> eval -> report.
demo: $(VENV)/.stamp-base
	$(VENV)/bin/celltwin demo -o demo_out

# The test suite (CPU only). CI calls exactly this target.
test: $(VENV)/.stamp-dev
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) demo_out .pytest_cache
