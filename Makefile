# storyreel — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel for dev and CI. On a GPU box: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO   := demo

.PHONY: install demo test test-fast lint typecheck unit bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The whole job on the tiny random-weight model: examples/stories -> demo/outbox/*.zip
demo: install
	rm -rf $(DEMO)/inbox $(DEMO)/outbox
	mkdir -p $(DEMO)/inbox
	for f in examples/stories/*.json; do cp "$$f" $(DEMO)/inbox/; done
	$(BIN)/storyreel run --once --config examples/demo.toml
	@echo
	@echo "Demo finished. ZIPs (one per story):"
	@ls -1 $(CURDIR)/$(DEMO)/outbox/*.zip
	@echo "Status sidecars: $(CURDIR)/$(DEMO)/outbox/*.status.jsonl"

lint: install
	$(BIN)/ruff check pipeline daemon tests bench
	$(BIN)/ruff format --check pipeline daemon tests bench

typecheck: install
	$(BIN)/mypy

# Two or more workers: most of the suite's time is daemons starting (importing torch is
# single-threaded), and every test waits on events, so running side by side is safe.
unit: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4

test: lint typecheck unit

# The edit-test loop: lint and every test but the slow ones (the tiny model, full daemon runs).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/kenburns.py
	$(BIN)/python bench/scene_breakdown.py
	$(BIN)/python bench/overlap.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
