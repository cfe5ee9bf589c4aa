# Two entry points (see README): `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs browser-check data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docs,plots,bench]'
	touch $(STAMP)

# Fashion-MNIST from Debian when we can install packages; the demo falls back to
# scikit-learn's digits otherwise, so a failure here is not fatal.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "Could not install dataset-fashion-mnist; the demo will use scikit-learn digits."; \
	else \
		echo "Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist); using digits."; \
	fi

demo: $(STAMP) data
	$(BIN)/oodunleash demo --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# The built site in headless Chromium (apt-get install chromium): pages render, search works.
browser-check: $(STAMP)
	$(BIN)/python scripts/check_site.py

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q --doctest-modules oodunleash tests
	$(BIN)/python -m pytest -q --markdown-docs -p no:cacheprovider docs README.md

clean:
	rm -rf $(VENV) site outputs .pytest_cache
