"""Converting a PyTorch GC ViT checkpoint (official or timm layout) to a Keras `.weights.h5` file.

Used by `tfgcvit convert SRC DST [--variant NAME] [--ema] [--overwrite]`: the
CLI calls `add_arguments` on its subparser and `main` with the parsed arguments.
Nothing existing is replaced without `--overwrite` (`overwrite=True`), and then
only a file, or a folder that is a preset (`tfgcvit.hub.check_preset_destination`).
"""

import os
import re
import sys

from tfgcvit.weights.checkpoint import CheckpointError, read_checkpoint
from tfgcvit.config import (
    ARCHITECTURE_KEYS,
    MAX_INPUT_SIZE,
    NUM_STAGES,
    VARIANTS,
    check_input_size,
    find_variant,
    input_size_argument,
    variant_name,
)
from tfgcvit.weights.download import (
    DownloadError,
    check_free_space,
    fetch,
    replaced_atomically,
    weights_file_bytes,
)
from tfgcvit.model.gcvit import get_constructor
from tfgcvit.weights.resize import table_window_size
from tfgcvit.weights.mapping import WeightsMismatchError, load_torch_weights, to_official_layout


class UnknownVariantError(ValueError):
    """A checkpoint's hyper-parameters match no official GC ViT variant."""


def _shape(state_dict, name):
    if name not in state_dict:
        raise UnknownVariantError(
            f"The checkpoint is not a GC ViT state dict: it has no {name!r} "
            f"(first tensors: {', '.join(list(state_dict)[:5])})."
        )
    return tuple(state_dict[name].shape)


def detect_config(state_dict):
    """Reads a GC ViT's hyper-parameters from the tensor shapes of its state dict.

    Args:
        state_dict: official or timm layout, as returned by `read_checkpoint`.

    Returns:
        A dict with embed_dim, depths, num_heads, window_size, mlp_ratio,
        layer_scale (True when per-channel residual scales are present) and
        classes (None when the checkpoint has no head).

    Raises:
        UnknownVariantError: the state dict is not a GC ViT's.
    """
    state_dict = to_official_layout(state_dict)
    embed_dim = _shape(state_dict, "patch_embed.proj.weight")[0]
    depths, num_heads, window_size = [], [], []
    for stage in range(NUM_STAGES):
        pattern = re.compile(rf"^levels\.{stage}\.blocks\.(\d+)\.")
        blocks = {int(match[1]) for name in state_dict if (match := pattern.match(name))}
        if not blocks:
            raise UnknownVariantError(f"The checkpoint is not a GC ViT state dict: stage {stage} has no blocks.")
        depths.append(max(blocks) + 1)
        table_rows, heads = _shape(state_dict, f"levels.{stage}.blocks.0.attn.relative_position_bias_table")
        window = table_window_size(table_rows)
        if window is None:
            raise UnknownVariantError(
                f"Stage {stage}'s relative position bias table has {table_rows} rows, which is "
                "not (2 * window - 1) ** 2 for any window."
            )
        num_heads.append(heads)
        window_size.append(window)
    hidden, channels = _shape(state_dict, "levels.0.blocks.0.mlp.fc1.weight")
    classes = _shape(state_dict, "head.weight")[0] if "head.weight" in state_dict else None
    return dict(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=tuple(window_size),
        mlp_ratio=hidden / channels,
        layer_scale="levels.0.blocks.0.gamma1" in state_dict,
        classes=classes,
    )


def detect_variant(state_dict):
    """The official variant whose hyper-parameters the state dict has.

    Returns:
        (variant name, detected config from `detect_config`).

    Raises:
        UnknownVariantError: no official variant matches; the message says what was detected.
    """
    config = detect_config(state_dict)
    name = find_variant(**{key: config[key] for key in ARCHITECTURE_KEYS}, exact=True)
    if name is not None:
        return name, config
    raise UnknownVariantError(
        "The checkpoint matches no official GC ViT variant. Detected: "
        f"embed_dim={config['embed_dim']}, depths={config['depths']}, "
        f"num_heads={config['num_heads']}, window_size={config['window_size']}, "
        f"mlp_ratio={config['mlp_ratio']:g}, layer_scale={'yes' if config['layer_scale'] else 'no'}, "
        f"classes={config['classes']}. For a custom configuration, build "
        "tfgcvit.GCViT(...) with these values and pass weights='<checkpoint path>'."
    )


def convert(src, dst, variant=None, entry="state_dict", overwrite=False):
    """Converts a PyTorch GC ViT checkpoint to a Keras `.weights.h5` file.

    Args:
        src: path or http(s) URL of a `.pth`, `.pth.tar` or `.safetensors`
            checkpoint, official or timm layout.
        dst: output path; must end in `.weights.h5` (Keras 3's weights format).
        variant: the official variant name; detected from the tensor shapes when None.
        entry: the training-checkpoint entry to read ("state_dict" or "state_dict_ema").
        overwrite: replace `dst` if it exists (a file; never a folder).

    Returns:
        A dict describing the result: src, dst, variant, classes, entry.

    Raises:
        FileExistsError: `dst` exists and `overwrite` is False, or it is a folder.
        OSError: `dst` cannot be written; the message names it and why.
        ValueError: `dst` does not end in `.weights.h5`, or the variant is unknown.
        UnknownVariantError: no official variant matches the checkpoint.
        CheckpointError: the checkpoint cannot be read.
        DownloadError: `src` is a URL that cannot be downloaded.
        WeightsMismatchError: the checkpoint does not fit the given variant.
    """
    dst = os.fspath(dst)
    if not dst.endswith(".weights.h5"):
        raise ValueError(
            f"The output {dst!r} must end in '.weights.h5' (the Keras 3 weights format), "
            f"e.g. {os.path.splitext(dst)[0]}.weights.h5."
        )
    _check_file_destination(dst, overwrite)
    src = os.fspath(src)
    state_dict = _read_source(src, entry)
    if variant is None:
        variant, config = detect_variant(state_dict)
    else:
        config = detect_config(state_dict)
    classes = config["classes"]
    # The variant's native input size: the official code only runs there.
    model = get_constructor(variant)(
        weights=None, include_top=classes is not None, classes=classes or 1000
    )
    load_torch_weights(model, state_dict)
    del state_dict

    # Written next to the destination, then moved: a failed save leaves no half file.
    check_free_space(dst, weights_file_bytes(model.weights))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with replaced_atomically(dst, suffix=".tmp.weights.h5") as temporary:
            model.save_weights(temporary)
    except OSError as error:
        # The error names the hidden temporary file, or nothing (HDF5's): name the destination.
        reason = os.strerror(error.errno) if error.errno else " ".join(str(error).split())
        raise OSError(f"cannot write {dst}: {reason}") from None
    return dict(src=src, dst=dst, variant=variant, classes=classes, entry=entry)


def _check_file_destination(dst, overwrite):
    if os.path.isdir(dst):
        raise FileExistsError(f"{dst} is a folder; give a file name")
    if os.path.lexists(dst) and not overwrite:  # lexists: a broken symbolic link is there too
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")


def _read_source(src, entry):
    src = os.fspath(src)
    path = fetch(src) if src.startswith(("http://", "https://")) else src
    return to_official_layout(read_checkpoint(path, entry=entry))


def convert_to_preset(src, directory, task="classifier", variant=None, entry="state_dict", image_size=None,
                      overwrite=False):
    """Converts a PyTorch GC ViT checkpoint to a keras-hub preset directory.

    The directory (config.json, model.weights.h5, metadata.json; for a
    classifier also task.json, task.weights.h5, preprocessor.json and
    image_converter.json) loads with `keras_hub.models.ImageClassifier.from_preset(directory)`
    or `keras_hub.models.Backbone.from_preset(directory)` once tfgcvit is
    imported, and `keras_hub.upload_preset` accepts it. Any GC ViT
    architecture works, official or not (read from the tensor shapes).

    Args:
        src: path or http(s) URL of an official or timm checkpoint.
        directory: the preset directory to write (atomically: all files or none).
        task: "classifier" (backbone, head and preprocessor) or "backbone".
        variant: the official variant, to check the checkpoint against; detected when None.
        entry: "state_dict" or "state_dict_ema".
        image_size: the preprocessor's input size, 32..2048; default the variant's (224 otherwise).
        overwrite: replace `directory` if it is a preset folder (or empty); any
            other existing entry is refused, with or without it.

    Returns:
        A dict describing the result: src, preset, task, variant (None for a
        custom architecture), classes, entry.

    Raises:
        FileExistsError: `directory` exists and may not be replaced.
        OSError: it cannot be written; the message names it and why.
    """
    from tfgcvit import hub

    if task not in ("classifier", "backbone"):
        raise ValueError(f"`task` must be 'classifier' or 'backbone'; got {task!r}.")
    if image_size is not None:
        check_input_size(image_size, "image_size")
    hub.check_preset_destination(directory, overwrite)  # before the conversion, which takes a while
    state_dict = _read_source(src, entry)
    config = detect_config(state_dict)
    detected = find_variant(**{key: config[key] for key in ARCHITECTURE_KEYS}, exact=True)
    if variant is not None and variant_name(variant) != detected:
        raise UnknownVariantError(
            f"The checkpoint is not GC ViT {variant}: its shapes are those of "
            f"{detected or 'a custom architecture'}. Leave out --variant to convert it as it is."
        )
    arguments = {key: config[key] for key in ARCHITECTURE_KEYS}
    # Checkpoints only say whether residual scales exist; their values come with the weights.
    arguments["layer_scale"] = 1e-5 if config["layer_scale"] else None
    if task == "backbone":
        model = hub.GCViTBackbone(**arguments)
        load_torch_weights(model, state_dict, skip_head=True)
    else:
        if config["classes"] is None:
            raise ValueError(
                "The checkpoint has no classification head (no head.weight); "
                "write a backbone preset with --task backbone."
            )
        record = _registry_record(detected)
        size = image_size if image_size is not None else (record["input_size"] if record else 224)
        crop_mode = record["crop_mode"] if record else "center"
        model = hub.build_classifier(arguments, config["classes"], size, crop_mode, state_dict)
    del state_dict
    hub.save_preset(model, directory, overwrite=overwrite)
    return dict(src=os.fspath(src), preset=os.fspath(directory), task=task, variant=detected,
                classes=config["classes"], entry=entry)


def _registry_record(variant):
    from tfgcvit.weights.pretrained import official_checkpoints

    records = [record for record in official_checkpoints() if record["variant"] == variant]
    return records[0] if records else None


def add_arguments(parser):
    """Adds the `convert` arguments to an argparse (sub)parser."""
    parser.add_argument("src", help="checkpoint path or http(s) URL (.pth, .pth.tar, .safetensors; official or timm layout)")
    parser.add_argument("dst", nargs="?", help="output Keras weights file, ending in .weights.h5 (or use --preset)")
    parser.add_argument("--preset", metavar="DIR",
                        help="write a keras-hub preset directory instead (any GC ViT architecture)")
    parser.add_argument("--task", choices=("classifier", "backbone"), default="classifier",
                        help="with --preset: an ImageClassifier preset (default) or a backbone-only one")
    parser.add_argument("--size", type=input_size_argument, default=None,
                        help=f"with --preset: the preprocessor's input size, 32..{MAX_INPUT_SIZE} "
                             "(default: the variant's, else 224)")
    parser.add_argument(
        "--variant",
        default=None,
        help=f"official variant ({', '.join(VARIANTS)}); detected from the tensor shapes by default",
    )
    parser.add_argument(
        "--ema", action="store_true", help="convert the EMA weights (state_dict_ema) instead of state_dict"
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST, or the --preset folder if it is a preset (or empty)")
    return parser


def main(args):
    """Runs `tfgcvit convert` with parsed arguments; returns the exit code (0 success, 1 error)."""
    entry = "state_dict_ema" if args.ema else "state_dict"
    try:
        if (args.dst is None) == (args.preset is None):
            raise ValueError("give either DST (a .weights.h5 file) or --preset DIR, not both or neither")
        if args.preset is not None:
            result = convert_to_preset(args.src, args.preset, task=args.task, variant=args.variant,
                                       entry=entry, image_size=args.size, overwrite=args.overwrite)
        else:
            result = convert(args.src, args.dst, variant=args.variant, entry=entry, overwrite=args.overwrite)
    except (CheckpointError, DownloadError, WeightsMismatchError, ValueError, OSError) as error:
        print(f"tfgcvit convert: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    classes = "no head" if result["classes"] is None else f"{result['classes']} classes"
    if args.preset is not None:
        kind = f"GC ViT {result['variant']}" if result["variant"] else "custom GC ViT"
        print(f"Converted {result['src']} ({result['entry']}, {kind}, {classes}) -> keras-hub "
              f"{result['task']} preset {result['preset']}")
    else:
        print(f"Converted {result['src']} ({result['entry']}, GC ViT {result['variant']}, {classes}) "
              f"-> {result['dst']}")
    return 0
