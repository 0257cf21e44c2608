"""Data-parallel fine-tuning of GC ViT with the engines' own tools, checked against one device.

- JAX: `keras.distribution.DataParallel` shards every batch over the devices
  and all-reduces the gradients (set before the model is built).
- TensorFlow: `tf.distribute.MirroredStrategy`; build and compile inside
  `strategy.scope()`, then `model.fit` as usual.

The script trains the same model (same initial weights, same batches) on one
device and data-parallel on all, and prints the per-step losses of both: they
agree up to float summation order. Stochastic depth and dropout draw different
random numbers per device, so the comparison uses path_drop=0 (the default
here); real training can keep them.

Without accelerators, try it on virtual CPU devices:
    python examples/distributed.py --engine jax --virtual-devices 2
    python examples/distributed.py --engine tensorflow --virtual-devices 2
On GPUs/TPUs leave out --virtual-devices. Prints one JSON line last.
"""

import argparse
import json
import os

# The architecture of the repository's test checkpoint (tests/data/fixtures/custom_224.pth.tar).
MINI = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
            mlp_ratio=3, layer_scale=1e-5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["jax", "tensorflow"], required=True)
    parser.add_argument("--virtual-devices", type=int, default=0,
                        help="split the CPU into this many devices (testing without GPUs)")
    parser.add_argument("--variant", default="mini", help="official variant or 'mini'")
    parser.add_argument("--weights", default=None, help="imagenet, a checkpoint path, or none")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, split over devices")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--path-drop", type=float, default=0.0)
    parser.add_argument("--depths", type=int, nargs=4, default=MINI["depths"],
                        help="blocks per stage of the 'mini' architecture")
    return parser.parse_args(argv)


def configure_engine(engine, virtual_devices):
    """Selects the Keras backend and virtual devices; must run before Keras is imported."""
    os.environ["KERAS_BACKEND"] = engine
    if virtual_devices and engine == "jax":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={virtual_devices}")
    if virtual_devices and engine == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * virtual_devices)


def build_classifier(args, num_classes):
    import keras

    import tfgcvit
    from tfgcvit.model.gcvit import get_constructor

    options = dict(include_top=False, pooling="avg", weights=args.weights, path_drop=args.path_drop,
                   input_shape=(args.image_size, args.image_size, 3))
    if args.variant == "mini":
        backbone = tfgcvit.GCViT(**dict(MINI, depths=tuple(args.depths)), **options)
    else:
        backbone = get_constructor(args.variant)(**options)
    inputs = keras.Input(backbone.input_shape[1:], dtype="uint8")
    x = backbone(keras.layers.Lambda(tfgcvit.preprocess_input)(inputs))
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    model = keras.Model(inputs, outputs)
    # Plain SGD: the first update is easy to reason about (loss 2 reflects it exactly).
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    return model


def step_losses(model, images, labels, batch_size):
    """Trains one epoch without shuffling; returns the loss Keras logs after each step."""
    import keras

    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    model.fit(images, labels, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[Record()])
    return losses


def main(argv=None):
    args = parse_args(argv)
    args.weights = None if args.weights in (None, "none") else args.weights
    configure_engine(args.engine, args.virtual_devices)
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    num_classes = 5
    count = args.batch_size * args.steps
    images = rng.integers(0, 256, (count, args.image_size, args.image_size, 3), dtype="uint8")
    labels = rng.integers(0, num_classes, count)

    keras.utils.set_random_seed(0)
    single = build_classifier(args, num_classes)
    initial = single.get_weights()
    single_losses = step_losses(single, images, labels, args.batch_size)

    if args.engine == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        parallel = build_classifier(args, num_classes)
        parallel.set_weights(initial)
        parallel_losses = step_losses(parallel, images, labels, args.batch_size)
        keras.distribution.set_distribution(None)
        device_names = [str(device) for device in devices]
        # Each weight is replicated on every device of the mesh.
        replicas = len(parallel.trainable_variables[0].value.sharding.device_set)
    else:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(
            [device.name for device in tf.config.list_logical_devices("CPU")]
            if args.virtual_devices else None)
        with strategy.scope():
            parallel = build_classifier(args, num_classes)
            parallel.set_weights(initial)
        parallel_losses = step_losses(parallel, images, labels, args.batch_size)
        device_names = list(strategy.extended.worker_devices)
        replicas = strategy.num_replicas_in_sync

    result = {"engine": args.engine, "devices": device_names, "replicas": replicas,
              "single_device_losses": single_losses, "data_parallel_losses": parallel_losses,
              "max_abs_diff": max(abs(a - b) for a, b in zip(single_losses, parallel_losses))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
