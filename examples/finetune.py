"""Fine-tune GC ViT on your own classes (the original tfgcvit "custom classification" recipe).

    uint8 images -> Lambda(preprocess_input) -> GC ViT backbone (include_top=False,
    pooling="avg", pretrained weights) -> Dense head (float32)

Works on every Keras backend (KERAS_BACKEND=tensorflow, jax or torch) and under
mixed precision: --policy mixed_bfloat16 (all backends) or mixed_float16
(TensorFlow, PyTorch; Keras adds loss scaling). The head and its softmax stay
float32.

Examples:
    # Your images, one sub-folder per class, GC ViT-Tiny with ImageNet weights:
    python examples/finetune.py --data path/to/train --variant tiny --weights imagenet \
        --epochs 5 --save finetuned.keras
    # Smoke test on random data with the tiny "mini" architecture:
    python examples/finetune.py --variant mini --image-size 64 --steps 2
"""

import argparse

import keras
import numpy as np

import tfgcvit
from tfgcvit.model.gcvit import get_constructor

# A tiny architecture for smoke tests: the one of the repository's test
# checkpoint (tests/data/fixtures/custom_224.pth.tar), whose weights it can load.
MINI = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
            mlp_ratio=3, layer_scale=1e-5)


def build_backbone(variant, image_size, weights=None, **kwargs):
    """A GC ViT without head, pooled to one vector per image."""
    options = dict(include_top=False, pooling="avg", weights=weights,
                   input_shape=(image_size, image_size, 3), **kwargs)
    if variant == "mini":
        return tfgcvit.GCViT(**MINI, model_name="gcvit_mini", **options)
    return get_constructor(variant)(**options)


def build_classifier(backbone, num_classes):
    """The recipe: raw uint8 pixels in, class probabilities out."""
    inputs = keras.Input(backbone.input_shape[1:], dtype="uint8", name="pixels")
    x = keras.layers.Lambda(tfgcvit.preprocess_input, name="preprocess")(inputs)
    x = backbone(x)
    # float32 even under a mixed policy: the softmax and the loss stay precise.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name="gcvit_classifier")


def random_data(num_images, image_size, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype="uint8")
    return images, rng.integers(0, num_classes, num_images)


def folder_data(path, image_size, batch_size):
    """Class sub-folders -> a tf.data pipeline of (uint8 images, labels) and the class names."""
    import tensorflow as tf

    dataset = keras.utils.image_dataset_from_directory(
        path, image_size=(image_size, image_size), batch_size=batch_size, label_mode="int")
    names = dataset.class_names
    dataset = dataset.map(lambda x, y: (tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8), y))
    return dataset.prefetch(2), names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder with one sub-folder of images per class "
                        "(default: random images)")
    parser.add_argument("--variant", default="xxtiny",
                        help="official variant (xxtiny, tiny, small, ...) or 'mini'")
    parser.add_argument("--weights", default=None,
                        help="imagenet, imagenet21k, a checkpoint path, or none (default)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=5, help="with random data")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--policy", default="float32",
                        choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--save", help="write the fine-tuned model to this .keras file")
    parser.add_argument("--run-eagerly", action="store_true", help="debugging, tiny runs")
    return parser.parse_args(argv)


def main(argv=None):
    """Builds, fine-tunes and optionally saves; returns (model, history)."""
    args = parse_args(argv)
    keras.config.set_dtype_policy(args.policy)
    weights = None if args.weights in (None, "none") else args.weights
    if args.data:
        data, names = folder_data(args.data, args.image_size, args.batch_size)
        num_classes, fit_args = len(names), dict(x=data)
    else:
        num_classes = args.classes
        steps = args.steps or 2
        images, labels = random_data(steps * args.batch_size, args.image_size, num_classes)
        fit_args = dict(x=images, y=labels, batch_size=args.batch_size)

    model = build_classifier(build_backbone(args.variant, args.image_size, weights), num_classes)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  run_eagerly=args.run_eagerly)
    history = model.fit(**fit_args, epochs=args.epochs, steps_per_epoch=args.steps, verbose=2)
    print(f"backend={keras.backend.backend()} policy={args.policy} "
          f"final loss={history.history['loss'][-1]:.4f}")
    if args.save:
        model.save(args.save)
        print(f"saved {args.save}; reload with keras.models.load_model(path, "
              "custom_objects={'preprocess_input': tfgcvit.preprocess_input})")
    return model, history


if __name__ == "__main__":
    main()
