# `make demo` and `make test` work on a fresh clone: each creates .venv on first use and installs the
# package with the tested versions pinned in constraints.txt.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPAT := .venv-compat
COMPAT_STAMP := $(COMPAT)/.installed

.PHONY: demo test test-compat lint bench browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The web demo's browser test drives Debian's Chromium; installed here when we are root (CI), else the
# test is skipped with a message (CI=true makes it fail instead).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "chromium/chromedriver not installed: the browser test will be skipped"; fi; \
	fi

# The whole suite on transformers 5.x, then the loading/generation tests again on 4.x.
test: $(STAMP) $(COMPAT_STAMP) browser lint
	$(BIN)/python -m pytest
	PYTHONPATH=$(CURDIR)/$(COMPAT) $(BIN)/python -m pytest -m compat

# transformers 4.x: an overlay of the 4.57 packages on top of .venv (torch and the rest are shared).
$(COMPAT_STAMP): $(STAMP) constraints-compat.txt
	rm -rf $(COMPAT) && mkdir -p $(COMPAT)
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPAT) -r constraints-compat.txt
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	PYTHONPATH=$(CURDIR)/$(COMPAT) $(BIN)/python -m pytest -m compat

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache .ruff_cache
