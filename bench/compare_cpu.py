"""CPU comparison: this port against the original port (tfgcvit 2.0.4) and timm.

Every implementation runs in its own worker process (see `harness.py`): the
original port from `.venv-seed` (TensorFlow 2.12, created on first use), timm
and this port on each Keras backend from `.venv`. All get the same input and
the same thread count, and are timed in interleaved rounds.

Usage (from the repository root):
    .venv/bin/python bench/compare_cpu.py                 # the full suite
    .venv/bin/python bench/compare_cpu.py --suite user    # predict_on_batch, the issue-12 targets
    .venv/bin/python bench/compare_cpu.py --suite quick   # a short check
    .venv/bin/python bench/compare_cpu.py --suite paths   # inference paths
    .venv/bin/python bench/compare_cpu.py --model tiny --batch-size 8 \
        --impls seed,keras-tensorflow:function,keras-tensorflow:xla
    .venv/bin/python bench/compare_cpu.py --impls keras-tensorflow@HEAD~1,keras-tensorflow

Results go to bench/out/cpu-<suite>-<time>.json and .md (and -latest).
"""

import argparse
import os
import shlex
import signal
import subprocess
import sys

from harness import (ROOT, Impl, load_average, markdown_table, run_group, worker_env,
                     write_outputs)

from tfgcvit.benchmark import cpu_model

VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
SEED_VENV = os.path.join(ROOT, ".venv-seed")
SEED_PYTHON = os.path.join(SEED_VENV, "bin", "python")
SEED_PACKAGES = ["tensorflow-cpu==2.12.1", "numpy<2", "tfgcvit==2.0.4"]
# Single-precision matmul peak of the 2-thread CPU measured here (GCVIT_NOTES.md, section 5).
PEAK_GFLOPS = 190.0

# Implementations by key; "name:path" picks an inference path (see worker.py).
LABELS = {
    "seed": "tfgcvit 2.0.4, TF 2.12",
    "keras-tensorflow": "this port, Keras 3 TensorFlow",
    "keras-jax": "this port, Keras 3 JAX",
    "keras-torch": "this port, Keras 3 PyTorch",
    "timm": "timm, PyTorch",
    "onnx-ours": "this port, Keras model.export(format='onnx')",
    "onnx-ours224": "this port, Keras model.export(format='onnx'), input 224x224",
    "onnx-oursfused": "this port, tfgcvit export_model (optimize_onnx)",
    "onnx-ours224fused": "this port, tfgcvit export_model (optimize_onnx), input 224x224",
    "onnx-timm": "timm, torch.onnx.export",
}
ONNX_DIR = os.path.join(ROOT, "bench", "out", "onnx")
# The files bench/onnx_export.py writes, as "<side>-<model>.onnx".
ONNX_SIDES = ("ours", "ours224", "oursfused", "ours224fused", "timm")

SUITES = {
    # (group name, model, batch, size, implementations)
    "full": [
        ("tiny-b8-224", "tiny", 8, 224,
         ["seed", "keras-tensorflow", "keras-jax", "keras-torch", "timm", "timm:compile"]),
        ("tiny-b1-224", "tiny", 1, 224,
         ["seed", "keras-tensorflow", "keras-jax", "keras-torch", "timm"]),
        ("tiny-b8-256", "tiny", 8, 256, ["seed", "keras-tensorflow", "keras-jax"]),
        ("xxtiny-b8-224", "xxtiny", 8, 224, ["seed", "keras-tensorflow", "keras-jax", "timm"]),
        ("small-b8-224", "small", 8, 224, ["seed", "keras-tensorflow", "keras-jax", "timm"]),
        ("base-b8-224", "base", 8, 224, ["seed", "keras-tensorflow", "keras-jax", "timm"]),
    ],
    # What a user runs: Keras models through predict_on_batch, timm eager (the issue-12 targets).
    "user": [
        ("user-tiny-b8-224", "tiny", 8, 224,
         ["seed:predict", "keras-tensorflow:predict", "keras-jax:predict", "keras-torch:predict",
          "timm"]),
        ("user-tiny-b1-224", "tiny", 1, 224,
         ["seed:predict", "keras-tensorflow:predict", "keras-jax:predict", "keras-torch:predict",
          "timm"]),
        ("user-tiny-b8-256", "tiny", 8, 256, ["seed:predict", "keras-tensorflow:predict"]),
    ],
    # Deployment: Keras' own ONNX export against timm's torch.onnx.export, in two runtimes.
    "onnx": [
        (f"onnx-tiny-b{batch}-224", "tiny", batch, 224,
         ["onnx-timm:onnxruntime", "onnx-ours:onnxruntime", "onnx-ours224:onnxruntime",
          "onnx-oursfused:onnxruntime", "onnx-ours224fused:onnxruntime",
          "onnx-timm:openvino", "onnx-ours:openvino", "onnx-ours224:openvino",
          "onnx-oursfused:openvino", "onnx-ours224fused:openvino"])
        for batch in (1, 8)
    ],
    "quick": [
        ("tiny-b8-224", "tiny", 8, 224, ["seed", "keras-tensorflow", "timm"]),
    ],
    "paths": [
        ("paths-tiny-b8-224", "tiny", 8, 224,
         ["seed:function", "seed:xla", "seed:predict", "keras-tensorflow:xla",
          "keras-tensorflow:function", "keras-tensorflow:predict", "keras-jax:jit",
          "keras-jax:predict", "keras-torch:eager"]),
        ("paths-tiny-b1-224", "tiny", 1, 224,
         ["seed:function", "seed:xla", "keras-tensorflow:xla", "keras-tensorflow:function"]),
    ],
}


def export_tree(ref, out_dir):
    """Exports the package at git revision `ref` to a folder; returns the folder."""
    commit = subprocess.check_output(["git", "rev-parse", "--short", ref], cwd=ROOT, text=True).strip()
    folder = os.path.join(out_dir, f"tree-{commit}")
    if not os.path.isdir(os.path.join(folder, "tfgcvit")):
        os.makedirs(folder, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", commit, "tfgcvit"], cwd=ROOT,
                                   stdout=subprocess.PIPE)
        subprocess.check_call(["tar", "-x", "-C", folder], stdin=archive.stdout)
        archive.wait()
    return folder


def ensure_onnx_files(model):
    """Writes the ONNX_SIDES files of MODEL (bench/onnx_export.py) unless all exist."""
    files = [os.path.join(ONNX_DIR, f"{side}-{model}.onnx") for side in ONNX_SIDES]
    if not all(os.path.exists(path) for path in files):
        print(f"exporting the ONNX files of GCViT-{model} ...", flush=True)
        subprocess.check_call([VENV_PYTHON, os.path.join(ROOT, "bench", "onnx_export.py"),
                               "--model", model, "--out", ONNX_DIR])
    return files


def make_impl(spec, dtype, out_dir, hide_jax=True, model="tiny"):
    """An `Impl` from "name[:path][@tree]".

    Examples: "keras-tensorflow:xla"; "keras-tensorflow@HEAD~1" runs the package
    as committed at HEAD~1 (exported with `git archive`), to measure a change;
    "keras-jax@/some/folder" runs the `tfgcvit` package found in that folder.
    """
    spec_body, _, ref = spec.partition("@")
    name, _, path = spec_body.partition(":")
    args = ["--dtype", dtype]
    if path:
        args += ["--path", path]
    if hide_jax and name == "keras-tensorflow":
        # Installed for the TensorFlow backend alone, this package brings no JAX (TF 2.12,
        # which the original port needs, does require JAX, and its process imports it).
        args.append("--hide-jax")
    label = LABELS.get(name, name) + (f", {path}" if path else "") + (f", at {ref}" if ref else "")
    if ref:
        if not name.startswith("keras-"):
            raise ValueError(f"Only keras-<backend> implementations take @REF, not {spec!r}.")
        backend = name[len("keras-"):]
        tree = ref if os.path.isdir(os.path.join(ref, "tfgcvit")) else export_tree(ref, out_dir)
        env = {"KERAS_BACKEND": backend, "PYTHONPATH": os.path.abspath(tree)}
        return Impl(spec, label, VENV_PYTHON, ["--impl", "keras", *args], env=env)
    if name == "seed":
        return Impl(spec, label, SEED_PYTHON, ["--impl", "seed", *args])
    if name.startswith("onnx-") and name[len("onnx-"):] in ONNX_SIDES:
        side = name[len("onnx-"):]
        layout = "nchw" if side == "timm" else "nhwc"
        return Impl(spec, label, VENV_PYTHON, ["--impl", "onnx", "--onnx-file",
                                               os.path.join(ONNX_DIR, f"{side}-{model}.onnx"),
                                               "--layout", layout, *args])
    if name == "timm":
        return Impl(spec, label, VENV_PYTHON, ["--impl", "timm", *args])
    if name.startswith("keras-"):
        backend = name[len("keras-"):]
        return Impl(spec, label, VENV_PYTHON, ["--impl", "keras", *args],
                    env={"KERAS_BACKEND": backend})
    raise ValueError(f"Unknown implementation {spec!r}; use seed, timm or keras-<backend>.")


def ensure_seed_venv(python="python3"):
    """Creates .venv-seed with the original port unless it already works."""
    check = [SEED_PYTHON, "-c", "import tfgcvit, tensorflow"]
    # Run the check outside the repository, whose own tfgcvit would shadow the seed's.
    if os.path.exists(SEED_PYTHON) and subprocess.call(
            check, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        return
    print(f"creating {SEED_VENV} with {' '.join(SEED_PACKAGES)} ...", flush=True)
    subprocess.check_call([python, "-m", "venv", SEED_VENV])
    subprocess.check_call([SEED_PYTHON, "-m", "pip", "install", "-q", *SEED_PACKAGES])


def _versions():
    import importlib.metadata as metadata

    versions = {}
    for name in ("keras", "tensorflow", "jax", "torch", "timm", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def main(argv=None):
    # On SIGTERM, unwind normally so that the workers are told to quit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="full")
    parser.add_argument("--groups", default=None,
                        help="comma-separated group names of the suite to run (default: all)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every worker (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up batches per worker")
    parser.add_argument("--sample-seconds", type=float, default=1.0,
                        help="work per worker per round (default 1 s)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="custom group: variant")
    parser.add_argument("--batch-size", type=int, default=8, help="custom group: batch size")
    parser.add_argument("--size", type=int, default=224, help="custom group: image size")
    parser.add_argument("--impls", default=None,
                        help="custom group: comma-separated implementations, e.g. "
                             "seed,keras-tensorflow:xla,keras-jax,timm,timm:compile")
    parser.add_argument("--jax-visible", action="store_true",
                        help="let TensorFlow import JAX in the keras-tensorflow workers, as it does "
                             "wherever JAX is installed (+140 MiB RSS); by default it is hidden, "
                             "as in an environment with this package and TensorFlow only")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "out"))
    parser.add_argument("--seed-python", default="python3",
                        help="interpreter (<= 3.11) that creates .venv-seed")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT),
                                               "bench/compare_cpu.py", *(argv or sys.argv[1:])])

    if args.impls:
        suite_name = "custom"
        groups = [(f"{args.model or 'tiny'}-b{args.batch_size}-{args.size}", args.model or "tiny",
                   args.batch_size, args.size, args.impls.split(","))]
    else:
        suite_name = args.suite
        groups = SUITES[args.suite]
        if args.groups:
            wanted = args.groups.split(",")
            groups = [g for g in groups if g[0] in wanted]
    if any(spec.split(":")[0] == "seed" for g in groups for spec in g[4]):
        ensure_seed_venv(args.seed_python)

    env = worker_env(args.threads)
    log_dir = os.path.join(args.out_dir, "logs")
    payload = {"command": command, "suite": suite_name, "cpu": cpu_model(),
               "cpus": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
               "dtype": args.dtype, "versions": _versions(), "load_before": load_average(),
               "groups": {}}
    sections = [f"# CPU comparison ({suite_name})", "",
                f"`{command}`", "",
                f"CPU: {payload['cpu']}, {payload['cpus']} cores; {args.threads} threads per "
                f"worker; {args.dtype}; {args.rounds} interleaved rounds, medians; "
                f"load average before: {payload['load_before']}", ""]
    for name, model, batch, size, specs in groups:
        if any(spec.startswith("onnx-") for spec in specs):
            ensure_onnx_files(model)
        impls = [make_impl(spec, args.dtype, args.out_dir, not args.jax_visible, model) for spec in specs]
        common = ["--model", model, "--batch-size", str(batch), "--height", str(size),
                  "--width", str(size), "--threads", str(args.threads),
                  "--warmup", str(args.warmup)]
        group = run_group(name, impls, common, batch, args.rounds, env, log_dir,
                          sample_seconds=args.sample_seconds)
        group.update(model=model, batch_size=batch, size=size)
        payload["groups"][name] = group
        reference = next((s for s in specs if s.startswith(("seed", "onnx-timm:onnxruntime"))), None)
        secondary = next((s for s in specs if s in ("timm", "onnx-timm:openvino")), None)
        table = markdown_table(group, reference, secondary, PEAK_GFLOPS)
        sections += [f"## GCViT-{model}, batch {batch}, {size}x{size}", "", table, ""]
        print("\n" + table + "\n", flush=True)
    payload["load_after"] = load_average()
    targets = check_targets(payload["groups"])
    if targets:
        sections += ["## Targets (TensorFlow backend against the original port)", "",
                     "| target | measured | met |", "|---|---|---|"]
        sections += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets]
        payload["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]
    markdown = "\n".join(sections)
    paths = write_outputs(f"cpu-{suite_name}", payload, markdown, args.out_dir)
    print("\n".join(sections[-(len(targets) + 4):]) if targets else "")
    print(f"\nwrote {', '.join(os.path.relpath(p, ROOT) for p in paths)}")
    print(f"command: {command}")
    return 0


def check_targets(groups):
    """The issue's CPU targets, as (target, measured, met) rows, where measured."""
    rows = []

    def ratio(group, a, b):
        g = groups.get(group)
        if not g or a not in g["ratios"] or b not in g["ratios"].get(a, {}):
            return None
        return g["ratios"][a][b]

    def result(group, key):
        return groups.get(group, {}).get("impls", {}).get(key, {})

    for group, label in (("tiny-b8-224", "batch 8 throughput >= 1.15x original"),
                         ("tiny-b8-256", "256x256 batch 8 throughput >= 1.15x original")):
        r = ratio(group, "keras-tensorflow", "seed")
        if r is not None:
            rows.append((label, f"{r:.2f}x", r >= 1.15))
    r = ratio("tiny-b1-224", "keras-tensorflow", "seed")
    if r is not None:
        rows.append(("batch 1 latency <= 0.8x original", f"{1 / r:.2f}x", 1 / r <= 0.8))
    r = ratio("tiny-b8-224", "keras-tensorflow", "timm")
    if r is not None:
        rows.append(("batch 8 throughput >= 3x timm eager", f"{r:.2f}x", r >= 3))
    ours, seed = result("tiny-b8-224", "keras-tensorflow"), result("tiny-b8-224", "seed")
    if "peak_rss_mib" in ours and "peak_rss_mib" in seed:
        rows.append(("peak RSS at batch 8 <= original",
                     f"{ours['peak_rss_mib']:.0f} vs {seed['peak_rss_mib']:.0f} MiB",
                     ours["peak_rss_mib"] <= seed["peak_rss_mib"]))
    if "ready" in ours and "ready" in seed:
        a = ours["ready"]["time_to_first_output_seconds"]
        b = seed["ready"]["time_to_first_output_seconds"]
        rows.append(("constructor to first prediction <= original", f"{a:.1f} vs {b:.1f} s", a <= b))
    rows += _user_path_targets(ratio, result)
    if "achieved_gflop_per_second" in ours:
        g = ours["achieved_gflop_per_second"]
        rows.append(("fraction of the CPU ceiling (report)",
                     f"{g:.1f} GFLOP/s = {100 * g / PEAK_GFLOPS:.0f}% of {PEAK_GFLOPS:g}", True))
    return rows


def _user_path_targets(ratio, result):
    """Issue 12's targets, on the user's path (`--suite user`: predict_on_batch, timm eager)."""
    rows = []
    tf, seed = "keras-tensorflow:predict", "seed:predict"
    for group, label, goal in (("user-tiny-b8-224", "TF batch 8 throughput >= 1.45x original", 1.45),
                               ("user-tiny-b8-256", "TF 256x256 batch 8 throughput >= 1.6x original", 1.6)):
        r = ratio(group, tf, seed)
        if r is not None:
            rows.append((label, f"{r:.2f}x", r >= goal))
    for other, label, goal in ((seed, "original", 0.7), ("timm", "timm eager", 0.9)):
        r = ratio("user-tiny-b1-224", tf, other)
        if r is not None:
            rows.append((f"TF batch 1 latency <= {goal}x {label}", f"{1 / r:.2f}x", 1 / r <= goal))
    for backend in ("jax", "torch"):
        key = f"keras-{backend}:predict"
        r = ratio("user-tiny-b8-224", key, "timm")
        if r is not None:
            rows.append((f"{backend} batch 8 throughput >= timm eager", f"{r:.2f}x", r >= 1.0))
        r = ratio("user-tiny-b1-224", key, "timm")
        if r is not None:
            rows.append((f"{backend} batch 1 latency <= 1.1x timm eager", f"{1 / r:.2f}x", 1 / r <= 1.1))
    ours, original = result("user-tiny-b8-224", tf), result("user-tiny-b8-224", seed)
    if "peak_rss_mib" in ours and "peak_rss_mib" in original:
        rows.append(("TF peak RSS at batch 8 <= original",
                     f"{ours['peak_rss_mib']:.0f} vs {original['peak_rss_mib']:.0f} MiB",
                     ours["peak_rss_mib"] <= original["peak_rss_mib"]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
