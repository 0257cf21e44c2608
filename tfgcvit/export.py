"""Exporting GC ViT models for serving: TensorFlow SavedModel, ONNX and TFLite (LiteRT).

`export_model` is a thin layer over Keras' `Model.export` that checks, before
any tracing starts, that the requested combination works for GC ViT, and says
what to do instead when it does not. What works (and is tested):

| format           | backends          | dynamic batch | dynamic height/width |
|------------------|-------------------|---------------|----------------------|
| "tf_saved_model" | tensorflow, jax   | yes           | yes                  |
| "onnx"           | tensorflow        | yes           | yes                  |
| "litert"         | tensorflow        | yes           | yes (resize the input tensor) |

Dynamic height/width need a model built with `input_shape=(None, None, 3)`.
Exports are traced with the layers' reference forms (`tfgcvit.model.forms.exporting`),
so a file runs the same graph wherever it is served. Keras' own
`model.export(path, format="onnx")` works too (after one call of the model);
wrap it in `tfgcvit.model.forms.exporting("onnx")` for the same forms.
`optimize_onnx` rewrites an ONNX file's layer norms and GELUs into the forms
runtimes fuse, runs its attention batch first, cancels tf2onnx's transposes,
splits the query/key/value projections and computes each shape once
(`export_model` applies it); `quantize_onnx` writes an int8
(dynamic quantisation) copy of an ONNX file.
The model weights are backend-independent: to export from a JAX or PyTorch
session, save them (`model.save_weights("m.weights.h5")`), rebuild the same
model under `KERAS_BACKEND=tensorflow`, load them and export there.
"""

import logging

import keras
import numpy as np

from tfgcvit.config import MIN_SIZE
from tfgcvit.model import forms
from tfgcvit.model.layers import SQRT_HALF

FORMATS = ("tf_saved_model", "onnx", "litert")
# Backends on which each format exports GC ViT (checked in tests/test_export.py).
BACKENDS = {
    "tf_saved_model": ("tensorflow", "jax"),
    "onnx": ("tensorflow",),
    "litert": ("tensorflow",),
}
# Why the other backends are not offered, shown in the error.
UNSUPPORTED_REASONS = {
    ("tf_saved_model", "torch"): "Keras cannot write a TensorFlow SavedModel from PyTorch",
    ("onnx", "jax"): ("Keras' JAX path, the separate jax2onnx 0.17 converter (with flax, equinox, "
                      "optax and orbax), fails on GC ViT's reshapes of symbolic shapes"),
    ("onnx", "torch"): ("Keras' PyTorch path (torch.onnx) fails on GC ViT's dynamic window "
                        "shapes and has no dynamic batch"),
    ("litert", "jax"): "Keras has no LiteRT exporter for JAX",
    ("litert", "torch"): "Keras' PyTorch path needs litert-torch and fixes every shape",
}
# Keyword arguments accepted per format (besides input_signature and verbose).
OPTIONS = {
    "tf_saved_model": ("is_static", "jax2tf_kwargs"),
    "onnx": ("opset_version", "optimize"),
    # TFLite converter attributes, passed through; Keras rejects unknown ones.
    "litert": None,
}
# The oldest ONNX opset tested with GC ViT (tf2onnx's default is newer).
MIN_ONNX_OPSET = 13
# ONNX's LayerNormalization node exists from this opset on.
LAYER_NORM_OPSET = 17
# ONNX operators (besides Random*) whose outputs may differ between two nodes with the same inputs.
RANDOM_OPS = ("Bernoulli", "Dropout", "Multinomial")


def _all_layers(model):
    """The layers of `model` and of the models nested in it (Keras' public `layers` lists).

    GC ViT's layers give their sub-layers their own dtype policy, so these tell a
    mixed-precision model."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += _all_layers(layer)
    return found


def _check_float32(model, format):
    dtypes = {layer.compute_dtype for layer in _all_layers(model)}
    dtypes.discard("float32")
    if dtypes and format != "tf_saved_model":
        raise ValueError(
            f"Export to {format!r} needs a float32 model, but layers of {model.name!r} compute "
            f"in {sorted(dtypes)} (a mixed-precision policy). Rebuild the model under "
            "keras.mixed_precision.set_global_policy('float32'), copy the weights with "
            "`model32.set_weights(model.get_weights())` and export that; to shrink the file, "
            "quantise at conversion instead (e.g. format='litert' with "
            "optimizations=[tf.lite.Optimize.DEFAULT])."
        )


def _check_signature(model, input_signature):
    if input_signature is None:
        return
    specs = input_signature if isinstance(input_signature, (list, tuple)) else [input_signature]
    if len(specs) != 1:
        raise ValueError(
            f"GC ViT has one image input; `input_signature` has {len(specs)} entries."
        )
    shape = tuple(specs[0].shape)
    channels = model.inputs[0].shape[-1]
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(
            f"`input_signature` must describe (batch, height, width, {channels}) images; "
            f"got shape {shape}."
        )
    for name, size, built in zip(("height", "width"), shape[1:3], model.inputs[0].shape[1:3]):
        if size is not None and size < MIN_SIZE:
            raise ValueError(f"`input_signature` {name} {size} is below the minimum of {MIN_SIZE}.")
        if built is not None and size != built:
            raise ValueError(
                f"`input_signature` {name} {size} differs from the model's fixed input {name} "
                f"{built}. For other or variable sizes build the model with "
                "input_shape=(None, None, 3) and copy the weights."
            )


def export_model(model, path, format="tf_saved_model", input_signature=None, verbose=False,
                 **kwargs):
    """Exports a GC ViT model (or a model built on one) for inference.

    Args:
        model: a built Keras model, e.g. from `tfgcvit.GCViT` or a fine-tuned
            model containing one.
        path: output path: a directory for "tf_saved_model", a file (".onnx",
            ".tflite") otherwise.
        format: "tf_saved_model", "onnx" or "litert" (TFLite).
        input_signature: optional single `keras.InputSpec` / `tf.TensorSpec`
            (batch, height, width, channels); defaults to the model's input,
            keeping its None dimensions dynamic.
        verbose: print Keras' export messages.
        **kwargs: format options: "onnx": `opset_version` (>= 13),
            `optimize` (default True: `optimize_onnx` rewrites the layer norms,
            which tf2onnx writes as ten elementwise nodes, as ONNX
            `LayerNormalization` nodes and the GELUs into the form ONNX
            Runtime fuses, runs the attention batch first and cancels
            tf2onnx's transposes; the file's opset becomes at least 17);
            "tf_saved_model" on JAX: `jax2tf_kwargs`, `is_static`;
            "litert": TFLite converter attributes such as `optimizations`.

    Returns:
        `path`.

    Raises:
        ValueError: an unknown format, a backend that cannot export this
            format, a mixed-precision model for ONNX/LiteRT, an input signature
            that does not fit the model, or an unknown or invalid option.
    """
    backend = keras.backend.backend()
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if backend not in BACKENDS[format]:
        reason = UNSUPPORTED_REASONS.get((format, backend), "not supported")
        raise ValueError(
            f"Exporting GC ViT to {format!r} works on the {' or '.join(BACKENDS[format])} "
            f"backend, not {backend!r} ({reason}). The weights are backend-independent: "
            "save them with model.save_weights('model.weights.h5'), rebuild the model "
            "with KERAS_BACKEND=tensorflow, load them and export there."
        )
    allowed = OPTIONS[format]
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for format {format!r}; accepted: "
                f"{', '.join(allowed) or 'none'}."
            )
    if not model.built or not model.inputs:
        raise ValueError("Build the model (give it an input shape) before exporting it.")
    _check_float32(model, format)
    _check_signature(model, input_signature)
    if format == "onnx" and input_signature is None:
        # Keras' ONNX exporter refuses a model never called unless given a signature:
        # the one it would read from the model itself.
        spec = model.inputs[0]
        input_signature = [keras.InputSpec(shape=(None, *spec.shape[1:]), dtype=spec.dtype, name=spec.name)]

    optimize = False
    if format == "onnx":
        opset = kwargs.get("opset_version")
        if opset is not None and (not isinstance(opset, int) or opset < MIN_ONNX_OPSET):
            raise ValueError(
                f"`opset_version` must be an integer >= {MIN_ONNX_OPSET} (the oldest opset "
                f"tested with GC ViT); got {opset!r}."
            )
        optimize = kwargs.pop("optimize", True)
        if not isinstance(optimize, bool):
            raise ValueError(f"`optimize` must be True or False; got {optimize!r}.")
        if optimize and opset is not None and opset < LAYER_NORM_OPSET:
            raise ValueError(
                f"`optimize` needs opset_version >= {LAYER_NORM_OPSET} (ONNX's "
                f"LayerNormalization); got {opset}. Pass optimize=False to keep "
                f"opset {opset}."
            )
    if format == "tf_saved_model" and backend == "jax":
        # jax2tf would also serialise gradients, which fails on the random-seed
        # state of the dropout layers; serving needs none.
        jax2tf_kwargs = dict(kwargs.pop("jax2tf_kwargs", None) or {})
        jax2tf_kwargs.setdefault("with_gradient", False)
        kwargs["jax2tf_kwargs"] = jax2tf_kwargs

    # The machine that serves the file is not this one: the reference forms.
    with forms.exporting(format):
        model.export(str(path), format=format, verbose=verbose, input_signature=input_signature,
                     **kwargs)
    if format == "onnx":
        _check_onnx_inputs(path, model)
    if optimize:
        optimize_onnx(path)
    return path


def _check_onnx_inputs(path, model):
    """Removes the file and raises ValueError if it needs inputs besides the model's own.

    tf2onnx writes the tensors a traced function captures (constants a layer keeps as
    eager tensors, such as `keras.layers.Normalization(mean=..., variance=...)`'s) as
    required inputs of the file, which then cannot run on images alone.
    """
    import os

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    if len(inputs) > len(model.inputs):
        os.remove(path)
        raise ValueError(
            f"The ONNX file of {model.name!r} would need the inputs {inputs[len(model.inputs):]} besides "
            "the images: a layer keeps constants as tensors, which tf2onnx writes as inputs (e.g. "
            "keras.layers.Normalization(mean=..., variance=...)). Use a layer that keeps them as Python "
            "numbers, such as keras.layers.Rescaling(scale, offset), and export again."
        )


def _require_onnx_file(path):
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ONNX file at {str(path)!r}; export one first.")


def optimize_onnx(path, output_path=None):
    """Rewrites an ONNX file from Keras' export into the forms that runtimes fuse.

    Layer norms: tf2onnx writes each norm of GC ViT's blocks (`tfgcvit.model.layers.LayerNorm`)
    as ten elementwise nodes (ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt,
    Reciprocal, Mul, Mul, Add), which ONNX Runtime neither fuses nor runs in
    one pass, sometimes with the mean reshaped away and back (the layout
    varies with tf2onnx's hash order). Where tf2onnx moved a norm into
    channels-first layout (reducing over axis 1 of a 4-D tensor), the node is
    wrapped in two transposes. Keras' own `LayerNormalization` (the model's
    final norm) is written in another form and left as it is.
    The file's opset is raised to 17 (ONNX's `version_converter`) where it is
    older.

    GELUs: `tfgcvit.model.layers._gelu` is 0.5 * x * (1 + erf(x * (1 / sqrt(2)))),
    and ONNX Runtime's GELU fusion only takes erf(x / sqrt(2)); each
    multiplication by 1/sqrt(2) that feeds an Erf becomes a division by
    sqrt(2), which ONNX Runtime then runs as one `Gelu` kernel (all 53 of
    GCViT-Tiny's; for the 11 that tf2onnx runs channels first, after depthwise
    convolutions, the 1 added to the erf also becomes a scalar).

    Attention: the model runs it heads first, (heads, B x windows, N, d), for
    TensorFlow's fused batch matmul; in the file the matmuls and softmax run
    batch first, (B x windows, heads, N, d), whose transposes from and to the
    projections move one axis each, which ONNX Runtime runs several times faster.

    Transposes: tf2onnx runs convolutions channels first and leaves the
    residual stream, the squeeze-excitation gates and (in files of any size) the
    window paddings channels first, with a transpose pair around every block
    norm. Transposes are moved through elementwise operations, paddings, slices
    and shapes until they meet the one that undoes them, and both go, or merge
    into one (GCViT-Tiny: 262 -> 172 in a 224x224 file, 341 -> 251 in one of any
    size, every one a one-axis move). Initializers nothing reads any more are
    dropped.

    Projections: each attention's query/key/value projection, one matrix product
    whose output is cut into parts on a middle axis (tf2onnx writes the model's
    unstack as Split and Squeeze nodes, read here as one Slice per part), becomes
    one product per part (OpenVINO runs that slice with its reference kernel; ONNX
    Runtime copies it).

    Shapes: every value is computed once. tf2onnx writes each block's shape
    arithmetic (window sizes, paddings, reshape targets) from that block's own
    `Shape` node; shapes that symbolic shape inference (ONNX Runtime's
    `SymbolicShapeInference`) finds equal are read once, and then every node that
    repeats another's computation on the same inputs goes (GCViT-Tiny: 2,682 ->
    1,760 nodes in a 224x224 file, 4,841 -> 2,103 in one of any size). Runtimes
    run each remaining node, and with dynamic shapes OpenVINO infers each one's
    shape on every run.

    Outputs agree with the file as written to float rounding.

    Args:
        path: an ONNX file from `export_model(..., format="onnx",
            optimize=False)` or Keras' `model.export(path, format="onnx")`.
        output_path: where to write the result (default: `path`, in place).

    Returns:
        {"layer_norms": norms rewritten, "gelus": GELU arguments rewritten,
        "attention": attention layers made batch first,
        "transposes": how many fewer transposes the file has,
        "projections": projections split into parts,
        "shared": nodes dropped as repeated computations}.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    import onnx
    from onnx import version_converter

    _require_onnx_file(path)
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < LAYER_NORM_OPSET:
        model = version_converter.convert_version(model, LAYER_NORM_OPSET)
    transposes = sum(node.op_type == "Transpose" for node in model.graph.node)
    rewrite = _Rewrite(model)
    rewrite.unstack_as_slices()  # first: the others match the slices
    gelus = rewrite.divide_gelu_arguments()  # next: it edits nodes in place, the others rebuild the list
    counts = {"layer_norms": rewrite.fuse_layer_norms(), "gelus": gelus,
              "attention": rewrite.batch_first_attention()}
    rewrite.cancel_transposes()  # after those: it also cancels the transposes they add
    counts["projections"] = rewrite.split_projections()
    # The opset conversion records inferred shapes, some of which the rewrites changed
    # (the attention's, now batch first); runtimes infer them again.
    del model.graph.value_info[:]
    # ONNX Runtime's symbolic shape inference logs "Unable to determine if ... treat as equal"
    # for each level's crop after the window padding (files of any size): it cannot prove the
    # map size <= the padded size (floor expressions of the input size), assumes the crop keeps
    # the whole axis and then merges the two sizes, so the padded maps' inferred shapes are
    # wrong. compute_once reads only the shapes of what Shape nodes read, and none reads a
    # padded map (only the crop does); the any-size tests at 97 x 131 and 64 x 80 check that.
    guesses = _DropMessages("Unable to determine if")
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").addFilter(guesses)
    try:
        counts["shared"] = rewrite.compute_once(model)  # last: it reads the graph the others leave
    finally:
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").removeFilter(guesses)
    counts["transposes"] = transposes - sum(node.op_type == "Transpose" for node in model.graph.node)
    onnx.save(model, str(output_path or path))
    return counts


def _perm(node):
    """A Transpose node's perm (None for one without: it reverses the axes), else None."""
    if node is None or node.op_type != "Transpose":
        return None
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


class _Rewrite:
    """The rewrites of `optimize_onnx`, on one graph.

    Layer norms are matched from their Sqrt: x -> ReduceMean (-> Reshape/Unsqueeze/Squeeze
    back to its own shape) -> Sub(x, mean) = d;
    Mul(d, d) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(d, .)
    [-> Mul(gamma)] [-> Add(beta)], both reductions over the same single axis,
    the last one or axis 1 of a 4-D tensor. tf2onnx drops a gamma of ones and a
    beta of zeros; the node then gets ones (from the inferred channel count).
    """

    def __init__(self, model):
        import onnx

        self.graph = model.graph
        self._index_graph()
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {
            value.name: [dim.dim_value if dim.HasField("dim_value") else None
                         for dim in value.type.tensor_type.shape.dim]
            for value in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        }

    def _index_graph(self):
        # Of the graph as loaded (or as `unstack_as_slices` leaves it); the passes that
        # rebuild the node list index it again.
        self.producer, self.consumers = self._index()
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.position = {id(node): i for i, node in enumerate(self.graph.node)}

    def _index(self):
        """{tensor: the node that makes it}, {tensor: the nodes that read it} of the graph now."""
        producer = {out: node for node in self.graph.node for out in node.output}
        readers = {}
        for node in self.graph.node:
            for name in dict.fromkeys(node.input):
                readers.setdefault(name, []).append(node)
        return producer, readers

    def unstack_as_slices(self):
        """Split(x, axis a) into equal parts, each read only by a Squeeze of axis a,
        becomes one Slice (i to i + 1 on axis a) per part; returns how many Splits.

        The attention unstacks its queries, keys and values (`ops.unstack`, which
        TFLite copies in one pass where it runs a slice element by element);
        tf2onnx writes that as Split and Squeeze nodes. As slices they take the
        form the other rewrites move transposes through and split projections from.
        """
        from onnx import helper, numpy_helper

        readers = self._index()[1]
        before, removed, count = {}, set(), 0
        for split in [node for node in self.graph.node if node.op_type == "Split"]:
            axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
            sizes = [a.ints for a in split.attribute if a.name == "split"]
            if len(split.input) > 1 and split.input[1]:
                sizes.append(self._constant(split.input[1]))
            parts = len(split.output)
            if any(size is None or list(np.asarray(size).reshape(-1)) != [1] * parts for size in sizes):
                continue
            squeezes = [readers.get(name, []) for name in split.output]
            if not all(len(users) == 1 and users[0].op_type == "Squeeze" for users in squeezes):
                continue
            rank = len(self.shapes.get(split.input[0]) or [])
            if not rank or any(self._moved_axes(users[0], range(rank)) != [axis % rank] for users in squeezes):
                continue
            name = split.output[0].rsplit(":", 1)[0]
            axes = numpy_helper.from_array(np.array([axis], np.int64), f"{name}/slice_axes")
            self.graph.initializer.append(axes)
            new = before.setdefault(id(split), [])
            for part, output in enumerate(split.output):
                bounds = [numpy_helper.from_array(np.array([value], np.int64), f"{name}/slice_{part}_{end}")
                          for end, value in (("start", part), ("end", part + 1))]
                self.graph.initializer.extend(bounds)
                new.append(helper.make_node("Slice", [split.input[0], bounds[0].name, bounds[1].name, axes.name],
                                            [output], name=f"{name}/slice_{part}"))
            removed.add(id(split))
            count += 1
        self._rebuild(before, removed)
        self._index_graph()
        return count

    def divide_gelu_arguments(self):
        """Mul(x, 1/sqrt(2)) -> Erf becomes Div(x, sqrt(2)) -> Erf; returns how many.

        The 1 added to the Erf's output becomes a scalar where tf2onnx left it
        shaped (1, 1, 1, 1) (channels-first GELUs): ONNX Runtime's fusion takes
        scalars only.
        """
        from onnx import numpy_helper

        name, one, count = "tfgcvit/gelu/sqrt2", "tfgcvit/gelu/one", 0
        for node in self.graph.node:
            if node.op_type != "Mul" or (erf := self._sole_consumer(node.output[0], "Erf")) is None:
                continue
            factors = [i for i in node.input
                       if (value := self._scalar(i)) is not None and abs(value - SQRT_HALF) < 1e-6]
            if len(node.input) != 2 or len(factors) != 1:
                continue
            add = self._sole_consumer(erf.output[0], "Add")
            constant = add and self._other_input(add, erf.output[0])
            ones = None if not constant else self._constant(constant)
            rank = len(self.shapes.get(erf.output[0]) or [])
            if ones is not None and ones.size == 1 and ones.reshape(-1)[0] == 1 and 0 < ones.ndim <= rank:
                add.input[:] = [one if i == constant else i for i in add.input]
                if one not in self.initializers:
                    self.initializers[one] = numpy_helper.from_array(np.array(1.0, np.float32), one)
                    self.graph.initializer.append(self.initializers[one])
            x = self._other_input(node, factors[0])
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([x, name])
            count += 1
        if count:
            self.graph.initializer.append(numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), name))
        return count

    def fuse_layer_norms(self):
        replacements, removed = {}, set()
        for sqrt in [node for node in self.graph.node if node.op_type == "Sqrt"]:
            match = self._match(sqrt)
            if match is None or removed & {id(node) for node in match["nodes"]}:
                continue
            removed |= {id(node) for node in match["nodes"]}
            # The new nodes go where the last matched node was, after everything they read.
            last = max(match["nodes"], key=lambda node: self.position[id(node)])
            replacements[id(last)] = self._layer_norm(match)
        self._rebuild(replacements, removed)
        return len(replacements)

    def batch_first_attention(self):
        """Runs each attention's matmuls and softmax on (B * windows, heads, ...) tensors.

        The model lays attention out heads first, (heads, B * windows, N, d), for
        TensorFlow's fused batch matmul (`tfgcvit.model.layers.WindowAttention`).
        From the projections' (B * windows, N, heads, d) that takes transposes
        that move two axes, which ONNX Runtime runs several times slower than
        the one-axis moves of batch first (the keys' transpose alone: 4.7 vs
        0.6 ms at GCViT-Tiny's first stage, batch 8). Matched from the transpose
        (1, 2, 0, 3) that merges the heads back: the MatMul, Mul, Add, Sub, Div
        and last-axis Softmax nodes it reads, each read only within, have their
        4-D inputs transposed (1, 0, 2, 3) (inputs of lower rank broadcast over
        the last axes, unchanged) and the merge becomes (0, 2, 1, 3).
        `cancel_transposes` then folds the new transposes into those before them.
        Returns how many attentions.
        """
        from onnx import helper

        swap, graph_outputs = [1, 0, 2, 3], {output.name for output in self.graph.output}
        producer, readers = self._index()
        position = {id(node): i for i, node in enumerate(self.graph.node)}
        before, count = {}, 0  # id(region node) -> transposes to insert before it
        for merge in list(self.graph.node):
            if _perm(merge) != [1, 2, 0, 3]:
                continue
            region, boundary, pending = [], [], [merge.input[0]]
            while pending:
                name = pending.pop()
                node = producer.get(name)
                inside = (node is not None and len(readers.get(name, [])) == 1 and name not in graph_outputs
                          and node.op_type in ("MatMul", "Mul", "Add", "Sub", "Div", "Softmax")
                          and all(a.name != "axis" or a.i in (-1, 3) for a in node.attribute))
                if inside and all(node is not other for other in region):
                    region.append(node)
                    pending.extend(node.input)
                elif not inside:
                    boundary.append(name)
            if sorted(node.op_type for node in region if node.op_type in ("MatMul", "Softmax")) != [
                    "MatMul", "MatMul", "Softmax"]:
                continue
            ranks = {}
            for name in boundary:
                value, shape = self._constant(name), self.shapes.get(name)
                ranks[name] = value.ndim if value is not None else None if shape is None else len(shape)
            if any(rank not in (0, 1, 2, 4) for rank in ranks.values()):
                continue  # unknown, or a rank-3 operand that would broadcast over the swapped axis
            for name in [name for name in dict.fromkeys(boundary) if ranks[name] == 4]:
                swapped = f"{name}/batch_first"
                first = min((node for node in region if name in node.input), key=lambda n: position[id(n)])
                before.setdefault(id(first), []).append(
                    helper.make_node("Transpose", [name], [swapped], perm=swap, name=swapped))
                for node in region:
                    node.input[:] = [swapped if i == name else i for i in node.input]
            del merge.attribute[:]
            merge.attribute.append(helper.make_attribute("perm", [0, 2, 1, 3]))
            count += 1
        self._rebuild(before)
        return count

    def cancel_transposes(self):
        """Moves transposes out of the way until they cancel.

        tf2onnx runs convolutions channels first and pushes the transposes around them
        along the residual stream, so every block adds channels-first tensors, its norm
        (channels last) sits between two transposes, and in files of any size each
        window padding runs channels first. In one pass in graph order, with T(x, p) a
        transpose and T' one that undoes it:
        - T'(T(x, p)) becomes x, and two transposes that do not cancel become one;
        - Op(T(a, p), T(b, p)) becomes T(Op(a, b), p) for an elementwise Op;
        - Op(T(a, p), b) becomes T(Op(a, T'(b)), p) where T' reads the result (and
          nothing else but Shape) and only Op reads T(a, p), b being of the same rank
          (a gate, a scale);
        - Pad(T(x, p)) becomes T(Pad(x), p), with the pads reordered, where T' reads
          the result (and nothing else but Shape);
        - Slice(T(x, p)) and Squeeze(T(x, p)) (constant axes) become T(Slice(x), p)
          and T(Squeeze(x), p) on the axes moved, where only they (and Shape) read
          T(x, p): heads split from a projection, transposed once per part;
        - Shape(T(x, p)) becomes Gather(Shape(x), p);
        - T(c) of a constant c that nothing else reads becomes a transposed constant.
        Transposes (and shapes) nothing reads any more are then dropped, and so are
        the initializers nothing reads (those of the norms rewritten before).
        """
        from onnx import helper, numpy_helper

        if any(a.type in (a.GRAPH, a.GRAPHS) for node in self.graph.node for a in node.attribute):
            return  # renaming inputs would have to reach into subgraphs
        graph_outputs = {output.name for output in self.graph.output}
        readers = self._index()[1]  # of the graph before the pass; `producer` follows the new one
        producer, renamed, nodes = {}, {}, []

        def inverse(perm):
            return [perm.index(axis) for axis in range(len(perm))]

        def undone(name, perm):
            """Whether transposes that undo `perm` read `name`, and only they (and Shape)."""
            users = readers.get(name, [])
            undoing = [user for user in users if _perm(user) == inverse(perm)]
            shapes = [user for user in users if user.op_type == "Shape" and not user.attribute]
            return name not in graph_outputs and undoing and len(undoing) + len(shapes) == len(users)

        def add(op_type, inputs, output, **attributes):
            node = helper.make_node(op_type, inputs, [output], name=output, **attributes)
            nodes.append(node)
            producer[output] = node
            return output

        for node in self.graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = renamed.get(name, name)
            first = producer.get(node.input[0]) if node.input else None
            perm, out = _perm(first), node.output[0] if node.output else None
            moved = f"{out}/channels_last"
            if perm is not None and _perm(node) is not None:
                composed = [perm[axis] for axis in _perm(node)]
                identity = composed == list(range(len(composed)))
                node.input[0] = first.input[0]
                if identity and out not in graph_outputs:
                    renamed[out] = node.input[0]
                    continue
                del node.attribute[:]
                if identity:
                    node.op_type = "Identity"
                else:
                    node.attribute.append(helper.make_attribute("perm", composed))
            elif perm is not None and node.op_type == "Shape" and not node.attribute:
                indices = numpy_helper.from_array(np.array(perm, np.int64), f"{out}/perm")
                self.graph.initializer.append(indices)
                shape = add("Shape", [first.input[0]], f"{out}/untransposed")
                node = helper.make_node("Gather", [shape, indices.name], [out], axis=0, name=node.name)
            elif perm is not None and node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
                other = producer.get(node.input[1])
                if _perm(other) == perm:
                    inputs = [first.input[0], other.input[0]]
                elif (len(self.shapes.get(node.input[1]) or []) == len(perm) and undone(out, perm)
                      and len(readers.get(node.input[0], [])) == 1):
                    inputs = [first.input[0], add("Transpose", [node.input[1]], f"{out}/operand",
                                                  perm=inverse(perm))]
                else:
                    inputs = None
                if inputs is not None:
                    add(node.op_type, inputs, moved)
                    node = helper.make_node("Transpose", [moved], [out], perm=perm, name=node.name)
            elif (perm is not None and node.op_type in ("Slice", "Squeeze")
                  and all(user.op_type in ("Slice", "Squeeze", "Shape") for user in readers.get(node.input[0], []))
                  and (axes := self._moved_axes(node, perm)) is not None):
                # Slicing or squeezing axis p[a] of x is slicing or squeezing axis a of T(x, p).
                moved_axes = numpy_helper.from_array(np.array([perm[a] for a in axes], np.int64), f"{out}/axes")
                self.graph.initializer.append(moved_axes)
                if node.op_type == "Slice":
                    steps = list(node.input[4:])
                    add("Slice", [first.input[0], node.input[1], node.input[2], moved_axes.name] + steps, moved)
                else:
                    add("Squeeze", [first.input[0], moved_axes.name], moved)
                    kept = [perm[i] for i in range(len(perm)) if i not in axes]
                    perm = [sorted(kept).index(axis) for axis in kept]
                node = helper.make_node("Transpose", [moved], [out], perm=perm, name=node.name)
            elif (node.op_type == "Transpose" and node.input[0] in self.initializers and out not in graph_outputs
                  and len(readers.get(node.input[0], [])) == 1 and _perm(node) is not None):
                value = numpy_helper.to_array(self.initializers[node.input[0]])
                self.graph.initializer.append(numpy_helper.from_array(value.transpose(_perm(node)), out))
                continue
            elif (perm is not None and node.op_type == "Pad" and len(node.input) in (2, 3)
                  and undone(out, perm)):
                rank = len(perm)
                # pads lists the starts, then the ends, of each axis of Pad's input, T(x, p).
                order = np.array(inverse(perm) + [rank + axis for axis in inverse(perm)], np.int64)
                indices = numpy_helper.from_array(order, f"{out}/pads_order")
                self.graph.initializer.append(indices)
                pads = add("Gather", [node.input[1], indices.name], f"{out}/pads", axis=0)
                add("Pad", [first.input[0], pads] + list(node.input[2:]), moved,
                    **{a.name: helper.get_attribute_value(a) for a in node.attribute})
                node = helper.make_node("Transpose", [moved], [out], perm=perm, name=node.name)
            for name in node.output:
                producer[name] = node
            nodes.append(node)
        while True:  # drop what nothing reads any more
            read = {name for node in nodes for name in node.input} | graph_outputs
            kept = [node for node in nodes if node.op_type not in ("Transpose", "Identity", "Shape", "Gather")
                    or any(name in read for name in node.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._drop_unread_initializers()

    def split_projections(self):
        """MatMul(x, W) [+ b] -> Reshape(., (-1, ..., parts, ...)) -> Slice/Squeeze per part
        becomes one MatMul(x, W_part) [+ b_part] -> Reshape per part; returns how many.

        The attention's `qkv` projection is split into queries, keys and values on
        axis 2 of a (B * windows, N, parts, heads, head_dim) view. Sliced there,
        each part is a strided copy (OpenVINO's reference kernel: 1.5-1.9 ms of
        GCViT-Tiny's 65-80 ms at batch 1); a product with the part's columns of W
        writes it directly. Only where the Reshape's target is a constant.
        """
        from onnx import helper, numpy_helper

        producer, readers = self._index()
        graph_outputs = {output.name for output in self.graph.output}
        before, removed, count = {}, set(), 0
        for reshape in [node for node in self.graph.node if node.op_type == "Reshape"]:
            target = self._constant(reshape.input[1])
            parts = self._split_parts(reshape, target, readers)
            source = producer.get(reshape.input[0])
            bias = None
            if source is not None and source.op_type == "Add" and len(readers.get(source.output[0], [])) == 1:
                bias = next((i for i in source.input if self._constant(i) is not None), None)
                matmul = producer.get(self._other_input(source, bias) or "")
            else:
                matmul, source = source, None
            if (parts is None or matmul is None or matmul.op_type != "MatMul"
                    or len(readers.get(matmul.output[0], [])) != 1
                    or {reshape.input[0], reshape.output[0], matmul.output[0]} & graph_outputs
                    or {part[1].output[0] for part in parts} & graph_outputs):
                continue
            weights = self._constant(matmul.input[1])
            width = int(np.prod(target[3:]))
            if weights is None or weights.ndim != 2 or weights.shape[1] != target[2] * width:
                continue
            biases = None if bias is None else self._constant(bias)
            if bias is not None and (biases.ndim > 1 or biases.size != weights.shape[1]):
                continue
            kept_target = numpy_helper.from_array(np.delete(target, 2).astype(np.int64),
                                                  f"{reshape.output[0]}/part_shape")
            self.graph.initializer.append(kept_target)
            new = before.setdefault(id(matmul), [])
            for index, slice_node, squeeze in parts:
                name = f"{squeeze.output[0]}/part"
                columns = slice(index * width, (index + 1) * width)
                self.graph.initializer.append(
                    numpy_helper.from_array(np.ascontiguousarray(weights[:, columns]), f"{name}/weights"))
                new.append(helper.make_node("MatMul", [matmul.input[0], f"{name}/weights"], [f"{name}/matmul"],
                                            name=f"{name}/matmul"))
                projected = f"{name}/matmul"
                if biases is not None:
                    self.graph.initializer.append(numpy_helper.from_array(biases[columns], f"{name}/bias"))
                    new.append(helper.make_node("Add", [projected, f"{name}/bias"], [f"{name}/add"],
                                                name=f"{name}/add"))
                    projected = f"{name}/add"
                new.append(helper.make_node("Reshape", [projected, kept_target.name], [squeeze.output[0]],
                                            name=f"{name}/reshape"))
                removed |= {id(slice_node), id(squeeze)}
            removed |= {id(node) for node in (matmul, source, reshape) if node is not None}
            count += 1
        self._rebuild(before, removed)
        self._drop_unread_initializers()
        return count

    def _split_parts(self, reshape, target, readers):
        """[(part, Slice, Squeeze)] taking every part of axis 2 of a constant 5-D Reshape, else None."""
        if target is None or target.ndim != 1 or target.size != 5 or min(target[1:]) < 1:
            return None
        parts = []
        for slice_node in readers.get(reshape.output[0], []):
            users = readers.get(slice_node.output[0], [])
            if slice_node.op_type != "Slice" or len(users) != 1 or users[0].op_type != "Squeeze":
                return None
            starts, ends = self._constant(slice_node.input[1]), self._constant(slice_node.input[2])
            steps = self._constant(slice_node.input[4]) if len(slice_node.input) > 4 else np.ones(1)
            if (starts is None or ends is None or steps is None or starts.size != 1 or steps.reshape(-1)[0] != 1
                    or self._moved_axes(slice_node, range(5)) != [2] or self._moved_axes(users[0], range(5)) != [2]):
                return None
            start = int(starts.reshape(-1)[0]) % int(target[2])
            if min(int(ends.reshape(-1)[0]), int(target[2])) != start + 1:
                return None
            parts.append((start, slice_node, users[0]))
        if sorted(part for part, _, _ in parts) != list(range(int(target[2]))):
            return None
        return parts

    def compute_once(self, model):
        """Drops every node that repeats another's computation; returns how many.

        Two nodes repeat each other when they have the same operator, attributes
        and inputs (small constants compared by value), or, for `Shape`, when
        symbolic shape inference gives their inputs the same shape. Nodes with
        subgraphs or random outputs, and those writing graph outputs, are kept;
        so are initializers that are also graph inputs (a caller may feed them).
        """
        from onnx import numpy_helper

        shapes = self._symbolic_shapes(model)
        graph_outputs = {output.name for output in self.graph.output}
        graph_inputs = {value.name for value in self.graph.input}
        renamed, seen = {}, {}
        for init in self.graph.initializer:
            if int(np.prod(init.dims)) <= 16 and init.name not in graph_inputs:
                value = numpy_helper.to_array(init)
                renamed[init.name] = seen.setdefault(("constant", value.dtype.str, value.shape, value.tobytes()),
                                                     init.name)
        renamed = {name: same for name, same in renamed.items() if name != same}
        nodes, before = [], len(self.graph.node)
        for node in self.graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
            if (set(node.output) & graph_outputs or node.op_type.startswith("Random") or node.op_type in RANDOM_OPS
                    or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)):
                nodes.append(node)
                continue
            key = (node.domain, node.op_type, tuple(node.input),
                   tuple(a.SerializeToString() for a in node.attribute))
            if node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
                key = ("shape", shapes[node.input[0]], key[3])
            if key in seen:
                renamed.update(zip(node.output, seen[key].output))
            else:
                seen[key] = node
                nodes.append(node)
        read = set(graph_outputs)
        kept = []
        for node in reversed(nodes):  # graph order is topological: readers come later
            if read & set(node.output):
                kept.append(node)
                read.update(node.input)
        del self.graph.node[:]
        self.graph.node.extend(reversed(kept))
        self._drop_unread_initializers()
        return before - len(kept)

    @staticmethod
    def _symbolic_shapes(model):
        """{tensor: shape as a tuple of ints and symbols} where every dimension is known."""
        import os
        import subprocess
        import sys
        import tempfile

        import onnx

        # onnxruntime's symbolic shape inference through its command line, its public interface.
        # Where some shape stays unknown it fails and saves the model in its working directory
        # (a temporary one here); then Shape nodes are compared by input instead.
        with tempfile.TemporaryDirectory() as folder:
            source, target = os.path.join(folder, "model.onnx"), os.path.join(folder, "shapes.onnx")
            onnx.save(model, source)
            command = [sys.executable, "-m", "onnxruntime.tools.symbolic_shape_infer", "--input", source,
                       "--output", target, "--auto_merge"]
            run = subprocess.run(command, cwd=folder, capture_output=True)
            if run.returncode != 0 or not os.path.isfile(target):
                return {}
            inferred = onnx.load(target)
        shapes = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input):
            dims = tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param or None
                         for dim in value.type.tensor_type.shape.dim)
            if value.type.tensor_type.HasField("shape") and None not in dims:
                shapes[value.name] = dims
        return shapes

    def _rebuild(self, before, removed=()):
        """The node list again, with `before[id(node)]` inserted ahead of each node and
        the nodes whose id is in `removed` left out."""
        nodes = []
        for node in self.graph.node:
            nodes.extend(before.get(id(node), []))
            if id(node) not in removed:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _drop_unread_initializers(self):
        read = {name for node in self.graph.node for name in node.input} | {o.name for o in self.graph.output}
        for init in [init for init in self.graph.initializer if init.name not in read]:
            self.graph.initializer.remove(init)
        self.initializers = {init.name: init for init in self.graph.initializer}

    def _moved_axes(self, node, perm):
        """The axes (normalised) a Slice or Squeeze node acts on, if constant, else None."""
        if node.op_type == "Squeeze":
            axes = self._constant(node.input[1]) if len(node.input) > 1 else None
        elif len(node.input) > 3 and node.input[3]:
            axes = self._constant(node.input[3])
        else:  # Slice's default: the first len(starts) axes
            starts = self._constant(node.input[1])
            axes = None if starts is None else np.arange(starts.size)
        return None if axes is None else [int(a) % len(perm) for a in axes.reshape(-1)]

    def _constant(self, name):
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def _made_by(self, name, op_type):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def _sole_consumer(self, name, op_type):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def _axes(self, node):
        for attribute in node.attribute:
            if attribute.name == "axes":
                return list(attribute.ints)
        if len(node.input) > 1:  # opset 18 and later: axes as an input
            axes = self._constant(node.input[1])
            return None if axes is None else [int(a) for a in axes.reshape(-1)]
        return None

    def _scalar(self, name):
        value = self._constant(name)
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])

    def _other_input(self, node, name):
        others = [i for i in node.input if i != name]
        return others[0] if len(others) == 1 else None

    def _reshaped_back(self, name):
        """The chain of single-use Reshape/Unsqueeze/Squeeze nodes that makes `name` from
        a tensor of the same shape, and that tensor: (nodes, source), else (None, None).

        tf2onnx's stand-ins for transposes of a singleton axis (a norm's mean, moved
        and moved back). Reshapes keep the elements' order, so when the shape comes back
        the tensor is the same; shapes are followed symbolically, unknown sizes as symbols.
        """
        chain, node = [], self.producer.get(name)
        while node is not None and node.op_type in ("Reshape", "Unsqueeze", "Squeeze"):
            chain.append(node)
            node = self.producer.get(node.input[0])
        if not chain:
            return [], name
        source = chain[-1].input[0]
        shape = self.shapes.get(source)
        if shape is None:
            return None, None
        # A size is (factor, symbols): the product of an integer and unknown sizes.
        start = [(size, ()) if size is not None else (1, (f"d{i}",)) for i, size in enumerate(shape)]
        dims = list(start)
        for node in reversed(chain):
            dims = self._reshaped_dims(node, dims)
            if dims is None:
                return None, None
        return (chain, source) if dims == start else (None, None)

    def _reshaped_dims(self, node, dims):
        import collections

        if node.op_type == "Reshape":
            target = self._constant(node.input[1])
            if target is None or any(a.name == "allowzero" and a.i for a in node.attribute):
                return None
            target = [int(t) for t in target.reshape(-1)]
            if target.count(-1) > 1 or any(t < -1 for t in target):
                return None
            out = [dims[i] if t == 0 and i < len(dims) else (t, ()) for i, t in enumerate(target)]
            if -1 in target:  # what the other sizes leave of the input's
                known = [d for t, d in zip(target, out) if t != -1]
                total, given = int(np.prod([d[0] for d in dims])), int(np.prod([d[0] for d in known]))
                symbols = collections.Counter(s for d in dims for s in d[1])
                symbols.subtract(s for d in known for s in d[1])
                if given == 0 or total % given or any(count < 0 for count in symbols.values()):
                    return None
                out[target.index(-1)] = (total // given, tuple(sorted(symbols.elements())))
            return out
        axes = self._axes(node)
        if node.op_type == "Unsqueeze":
            if axes is None:
                return None
            out = list(dims)
            for axis in sorted(a % (len(dims) + len(axes)) for a in axes):
                out.insert(axis, (1, ()))
            return out
        # Squeeze: only sizes known to be 1.
        axes = [a % len(dims) for a in axes] if axes is not None else [i for i, d in enumerate(dims) if d == (1, ())]
        if any(dims[a] != (1, ()) for a in axes):
            return None
        return [d for i, d in enumerate(dims) if i not in axes]

    def _match(self, sqrt):
        # Statistics: x -> ReduceMean (-> reshaped back) -> Sub = d; d * d -> ReduceMean -> Add(eps) -> Sqrt.
        add_eps = self._made_by(sqrt.input[0], "Add")
        if add_eps is None:
            return None
        variance = next(filter(None, (self._made_by(i, "ReduceMean") for i in add_eps.input)), None)
        if variance is None:
            return None
        epsilon = self._scalar(self._other_input(add_eps, variance.output[0]))
        square = self._made_by(variance.input[0], "Mul")
        if epsilon is None or square is None or square.input[0] != square.input[1]:
            return None
        centre = self._made_by(square.input[0], "Sub")
        if centre is None:
            return None
        x = centre.input[0]
        single_use = [square, variance, add_eps, sqrt]
        # The mean, possibly reshaped away and back (tf2onnx moves its singleton axis).
        chain, mean = self._reshaped_back(centre.input[1])
        if chain is None:
            return None
        single_use.extend(chain)
        mean = self.producer.get(mean)
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != x:
            return None
        single_use.append(mean)
        shape, axes = self.shapes.get(x), self._axes(mean)
        if not shape or axes is None or len(axes) != 1 or axes != self._axes(variance):
            return None
        rank = len(shape)
        axis = axes[0] % rank
        channels = shape[axis]
        if channels is None or not (axis == rank - 1 or (axis == 1 and rank == 4)):
            return None

        def per_channel(node, name):
            """The constant other input of `node`, if it holds one value per channel."""
            other = node and self._other_input(node, name)
            value = None if not other else self._constant(other)
            if value is None:
                return None
            expected = [1] * rank
            expected[axis] = channels
            return value.reshape(-1) if [1] * (rank - value.ndim) + list(value.shape) == expected else None

        # Normalisation: d * Reciprocal(Sqrt), with gamma either folded into the reciprocal
        # (Grappler's order) or multiplied afterwards, then + beta; tf2onnx drops a gamma
        # of ones and a beta of zeros.
        scale = self._sole_consumer(sqrt.output[0], "Reciprocal")
        if scale is None:
            return None
        single_use.append(scale)
        weights = {}
        after = self._sole_consumer(scale.output[0], "Mul")
        gamma = None
        if after is not None and centre.output[0] not in after.input:
            gamma = per_channel(after, scale.output[0])
        if gamma is not None:
            weights["gamma"] = gamma
            scale = after
            single_use.append(scale)
        normalize = self._sole_consumer(scale.output[0], "Mul")
        if normalize is None or set(normalize.input) != {centre.output[0], scale.output[0]}:
            return None
        if any(len(self.consumers.get(node.output[0], [])) != 1 for node in single_use):
            return None
        if {id(node) for node in self.consumers[centre.output[0]]} != {id(square), id(normalize)}:
            return None
        nodes, output = [centre, normalize] + single_use, normalize.output[0]
        for op_type, role in (("Mul", "gamma"), ("Add", "beta")):
            if role in weights:
                continue
            node = self._sole_consumer(output, op_type)
            value = per_channel(node, output)
            if value is not None:
                weights[role] = value
                nodes.append(node)
                output = node.output[0]
        return {"x": x, "axis": axis, "rank": rank, "epsilon": epsilon, "channels": channels,
                "gamma": weights.get("gamma"), "beta": weights.get("beta"), "nodes": nodes,
                "output": output, "name": sqrt.name}

    def _layer_norm(self, match):
        from onnx import helper, numpy_helper

        channels, name = match["channels"], match["name"] + "/LayerNormalization"
        gamma = match["gamma"] if match["gamma"] is not None else np.ones(channels, np.float32)
        inputs = []
        for suffix, value in (("gamma", gamma), ("beta", match["beta"])):
            if value is not None:
                tensor = numpy_helper.from_array(np.asarray(value, np.float32), f"{name}/{suffix}")
                self.graph.initializer.append(tensor)
                inputs.append(tensor.name)
        if match["axis"] == match["rank"] - 1:
            return [helper.make_node("LayerNormalization", [match["x"]] + inputs, [match["output"]],
                                     axis=-1, epsilon=match["epsilon"], name=name)]
        # Channels-first (N, C, H, W), as tf2onnx laid it out: normalise channels last.
        return [
            helper.make_node("Transpose", [match["x"]], [name + "/nhwc"], perm=[0, 2, 3, 1],
                             name=name + "/to_nhwc"),
            helper.make_node("LayerNormalization", [name + "/nhwc"] + inputs, [name + "/out"],
                             axis=-1, epsilon=match["epsilon"], name=name),
            helper.make_node("Transpose", [name + "/out"], [match["output"]], perm=[0, 3, 1, 2],
                             name=name + "/to_nchw"),
        ]


# ONNX Runtime's CPU provider runs int8 MatMuls on its fast integer kernels, but
# has no fast ConvInteger: with GC ViT's convolutions quantised too, GCViT-Tiny
# ran at 0.73-0.94x float32's speed; with the MatMuls only, 1.20-1.33x (batch 1)
# and 1.46-1.55x (batch 8) (2-core AMD EPYC; BENCHMARKS.md, "int8 ONNX").
QUANTIZE_OP_TYPES = ("MatMul",)


def quantize_onnx(path, output_path, per_channel=True, op_types=QUANTIZE_OP_TYPES):
    """Int8 dynamic quantisation of an exported ONNX file, for ONNX Runtime.

    The weights of the chosen operators (by default every MatMul with a constant
    weight: the dense layers) are stored as int8 and their inputs are quantised
    as the model runs (`onnxruntime.quantization.quantize_dynamic`); the
    convolutions stay float32 by default, because ONNX Runtime has no fast kernel
    for `ConvInteger` and quantising them makes the whole model slower than
    float32. It costs accuracy: check it on your own data. On the test fixture
    (BENCHMARKS.md, "int8 ONNX") top-1 agreed with float32 on all 8 images
    tried, while logits (up to 2.9 in size) moved by up to 0.11.

    Args:
        path: a float32 ONNX file, e.g. from `export_model(..., format="onnx")`.
        output_path: where to write the quantised file.
        per_channel: one scale per output channel (more accurate) rather than
            one per tensor.
        op_types: the ONNX operator types to quantise, e.g. `("MatMul", "Conv")`
            for the smallest file rather than the fastest one.

    Returns:
        `output_path`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `op_types` is empty or names an operator ONNX Runtime's
            dynamic quantisation does not handle.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    _require_onnx_file(path)
    op_types = [op_types] if isinstance(op_types, str) else list(op_types)
    unknown = [name for name in op_types if name not in IntegerOpsRegistry]
    if not op_types or unknown:
        raise ValueError(
            f"op_types={op_types!r}: give one or more of {sorted(IntegerOpsRegistry)} "
            f"(the operators ONNX Runtime quantises dynamically), e.g. {list(QUANTIZE_OP_TYPES)}."
        )
    # The quantiser logs advice to run its pre-processing (shape inference and graph
    # optimisation) through the root logger; export_model's files have had both.
    advice = _DropMessages("Please consider to run pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(str(path), str(output_path), per_channel=per_channel,
                         weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    finally:
        logging.getLogger().removeFilter(advice)
    return output_path


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not record.getMessage().startswith(self.prefix)
