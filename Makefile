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

.PHONY: demo test lint bench deploy clean browser

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

# The console's browser test drives Debian's chromium. Installed here when missing and we are root (a
# fresh CI machine); otherwise that test skips and says why. Playwright never downloads a browser.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is not installed and this is not root: the console's browser test will skip"; fi

test: $(STAMP) browser
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects nothing: say so instead of failing on a bare code.
	$(BIN)/python -m pytest -q || { rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc; }

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/*_bench.py; do $(BIN)/python $$b || exit 1; done

# The deployments of prefect.yaml on the server PREFECT_API_URL names (the schedule is the server's to
# run: `prefect server start` with its services). The process work pool they name is created only when
# the server lacks it, so re-deploying keeps a pool's settings. RAGINDEX_PROJECT_DIR is where the worker
# runs the flows from: this checkout.
deploy: $(STAMP)
	$(BIN)/prefect work-pool inspect ragindex >/dev/null 2>&1 || $(BIN)/prefect work-pool create ragindex --type process
	RAGINDEX_PROJECT_DIR=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

clean:
	rm -rf $(VENV) var
