"""One test harness for every GC ViT layer, in the keras-hub style.

`check_layer` runs a layer through what a Keras layer must survive:

- shape inference: the output of an eager call and of a symbolic call have
  the shape `compute_output_shape` announces;
- a config round trip that compares *outputs* with the same weights, so a
  constructor argument missing from `get_config` fails (the factories pass
  non-default values for that reason);
- a `.keras` round trip of a model holding the layer;
- mixed precision: built with `dtype="mixed_bfloat16"` the layer computes in
  bfloat16 and keeps float32 variables, its sub-layers too;
- one training step in which every trainable variable changes.
"""

import keras
import numpy as np
from keras import ops


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def _all_layers(layer):
    found, pending = [], [layer]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(current._layers)  # Keras' own list of tracked sub-layers
    return found


class _Wrapper(keras.Model):
    """A model calling `layer(x, **constants)`: extra inputs that are not batch-first (global queries)."""

    def __init__(self, layer, constants, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.constants = constants

    def call(self, x, training=None):
        constants = {name: ops.convert_to_tensor(value) for name, value in self.constants.items()}
        return self.layer(x, training=training, **constants)


def check_layer(factory, input_shape, constants=None, tmp_path=None):
    """Runs every check on `factory(**kwargs)`, a function returning a new layer.

    Args:
        factory: builds the layer; takes keyword arguments for the base Layer (dtype).
        input_shape: the main input's shape, batch included (a fixed batch).
        constants: other call arguments as numpy arrays (e.g. {"global_query": ...}).
        tmp_path: a folder for the `.keras` file.
    """
    constants = constants or {}
    tensors = {name: ops.convert_to_tensor(value) for name, value in constants.items()}
    x = _random(input_shape, seed=0)

    layer = factory()
    output = _to_numpy(layer(x, **tensors))
    expected_shape = tuple(layer.compute_output_shape(tuple(input_shape)))
    assert output.shape == expected_shape, (output.shape, expected_shape)
    if not constants:
        symbolic = factory()(keras.KerasTensor((None, *input_shape[1:])))
        assert tuple(symbolic.shape) == (None, *expected_shape[1:])

    restored = type(layer).from_config(layer.get_config())
    restored(x, **tensors)
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(_to_numpy(restored(x, **tensors)), output)
    assert restored.get_config() == layer.get_config()
    serialized = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(serialized) is type(layer) and serialized.get_config() == layer.get_config()

    if tmp_path is not None:
        _check_keras_file(factory, x, constants, tmp_path)
    _check_mixed_precision(factory, x, tensors)
    _check_training_step(factory, x, constants)


def _check_keras_file(factory, x, constants, tmp_path):
    if constants:  # only batch-first inputs go through a functional model and a file
        return
    inputs = keras.Input(x.shape[1:], batch_size=x.shape[0])
    model = keras.Model(inputs, factory()(inputs))
    path = tmp_path / "layer.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_to_numpy(loaded(x)), _to_numpy(model(x)))


def _check_mixed_precision(factory, x, tensors):
    layer = factory(dtype="mixed_bfloat16")
    tensors = {name: ops.cast(value, "bfloat16") for name, value in tensors.items()}
    output = layer(x, **tensors)
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert {keras.backend.standardize_dtype(w.dtype) for w in layer.weights} <= {"float32"}
    assert {sub.dtype_policy.name for sub in _all_layers(layer)} == {"mixed_bfloat16"}


def _check_training_step(factory, x, constants):
    keras.utils.set_random_seed(1)
    layer = factory()
    model = _Wrapper(layer, constants, name="harness")
    model(x)
    if not model.trainable_weights:
        return
    # Adam moves every weight with a non-zero gradient by about its learning rate.
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = [np.array(w) for w in model.trainable_weights]
    target = _random(tuple(model(x).shape), seed=2)
    model.fit(x, target, batch_size=x.shape[0], epochs=1, verbose=0)
    unchanged = [w.path for w, old in zip(model.trainable_weights, before) if np.array_equal(np.array(w), old)]
    assert unchanged == [], unchanged
