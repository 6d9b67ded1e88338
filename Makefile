# Every target works alone on a fresh clone: test and demo depend on install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This environment serves exactly this torch pair from local disk; pyproject keeps a range for users elsewhere.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow bench gpu-prep readme demo eval-demo eval-voc eval-context eval-object lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

# The slow tests (real torch.compile, ...): not part of `make test`.
test-slow: install
	$(PY) -m pytest -q -m slow

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
	@echo "== a class from your own photos: 6 drawn kite photos, 3 of them with masks (examples/draw_photos.py)"
	$(PY) examples/draw_photos.py $(DEMO_DIR)/photos
	$(VENV)/bin/ovdiff synth kite --photos $(DEMO_DIR)/photos/kite --photo-masks $(DEMO_DIR)/photos/kite-masks $(DEMO_TINY) --n 0
	@echo "== explain a pixel of the kite: the prototypes that decided it come from the photos"
	$(VENV)/bin/ovdiff explain $(DEMO_DIR)/photos/scene_kite.jpg --xy 330,60 --out $(DEMO_DIR)/explain_kite.png \
		--classes-file examples/photo_classes.txt $(DEMO_TINY) --no-filter
	$(VENV)/bin/ovdiff cache info --cache-dir $(DEMO_DIR)/cache
	@echo "== inputs:   $(DEMO_DIR)/images/*.jpg"
	@echo "== masks:    $(DEMO_DIR)/segment/*.png (palette PNG: 0 background, i = i-th class of the list)"
	@echo "== overlays: $(DEMO_DIR)/segment/*_overlay.jpg"
	@echo "== legend:   $(DEMO_DIR)/segment/legend.json"
	@echo "== explain:  $(DEMO_DIR)/explain.png"
	@echo "== photos:   $(DEMO_DIR)/photos/kite/*.jpg (masks in kite-masks/), explained: $(DEMO_DIR)/explain_kite.png"

# Where the time goes, CPU and tiny models (about a minute on 2 cores): prints a table, writes bench/results-cpu.json.
bench: install
	$(PY) bench/cpu.py --out bench/results-cpu.json

# For a session lent a GPU machine (bench/device.sh): wheels of the packages its image lacks, at the versions installed
# here, and BASE's tree for a before/after run: make gpu-prep BASE=<commit>. Both folders are git-ignored.
GPU_WHEELS := diffusers open.clip.torch diskcache ftfy wcwidth
gpu-prep: install
	@test -n "$(BASE)" || { echo "usage: make gpu-prep BASE=<commit to compare against>"; exit 2; }
	rm -rf .whl .before
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -m pip freeze | grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==')
	mkdir .before && git archive $(BASE) | tar -x -C .before

# The README's real outputs (digests, counts, timings) regenerated from this release, offline with the tiny models.
readme: install
	$(PY) examples/readme_outputs.py

# Benchmarks on real data: make eval-voc DATA=/data/VOCdevkit [EVAL_ARGS="--device cuda --seeds 42,43,44,45,46"]
RESULTS := results
EVAL_ARGS ?=
eval-voc eval-context eval-object: eval-%: install
	@test -n "$(DATA)" || { echo "usage: make $@ DATA=/path/to/the/dataset/root [EVAL_ARGS='...']"; exit 2; }
	@mkdir -p $(RESULTS)
	$(VENV)/bin/ovdiff eval $* --root $(DATA) --save $(RESULTS)/$*.json $(EVAL_ARGS)

# Offline: a 20-image dataset in VOC's layout, evaluated with the tiny models whole and as 2 merged shards.
# Small windows keep it to about a minute on 2 CPU cores.
EVAL_DEMO := $(DEMO_DIR)/eval
EVAL_DEMO_ARGS := voc --root $(EVAL_DEMO)/data $(DEMO_TINY) --short-side 128 --scales 128,96 --stride 64 --quiet
eval-demo: install
	$(PY) examples/synthetic_voc.py $(EVAL_DEMO)/data --count 20
	$(VENV)/bin/ovdiff eval $(EVAL_DEMO_ARGS) --save $(EVAL_DEMO)/all.json
	$(VENV)/bin/ovdiff eval $(EVAL_DEMO_ARGS) --shard 0/2 --save $(EVAL_DEMO)/part0.json
	$(VENV)/bin/ovdiff eval $(EVAL_DEMO_ARGS) --shard 1/2 --save $(EVAL_DEMO)/part1.json
	$(VENV)/bin/ovdiff eval merge $(EVAL_DEMO)/part0.json $(EVAL_DEMO)/part1.json --save $(EVAL_DEMO)/merged.json --quiet
	cmp $(EVAL_DEMO)/all.json $(EVAL_DEMO)/merged.json && echo "== merged shards == unsharded run, byte for byte"
