# The two commands a new user needs:
#   make demo   install certctl and plan + apply the bundled inventory/ (no network)
#   make test   install what the tests need and run lint, types and the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CERTCTL = $(BIN)/certctl -i inventory

.PHONY: demo demo-clean test lint unit bench venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

demo: venv
	$(BIN)/pip install -q .
	@echo "== certctl validate"; $(CERTCTL) validate
	@echo; echo "== certctl plan"; $(CERTCTL) plan --detailed-exitcode || test $$? -eq 2
	@echo; echo "== certctl apply"; $(CERTCTL) apply --auto-approve
	@echo; echo "== certctl status"; $(CERTCTL) status
	@echo; echo "== certctl plan (again: nothing left to do)"; $(CERTCTL) plan
	@echo; echo "Deployed files are under inventory/deployed/; state is in inventory/.certctl/."
	@echo "Run 'make demo' again: it prints 'No changes'. 'make demo-clean' starts over."

demo-clean:
	rm -rf inventory/deployed inventory/.certctl

test: venv
	bash scripts/test-deps.sh
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/ruff check certctl connectors tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: venv
	$(BIN)/python -m pytest -q tests/unit

bench: venv
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python benchmarks/core_10k.py
