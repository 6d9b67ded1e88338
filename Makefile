# Every target works alone on a fresh clone: test and demo depend on install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This environment serves exactly this torch pair from local disk; pyproject keeps a range for users elsewhere.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
