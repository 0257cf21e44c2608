"""What a GC ViT looks at: class-activation maps and global-attention maps.

Python API (`tfgcvit.explain` is this module; `tfgcvit.explain_image` is its
main function):

- `explain_image(model, image)` / `explain_images(model, images)`: the maps
  of one image / a batch, as numpy arrays at image resolution, normalised to
  [0, 1], with the class scores;
- `global_attention(model, inputs)`: the raw attention probabilities of every
  global-attention block;
- `render(image, explanation)`: the picture `tfgcvit explain` writes, as a
  Pillow image.

Command line: ``tfgcvit explain IMAGE... [--class NAME|INDEX] [--out DIR]``
writes one PNG per image (`tfgcvit.cli`). See docs/explain.md.

The model normalises the pixels itself when built with
`include_preprocessing=True` (`_takes_pixels`); else they are normalised here.
A model without a head (`include_top=False`) is refused: its pooled features
have the shape of class scores but are none.

The maps:

- **Class-activation map** (HiResCAM, Draelos & Carin 2020): on the output of
  the final LayerNorm ("norm", the last feature map, stride 32), the gradient
  of the class logit times the features, summed over channels, ReLU. GC ViT's
  head is global average pooling then a dense layer, so the gradient is the
  same at every position and this is exactly Grad-CAM and the original CAM;
  its token values then sum to the logit minus the head bias. For a head that
  weighs positions differently (a custom head), HiResCAM still shows only the
  positions the score depends on, where Grad-CAM's averaged gradients can
  light up positions the head never reads. `method="gradcam"` gives Grad-CAM.
- **Global-attention map** of a stage: in GC ViT's global blocks (the odd
  blocks of each stage) the w*w global query tokens of an image attend to the
  keys of each window, with a softmax over the window's w*w keys. For each key
  position, the map holds the attention it receives, averaged over heads,
  global queries and the stage's global blocks; padded positions (at sizes
  that are not window multiples) are cropped away. Each window's values thus
  sum to one (less what padding took): the map says where in each window the
  global context looks, not which window matters more.

Both are upsampled bilinearly to the image and min-max normalised (a constant
map becomes zeros). With random or fixture weights they show the model's
structure (windows, borders, textures), not semantics.
"""

import weakref

import numpy as np
import keras
from keras import ops
from PIL import Image, ImageDraw, ImageFont

from tfgcvit.model.layers import window_partition, window_reverse
from tfgcvit.model.gcvit import NUM_STAGES

METHODS = ("hirescam", "gradcam")
OVERLAY_ALPHA = 0.5
TOP = 5
# The "turbo" colour map (Mikhailov, Google, 2019; Apache 2.0) at 33 evenly spaced
# points, read from matplotlib's table, between which `turbo` interpolates linearly
# (within 6/255 of matplotlib's map). Written out rather than imported: Keras
# imports matplotlib.pyplot whenever matplotlib is installed, which added 25-60 MiB
# to the peak memory of every process (BENCHMARKS.md, issue 12 round 6).
TURBO = np.array([
    (0.1900, 0.0718, 0.2322), (0.2250, 0.1635, 0.4510), (0.2511, 0.2524, 0.6337),
    (0.2682, 0.3382, 0.7805), (0.2763, 0.4212, 0.8912), (0.2754, 0.5011, 0.9659),
    (0.2586, 0.5796, 0.9988), (0.2138, 0.6589, 0.9796), (0.1584, 0.7355, 0.9231),
    (0.1117, 0.8057, 0.8452), (0.0927, 0.8655, 0.7623), (0.1201, 0.9119, 0.6866),
    (0.1966, 0.9490, 0.5947), (0.3051, 0.9770, 0.4899), (0.4278, 0.9942, 0.3857),
    (0.5466, 0.9991, 0.2958), (0.6436, 0.9900, 0.2336), (0.7260, 0.9647, 0.2064),
    (0.8047, 0.9245, 0.2046), (0.8753, 0.8727, 0.2155), (0.9330, 0.8124, 0.2267),
    (0.9732, 0.7468, 0.2254), (0.9931, 0.6741, 0.2035), (0.9959, 0.5870, 0.1690),
    (0.9836, 0.4929, 0.1285), (0.9580, 0.3996, 0.0883), (0.9211, 0.3149, 0.0548),
    (0.8742, 0.2453, 0.0330), (0.8161, 0.1846, 0.0181), (0.7462, 0.1310, 0.0085),
    (0.6645, 0.0844, 0.0042), (0.5710, 0.0447, 0.0053), (0.4796, 0.0158, 0.0106),
])
# model -> (explainer, head). Not an attribute of the model: Keras would track
# the sub-models as its layers and save them with its weights.
_PARTS = weakref.WeakKeyDictionary()


# Model parts -------------------------------------------------------------------


def _image_input(model):
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _block_attention(block, x, global_query):
    """A global block's attention probabilities for its input x, (B, heads, windows, w*w, w*w)."""
    # The windows its attention sees: norm1, zero-padded bottom/right to a
    # window multiple, partitioned, as in `GCViTBlock._attention`.
    w = block.window_size
    shape = ops.shape(x)
    padding = [[0, 0], [0, (w - shape[1] % w) % w], [0, (w - shape[2] % w) % w], [0, 0]]
    windows = window_partition(ops.pad(block.norm1(x), padding), w)
    probabilities, _ = block.attn.attend(windows, global_query)
    probabilities = ops.reshape(probabilities, (block.num_heads, shape[0], -1, w * w, w * w))
    return ops.transpose(probabilities, (1, 0, 2, 3, 4))


class _StageAttention(keras.layers.Layer):
    """Runs the blocks of a stage (a `GCViTLevel`, its weights shared) as the level does,
    also returning the attention probabilities of its global blocks.

    A layer, so that the explanation is one Keras model, which JAX compiles
    (see `_parts`) instead of running op by op.
    """

    def __init__(self, level, **kwargs):
        super().__init__(name=f"{level.name}_attention", **kwargs)
        self.level = level

    def call(self, inputs):
        global_query = self.level.global_query(inputs)
        x, probabilities = inputs, []
        for block in self.level.blocks:
            if block.use_global_query:
                probabilities.append(_block_attention(block, x, global_query))
            x = block(x, global_query=global_query)
        return {"probabilities": probabilities, "output": x}


def _parts(model):
    """Sub-models of a GC ViT classifier, made once per model.

    Returns:
        (explainer, head): `explainer` maps images to {"features": the final
        norm's output, "stages": per stage, the `_StageAttention` outputs};
        `head` maps those features to the class logits (before the softmax
        of `classifier_activation`).
    """
    if model in _PARTS:
        return _PARTS[model]
    try:
        levels = [model.get_layer(f"levels_{i}") for i in range(NUM_STAGES)]
        features = model.get_layer("norm").output
    except ValueError:
        raise ValueError(
            f"explain needs a GC ViT classifier built by tfgcvit (layers levels_0..levels_3 and norm); "
            f"model {model.name!r} has none of them."
        ) from None
    last = model.layers[-1]
    # Gradients of logits, not of softmax probabilities (those saturate).
    logits = last.input if isinstance(last, keras.layers.Activation) else model.outputs[0]
    # A class score needs weights after the final norm (a head): include_top=False
    # with pooling="avg" or "max" also outputs (batch, channels), pooled features.
    head = keras.Model(features, logits) if len(logits.shape) == 2 else None
    if head is None or not head.weights:
        raise ValueError(
            f"explain needs class scores (batch, classes); model {model.name!r} outputs "
            f"{'pooled ' if head is not None else ''}features of shape {tuple(logits.shape)} with no "
            f"classification layer after the final norm. Pass a classifier: the model built with "
            f"include_top=True, or this model with your own head on top."
        )
    # The stages run twice (once in the model, once here): simpler than rewiring
    # the model, and cheap next to compiling it.
    stages = [_StageAttention(level)(level.input) for level in levels]
    explainer = keras.Model(_image_input(model), {"features": features, "stages": stages})
    parts = (explainer, head)
    for part in parts:
        # `predict_on_batch` compiles with jax.jit: JAX's op-by-op execution
        # compiles each op instead. Tracing a tf.function costs more than a few
        # eager TensorFlow runs; PyTorch runs eagerly anyway.
        part.run_eagerly = keras.backend.backend() != "jax"
    _PARTS[model] = parts
    return parts


def _takes_pixels(model):
    """Whether `model` normalises its input itself (built with `include_preprocessing=True`).

    Such a model has its `preprocessing` layer between the image input and the
    first GC ViT layer (`image_size_check`, or the stem `patch_embed` in models saved
    before that check existed): it takes RGB pixels in [0, 255]. Otherwise that layer
    reads the input, which must be normalised with `tfgcvit.preprocess_input`.
    """
    names = {layer.name for layer in model.layers}
    first = "image_size_check" if "image_size_check" in names else "patch_embed"
    return model.get_layer(first).input is not model.inputs[0]


def _check_images(model, images):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Expected RGB images (batch, height, width, 3); got shape {images.shape}.")
    expected = tuple(_image_input(model).shape[1:3])
    if any(e is not None and e != s for e, s in zip(expected, images.shape[1:3])):
        raise ValueError(
            f"The model takes {expected[0]}x{expected[1]} images; got {images.shape[1]}x{images.shape[2]}. "
            f"Resize them (tfgcvit.data.images.evaluation_transform) or build the model with "
            f"input_shape=(None, None, 3)."
        )
    return images


# Global attention ----------------------------------------------------------------


def _stages(model, outputs):
    return [dict(size=tuple(stage["output"].shape[1:3]), window_size=model.get_layer(f"levels_{i}").window_size,
                 probabilities=list(stage["probabilities"]), output=stage["output"])
            for i, stage in enumerate(outputs["stages"])]


def global_attention(model, inputs):
    """The attention probabilities of every global-attention block.

    Args:
        model: a GC ViT classifier built by tfgcvit (any input size).
        inputs: what the model takes (batch, height, width, 3): images
            normalised with `tfgcvit.preprocess_input`, or RGB pixels in
            [0, 255] for a model built with `include_preprocessing=True`.

    Returns:
        One dict per stage with "size" (the stage's feature map height and
        width), "window_size" w, "probabilities": one float32 array per
        global block of the stage, shaped (batch, heads, windows, w*w global
        queries, w*w keys), windows in row-major order over the map padded to
        window multiples, each query's probabilities summing to one over the
        keys; and "output": the stage output these blocks computed (the
        model's `levels_i` output), numpy (batch, height, width, channels).
    """
    explainer, _ = _parts(model)
    return _stages(model, explainer.predict_on_batch(inputs))


def attention_token_maps(stages):
    """Per-stage maps from `global_attention`: attention received by each key position.

    Averages the probabilities over heads, global queries and the stage's
    global blocks, puts the windows back in place and crops the padding.

    Returns:
        One float32 array (batch, height, width) per stage, at the stage's
        feature-map resolution; within each window the values sum to one
        (less what padded positions received).
    """
    maps = []
    for stage in stages:
        height, width = stage["size"]
        w = stage["window_size"]
        received = np.mean([np.mean(p, axis=(1, 3), dtype=np.float32) for p in stage["probabilities"]],
                           axis=0)  # (B, nW, N)
        grid = window_reverse(received[..., None], w, height + (-height % w), width + (-width % w))
        maps.append(np.asarray(ops.convert_to_numpy(grid))[:, :height, :width, 0])
    return maps


# Class activation ----------------------------------------------------------------


def _score_gradients(head, features, class_indices):
    """d sum_b logits[b, class_b] / d features, with the backend's autodiff."""
    backend = keras.backend.backend()
    classes = head.outputs[0].shape[-1]
    selector = np.eye(classes, dtype="float32")[np.asarray(class_indices)]

    def score(logits):
        return ops.sum(ops.cast(logits, "float32") * ops.convert_to_tensor(selector))

    if backend == "tensorflow":
        import tensorflow as tf

        features = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(features)
            total = score(head(features))
        return tape.gradient(total, features).numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in head.trainable_variables]
        non_trainable = [v.value for v in head.non_trainable_variables]

        def stateless_score(x):
            logits, _ = head.stateless_call(trainable, non_trainable, x)
            return score(logits)

        return np.asarray(jax.grad(stateless_score)(jax.numpy.asarray(features)))
    if backend == "torch":
        import torch

        features = ops.convert_to_tensor(features).detach().requires_grad_(True)
        (gradients,) = torch.autograd.grad(score(head(features)), features)
        return gradients.detach().cpu().numpy()
    raise NotImplementedError(
        f"Class-activation maps need gradients, taken here with TensorFlow, JAX or PyTorch; "
        f"the {backend!r} backend is not supported."
    )


def class_activation_tokens(head, features, class_indices, method="hirescam"):
    """Signed class-activation values at the final feature map, (batch, h, w).

    Args:
        head: the model part from the final norm's output to the logits.
        features: that output, numpy (batch, h, w, C).
        class_indices: one class per image.
        method: "hirescam" (gradient x features, summed over channels) or
            "gradcam" (features weighted by the spatially averaged gradient).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    gradients = _score_gradients(head, features, class_indices)
    if method == "gradcam":
        gradients = gradients.mean(axis=(1, 2), keepdims=True)
    return np.sum(gradients * features, axis=-1)


# Maps at image resolution -----------------------------------------------------------


def _upsample(token_map, height, width):
    """Bilinear resize of a (h, w) map to (height, width), half-pixel centres (Pillow)."""
    image = Image.fromarray(np.asarray(token_map, np.float32))  # mode "F"
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def normalise(values):
    """Min-max scaling to [0, 1]; a constant map gives zeros."""
    values = np.asarray(values, np.float32)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def explain_images(model, images, class_index=None, method="hirescam"):
    """Class-activation and global-attention maps of a batch of images.

    Args:
        model: a GC ViT classifier built by tfgcvit (`include_top=True`, or
            a backbone with your own head), on any backend, with or without
            `include_preprocessing`. Models built with `input_shape=(None,
            None, 3)` take any image size; others need images of their input size.
        images: RGB images (batch, height, width, 3) with values in [0, 255],
            uint8 or float; they are normalised with `tfgcvit.preprocess_input`
            (or by the model's own layer, built with `include_preprocessing=True`).
        class_index: the class to explain: None (each image's top class), an
            int, or one int per image.
        method: "hirescam" (default; for GC ViT's own head equal to Grad-CAM)
            or "gradcam".

    Returns:
        One dict per image:
        "logits" (classes,) and "probabilities" (their softmax), float32;
        "class_index": the explained class;
        "cam": the class-activation map (height, width), float32 in [0, 1];
        "attention": {"stage0".."stage3": global-attention map (height,
        width), float32 in [0, 1]};
        "cam_tokens": the signed map before ReLU, upsampling and scaling,
        at the final feature map (h, w);
        "attention_tokens": {"stage0"..: the map before upsampling and
        scaling, at the stage's feature map, see `attention_token_maps`};
        "method": the class-activation method.

    Raises:
        ValueError: not a GC ViT classifier (also a model without a head,
            `include_top=False`, whose pooled features are no class scores),
            images of the wrong shape, or a class index out of range.
    """
    from tfgcvit.data.preprocessing import preprocess_input

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    images = _check_images(model, images)
    explainer, head = _parts(model)
    # The pixels are normalised once: by the model's own layer, or here.
    inputs = images.astype(np.float32) if _takes_pixels(model) else preprocess_input(images)
    outputs = explainer.predict_on_batch(inputs)
    features = np.asarray(outputs["features"], np.float32)
    logits = np.asarray(head.predict_on_batch(features), np.float32)
    attention_tokens = attention_token_maps(_stages(model, outputs))
    batch, classes = logits.shape
    if class_index is None:
        indices = np.argmax(logits, axis=-1)
    else:
        indices = np.broadcast_to(np.asarray(class_index), (batch,)).astype(int)
        if indices.min() < 0 or indices.max() >= classes:
            raise ValueError(f"class_index must be in 0..{classes - 1}; got {class_index}.")
    cam_tokens = class_activation_tokens(head, features, indices, method)
    height, width = images.shape[1:3]
    results = []
    for b in range(batch):
        tokens = {f"stage{i}": maps[b] for i, maps in enumerate(attention_tokens)}
        results.append(dict(
            logits=logits[b],
            probabilities=_softmax(logits[b]).astype(np.float32),
            class_index=int(indices[b]),
            cam=normalise(_upsample(np.maximum(cam_tokens[b], 0.0), height, width)),
            attention={name: normalise(_upsample(m, height, width)) for name, m in tokens.items()},
            cam_tokens=cam_tokens[b].astype(np.float32),
            attention_tokens=tokens,
            method=method,
        ))
    return results


def explain_image(model, image, class_index=None, method="hirescam"):
    """The maps of one RGB image (height, width, 3): `explain_images` for a batch of one.

    Example:
        >>> from tfgcvit import GCViTTiny
        >>> from tfgcvit.explain import explain_image
        >>> model = GCViTTiny(input_shape=(None, None, 3))
        >>> maps = explain_image(model, pixels)  # uint8 (H, W, 3)
        >>> maps["cam"].shape, sorted(maps["attention"])
        ((H, W), ['stage0', 'stage1', 'stage2', 'stage3'])
    """
    return explain_images(model, np.asarray(image)[None], class_index, method)[0]


# Rendering ----------------------------------------------------------------------


def turbo(values):
    """RGB colours in [0, 1], shape (..., 3), of values in [0, 1] (clipped), blue low, red high."""
    values = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    points = np.linspace(0.0, 1.0, len(TURBO))
    return np.stack([np.interp(values, points, TURBO[:, channel]) for channel in range(3)], axis=-1)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _overlay(image, values):
    heat = turbo(values) * 255.0
    return Image.fromarray(np.uint8(np.round((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * heat)))


def _fit(draw, text, font, width):
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def render(image, explanation, labels=None):
    """The explanation as one picture: the image with its top-5, the class map, one map per stage.

    Args:
        image: the RGB uint8 image (height, width, 3) that was explained.
        explanation: a dict from `explain_image`.
        labels: class names, in class-index order (default: the indices).

    Returns:
        A Pillow RGB image: six panels side by side with captions and a
        colour scale.
    """
    image = np.asarray(image, np.float32)
    height, width = image.shape[:2]
    probabilities = explanation["probabilities"]
    labels = labels or [str(i) for i in range(len(probabilities))]
    font_size = max(10, min(14, width // 18))
    font, caption = _font(font_size), _font(font_size + 1)

    first = Image.fromarray(np.uint8(image))
    draw = ImageDraw.Draw(first, "RGBA")
    best = np.argsort(-probabilities, kind="stable")[:TOP]
    line = font_size + 4
    draw.rectangle((0, 0, width, 4 + line * len(best)), fill=(0, 0, 0, 150))
    for row, index in enumerate(best):
        text = _fit(draw, f"{probabilities[index]:6.1%}  {labels[index]}", font, width - 8)
        draw.text((4, 3 + row * line), text, font=font, fill=(255, 255, 255))

    chosen = labels[explanation["class_index"]]
    panels = [(first, "input, top-5"),
              (_overlay(image, explanation["cam"]), f"{explanation.get('method', 'hirescam')}: {chosen}")]
    for name, values in explanation["attention"].items():
        h, w = explanation["attention_tokens"][name].shape
        panels.append((_overlay(image, values), f"{name} global attention ({h}x{w})"))

    band, scale = caption.size + 8, 12
    canvas = Image.new("RGB", (width * len(panels), band + height + scale + band), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(panels):
        canvas.paste(panel, (i * width, band))
        draw.text((i * width + 4, 4), _fit(draw, title, caption, width - 8), font=caption, fill=(0, 0, 0))
    ramp = turbo(np.linspace(0.0, 1.0, width * len(panels)))[None] * 255.0
    canvas.paste(Image.fromarray(np.uint8(np.repeat(ramp, scale, axis=0))), (0, band + height + 2))
    draw.text((4, band + height + scale + 4), "0 (low)", font=font, fill=(0, 0, 0))
    note = "each map scaled to its own range"
    draw.text(((canvas.width - draw.textlength(note, font=font)) / 2, band + height + scale + 4), note,
              font=font, fill=(0, 0, 0))
    draw.text((canvas.width - 4 - draw.textlength("1 (high)", font=font), band + height + scale + 4),
              "1 (high)", font=font, fill=(0, 0, 0))
    return canvas
