# The two commands of the README: `make demo` and `make test` (plus `make test-fast`,
# the fast tier for development). All create .venv on a fresh machine; torch goes in
# first, on its own, so that no other package can pull a multi-GB CUDA build of it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-drills install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet torch==2.13.0
	$(BIN)/pip install --quiet --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The results-page test screenshots the page in Debian's chromium: installed here, by
# the make target, never from inside a test.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pipelines demo --config conf/demo.yaml

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not drill"

test-drills: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m drill

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m fast

clean:
	rm -rf $(VENV) runs
