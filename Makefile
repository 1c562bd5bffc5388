# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# Reinstall only when the venv is missing or the dependency list changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" -c constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	rm -rf $(VENV)/demo-out
	$(BIN)/match tests/fixtures/demo/siglip_tiny.npz --target SiglipModel --save $(VENV)/demo-out

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
