"""GPU comparison: this port on Keras 3 + JAX against timm (eager, TF32, bf16, compiled).

Run through `bench/gpu.sh`, which installs Keras offline first. Every
implementation is a `worker.py` process on the same GPU, same input, timed in
interleaved rounds (see `harness.py`).

Settings (environment variables):
    GCVIT_BENCH_BATCH   batch size (default 128)
    GCVIT_BENCH_MODEL   variant (default tiny)
    GCVIT_BENCH_SIZE    image size (default 224)
    GCVIT_BENCH_ROUNDS  interleaved rounds (default 5)
    GCVIT_BENCH_DEVICE  cuda (default) or cpu, to test the script without a GPU
    GCVIT_BENCH_IMPLS   comma-separated subset of the implementation keys below
"""

import os
import platform
import shutil
import signal
import subprocess
import sys

from harness import ROOT, Impl, load_average, markdown_table, run_group, worker_env, write_outputs

TARGET = ("keras-jax-bf16", "timm-compile-bf16")
# Issue 12: mixed_bfloat16 on JAX at least 1.3x timm's torch.compile + bf16.
TARGET_RATIO = 1.3


def implementations(device):
    """Implementation key -> Impl, in the order they are started."""
    python = sys.executable
    timm = ["--impl", "timm", "--device", device]
    keras = ["--impl", "keras", "--path", "jit"]
    jax_env = {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if device == "cpu":
        jax_env["JAX_PLATFORMS"] = "cpu"
    impls = [
        Impl("keras-jax-fp32", "this port, Keras 3 JAX, jax.jit, float32", python,
             keras + ["--dtype", "float32"], jax_env),
        Impl("keras-jax-bf16", "this port, Keras 3 JAX, jax.jit, mixed_bfloat16", python,
             keras + ["--dtype", "mixed_bfloat16"], jax_env),
        Impl("timm-fp32", "timm eager, float32", python, timm),
        Impl("timm-tf32", "timm eager, TF32 matmuls", python, timm + ["--tf32"]),
        Impl("timm-bf16", "timm eager, autocast bfloat16", python, timm + ["--autocast", "bfloat16"]),
        Impl("timm-compile-bf16", "timm torch.compile, autocast bfloat16", python,
             timm + ["--path", "compile", "--autocast", "bfloat16"]),
    ]
    return {impl.key: impl for impl in impls}


def gpu_name():
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.check_output(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            text=True, timeout=30).strip()
    except (subprocess.SubprocessError, OSError):
        return None


def main():
    # On SIGTERM, unwind normally so that the workers are told to quit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    batch = int(os.environ.get("GCVIT_BENCH_BATCH", "128"))
    model = os.environ.get("GCVIT_BENCH_MODEL", "tiny")
    size = int(os.environ.get("GCVIT_BENCH_SIZE", "224"))
    rounds = int(os.environ.get("GCVIT_BENCH_ROUNDS", "5"))
    device = os.environ.get("GCVIT_BENCH_DEVICE", "cuda")
    available = implementations(device)
    wanted = os.environ.get("GCVIT_BENCH_IMPLS")
    keys = wanted.split(",") if wanted else list(available)
    impls = [available[key] for key in keys]

    out_dir = os.path.join(ROOT, "bench", "out")
    common = ["--model", model, "--batch-size", str(batch), "--height", str(size),
              "--width", str(size), "--warmup", "3"]
    group = run_group(f"gpu-{model}-b{batch}", impls, common, batch, rounds,
                      worker_env(), os.path.join(out_dir, "logs"), sample_seconds=0.5)
    versions = {}
    for result in group["impls"].values():
        versions.update(result.get("ready", {}).get("versions", {}))
    settings = {key: os.environ[key] for key in os.environ if key.startswith("GCVIT_BENCH_")}
    command = " ".join([*(f"{k}={v}" for k, v in sorted(settings.items())), "bash bench/gpu.sh"])
    payload = {"command": command, "device": device, "gpu": gpu_name(), "batch_size": batch,
               "model": model, "size": size, "rounds": rounds, "versions": versions,
               "python": platform.python_version(), "load": load_average(), "group": group}

    table = markdown_table(group, reference="timm-compile-bf16", secondary="timm-fp32")
    lines = [f"# GPU comparison: GCViT-{model}, batch {batch}, {size}x{size}", "",
             f"`{command}`", "", f"Device: {payload['gpu'] or device}; versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), "", table, ""]
    ours, theirs = TARGET
    ratio = group["ratios"].get(ours, {}).get(theirs)
    if ratio is not None:
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        lines.append(f"Target: {ours} throughput >= {TARGET_RATIO}x {theirs}: {ratio:.2f}x ({verdict}).")
        payload["target_ratio"] = ratio
    markdown = "\n".join(lines)
    paths = write_outputs("gpu", payload, markdown, out_dir)
    print("\n" + markdown)
    print(f"\nwrote {', '.join(os.path.relpath(p, ROOT) for p in paths)}")
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):
        for path in paths:
            if "-latest." in path:
                shutil.copy(path, out)
        logs = os.path.join(out_dir, "logs")
        for name in sorted(os.listdir(logs)):
            if name.startswith(f"gpu-{model}-b{batch}"):
                shutil.copy(os.path.join(logs, name), out)
    return 0 if all("error" not in r for r in group["impls"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
