# splice: `make demo` runs the main job on the built-in zoo, `make test` runs the tests.
# Both create .venv on first use. TORCH pins the CPU build that lies on this machine's disk;
# elsewhere run e.g. `make test TORCH=torch` to take whatever pip finds.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint format venv clean zoo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The same checks less the slow tests (mergekit runs, zoo builds and scoring, processes, Ray,
# long fuzzing): tests/conftest.py FAST_LEAVES_OUT says which. For the edit-test loop.
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q --fast

demo: venv
	$(BIN)/python examples/demo.py

# Rebuild the committed zoo (assets/zoo) after a change to splice/zoo; commit the result.
zoo: venv
	$(BIN)/splice zoo build assets/zoo

lint: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
