"""The official pretrained checkpoints: registry, download, one-time conversion, cache.

The registry (`tfgcvit/weights/official_weights.json`) lists NVIDIA's official GC
ViT checkpoints. The first time a model is built with `weights="imagenet"` (or
"imagenet21k"), the checkpoint is downloaded into `<cache>/checkpoints/`, its
`state_dict` read without PyTorch, and the model tensors (official names,
PyTorch layout, no optimizer state) saved to `<cache>/converted/<name>.npz`.
Later constructions load that file: no network and no re-reading of the
checkpoint. `<cache>` is `$TFGCVIT_HOME` or `~/.cache/tfgcvit`; the downloaded
checkpoints may be deleted once converted.

The official weights are licensed CC-BY-NC-SA-4.0 (non-commercial use only).
"""

import functools
import json
import os
import sys
import zipfile

import numpy as np

from tfgcvit.weights import download
from tfgcvit.weights.checkpoint import read_checkpoint
from tfgcvit.weights.download import fetch
from tfgcvit.config import VARIANTS, WEIGHTS_LICENSE_ID, variant_name
from tfgcvit.weights.mapping import IGNORED_SUFFIXES, load_torch_weights, to_official_layout

REGISTRY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_weights.json")
PRETRAIN_NAMES = ("imagenet", "imagenet21k")
# Stored next to the tensors in a converted file; "__" keeps them apart from tensor names.
_SOURCE_KEY = "__tfgcvit_source_sha256__"
_FORMAT_KEY = "__tfgcvit_format__"
_FORMAT = "official-names-torch-layout-v1"


@functools.lru_cache(maxsize=1)
def _registry():
    with open(REGISTRY_PATH, encoding="utf-8") as file:
        return json.load(file)


def official_checkpoints():
    """The registry records: one dict per official checkpoint (variant, pretrain, url, sha256, ...)."""
    return [dict(record) for record in _registry()["checkpoints"]]


def _checkpoint_file_name(record):
    return os.path.basename(record["url"])


def _file_stem(record):
    name = _checkpoint_file_name(record)
    for suffix in (".pth.tar", ".pth", ".pt", ".safetensors"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def converted_path(record):
    """Where the converted weights of a registry record are cached."""
    return os.path.join(download.cache_dir(), "converted", _file_stem(record) + ".npz")


def checkpoint_entry(variant, pretrain):
    """The registry record of an official checkpoint.

    Args:
        variant: a key of `tfgcvit.model.gcvit.VARIANTS` ("xxtiny" ... "large_512"),
            or an alias such as "nano".
        pretrain: "imagenet" or "imagenet21k".

    Returns:
        A dict with url, sha256 (or None), size, top1, crop_pct, crop_mode, input_size.

    Raises:
        ValueError: no official checkpoint exists for this combination; the
            message lists those that do.
    """
    records = official_checkpoints()
    if variant is None:
        raise ValueError(
            f"Pretrained weights ({pretrain!r}) exist only for the official GC ViT "
            f"configurations ({', '.join(VARIANTS)}); this model's hyper-parameters match "
            "none of them. Build it with a variant constructor (e.g. tfgcvit.GCViTTiny) "
            "(any window sizes), or pass weights=None or a checkpoint path."
        )
    key = variant_name(variant)
    for record in records:
        if record["variant"] == key and record["pretrain"] == pretrain:
            return record
    for_variant = [record["pretrain"] for record in records if record["variant"] == key]
    with_pretrain = [record["variant"] for record in records if record["pretrain"] == pretrain]
    raise ValueError(
        f"There are no official {pretrain!r} weights for GC ViT {key}. For {key}: "
        f"{', '.join(repr(p) for p in for_variant) or 'none'}. "
        f"{pretrain!r} weights exist for: {', '.join(with_pretrain) or 'none'}."
    )


def _load_converted(path, record, report=True):
    """The cached converted state dict, or None when absent, stale or unreadable (said on stderr if `report`)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if _FORMAT_KEY not in archive.files or str(archive[_FORMAT_KEY]) != _FORMAT:
                reason = "written by another version"
            elif record["sha256"] and str(archive[_SOURCE_KEY]) != record["sha256"]:
                reason = "converted from another checkpoint file"
            else:
                return {name: archive[name] for name in archive.files if not name.startswith("__tfgcvit")}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        reason = f"unreadable ({error})"
    if report:
        sys.stderr.write(f"tfgcvit: converted weights {path} are {reason}; converting again.\n")
    return None


def _save_converted(path, state, source_sha256):
    """Writes the converted state dict atomically (`download.replaced_atomically`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with download.replaced_atomically(path, suffix=".npz.part") as temporary, open(temporary, "wb") as file:
        np.savez(file, **state, **{_SOURCE_KEY: np.array(source_sha256), _FORMAT_KEY: np.array(_FORMAT)})
        file.flush()
        os.fsync(file.fileno())


def _convert(record, progress):
    sys.stderr.write(
        f"tfgcvit: fetching the official GC ViT {record['variant']} ({record['pretrain']}) "
        f"weights, licensed {WEIGHTS_LICENSE_ID} (non-commercial use only). They are "
        f"converted once and cached in {download.cache_dir()}.\n"
    )
    source = download.mirrored(record["url"])
    checkpoint = download.fetch(
        source, sha256=record["sha256"], filename=_checkpoint_file_name(record), progress=progress
    )
    source_sha256 = record["sha256"] or download.recorded_sha256(checkpoint) or ""
    state = to_official_layout(read_checkpoint(checkpoint, entry="state_dict"))
    # Only the model's weights: index buffers are rebuilt by the model itself.
    return {name: value for name, value in state.items() if not name.endswith(IGNORED_SUFFIXES)}, source_sha256


def pretrained_state_dict(variant, pretrain="imagenet", progress=True):
    """The official weights of a variant as a state dict, downloading and converting on first use.

    Args:
        variant: a key of `tfgcvit.model.gcvit.VARIANTS`.
        pretrain: "imagenet" or "imagenet21k".
        progress: show download progress on stderr (when it is a terminal).

    Returns:
        A dict from official PyTorch tensor names to numpy arrays (PyTorch layout).

    Raises:
        ValueError: no such official checkpoint.
        tfgcvit.weights.download.DownloadError: the checkpoint cannot be downloaded.
        tfgcvit.weights.checkpoint.CheckpointError: the checkpoint cannot be read.
    """
    record = checkpoint_entry(variant, pretrain)
    path = converted_path(record)
    # A first look without the lock, quietly: the look under the lock decides and reports.
    state = _load_converted(path, record, report=False)
    if state is not None:
        return state
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # One conversion at a time per file; a waiting process then finds the result.
    with download.FileLock(path):
        state = _load_converted(path, record)
        if state is None:
            state, source_sha256 = _convert(record, progress)
            _save_converted(path, state, source_sha256)
    return state


def load_pretrained(model, variant, pretrain="imagenet"):
    """Loads official pretrained weights into a GC ViT model.

    Models without a head (include_top=False) take all weights but the head's.

    Args:
        model: a model built with the variant's configuration.
        variant: a key of `tfgcvit.model.gcvit.VARIANTS`, or None for a custom
            configuration (which has no pretrained weights: ValueError).
        pretrain: "imagenet" or "imagenet21k".

    Returns:
        The model.
    """
    if pretrain not in PRETRAIN_NAMES:
        raise ValueError(f"`pretrain` must be one of {PRETRAIN_NAMES}; got {pretrain!r}.")
    return load_torch_weights(model, pretrained_state_dict(variant, pretrain))


def pretrained_info():
    """One dict per official checkpoint, for listings (e.g. `tfgcvit info`).

    Returns:
        A list of dicts with variant, pretrain, url, sha256, size, top1,
        crop_pct, crop_mode, input_size, license, and cached (True when the
        converted weights are in the cache, so loading needs no network).
    """
    fields = ("variant", "pretrain", "url", "sha256", "size", "top1", "crop_pct", "crop_mode", "input_size")
    return [
        {**{field: record.get(field) for field in fields},
         "license": WEIGHTS_LICENSE_ID,
         "cached": os.path.isfile(converted_path(record))}
        for record in official_checkpoints()
    ]


def load_weights(model, weights, variant=None, entry="state_dict"):
    """Loads `weights` into `model`: a pretrained name, a local file or a URL.

    Args:
        model: a GC ViT model.
        weights: "imagenet", "imagenet21k", a path (`.weights.h5`, `.pth`,
            `.pth.tar`, `.safetensors`) or an http(s) URL to such a file.
        variant: the official variant name, needed for pretrained names.
        entry: which state dict of a training checkpoint to read
            ("state_dict" or "state_dict_ema").
    """
    if weights in PRETRAIN_NAMES:
        return load_pretrained(model, variant, weights)
    if weights.startswith(("http://", "https://")):
        weights = fetch(weights)
    if not os.path.exists(weights):
        raise FileNotFoundError(
            f"Weights file {weights!r} does not exist. Pass None, 'imagenet', "
            f"'imagenet21k', an existing checkpoint path or an http(s) URL."
        )
    if weights.endswith(".h5"):
        model.load_weights(weights)
        return model
    return load_torch_weights(model, read_checkpoint(weights, entry=entry))
