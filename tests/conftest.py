"""Shared test set-up: fixture paths, the slow marker, weights with realistic magnitudes."""

import os

import numpy as np
import pytest

# torchvision (imported by timm) crashes the process when it loads after
# TensorFlow, so the torch stack is imported before any test imports Keras.
try:
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass

from weights_helpers import (  # noqa: F401  (the tests import these from here)
    FIXTURE_MODEL_CONFIG as FIXTURE_CONFIG,
    FIXTURES,
    OFFICIAL_PARAMS,
    REFERENCE,
    REPO,
    tolerance,
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TFGCVIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set TFGCVIT_SLOW=1 (make test-slow) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def realistic_weights_(module, seed):
    """Re-draws every parameter of a torch module in place with trained-like magnitudes.

    timm's default initialisation makes attention nearly uniform, which hides
    wiring mistakes (a wrong bias index or head split changes outputs by ~1e-6).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(0.8 + 0.4 * torch.rand(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def tflite_interpreter(path):
    """A TFLite interpreter for the file at `path`: LiteRT's, else TensorFlow's own (deprecated) copy."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(path))


def run_tflite(path, images):
    """The outputs of the TFLite file at `path` on a float32 batch of `images`, any shape it allows."""
    interpreter = tflite_interpreter(path)
    (feed,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(feed["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(feed["index"], images.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(FIXTURES / "custom_224_golden.npz"))


@pytest.fixture(scope="session")
def fixture_state_dict():
    """The fixture's `state_dict`, read with torch as the official code wrote it."""
    torch = pytest.importorskip("torch")
    checkpoint = torch.load(FIXTURES / "custom_224.pth.tar", map_location="cpu", weights_only=False)
    return {name: tensor.numpy() for name, tensor in checkpoint["state_dict"].items()}


@pytest.fixture(scope="session")
def fixture_ema_state_dict():
    torch = pytest.importorskip("torch")
    checkpoint = torch.load(FIXTURES / "custom_224.pth.tar", map_location="cpu", weights_only=False)
    return {name: tensor.numpy() for name, tensor in checkpoint["state_dict_ema"].items()}


@pytest.fixture(scope="session")
def fixture_model(fixture_state_dict):
    """The fixture architecture with the fixture weights (224x224 input)."""
    from tfgcvit import GCViT, load_torch_weights

    model = GCViT(**FIXTURE_CONFIG)
    load_torch_weights(model, fixture_state_dict)
    return model
