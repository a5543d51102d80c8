# Two entry points for a fresh machine: `make demo` and `make test`.
# torch stays the CPU build through every install step: constraints.txt pins it and PIP_CONSTRAINT
# applies that pin to each pip call (a pin in the first call alone was undone by the resolver of the
# second, which pulled a CUDA torch and fifteen nvidia-* packages). After installing, tests/test_install.py
# fails the install if a CUDA torch or an nvidia-* package got in anyway.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q torch
	$(PIP) install -q -e '.[dev]'
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_install.py
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ragindex demo

test: $(STAMP)
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects nothing: say so instead of failing on a bare code.
	$(BIN)/python -m pytest -q || { rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc; }

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/*_bench.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) var
