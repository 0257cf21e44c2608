# Everything runs in a local virtual environment that the targets create.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: venv demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Classify the sample photos with pretrained GC ViT-Tiny: the official checkpoint is
# downloaded and converted once. Offline, pass a local checkpoint instead:
#   make demo WEIGHTS=/path/to/gcvit_1k_tiny.pth.tar [MODEL=tiny]
MODEL ?= tiny
WEIGHTS ?=
demo: venv
	$(VENV)/bin/tfgcvit predict --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) examples/images/*.jpg

# The whole suite: everything on TensorFlow, then the backend tests on JAX and PyTorch.
# The TensorFlow and JAX runs spread over TEST_WORKERS processes (pytest-xdist): their tests
# spend most of their time building and compiling graphs on one core. On 2 cores this took
# the suite from 29 to 21 minutes; the short PyTorch run is slower with workers (each one
# imports and builds its fixtures again), so it runs in one. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)
test: venv
	KERAS_BACKEND=tensorflow $(PYTEST) $(WORKERS) tests
	KERAS_BACKEND=jax $(PYTEST) $(WORKERS) -m backends tests
	KERAS_BACKEND=torch $(PYTEST) -m backends tests

test-slow: venv
	TFGCVIT_SLOW=1 KERAS_BACKEND=tensorflow $(PYTEST) $(WORKERS) tests

clean:
	rm -rf $(VENV) build *.egg-info
