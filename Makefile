# The two commands of the README. Each creates .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the venv's tools first (its ninja builds the kernels, whatever ninja the system or an activated env has)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test bench native clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this disk (a bare `torch` would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q torch==2.13.0 -e '.[dev]'  # torch named again: nothing the extras pull in may replace it
	touch $@

# the native kernels, compiled ahead of time (cached per build setup: sources, flags, torch and its location,
# compiler, ninja, Python); where that fails, the eager path serves
native: $(VENV)/.installed
	-$(VENV)/bin/normkit build

demo: native
	$(VENV)/bin/normkit check

test: native
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
