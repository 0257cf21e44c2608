"""Interleaved A/B benchmark driver shared by `compare_cpu.py` and `gpu.py`.

Each implementation runs in its own long-lived `worker.py` subprocess that
builds its model once and warms up. The driver then runs rounds: in every
round each worker times a few consecutive batches (about `sample_seconds` of
work), in an order rotated from round to round, so that slow drifts of the
machine (other jobs, clocks, thermals) hit every implementation alike. The
figures are medians over rounds; ratios are also given round by round (paired),
whose median cancels drift better than a ratio of medians.
"""

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "worker.py")


@dataclasses.dataclass
class Impl:
    """One implementation under test.

    Attributes:
        key: short unique name used in tables ("seed", "keras-tensorflow", ...).
        label: human-readable description.
        python: interpreter of the environment it runs in.
        worker_args: extra `worker.py` arguments (--impl, --path, --dtype, ...).
        env: extra environment variables (KERAS_BACKEND, ...).
    """

    key: str
    label: str
    python: str
    worker_args: list
    env: dict = dataclasses.field(default_factory=dict)


class Worker:
    """A running `worker.py` process speaking JSON lines."""

    def __init__(self, impl, common_args, env, log_path):
        self.impl = impl
        self.log = open(log_path, "w")
        full_env = dict(env, **impl.env)
        command = [impl.python, WORKER, *impl.worker_args, *common_args]
        self.log.write("$ " + " ".join(command) + "\n")
        self.log.flush()
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env=full_env, cwd=ROOT, text=True, bufsize=1,
        )

    def receive(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"worker {self.impl.key} exited (status {self.process.poll()}); "
                f"see {self.log.name}"
            )
        return json.loads(line)

    def send(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def worker_env(threads=None, extra=None):
    """Environment shared by all workers: same thread counts, quiet TF logs."""
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def _stats(values):
    values = sorted(values)
    if len(values) == 1:
        return {"median": values[0], "p25": values[0], "p75": values[0],
                "min": values[0], "max": values[0]}
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "p25": quartiles[0], "p75": quartiles[2],
            "min": values[0], "max": values[-1]}


def run_group(name, impls, common_args, batch_size, rounds, env, log_dir,
              sample_seconds=1.0, pause_seconds=0.2, out=sys.stdout):
    """Starts one worker per implementation, runs interleaved rounds, returns results.

    Args:
        name: group name (used for log files).
        impls: list of `Impl`.
        common_args: `worker.py` arguments shared by all (model, batch, size, ...).
        batch_size: images per batch, for the throughput.
        rounds: number of interleaved rounds.
        env: environment for the workers (see `worker_env`).
        log_dir: folder for each worker's stderr.
        sample_seconds: approximate work per worker per round.
        pause_seconds: idle time before each sample, so that the previous
            worker's spinning threads go to sleep.
        out: stream for progress messages.

    Returns:
        {"impls": {key: result dict}, "ratios": {...}} where a result holds the
        ready message, per-round per-batch seconds, statistics and peak RSS,
        or {"error": ...} when the worker failed.
    """
    os.makedirs(log_dir, exist_ok=True)
    results, workers = {}, {}
    try:
        for impl in impls:
            # Start one at a time so that build and compile times are not shared.
            safe_key = re.sub(r"[^A-Za-z0-9._-]+", "_", impl.key).strip("_")
            log_path = os.path.join(log_dir, f"{name}-{safe_key}.log")
            print(f"[{name}] starting {impl.key} ...", file=out, flush=True)
            worker = Worker(impl, common_args, env, log_path)
            try:
                ready = worker.receive()
                calibration = worker.send("run 1")["times"][0]
            except (RuntimeError, json.JSONDecodeError) as error:
                worker.close()
                results[impl.key] = {"label": impl.label, "error": str(error)}
                print(f"[{name}] {impl.key} failed: {error}", file=out, flush=True)
                continue
            per_sample = max(1, math.ceil(sample_seconds / max(calibration, 1e-6)))
            workers[impl.key] = (worker, per_sample)
            results[impl.key] = {"label": impl.label, "ready": ready,
                                 "batches_per_sample": per_sample, "rounds": []}
            print(f"[{name}] {impl.key} ready: first output "
                  f"{ready['time_to_first_output_seconds']:.1f} s, one batch {calibration * 1e3:.0f} ms",
                  file=out, flush=True)

        keys = list(workers)
        for r in range(rounds):
            order = keys[r % len(keys):] + keys[: r % len(keys)] if keys else []
            for key in order:
                worker, per_sample = workers[key]
                time.sleep(pause_seconds)
                times = worker.send(f"run {per_sample}")["times"]
                results[key]["rounds"].append(sum(times) / len(times))
            line = "  ".join(f"{k} {results[k]['rounds'][-1] * 1e3:.0f} ms" for k in keys)
            print(f"[{name}] round {r + 1}/{rounds}: {line}", file=out, flush=True)

        for key, (worker, _) in workers.items():
            results[key]["peak_rss_mib"] = worker.send("info")["peak_rss_mib"]
    finally:
        for worker, _ in workers.values():
            worker.close()

    for key in workers:
        result = results[key]
        latency = _stats([t * 1e3 for t in result["rounds"]])
        result["latency_ms"] = latency
        result["images_per_second"] = batch_size / (latency["median"] / 1e3)
        gflop = next((r["ready"].get("gflop_per_image") for r in results.values()
                      if r.get("ready", {}).get("gflop_per_image")), None)
        if gflop:
            result["gflop_per_image"] = gflop
            result["achieved_gflop_per_second"] = gflop * result["images_per_second"]
    return {"impls": results, "ratios": paired_ratios(results)}


def paired_ratios(results):
    """Throughput of every implementation over every other, round by round.

    ratio[a][b] = median over rounds of time_b / time_a (> 1: a is faster).
    """
    ok = {k: r["rounds"] for k, r in results.items() if r.get("rounds")}
    ratios = {}
    for a, times_a in ok.items():
        ratios[a] = {}
        for b, times_b in ok.items():
            if a != b:
                pairs = [tb / ta for ta, tb in zip(times_a, times_b)]
                ratios[a][b] = statistics.median(pairs)
    return ratios


def markdown_table(group, reference=None, secondary=None, peak_gflops=None):
    """A markdown table of one group's results.

    Args:
        group: a `run_group` result.
        reference: key of the implementation the "vs" column compares with.
        secondary: key of a second implementation to compare with.
        peak_gflops: machine peak used for the "% of peak" column.
    """
    header = ["implementation", "img/s", "latency/batch ms: median [IQR] (min-max)",
              "peak RSS MiB", "first output s"]
    for key in (reference, secondary):
        if key and key in group["impls"] and "rounds" in group["impls"][key]:
            header.append(f"throughput vs {key}")
    header.append("GFLOP/s" + (f" (% of {peak_gflops:g})" if peak_gflops else ""))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, result in group["impls"].items():
        if "error" in result:
            lines.append(f"| {key}: {result['label']} | failed: {result['error'][:80]} |"
                         + " |" * (len(header) - 2))
            continue
        lat = result["latency_ms"]
        row = [f"{key}: {result['label']}", f"{result['images_per_second']:.2f}",
               f"{lat['median']:.1f} [{lat['p25']:.1f}-{lat['p75']:.1f}] "
               f"({lat['min']:.1f}-{lat['max']:.1f})",
               f"{result['peak_rss_mib']:.0f}",
               f"{result['ready']['time_to_first_output_seconds']:.1f}"]
        for ref in (reference, secondary):
            if ref and ref in group["impls"] and "rounds" in group["impls"][ref]:
                ratio = group["ratios"][key].get(ref) if key != ref else 1.0
                row.append("-" if ratio is None else f"{ratio:.2f}x")
        gflops = result.get("achieved_gflop_per_second")
        if gflops is None:
            row.append("-")
        elif peak_gflops:
            row.append(f"{gflops:.1f} ({100 * gflops / peak_gflops:.0f}%)")
        else:
            row.append(f"{gflops:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(prefix, payload, markdown, out_dir):
    """Writes `<prefix>-<timestamp>.json/.md` and `<prefix>-latest.json/.md`."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = []
    for name in (f"{prefix}-{stamp}", f"{prefix}-latest"):
        for ext, text in (("json", json.dumps(payload, indent=2)), ("md", markdown)):
            path = os.path.join(out_dir, f"{name}.{ext}")
            with open(path, "w") as f:
                f.write(text + "\n")
            paths.append(path)
    return paths


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None
