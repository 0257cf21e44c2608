"""Mapping between PyTorch GC ViT checkpoints (official or timm layout) and Keras models.

`keras_weight_table` lists, for a built model, every official PyTorch tensor
name with the Keras variable it fills and how the array is laid out. timm 1.0
names are first renamed to official ones (`TIMM_RENAMES`), so both layouts go
through the same table.
"""

import re

import keras
import numpy as np

from tfgcvit.config import NUM_STAGES
from tfgcvit.weights.resize import resize_bias_table, table_window_size

# How a PyTorch array becomes a Keras one.
DENSE = "dense"  # Linear (out, in) -> (in, out); timm's 1x1-conv SE (out, in, 1, 1) too.
CONV = "conv"  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
DEPTHWISE = "depthwise"  # Conv2d (C, 1, kh, kw) -> (kh, kw, C, 1)
COPY = "copy"  # vectors, bias tables

# Tensors that PyTorch stores but that are not weights.
IGNORED_SUFFIXES = ("relative_position_index", "num_batches_tracked")

# timm 1.0 -> official names, applied in order (each pattern once).
TIMM_RENAMES = (
    (r"^stem\.conv1\.", "patch_embed.proj."),
    (r"^stem\.down\.", "patch_embed.conv_down."),
    (r"^stages\.(\d+)\.global_block\.blocks\.conv(\d+)\.",
     lambda m: f"levels.{m[1]}.q_global_gen.to_q_global.{int(m[2]) - 1}.conv."),
    (r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m[1]) - 1}.downsample."),
    (r"^stages\.3\.norm\.", "norm."),
    (r"^stages\.", "levels."),
    (r"^head\.fc\.", "head."),
    (r"\.conv_block\.conv_dw\.", ".conv.0."),
    (r"\.conv_block\.se\.fc1\.", ".conv.2.fc.0."),
    (r"\.conv_block\.se\.fc2\.", ".conv.2.fc.2."),
    (r"\.conv_block\.conv_pw\.", ".conv.3."),
    (r"\.conv_dw\.", ".0."),
    (r"\.se\.fc1\.", ".2.fc.0."),
    (r"\.se\.fc2\.", ".2.fc.2."),
    (r"\.conv_pw\.", ".3."),
    (r"\.attn\.rel_pos\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"\.ls1\.gamma$", ".gamma1"),
    (r"\.ls2\.gamma$", ".gamma2"),
)


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or misshapen tensors."""


def _mbconv(prefix, layer):
    return [
        (f"{prefix}.0.weight", layer.conv_0.kernel, DEPTHWISE),
        (f"{prefix}.2.fc.0.weight", layer.se.fc_0.kernel, DENSE),
        (f"{prefix}.2.fc.2.weight", layer.se.fc_2.kernel, DENSE),
        (f"{prefix}.3.weight", layer.conv_3.kernel, CONV),
    ]


def _norm(prefix, layer):
    return [(f"{prefix}.weight", layer.gamma, COPY), (f"{prefix}.bias", layer.beta, COPY)]


def _dense(prefix, layer, kind=DENSE):
    rows = [(f"{prefix}.weight", layer.kernel, kind)]
    if layer.bias is not None:
        rows.append((f"{prefix}.bias", layer.bias, COPY))
    return rows


def _reduce_size(prefix, layer):
    return [
        *_norm(f"{prefix}.norm1", layer.norm1),
        *_mbconv(f"{prefix}.conv", layer.conv),
        (f"{prefix}.reduction.weight", layer.reduction.kernel, CONV),
        *_norm(f"{prefix}.norm2", layer.norm2),
    ]


def _block(prefix, block):
    rows = [
        *_norm(f"{prefix}.norm1", block.norm1),
        (f"{prefix}.attn.relative_position_bias_table", block.attn.relative_position_bias_table, COPY),
        *_dense(f"{prefix}.attn.qkv", block.attn.qkv),
        *_dense(f"{prefix}.attn.proj", block.attn.proj),
        *_norm(f"{prefix}.norm2", block.norm2),
        *_dense(f"{prefix}.mlp.fc1", block.mlp.fc1),
        *_dense(f"{prefix}.mlp.fc2", block.mlp.fc2),
    ]
    if block.gamma1 is not None:
        rows += [(f"{prefix}.gamma1", block.gamma1, COPY), (f"{prefix}.gamma2", block.gamma2, COPY)]
    return rows


def _find_layer(model, name):
    for layer in model.layers:
        if layer.name == name:
            return layer
    return None


def _trunk_and_head(model):
    """(the model holding the GC ViT layers, the classification head Dense or None).

    A Keras Applications model holds both itself (head: `head`); a keras-hub
    `GCViTImageClassifier` holds its `backbone` and its `output_dense`.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model) and _find_layer(backbone, "patch_embed") is not None:
        return backbone, getattr(model, "output_dense", None)
    return model, _find_layer(model, "head")


def keras_weight_table(model):
    """Rows (official PyTorch name, Keras variable, layout) for every weight of `model`.

    Args:
        model: a model from `tfgcvit.GCViT` or a variant constructor (with or
            without head), a `tfgcvit.GCViTBackbone` or a `tfgcvit.GCViTImageClassifier`.
    """
    trunk, head = _trunk_and_head(model)
    patch_embed = _find_layer(trunk, "patch_embed")
    if patch_embed is None:
        raise ValueError(f"Model {model.name!r} is not a GC ViT model built by tfgcvit.")
    rows = [
        *_dense("patch_embed.proj", patch_embed.proj, CONV),
        *_reduce_size("patch_embed.conv_down", patch_embed.conv_down),
    ]
    for i in range(NUM_STAGES):
        level = _find_layer(trunk, f"levels_{i}")
        for j, extract in enumerate(level.q_global_gen.to_q_global):
            rows += _mbconv(f"levels.{i}.q_global_gen.to_q_global.{j}.conv", extract.conv)
        for k, block in enumerate(level.blocks):
            rows += _block(f"levels.{i}.blocks.{k}", block)
        downsample = _find_layer(trunk, f"levels_{i}_downsample")
        if downsample is not None:
            rows += _reduce_size(f"levels.{i}.downsample", downsample)
    rows += _norm("norm", _find_layer(trunk, "norm"))
    if head is not None:
        rows += _dense("head", head)
    return rows


def is_timm_layout(names):
    return any(name.startswith(("stem.", "stages.")) for name in names)


def timm_to_official(name):
    """Renames one timm 1.0 GC ViT tensor name to the official one."""
    for pattern, replacement in TIMM_RENAMES:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def to_official_layout(state_dict):
    """Returns the state dict with official names, converting from timm if needed."""
    names = list(state_dict)
    if not is_timm_layout(names):
        return dict(state_dict)
    return {timm_to_official(name): value for name, value in state_dict.items()}


def torch_to_keras_array(array, layout):
    """Reorders one PyTorch array into the Keras layout `layout`."""
    array = np.asarray(array)
    if layout == DENSE:
        return array.reshape(array.shape[0], -1).T if array.ndim == 4 else array.T
    if layout == CONV:
        return np.transpose(array, (2, 3, 1, 0))
    if layout == DEPTHWISE:
        return np.transpose(array, (2, 3, 0, 1))
    return array


def _summarise(names, limit=12):
    names = sorted(names)
    text = ", ".join(names[:limit])
    return text + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _resize_bias_table_to(name, value, variable):
    """The checkpoint's bias table resized to the model's window size when only that differs.

    Other arrays, tables with another number of heads, and lengths that are not
    (2w - 1) ** 2 come back unchanged (and then fail the shape check).
    """
    if not name.endswith(".relative_position_bias_table") or value.ndim != 2:
        return value
    shape = tuple(variable.shape)
    if len(shape) != 2 or value.shape[1] != shape[1] or table_window_size(value.shape[0]) is None:
        return value
    window = table_window_size(shape[0])
    return value if window is None else resize_bias_table(value, window)


def load_torch_weights(model, state_dict, skip_head=None, resize_bias_tables=True):
    """Sets the weights of a GC ViT model from a PyTorch state dict.

    Args:
        model: a model built by `tfgcvit.GCViT` or a variant constructor.
        state_dict: mapping from PyTorch tensor names to arrays (numpy, or
            anything `np.asarray` accepts), in the official NVlabs layout or in
            the timm 1.0 layout (detected from the names).
        skip_head: ignore `head.*` tensors. Defaults to True when the model has
            no head (include_top=False), False otherwise.
        resize_bias_tables: when a relative-position bias table differs from
            the model's only by its window size (e.g. 224 weights with windows
            7/7/14/7 in a model built with 12/12/24/12), resize it bicubically
            like the official detection backbone (`tfgcvit.weights.resize`). False
            reports such tables as shape mismatches.

    Raises:
        WeightsMismatchError: listing tensors the model needs that are missing,
            tensors that the model has no place for, and shape mismatches.
    """
    table = keras_weight_table(model)
    has_head = any(name.startswith("head.") for name, _, _ in table)
    if skip_head is None:
        skip_head = not has_head
    source = {
        name: value
        for name, value in to_official_layout(state_dict).items()
        if not name.endswith(IGNORED_SUFFIXES) and not (skip_head and name.startswith("head."))
    }
    expected = {name for name, _, _ in table}
    missing = expected - set(source)
    unexpected = set(source) - expected
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_summarise(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_summarise(unexpected)}")
    arrays = []
    shape_errors = []
    for name, variable, layout in table:
        if name not in source:
            continue
        value = torch_to_keras_array(source[name], layout)
        if resize_bias_tables and tuple(value.shape) != tuple(variable.shape):
            value = _resize_bias_table_to(name, value, variable)
        if tuple(value.shape) != tuple(variable.shape):
            shape_errors.append(
                f"{name}: checkpoint {tuple(np.shape(source[name]))} -> "
                f"{tuple(value.shape)}, model {tuple(variable.shape)}"
            )
        arrays.append((variable, value))
    if shape_errors:
        problems.append("shape mismatches: " + "; ".join(shape_errors[:8])
                        + (f" ... ({len(shape_errors) - 8} more)" if len(shape_errors) > 8 else ""))
    if problems:
        raise WeightsMismatchError(
            f"The checkpoint does not fit model {model.name!r} "
            f"({len(expected)} tensors expected, {len(source)} given): "
            + " | ".join(problems)
            + ". Check that the checkpoint is a GC ViT of the same variant "
            "(embed_dim, depths, heads, window sizes) and head size."
        )
    for variable, value in arrays:
        variable.assign(value.astype(variable.dtype))
    return model
