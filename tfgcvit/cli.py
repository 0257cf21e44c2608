"""The `tfgcvit` command: predict, evaluate, explain, export, info, convert and benchmark.

Exit codes: 0 on success; 1 when something failed at run time (a missing
model file, weights that cannot be downloaded, an image that cannot be read -
in which case the other images are still processed and reported); 2 for a
wrong command line; 130 when interrupted (Ctrl-C, SIGINT). Errors are one line
on stderr, never a traceback; set TFGCVIT_DEBUG=1 to see the traceback of an
unexpected error. docs/input_limits.md lists the limits enforced on inputs.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import errno
import importlib
import itertools
import json
import os
import signal
import sys
import threading
import time
import warnings

# numpy is imported by the functions that use it: importing this module stays
# quick (0.05 s rather than 0.2 s), so that `main` installs its SIGINT handler
# soon after start-up.

from tfgcvit.config import (
    ALIASES,
    DEFAULT_CROP_PCT,
    MAX_INPUT_SIZE,
    OFFICIAL_ARGUMENT_NAMES,
    VARIANTS,
    WEIGHTS_LICENSE,
    architecture,
    architecture_from_official_arguments,
    check_input_size,
    input_size_argument,
    parameter_count,
    whole_number,
)

PROG = "tfgcvit"
DEFAULT_MODEL = "tiny"
CUSTOM_MODEL = "custom"
CUSTOM_CONFIG_KEYS = (*OFFICIAL_ARGUMENT_NAMES, "num_classes")
TFDS_PREFIX = "tfds:"
# 128 + SIGINT, what shells report for a command killed by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit code 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _print_error(message):
    # Exceptions from libraries can span lines; the contract is one line, on a
    # line of its own even while a progress bar is drawn.
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Hides what native libraries write to file descriptor 2 inside the block.

    TensorFlow's C++ runtime prints start-up banners (oneDNN, CPU features) to
    stderr on import, whatever TF_CPP_MIN_LOG_LEVEL says; they would bury the
    command's own messages.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_keras():
    """Imports Keras (and its backend) without TensorFlow's native start-up noise.

    Only the first import prints that noise; when `import tfgcvit` has already
    loaded Keras, this is a no-op.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow

            # Looking for GPUs here, silenced, rather than at the first
            # operation: without a GPU, CUDA logs a "failed call to cuInit" line.
            tensorflow.config.list_physical_devices("GPU")


# Building the model ----------------------------------------------------------


def _check_input_size(size, what):
    """Raises CommandError unless `size` is one the model can serve (see config.MAX_INPUT_SIZE)."""
    try:
        return check_input_size(size, what)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _read_custom_config(path):
    try:
        with open(path) as file:
            config = json.load(file)
    except FileNotFoundError:
        raise CommandError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CommandError(f"{path}: not a JSON config file ({error})") from None
    missing = [key for key in CUSTOM_CONFIG_KEYS if key not in config] if isinstance(config, dict) else None
    if missing is None or missing:
        raise CommandError(
            f"{path}: a custom model config needs the keys {', '.join(CUSTOM_CONFIG_KEYS)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
        )
    return config


def _resolve_model(args):
    """What to build and how to preprocess, from --model/--weights/--config/--size.

    Returns:
        A dict with "build" (a function giving the model; it takes an
        `input_shape` other than (size, size, 3) and other `GCViT` options),
        "size", "crop_pct", "crop_mode", "classes", "name" and "weights".
    """
    from tfgcvit.model.gcvit import GCViT, get_constructor
    from tfgcvit.weights.pretrained import PRETRAIN_NAMES, checkpoint_entry

    model_name = args.model.lower().replace("-", "_")
    crop_pct, crop_mode = DEFAULT_CROP_PCT, "center"
    if model_name == CUSTOM_MODEL:
        if not args.config:
            raise CommandError("--model custom needs --config FILE (JSON with the architecture)")
        if not args.weights:
            raise CommandError("--model custom needs --weights PATH: random weights would predict noise")
        if args.classes:
            raise CommandError("--classes does not apply to --model custom: the config's num_classes does")
        config = _read_custom_config(args.config)
        size = args.size or _check_input_size(int(config.get("res", 224)), f"{args.config}: res")
        classes = int(config["num_classes"])
        weights = args.weights

        def build(input_shape=(size, size, 3), **options):
            return GCViT(
                **architecture_from_official_arguments(config),
                classes=classes,
                weights=weights,
                input_shape=input_shape,
                model_name="gcvit_custom",
                **options,
            )

    else:
        if args.config:
            raise CommandError("--config is only used with --model custom")
        variant = ALIASES.get(model_name, model_name)
        if variant not in VARIANTS:
            raise CommandError(
                f"unknown model {args.model!r}; choose one of {', '.join(VARIANTS)}, "
                f"{', '.join(ALIASES)} or {CUSTOM_MODEL}"
            )
        weights = args.weights or VARIANTS[variant]["weights"]
        size = args.size or VARIANTS[variant]["input_size"]
        classes = args.classes or 1000
        if weights in PRETRAIN_NAMES:
            try:
                entry = checkpoint_entry(variant, weights)
            except ValueError as error:
                raise CommandError(str(error)) from None
            crop_pct, crop_mode = entry["crop_pct"], entry["crop_mode"]

        def build(input_shape=(size, size, 3), **options):
            return get_constructor(variant)(weights=weights, classes=classes, input_shape=input_shape, **options)

        model_name = variant

    if args.crop_pct is not None:
        crop_pct = args.crop_pct
    if args.crop_mode is not None:
        crop_mode = args.crop_mode
    return dict(build=build, size=size, crop_pct=crop_pct, crop_mode=crop_mode,
                classes=classes, name=model_name, weights=weights)


def _build_model(resolved, **options):
    """Builds the model; turns loading failures into one line."""
    try:
        return resolved["build"](**options)
    except (OSError, ValueError) as error:
        # OSError: missing or unreadable files, failed downloads (DownloadError).
        # ValueError: mismatched or malformed checkpoints, bad hyper-parameters.
        raise CommandError(str(error)) from None


def _predict_probabilities(model, images):
    """Runs the model on a batch of uint8 RGB images; returns float probabilities."""
    import numpy as np

    from tfgcvit.data.preprocessing import preprocess_input

    batch = preprocess_input(np.stack(images))
    return np.asarray(model.predict_on_batch(batch), dtype=np.float64)


def _top_indices(probabilities, k):
    """Indices of the k largest values of each row, best first (ties: lower index)."""
    import numpy as np

    return np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]


# predict ---------------------------------------------------------------------


def _class_names(classes, labels_path):
    if labels_path:
        try:
            with open(labels_path, encoding="utf-8") as file:
                names = [line.strip() for line in file if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"cannot read labels file {labels_path}: {error}") from None
        if len(names) != classes:
            raise CommandError(
                f"{labels_path} has {len(names)} labels but the model has {classes} classes"
            )
        return names
    if classes == 1000:
        from tfgcvit.data.preprocessing import imagenet_classes

        return [names.split(",")[0].strip() for _, names in imagenet_classes()]
    return [str(index) for index in range(classes)]


def _chunks(iterable, size):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _prepared_batches(items, batch_size, prepare, workers):
    """Prepares items in threads, one batch ahead of the model.

    Args:
        items: an iterable of inputs to `prepare`.
        batch_size: items per batch.
        prepare: function item -> uint8 image; may raise `ImageLoadError`.
        workers: number of threads.

    Yields:
        (items, results) per batch, where each result is (image, None) or
        (None, error message).
    """
    from tfgcvit.data.images import ImageLoadError

    def attempt(item):
        try:
            return prepare(item), None
        except ImageLoadError as error:
            return None, str(error)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        chunks = _chunks(items, batch_size)
        current = next(chunks, None)
        pending = [pool.submit(attempt, item) for item in current] if current else []
        while current:
            following = next(chunks, None)
            ahead = [pool.submit(attempt, item) for item in following] if following else []
            yield current, [future.result() for future in pending]
            current, pending = following, ahead


def _top_predictions(image_path, probabilities, best, names, as_json):
    """The top-k records of one image; printed as text unless the output is JSON."""
    predictions = [{"index": int(i), "label": names[i], "probability": float(probabilities[i])} for i in best]
    if not as_json:
        print(image_path)
        for rank, prediction in enumerate(predictions, 1):
            print(f"  {rank}. {prediction['probability']:.4f}  {prediction['label']}")
    return predictions


def _image_outputs(args, resolved, records, run_batch):
    """Runs `run_batch` on the command line's images, batch by batch, read ahead in threads.

    Yields (path, image, output) for each image that could be read, in
    command-line order; for each one that could not, prints the error and
    appends {"image": path, "error": message} to `records` in its place.
    `run_batch` maps a list of uint8 images to one output per image.
    """
    from tfgcvit.data.images import evaluation_transform, load_image

    def prepare(path):
        return evaluation_transform(load_image(path), resolved["size"], resolved["crop_pct"], resolved["crop_mode"])

    for paths, results in _prepared_batches(args.images, args.batch_size, prepare, args.workers):
        good = [image for image, _ in results if image is not None]
        outputs = iter(run_batch(good) if good else [])
        for path, (image, message) in zip(paths, results):
            if message is None:
                yield path, image, next(outputs)
            else:
                _print_error(message)
                records.append({"image": path, "error": message})


def _finish(args, header, records):
    """Prints the JSON report (when asked) and the failure summary; returns the exit code."""
    failures = sum("error" in record for record in records)
    if args.json:
        json.dump({**header, "results": records}, sys.stdout, indent=1)
        print()
    if failures:
        if len(args.images) > 1:
            _print_error(f"{failures} of {len(args.images)} images could not be read")
        return 1
    return 0


def _predict(args):
    resolved = _resolve_model(args)
    names = _class_names(resolved["classes"], args.labels)
    model = _build_model(resolved)
    top = min(args.top, resolved["classes"])

    def top_predictions(images):
        probabilities = _predict_probabilities(model, images)
        return zip(probabilities, _top_indices(probabilities, top))

    records = []
    for path, _, (probabilities, best) in _image_outputs(args, resolved, records, top_predictions):
        records.append({"image": path, "predictions": _top_predictions(path, probabilities, best, names, args.json)})
    header = {"model": resolved["name"], "weights": resolved["weights"], "size": resolved["size"],
              "crop_pct": resolved["crop_pct"], "crop_mode": resolved["crop_mode"]}
    return _finish(args, header, records)


# evaluate --------------------------------------------------------------------


def _is_folder(entry):
    """True or False; None when it cannot be told (a symbolic-link loop: stat fails with ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return None


def list_image_folder(root):
    """Lists (path, class index) for a folder laid out like ImageNet-v2.

    The folder holds one subfolder per class, named by the class index in
    ASCII digits (0, 1, ..., 999), each holding that class's image files.
    Hidden entries, subfolders of class folders and files directly in `root`
    are ignored; anything else in a class folder is listed, so that what is not
    a readable image is reported rather than silently skipped. So is a class
    folder that cannot be opened (a symbolic-link loop named 3): it is listed
    as one item, reported when read, and the other classes are evaluated.

    Returns:
        A list of (path, label), sorted by class index then file name.

    Raises:
        CommandError: the folder is missing, empty, or laid out differently.
    """
    if not os.path.exists(root):
        raise CommandError(f"{root}: no such folder")
    if not os.path.isdir(root):
        raise CommandError(f"{root}: not a folder (expected subfolders 0, 1, ... of images, or tfds:imagenet_v2)")
    kinds = {entry.name: _is_folder(entry) for entry in os.scandir(root) if not entry.name.startswith(".")}
    folders = sorted(name for name, kind in kinds.items() if kind)
    if not folders:
        raise CommandError(f"{root}: no class folders (expected subfolders named 0, 1, ... holding images)")
    # str.isdigit() also accepts other scripts' digits ("١") and superscripts.
    misnamed = [name for name in folders if not (name.isascii() and name.isdigit())]
    if misnamed:
        raise CommandError(
            f"{root}: class folders must be named by class index (0, 1, ...); found "
            + ", ".join(repr(name) for name in misnamed[:5])
            + (f" and {len(misnamed) - 5} more" if len(misnamed) > 5 else "")
        )
    unreadable = [name for name, kind in kinds.items() if kind is None and name.isascii() and name.isdigit()]
    items = []
    for name in sorted(folders + unreadable, key=int):
        folder = os.path.join(root, name)
        if name in unreadable:
            items.append((folder, int(name)))
            continue
        # Entries that cannot be told (_is_folder None) are listed: reading them reports why.
        files = sorted(entry.name for entry in os.scandir(folder)
                       if _is_folder(entry) is not True and not entry.name.startswith("."))
        items.extend((os.path.join(folder, file), int(name)) for file in files)
    if not items:
        raise CommandError(f"{root}: the class folders hold no files")
    return items


def _evenly_spaced(items, limit):
    # A quick look at many classes rather than the first few classes only.
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _tfds_source(spec, limit):
    """(iterator of (image array, label), count, number of classes) for `tfds:NAME[:SPLIT]`."""
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    split = split or "test"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise CommandError(
            f"{spec} needs tensorflow-datasets: pip install 'tfgcvit[datasets]', "
            "or pass a folder of class subfolders instead"
        ) from None
    try:
        dataset, info = tfds.load(name, split=split, download=False, with_info=True, shuffle_files=False)
    except Exception as error:  # noqa: BLE001  tfds raises many types for "not prepared"
        raise CommandError(
            f"cannot load {spec} from the TFDS data folder (prepare it first with "
            f"`tfds build {name}`): {error}"
        ) from None
    count = info.splits[split].num_examples
    if limit is not None:
        dataset, count = dataset.take(limit), min(limit, count)
    records = ((example["image"], int(example["label"])) for example in tfds.as_numpy(dataset))
    return records, count, info.features["label"].num_classes


def _progress_bar(total):
    """A tqdm progress bar on stderr: redrawn in place on a terminal, a line every 10 s in logs."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else 10.0, ascii=not interactive)


def _evaluate(args):
    import numpy as np

    from tfgcvit.data.images import (
        ImageLoadError,
        decode_like_tensorflow,
        evaluation_transform,
        load_image,
        seed_port_transform,
    )

    resolved = _resolve_model(args)
    size = resolved["size"]

    if args.data.startswith(TFDS_PREFIX):
        items, total, data_classes = _tfds_source(args.data, args.limit)
        load = None
    else:
        listed = list_image_folder(args.data)
        data_classes = max(label for _, label in listed) + 1
        items = _evenly_spaced(listed, args.limit)
        total = len(items)
        # timm's evaluation reads files with Pillow and ignores EXIF orientation;
        # the seed port's data was decoded by TensorFlow.
        load = decode_like_tensorflow if args.protocol == "seed" else lambda path: load_image(path, apply_exif=False)

    # Before the model is built or any image read: accuracy against labels the
    # head cannot predict would be meaningless.
    if data_classes > resolved["classes"]:
        raise CommandError(
            f"{args.data} has class index {data_classes - 1}, beyond the model's {resolved['classes']} classes "
            f"(0..{resolved['classes'] - 1})"
        )

    if args.protocol == "seed":
        def transform(image):
            return seed_port_transform(image, size)
    else:
        def transform(image):
            return evaluation_transform(image, size, resolved["crop_pct"], resolved["crop_mode"])

    def prepare(item):
        source, _ = item
        try:
            return transform(source if load is None else load(source))
        except ImageLoadError:
            raise
        except ValueError as error:  # an image the transform refuses (seed_port_transform's aspect limit)
            raise ImageLoadError(f"{source if load else 'a TFDS image'}: {error}") from None

    model = _build_model(resolved)
    classes_seen = set()
    correct_top1 = correct_top5 = evaluated = failures = 0
    top = min(5, resolved["classes"])
    progress = _progress_bar(total)
    start = time.perf_counter()
    for batch, results in _prepared_batches(items, args.batch_size, prepare, args.workers):
        images, labels = [], []
        for (source, label), (image, message) in zip(batch, results):
            if message is not None:
                failures += 1
                _print_error(message)
            else:
                images.append(image)
                labels.append(label)
        if images:
            best = _top_indices(_predict_probabilities(model, images), top)
            labels = np.asarray(labels)
            correct_top1 += int(np.sum(best[:, 0] == labels))
            correct_top5 += int(np.sum(np.any(best == labels[:, None], axis=1)))
            evaluated += len(labels)
            classes_seen.update(labels.tolist())
        progress.update(len(batch))
    progress.close()
    rate = progress.n / max(time.perf_counter() - start, 1e-9)

    if not evaluated:
        raise CommandError(f"none of the {total} images in {args.data} could be read")
    result = {
        "top1": correct_top1 / evaluated,
        "top5": correct_top5 / evaluated,
        "images": evaluated,
        "failed": failures,
        "classes_seen": len(classes_seen),
        "images_per_second": rate,
        "model": resolved["name"],
        "weights": resolved["weights"],
        "protocol": args.protocol,
        "size": size,
        "crop_pct": resolved["crop_pct"] if args.protocol == "official" else None,
        "crop_mode": resolved["crop_mode"] if args.protocol == "official" else None,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"top1 {result['top1']:.4f} top5 {result['top5']:.4f} ({evaluated} images, {rate:.1f} img/s)")
    if failures:
        _print_error(f"{failures} of {total} images could not be read and were left out of the accuracy")
        return 1
    return 0


# explain ---------------------------------------------------------------------


def _add_explain_arguments(parser):
    from tfgcvit.explain import METHODS

    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--class", dest="explain_class", metavar="NAME|INDEX",
                        help="class to explain, by index or label (default: each image's top class)")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="folder for the pictures, IMAGE-NAME_explain.png (default: the current folder)")
    parser.add_argument("--method", choices=METHODS, default="hirescam",
                        help="class-activation method (default: hirescam, equal to Grad-CAM for GC ViT's head)")
    parser.add_argument("--labels", help="text file with one class name per line, in class-index order")
    parser.add_argument("--overwrite", action="store_true", help="replace pictures that exist in --out")
    _add_model_arguments(parser, batch_size=4)
    parser.set_defaults(handler=_explain)


def _class_from_argument(text, names):
    if text is None:
        return None
    index = whole_number(text)
    if index is not None:
        if index >= len(names):
            raise CommandError(f"--class {text}: the model has {len(names)} classes (0..{len(names) - 1})")
        return index
    wanted = text.strip().lower().replace("_", " ")
    matches = [i for i, name in enumerate(names) if name.lower().replace("_", " ") == wanted]
    if not matches:
        raise CommandError(f"--class {text!r}: no such class label; pass a class index or a label "
                           f"such as {names[0]!r}")
    return matches[0]


def _summary(values):
    import numpy as np

    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    return {"shape": list(values.shape), "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "peak": [int(peak[0]), int(peak[1])]}


def _output_paths(folder, image_paths, overwrite):
    """One picture path per image, in order: `<stem>_explain.png`, `_2`, `_3` for a name used again.

    Raises CommandError, before any work, when one of them exists and `overwrite` is false.
    """
    paths = []
    for image_path in image_paths:
        stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
        path, count = os.path.join(folder, f"{stem}_explain.png"), 1
        while path in paths:
            count += 1
            path = os.path.join(folder, f"{stem}_explain_{count}.png")
        paths.append(path)
    existing = [path for path in paths if os.path.lexists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CommandError(
            f"{existing[0]} exists{more}; pass --overwrite to replace it, or choose another --out")
    return paths


def _report(image_path, path, result, names, as_json):
    from tfgcvit.explain import TOP

    best = _top_indices(result["probabilities"], TOP)
    predictions = _top_predictions(image_path, result["probabilities"], best, names, as_json)
    if not as_json:
        print(f"  -> {path} ({result['method']} of {names[result['class_index']]})")
    return {"image": image_path, "output": path, "predictions": predictions,
            "class": {"index": result["class_index"], "label": names[result["class_index"]]},
            "method": result["method"], "cam": _summary(result["cam"]),
            "attention": {name: _summary(values) for name, values in result["attention"].items()}}


def _explain(args):
    import numpy as np

    from tfgcvit import explain
    from tfgcvit.weights.download import replaced_atomically

    resolved = _resolve_model(args)
    names = _class_names(resolved["classes"], args.labels)
    class_index = _class_from_argument(args.explain_class, names)
    outputs = collections.defaultdict(collections.deque)  # image path -> its pictures' paths, in order
    for image_path, path in zip(args.images, _output_paths(args.out, args.images, args.overwrite)):
        outputs[image_path].append(path)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create the output folder {args.out}: {error}") from None
    model = _build_model(resolved)

    def explained(images):
        return explain.explain_images(model, np.stack(images), class_index, args.method)

    records = []
    for image_path, image, result in _image_outputs(args, resolved, records, explained):
        path = outputs[image_path].popleft()
        picture = explain.render(image, result, names)
        try:
            # Beside the picture, then moved into place: an interrupt or a full disk leaves no half PNG.
            with replaced_atomically(path, suffix=".png") as temporary:
                picture.save(temporary, format="PNG")
        except OSError as error:
            raise CommandError(f"cannot write {path}: {error}") from None
        records.append(_report(image_path, path, result, names, args.json))
    header = {"model": resolved["name"], "weights": resolved["weights"], "size": resolved["size"],
              "method": args.method}
    return _finish(args, header, records)


# export ----------------------------------------------------------------------

# The output's suffix chooses the format (`tfgcvit.export.export_model`'s names);
# a name without one is a SavedModel folder.
EXPORT_FORMATS = {".onnx": "onnx", ".tflite": "litert", "": "tf_saved_model"}
FORMAT_NAMES = {"onnx": "ONNX", "litert": "TFLite", "tf_saved_model": "TensorFlow SavedModel"}


def _is_saved_model(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def _folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _tflite_int8_options(args, export_format):
    """TFLite's dynamic-range quantisation: int8 weights for the dense and convolution layers."""
    if not (args.int8 and export_format == "litert"):
        return {}
    import tensorflow as tf

    return {"optimizations": [tf.lite.Optimize.DEFAULT]}


def _check_destination(output, saved_model, overwrite):
    """Refuses, before the model is built, a destination that the export could not (or may not) write."""
    import tempfile

    # lexists: a link to nothing is an entry too, and os.replace would replace it.
    if os.path.lexists(output):
        if saved_model and not _is_saved_model(output):
            # --overwrite replaces a SavedModel folder whole, never another folder or a file.
            raise CommandError(f"{output} exists and is not a SavedModel folder; choose another name")
        if not saved_model and os.path.isdir(output):
            raise CommandError(f"{output} is a folder; give a file name")
        if not overwrite:
            raise CommandError(f"{output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CommandError(f"{folder}: no such folder")
    try:  # what the export needs there: to create a file (deleted again at once)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise CommandError(f"cannot write {output}: {error.strerror or error}") from None


# What a write can fail with (a full disk, a quota, a folder that became read-only, ...).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _write_failure(error):
    """The C library's reason for a failed write: an OSError's, or the one TensorFlow's own errors
    (a SavedModel's variables) quote in their message; None for any other error."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    return next((os.strerror(code) for code in WRITE_ERRORS if os.strerror(code) in text), None)


def _export(args):
    import keras

    from tfgcvit.export import BACKENDS, export_model, quantize_onnx
    from tfgcvit.weights.download import replaced_atomically

    if not args.output.strip():
        raise CommandError("OUTPUT is empty; name the file *.onnx (ONNX) or *.tflite (TFLite), or a folder "
                           "for a TensorFlow SavedModel")
    output = args.output.rstrip("/") or args.output
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in EXPORT_FORMATS:
        raise CommandError(f"{output}: name the file *.onnx (ONNX) or *.tflite (TFLite), or give a name "
                           "without a suffix for a TensorFlow SavedModel folder; the name chooses the format")
    export_format = EXPORT_FORMATS[suffix]
    saved_model = export_format == "tf_saved_model"
    if args.int8 and saved_model:
        raise CommandError("--int8 quantises ONNX and TFLite files; a SavedModel keeps float32 weights "
                           "(name the output *.onnx or *.tflite)")
    _check_destination(output, saved_model, args.overwrite)
    # Checked before the model is built.
    backend = keras.backend.backend()
    if backend not in BACKENDS[export_format]:
        backends = " or ".join({"tensorflow": "TensorFlow", "jax": "JAX"}.get(b, b) for b in BACKENDS[export_format])
        raise CommandError(f"{FORMAT_NAMES[export_format]} export runs on the {backends} backend (the Keras "
                           f"backend here is {backend!r}); run it with KERAS_BACKEND=tensorflow")
    resolved = _resolve_model(args)
    # Any height and width unless --size fixes one (a fixed size runs faster in OpenVINO).
    input_shape = (None, None, 3) if args.size is None else (args.size, args.size, 3)
    model = _build_model(resolved, input_shape=input_shape, include_preprocessing=args.include_preprocessing)
    try:
        with replaced_atomically(output, suffix=suffix or ".savedmodel", folder=saved_model) as temporary:
            try:
                with warnings.catch_warnings():
                    # Keras' tf2onnx shim checks for NumPy's removed `np.object` (a FutureWarning).
                    warnings.simplefilter("ignore", FutureWarning)
                    export_model(model, temporary, format=export_format,
                                 **_tflite_int8_options(args, export_format))
                if args.int8 and export_format == "onnx":
                    with replaced_atomically(temporary, suffix=".int8" + suffix) as quantized:
                        quantize_onnx(temporary, quantized)
            except ValueError as error:
                raise CommandError(str(error)) from None
            except ImportError as error:  # tf2onnx, onnx or onnxruntime missing
                extra = (" (pip install 'tfgcvit[onnx]' installs what ONNX export needs)"
                         if export_format == "onnx" else "")
                raise CommandError(f"{error}{extra}") from None
    except CommandError:
        raise
    except Exception as error:  # noqa: BLE001  only failures to write are reported here
        reason = _write_failure(error)
        if reason is None:
            raise
        # Named by the user's path: the file being written was a hidden temporary one.
        raise CommandError(f"cannot write {output}: {reason}") from None
    record = {"output": output, "format": export_format, "int8": args.int8,
              "include_preprocessing": args.include_preprocessing, "model": resolved["name"],
              "weights": resolved["weights"], "input_shape": [None, *input_shape],
              "classes": resolved["classes"],
              "bytes": _folder_bytes(output) if saved_model else os.path.getsize(output)}
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    size = "any height and width" if args.size is None else f"{args.size}x{args.size}"
    pixels = ("RGB pixels in [0, 255]" if args.include_preprocessing
              else "RGB normalised as tfgcvit.preprocess_input does")
    serve = ("; serve it with TensorFlow Serving, or in Python: model = tf.saved_model.load(path); "
             "model.serve(images)") if saved_model else ""
    print(f"wrote {output} ({'int8 ' if args.int8 else ''}{export_format}, {record['bytes'] / 1e6:.1f} MB): "
          f"{resolved['name']} with {resolved['weights']} weights; input float32 (batch, height, width, 3), "
          f"{size}, {pixels}; output (batch, {resolved['classes']}) probabilities{serve}")
    return 0


# info ------------------------------------------------------------------------


def _info(args):
    from tfgcvit.model.gcvit import CONSTRUCTORS
    from tfgcvit.weights.pretrained import pretrained_info

    checkpoints = pretrained_info()
    rows = []
    for variant, config in VARIANTS.items():
        params = parameter_count(**architecture(variant))
        for entry in [entry for entry in checkpoints if entry["variant"] == variant] or [{}]:
            rows.append({
                "variant": variant,
                "constructor": CONSTRUCTORS[variant].__name__,
                "aliases": [alias for alias, target in ALIASES.items() if target == variant],
                "params": params,
                "window_size": list(config["window_size"]),
                "input_size": config["input_size"],
                "pretrain": entry.get("pretrain"),
                "top1": entry.get("top1"),
                "crop_pct": entry.get("crop_pct"),
                "crop_mode": entry.get("crop_mode"),
                "cached": entry.get("cached"),
                "license": entry.get("license"),
            })
    if args.json:
        print(json.dumps({"variants": rows}, indent=1))
        return 0
    header = ("variant", "constructor", "params", "windows", "input", "weights", "ImageNet top-1", "test crop",
              "cached")
    table = [header] + [
        (
            " / ".join([row["variant"], *row["aliases"]]),
            row["constructor"],
            f"{row['params'] / 1e6:.1f}M",
            ",".join(map(str, row["window_size"])),
            str(row["input_size"]),
            row["pretrain"] or "-",
            "-" if row["top1"] is None else f"{row['top1']:.1f}",
            "-" if row["crop_pct"] is None else f"{row['crop_pct']} {row['crop_mode']}",
            {True: "yes", False: "no", None: "?"}[row["cached"]],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print(f"\n{WEIGHTS_LICENSE}")
    return 0


# Delegated subcommands ---------------------------------------------------------


def _delegate(module_name):
    """(add_arguments, main) of tfgcvit.<module_name>, or None when it is not installed."""
    try:
        module = importlib.import_module(f"tfgcvit.{module_name}")
    except ModuleNotFoundError as error:
        if error.name != f"tfgcvit.{module_name}":
            raise
        return None
    return module.add_arguments, module.main


# Command line ------------------------------------------------------------------


# Types of the options: an ArgumentTypeError gives `argument --OPTION: MESSAGE`
# (see config.input_size_argument).


def _positive_int(text):
    value = whole_number(text)
    if not value:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more; got {text!r}")
    return value


def _crop_pct(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], such as 0.875; got {text!r}")
    return value


def _add_model_arguments(parser, batch_size, size_help=None):
    """The options that choose the model and, unless batch_size is None, how images reach it."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"variant name (xxtiny, xtiny, tiny, tiny2, small, small2, base, large, "
                             f"large_384, large_512; aliases nano, micro) or '{CUSTOM_MODEL}' with --config "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--weights",
                        help="'imagenet', 'imagenet21k', a checkpoint path or an http(s) URL "
                             "(default: the variant's official weights)")
    parser.add_argument("--config",
                        help="JSON architecture of a custom model (keys: " + ", ".join(CUSTOM_CONFIG_KEYS)
                             + ", optional res)")
    parser.add_argument("--classes", type=_positive_int,
                        help="classes of the checkpoint's head when it is not 1000 (variants only)")
    parser.add_argument("--size", type=input_size_argument,
                        help=size_help or f"input size, 32..{MAX_INPUT_SIZE} (default: the variant's native "
                                          "size, or the config's res)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if batch_size is None:
        parser.set_defaults(crop_pct=None, crop_mode=None)
        return
    parser.add_argument("--crop-pct", type=_crop_pct,
                        help=f"resize to int(size / crop_pct) before the centre crop (default: the "
                             f"official checkpoint's, else {DEFAULT_CROP_PCT})")
    parser.add_argument("--crop-mode", choices=("center", "squash"),
                        help="'center' keeps the aspect ratio, 'squash' does not "
                             "(default: the official checkpoint's, else center)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help=f"images per batch (default: {batch_size})")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                        help="threads decoding images (default: the number of CPUs)")


def build_parser():
    parser = _Parser(
        prog=PROG,
        description="Global Context Vision Transformer (GC ViT) in Keras 3: classify images, "
                    "evaluate on ImageNet-v2, export for deployment, convert official weights, benchmark.",
        epilog=f"Exit codes: 0 success, 1 failure (one line on stderr), 2 bad command line. "
               f"{WEIGHTS_LICENSE}",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict = commands.add_parser("predict", help="top-k classes of images")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    predict.add_argument("--top", type=_positive_int, default=5, help="classes per image (default: 5)")
    predict.add_argument("--labels", help="text file with one class name per line, in class-index order")
    _add_model_arguments(predict, batch_size=8)
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser("evaluate", help="top-1/top-5 accuracy on a labelled image folder")
    evaluate.add_argument("data", metavar="DATA",
                          help="folder with subfolders 0..999 (class index) of images, like ImageNet-v2, "
                               "or tfds:imagenet_v2 (needs tensorflow-datasets and prepared data)")
    evaluate.add_argument("--limit", type=_positive_int, help="evaluate N images spread evenly over the data")
    evaluate.add_argument("--protocol", choices=("official", "seed"), default="official",
                          help="'official': the checkpoint's timm test transform (Pillow bicubic, crop_pct); "
                               "'seed': the original tfgcvit 2.0.4 README evaluation (TensorFlow decode and "
                               "bicubic resize to 256, crop 224) (default: official)")
    _add_model_arguments(evaluate, batch_size=32)
    evaluate.set_defaults(handler=_evaluate)

    explain = commands.add_parser("explain", help="pictures of the class-activation and global-attention maps")
    _add_explain_arguments(explain)

    export = commands.add_parser("export", help="an ONNX or TFLite file or a SavedModel for deployment")
    export.add_argument("output", metavar="OUTPUT",
                        help="what to write: *.onnx (ONNX, optimised for ONNX Runtime and OpenVINO), "
                             "*.tflite (TFLite), or a name without a suffix: a TensorFlow SavedModel folder "
                             "(TensorFlow Serving)")
    export.add_argument("--int8", action="store_true",
                        help="ONNX and TFLite: int8 weights (ONNX: the dense layers, ONNX Runtime's dynamic "
                             "quantisation; TFLite: dynamic-range quantisation); faster on CPU and smaller, logits "
                             "move a little: check on your data")
    export.add_argument("--include-preprocessing", action="store_true",
                        help="the file takes RGB pixels in [0, 255] and normalises them itself (default: it "
                             "takes images normalised as tfgcvit.preprocess_input does)")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_model_arguments(export, batch_size=None, size_help="fix the input to SIZE x SIZE, 32..{} "
                         "(default: any height and width, dynamic batch)".format(MAX_INPUT_SIZE))
    export.set_defaults(handler=_export)

    info = commands.add_parser("info", help="variants, parameter counts, official weights and cache")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_info)

    for name, help_text in (("convert", "convert official/timm checkpoints to Keras weights"),
                            ("benchmark", "measure inference speed")):
        delegate = _delegate(name)
        sub = commands.add_parser(name, help=help_text)
        if delegate is None:
            sub.add_argument("arguments", nargs=argparse.REMAINDER)
            sub.set_defaults(handler=lambda args, name=name: _unavailable(name))
        else:
            add_arguments, run = delegate
            add_arguments(sub)
            sub.set_defaults(handler=run)
    return parser


def _unavailable(name):
    raise CommandError(f"`{PROG} {name}` is not available in this installation (tfgcvit.{name} is missing)")


def _exit_on_interrupt(stderr_fd):
    """A SIGINT handler: removes half-written files, says so in one line, exits with 130 at once.

    Python's default, raising KeyboardInterrupt wherever the main thread is,
    is not deterministic: raised inside a destructor, a callback or a
    library's broad `except`, it is lost (the likely reason why a Ctrl-C during
    `convert` once exited 0). Exiting from the handler cannot be lost.

    Args:
        stderr_fd: a duplicate of the original stderr, which stays valid
            while `_native_stderr_silenced` points descriptor 2 elsewhere.
    """
    from tfgcvit.weights.download import remove_pending_files

    def handler(signum, frame):
        remove_pending_files()
        # A terminal shows "^C" where the cursor is: start a fresh line.
        start = "\n" if os.isatty(stderr_fd) else ""
        os.write(stderr_fd, f"{start}{PROG}: error: interrupted\n".encode())
        os._exit(INTERRUPTED_EXIT_CODE)

    return handler


@contextlib.contextmanager
def _command_environment():
    """What a command runs under: the SIGINT handler, and Pillow's bomb warning as an error.

    Both are undone afterwards, so that `main()` called from Python (the tests)
    leaves the process as it found it.
    """
    with warnings.catch_warnings():
        from PIL import Image

        # Refused with one line per image (load_image), rather than a two-line
        # Python warning and then the memory of a 90+ megapixel image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if threading.current_thread() is not threading.main_thread():  # only there can handlers be set
            yield
            return
        stderr_fd = os.dup(2)
        previous = signal.signal(signal.SIGINT, _exit_on_interrupt(stderr_fd))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            os.close(stderr_fd)


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]); returns the exit code."""
    with _command_environment():
        try:
            # Before anything imports Keras, so that TensorFlow's start-up banners stay quiet.
            _import_keras()
            args = build_parser().parse_args(argv)
            return int(args.handler(args) or 0)
        except CommandError as error:
            _print_error(error)
            return 1
        except KeyboardInterrupt:  # a SIGINT raised as KeyboardInterrupt (main() run in another thread)
            _print_error("interrupted")
            return INTERRUPTED_EXIT_CODE
        except Exception as error:  # noqa: BLE001  the contract is one line, not a traceback
            if os.environ.get("TFGCVIT_DEBUG"):
                raise
            message = str(error) or type(error).__name__
            _print_error(f"{message} (set TFGCVIT_DEBUG=1 for the traceback)")
            return 1
