"""keras-hub's own conformance checks, run on GCViTBackbone and GCViTImageClassifier.

keras-hub tests every first-party vision backbone and image classifier with the
`run_*` methods of its shared `TestCase` (as `MiTBackboneTest`,
`ResNetBackboneTest`, `ViTImageClassifierTest` do): config and serialisation
round trips, eager, compiled and `tf.data` predictions, the pyramid outputs,
every dtype policy it tests with `compute_output_spec` and each sublayer's
dtypes, int8 and float8 quantisation of the dense layers, task `fit` and
`predict` with the preprocessor inside and split out, `.keras` saving, presets
with and without weights. This file runs the same methods, unchanged, on a
small GC ViT.

keras-hub publishes no name for its `TestCase`; it is imported from
`keras_hub.src.tests.test_case`, in the tests only. keras-hub skips some of
its checks on some backends: mixed precision on PyTorch without a GPU (run
here all the same), quantisation on PyTorch (the quantised round trip below
runs on every backend) and the channels_first check on TensorFlow without a
GPU (GC ViT is channels-last only: `run_data_format_check=False` everywhere).
"""

import os
from unittest import mock

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras_hub.src.tests.test_case import TestCase  # noqa: E402  (no public name)

from tfgcvit import hub  # noqa: E402
from tfgcvit.hub import (  # noqa: E402
    GCViTBackbone,
    GCViTImageClassifier,
    GCViTImageClassifierPreprocessor,
    GCViTImageConverter,
)

pytestmark = pytest.mark.backends

SIZE = 64
# The fixture's width with one block per stage but two in stage 2, so that global attention
# (every second block) runs; stage 2's 4x4 map is padded to its window of 3 (to 6x6). Residual
# scales exist (their weights go through every check) but start at 1, not the checkpoints' 1e-5,
# so that every branch counts in the outputs compared.
ARCHITECTURE = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(4, 4, 3, 2),
                    mlp_ratio=2.0, layer_scale=1.0, drop_path_rate=0.1)


def _images(seed=0):
    # A backend tensor, as keras-hub's vision tests pass (`ops.ones`): `compute_output_spec` takes
    # tensors, and on a NumPy array every Keras layer with a `compute_output_shape` (Dense, Conv2D,
    # keras-hub's ResNet and ViT backbones alike) gets `None` for the input shape.
    images = np.random.default_rng(seed).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    return keras.ops.convert_to_tensor(images)


def _torch_without_cuda():
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not torch.cuda.is_available()


def _pixels(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(2, SIZE, SIZE, 3)).astype("float32")


class GCViTBackboneTest(TestCase):
    def setUp(self):
        self.init_kwargs = dict(ARCHITECTURE)  # image_shape (None, None, 3), the presets' default
        self.input_data = _images()

    def test_backbone_basics(self):
        self.run_vision_backbone_test(
            cls=GCViTBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
            expected_output_shape=(2, 2, 2, 128),
            expected_pyramid_output_keys=["P2", "P3", "P4", "P5"],
            expected_pyramid_image_sizes=[(16, 16), (8, 8), (4, 4), (2, 2)],
            run_data_format_check=False,
        )

    @pytest.mark.skipif(not _torch_without_cuda(), reason="run_backbone_test checks every policy here")
    def test_mixed_precision_on_torch_cpu(self):
        # keras-hub skips its precision check on PyTorch without CUDA ("Torch lacks support");
        # GC ViT runs every policy there, so the check runs as if CUDA were present.
        import torch

        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            self.run_precision_test(GCViTBackbone, self.init_kwargs, self.input_data)

    def test_saved_model(self):
        self.run_model_saving_test(cls=GCViTBackbone, init_kwargs=self.init_kwargs,
                                   input_data=self.input_data)

    def test_preset(self):
        backbone = GCViTBackbone(**self.init_kwargs)
        directory = os.path.join(self.get_temp_dir(), "backbone_preset")
        hub.save_preset(backbone, directory)
        self.run_preset_test(
            cls=GCViTBackbone,
            preset=directory,
            input_data=self.input_data,
            expected_output=backbone(self.input_data),
        )


class GCViTImageClassifierTest(TestCase):
    def setUp(self):
        self.images = _pixels()
        self.labels = [0, 1]
        converter = GCViTImageConverter(image_size=(SIZE, SIZE))
        self.init_kwargs = {
            "backbone": GCViTBackbone(**ARCHITECTURE, image_shape=(SIZE, SIZE, 3)),
            "num_classes": 2,
            "preprocessor": GCViTImageClassifierPreprocessor(image_converter=converter),
        }
        self.train_data = (self.images, self.labels)

    def test_classifier_basics(self):
        self.run_task_test(
            cls=GCViTImageClassifier,
            init_kwargs=self.init_kwargs,
            train_data=self.train_data,
            expected_output_shape=(2, 2),
        )

    def test_head_dtype(self):
        model = GCViTImageClassifier(**self.init_kwargs, head_dtype="bfloat16")
        self.assertEqual(model.output_dense.compute_dtype, "bfloat16")

    def test_saved_model(self):
        self.run_model_saving_test(cls=GCViTImageClassifier, init_kwargs=self.init_kwargs,
                                   input_data=self.images)

    def test_preset(self):
        classifier = GCViTImageClassifier(**self.init_kwargs)
        directory = os.path.join(self.get_temp_dir(), "classifier_preset")
        hub.save_preset(classifier, directory)
        self.run_preset_test(
            cls=GCViTImageClassifier,
            preset=directory,
            input_data=self.images,
            expected_output=classifier(self.images),
            expected_output_shape=(2, 2),
        )
        # A new head: keras-hub's `test_all_presets` loads every preset with num_classes=2.
        self.run_preset_test(
            cls=GCViTImageClassifier,
            preset=directory,
            init_kwargs={"num_classes": 3},
            input_data=self.images,
            expected_output_shape=(2, 3),
        )


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_quantized_backbone_rebuilt_from_its_config_and_file_computes_the_same(mode, tmp_path):
    # keras-hub's quantisation check revives a quantised backbone from its config and loads its
    # weights, but compares no outputs and skips PyTorch. The config holds a DTypePolicyMap: the
    # rebuilt layers must compute what `quantize()` made of the original (on PyTorch they did not:
    # `_call` took the map's default policy for the layer's and ran int8 kernels unscaled).
    backbone = GCViTBackbone(**ARCHITECTURE)
    images = _images()
    full = keras.ops.convert_to_numpy(backbone(images))
    backbone.quantize(mode)
    quantized = keras.ops.convert_to_numpy(backbone(images))
    assert not np.array_equal(quantized, full)
    np.testing.assert_allclose(quantized, full, rtol=0, atol=0.1 * np.abs(full).max())

    rebuilt = GCViTBackbone.from_config(backbone.get_config())
    # All 42 dense layers quantised (each has a kernel scale), with the original's variables.
    assert sum(weight.path.endswith("/kernel_scale") for weight in rebuilt.weights) == 42
    assert sorted(weight.path for weight in rebuilt.weights) == sorted(weight.path for weight in backbone.weights)
    # By name, as presets load them: `quantize()` leaves a float8 layer's variables in another order.
    backbone.save_weights(tmp_path / "quantized.weights.h5")
    rebuilt.load_weights(tmp_path / "quantized.weights.h5")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(rebuilt(images)), quantized)

    backbone.save(tmp_path / "quantized.keras")
    restored = keras.saving.load_model(tmp_path / "quantized.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(images)), quantized)

    # In a classifier preset: keras-hub's task loader keeps the saved DTypePolicyMap. (Its
    # `Backbone.from_preset` replaces it by the global policy, for its own backbones too.)
    classifier = GCViTImageClassifier(backbone=backbone, num_classes=2)
    logits = keras.ops.convert_to_numpy(classifier(images))
    hub.save_preset(classifier, tmp_path / "preset")
    restored = GCViTImageClassifier.from_preset(str(tmp_path / "preset"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(images)), logits)
