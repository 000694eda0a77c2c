# Two commands on a fresh machine: `make demo` and `make test` (both set everything up first).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (ROS 2 Kilted wheels need Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/diffseg demo

test: setup
	$(PY) -m pytest test -q -p no:cacheprovider

bench: setup
	$(VENV)/bin/diffseg bench

clean:
	rm -rf $(VENV) build install log *.egg-info
