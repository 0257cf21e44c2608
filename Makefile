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
test: venv
	KERAS_BACKEND=tensorflow $(PYTEST) tests
	KERAS_BACKEND=jax $(PYTEST) -m backends tests
	KERAS_BACKEND=torch $(PYTEST) -m backends tests

test-slow: venv
	TFGCVIT_SLOW=1 KERAS_BACKEND=tensorflow $(PYTEST) tests

clean:
	rm -rf $(VENV) build *.egg-info
