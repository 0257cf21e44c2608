"""Converting a PyTorch GC ViT checkpoint (official or timm layout) to a Keras `.weights.h5` file.

Used by `tfgcvit convert SRC DST [--variant NAME] [--ema]`: the CLI calls
`add_arguments` on its subparser and `main` with the parsed arguments.
"""

import math
import os
import re
import sys

from tfgcvit.checkpoint import CheckpointError, read_checkpoint
from tfgcvit.download import DownloadError, fetch, replaced_atomically
from tfgcvit.model import NUM_STAGES, VARIANTS, get_constructor
from tfgcvit.weights import WeightsMismatchError, load_torch_weights, to_official_layout


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
        side = math.isqrt(table_rows)
        if side * side != table_rows or side % 2 == 0:
            raise UnknownVariantError(
                f"Stage {stage}'s relative position bias table has {table_rows} rows, which is "
                "not (2 * window - 1) ** 2 for any window."
            )
        num_heads.append(heads)
        window_size.append((side + 1) // 2)
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
    for name, known in VARIANTS.items():
        if (known["embed_dim"] == config["embed_dim"]
                and tuple(known["depths"]) == config["depths"]
                and tuple(known["num_heads"]) == config["num_heads"]
                and tuple(known["window_size"]) == config["window_size"]
                and float(known["mlp_ratio"]) == config["mlp_ratio"]
                and (known["layer_scale"] is not None) == config["layer_scale"]):
            return name, config
    raise UnknownVariantError(
        "The checkpoint matches no official GC ViT variant. Detected: "
        f"embed_dim={config['embed_dim']}, depths={config['depths']}, "
        f"num_heads={config['num_heads']}, window_size={config['window_size']}, "
        f"mlp_ratio={config['mlp_ratio']:g}, layer_scale={'yes' if config['layer_scale'] else 'no'}, "
        f"classes={config['classes']}. For a custom configuration, build "
        "tfgcvit.GCViT(...) with these values and pass weights='<checkpoint path>'."
    )


def convert(src, dst, variant=None, entry="state_dict"):
    """Converts a PyTorch GC ViT checkpoint to a Keras `.weights.h5` file.

    Args:
        src: path or http(s) URL of a `.pth`, `.pth.tar` or `.safetensors`
            checkpoint, official or timm layout.
        dst: output path; must end in `.weights.h5` (Keras 3's weights format).
        variant: the official variant name; detected from the tensor shapes when None.
        entry: the training-checkpoint entry to read ("state_dict" or "state_dict_ema").

    Returns:
        A dict describing the result: src, dst, variant, classes, entry.

    Raises:
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
    src = os.fspath(src)
    path = fetch(src) if src.startswith(("http://", "https://")) else src
    state_dict = to_official_layout(read_checkpoint(path, entry=entry))
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
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with replaced_atomically(dst, suffix=".tmp.weights.h5") as temporary:
        model.save_weights(temporary)
    return dict(src=src, dst=dst, variant=variant, classes=classes, entry=entry)


def add_arguments(parser):
    """Adds the `convert` arguments to an argparse (sub)parser."""
    parser.add_argument("src", help="checkpoint path or http(s) URL (.pth, .pth.tar, .safetensors; official or timm layout)")
    parser.add_argument("dst", help="output Keras weights file, ending in .weights.h5")
    parser.add_argument(
        "--variant",
        default=None,
        help=f"official variant ({', '.join(VARIANTS)}); detected from the tensor shapes by default",
    )
    parser.add_argument(
        "--ema", action="store_true", help="convert the EMA weights (state_dict_ema) instead of state_dict"
    )
    return parser


def main(args):
    """Runs `tfgcvit convert` with parsed arguments; returns the exit code (0 success, 1 error)."""
    entry = "state_dict_ema" if args.ema else "state_dict"
    try:
        result = convert(args.src, args.dst, variant=args.variant, entry=entry)
    except (CheckpointError, DownloadError, WeightsMismatchError, ValueError, OSError) as error:
        print(f"tfgcvit convert: error: {error}", file=sys.stderr)
        return 1
    classes = "no head" if result["classes"] is None else f"{result['classes']} classes"
    print(f"Converted {result['src']} ({result['entry']}, GC ViT {result['variant']}, {classes}) -> {result['dst']}")
    return 0
