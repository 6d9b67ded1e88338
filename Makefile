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
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info

DEMO_DIR := demo-out

# Runs offline with the tiny random-weight models: every stage is real, the pictures and prototypes are noise.
# --no-filter: the tiny CLIP has random weights, so its pre-filter would keep one arbitrary class per image.
DEMO_TINY := --models tiny --n 8 --steps 10 --cache-dir $(DEMO_DIR)/cache
DEMO_SEG := --classes-file examples/scene_classes.txt $(DEMO_TINY) --no-filter
demo: install
	@echo "== ovdiff demo: offline, --models tiny (random weights; output is mechanically real, semantically meaningless)"
	$(PY) examples/draw_scenes.py $(DEMO_DIR)/images --count 4
	$(VENV)/bin/ovdiff synth --classes-file examples/scene_classes.txt $(DEMO_TINY)
	@echo "== segment: prototypes come from the cache the synth run filled"
	$(VENV)/bin/ovdiff segment $(DEMO_DIR)/images --out $(DEMO_DIR)/segment $(DEMO_SEG)
	@echo "== explain one pixel of the first scene"
	$(VENV)/bin/ovdiff explain $(DEMO_DIR)/images/scene_00.jpg --xy 120,300 --out $(DEMO_DIR)/explain.png $(DEMO_SEG)
	$(VENV)/bin/ovdiff cache info --cache-dir $(DEMO_DIR)/cache
	@echo "== inputs:   $(DEMO_DIR)/images/*.jpg"
	@echo "== masks:    $(DEMO_DIR)/segment/*.png (palette PNG: 0 background, i = i-th class of the list)"
	@echo "== overlays: $(DEMO_DIR)/segment/*_overlay.jpg"
	@echo "== legend:   $(DEMO_DIR)/segment/legend.json"
	@echo "== explain:  $(DEMO_DIR)/explain.png"
