# The two commands the README documents; each sets up everything on a fresh machine first.
#   make run   -- create .venv, install, build llama.cpp (portable), run the default pipeline offline
#   make test  -- the same set-up plus the legacy AutoAWQ environment, then the test suite
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
LLAMA := .llama.cpp
LEGACY := .venv-legacy
# Test processes: the suite's modules each start their own servers and stores, so they run side by side; most of
# its tests wait on servers and child processes, so two processes gain even on two cores.
TEST_WORKERS ?= 2

.PHONY: run test setup llama-cpp bench clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,mlx,lora,quant,onnx,tasks]"
	touch $@

$(LLAMA)/BUILD_INFO.json: scripts/build-llama-cpp.sh $(VENV)/.installed
	bash scripts/build-llama-cpp.sh $(PYTHON) $(LLAMA)
	touch $@

llama-cpp: $(LLAMA)/BUILD_INFO.json

# AutoAWQ (archived) pins transformers 4.x: it gets an environment of its own, never the main one.
$(LEGACY)/.installed: scripts/make-legacy-env.sh
	bash scripts/make-legacy-env.sh autoawq $(LEGACY)
	touch $@

setup: $(VENV)/.installed $(LLAMA)/BUILD_INFO.json

run: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/quantmill run

# The catalogue page is checked in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: setup $(LEGACY)/.installed browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PYTHON) bench/run.py

clean:
	rm -rf artifacts/objects artifacts/staging artifacts/registry artifacts/.state .quantmill
