# The two front-door commands. Each creates .venv and installs what it needs on a fresh machine.
#   make demo   compile a pattern, show its kernel, run it (GPU if present, else Triton's
#               interpreter) and check it against the float64 reference
#   make test   the test suite (CPU; generated kernels run in Triton's interpreter)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU build of torch from the local wheel; numpy<2.4 because Triton's interpreter breaks on 2.4
	$(VENV)/bin/pip install -q torch==2.13.0 triton==3.6.0 'numpy<2.4'
	$(VENV)/bin/pip install -q -e '.[test,viz]'
	touch $(STAMP)

.PHONY: demo test clean
demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	# two workers (pytest-xdist), a test file per worker at a time: test files share compiled kernels
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

clean:
	rm -rf $(VENV)
