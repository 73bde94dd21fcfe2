"""Fleet extraction: N separate ``extract`` runs vs one fleet run vs one fleet run on a local Ray cluster.

    python benchmarks/bench_fleet.py                  # N = 4 fine-tunes, 1 Llama-7B layer each (~2 GB on disk)
    python benchmarks/bench_fleet.py --layers 2 -n 8

A base and N fine-tunes with Llama-7B-shaped layers (hidden 4096, intermediate 11008, fp16; tuned = base + a
rank-32 delta on every projection) are written to a temporary folder. Each way runs as its own process with
the checkpoints evicted from the page cache first (``posix_fadvise(DONTNEED)``), so the bytes come from disk:

- N separate ``python -m loratools extract BASE TUNED_i`` processes, one after the other;
- one ``python -m loratools extract BASE TUNED_1 … TUNED_N`` process (the fleet, base read once);
- one fleet process with ``--executor ray`` on a Ray cluster started beforehand on this machine
  (``ray start --head``, as many CPUs as torch threads); the cluster's start is reported apart.

Columns: wall time (start-up included), storage bytes the process read (``ru_inblock``; Ray workers are not
children of the driver, so for Ray the bytes its tasks asked for, from the report), the bytes the run asked for
(the report's ``bytes_read``), peak RssAnon of the process (its own memory, sampled every 20 ms; mapped
checkpoint pages are page cache, not counted), for Ray also the largest worker's peak RSS (from the report),
and the ratio of the time to the I/O floor: reading the base once plus each fine-tune once, cold, with ``cat``.
The separate runs are evicted once before the first: the base stays in the page cache between them, as it
does on a machine with the memory to hold it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
RAY_PORT = 6391
MEMORY_FIELD = "RssAnon:" if "RssAnon:" in Path("/proc/self/status").read_text() else "VmRSS:"
SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
          "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}


def write_fleet(root: Path, layers: int, count: int) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(0)
    base = {}
    for layer in range(layers):
        for name, shape in SHAPES.items():
            base[f"model.layers.{layer}.{name}.weight"] = (torch.randn(shape, generator=gen) * 0.02).half()
        base[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.float16)
    save_file(base, str(root / "base.safetensors"))
    tuned_paths = []
    for number in range(count):
        tuned = {}
        for name, weight in base.items():
            if weight.dim() == 2:
                rows, cols = weight.shape
                delta = torch.randn(rows, 32, generator=gen) @ torch.randn(32, cols, generator=gen) * 2e-4
                tuned[name] = (weight.float() + delta).half()
            else:
                tuned[name] = weight
        path = root / f"tuned-{number}.safetensors"
        save_file(tuned, str(path))
        tuned_paths.append(path)
    return root / "base.safetensors", tuned_paths


def evict(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def anonymous_rss(pid: int) -> int:
    """RssAnon of a process in bytes (its own memory; mapped checkpoint pages are the page cache's), 0 once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(MEMORY_FIELD)), 0)


def measured(args: list[object], env: dict[str, str]) -> tuple[float, int, int, str]:
    """(seconds, storage bytes read from wait4's rusage, peak RssAnon sampled every 20 ms, stdout) of one child."""
    started = time.perf_counter()
    child = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0]

    def sample() -> None:
        while child.returncode is None:
            peak[0] = max(peak[0], anonymous_rss(child.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    stdout = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))}: exit {child.returncode}")
    return seconds, usage.ru_inblock * 512, peak[0], stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=4, help="fine-tunes")
    parser.add_argument("--layers", type=int, default=1, help="Llama-7B layers per checkpoint")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-ray", action="store_true")
    options = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    common = ["--rank", options.rank, "--threads", options.threads, "--json", "-q"]
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    ray_started: subprocess.Popen | None = None
    try:
        base, tuned = write_fleet(root, options.layers, options.n)
        inputs = [base, *tuned]
        size = sum(p.stat().st_size for p in inputs)
        print(f"{options.n} fine-tunes × {options.layers} Llama-7B layer(s), fp16: {size / 1e9:.2f} GB on disk;"
              f" rank {options.rank}, {options.threads} torch threads")
        evict(inputs)
        started = time.perf_counter()
        subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
        floor_s = time.perf_counter() - started
        rows = []

        evict(inputs)
        seconds = stored = peak = asked = 0
        for number, path in enumerate(tuned):
            s, b, p, out = measured([sys.executable, "-m", "loratools", "extract", base, path, "-o",
                                     root / "separate" / f"tuned-{number}", *common], env)
            seconds, stored, peak = seconds + s, stored + b, max(peak, p)
            asked += base.stat().st_size + path.stat().st_size  # each run reads both whole (one layer file)
        rows.append(("N separate extract runs", seconds, stored, asked, peak, 0))

        evict(inputs)
        s, b, p, out = measured([sys.executable, "-m", "loratools", "extract", base, *tuned, "-o", root / "fleet",
                                 *common], env)
        summary = json.loads(out)["summary"]
        rows.append(("one fleet run", s, b, summary["bytes_read"], p, 0))

        ray = Path(sys.executable).parent / "ray"
        if not options.no_ray and ray.exists():
            tick = time.perf_counter()
            # a head of our own, in the foreground of its own session: stopped by its process group, not `ray stop`
            ray_started = subprocess.Popen([ray, "start", "--head", "--block", f"--port={RAY_PORT}",
                                            f"--num-cpus={options.threads}", "--include-dashboard=false",
                                            "--disable-usage-stats", f"--temp-dir={root / 'ray'}"], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            while subprocess.run([ray, "status", f"--address=127.0.0.1:{RAY_PORT}"], env=env,
                                 capture_output=True).returncode != 0:
                time.sleep(1)
            print(f"ray start --head: {time.perf_counter() - tick:.1f} s (not counted below)")
            evict(inputs)
            s, b, p, out = measured([sys.executable, "-m", "loratools", "extract", base, *tuned, "-o",
                                     root / "ray-fleet", "--executor", "ray", "--address", f"127.0.0.1:{RAY_PORT}", *common], env)
            summary = json.loads(out)["summary"]
            rows.append(("one fleet run, Ray (local cluster)", s, summary["bytes_read"], summary["bytes_read"], p,
                         summary["worker_peak_rss_bytes"]))
            same = all((root / "fleet" / f"tuned-{i}" / "adapter_model.safetensors").read_bytes()
                       == (root / "ray-fleet" / f"tuned-{i}" / "adapter_model.safetensors").read_bytes()
                       for i in range(options.n))
            print(f"Ray adapters byte-identical to the local fleet's: {same}")
        same = all((root / "fleet" / f"tuned-{i}" / "adapter_model.safetensors").read_bytes()
                   == (root / "separate" / f"tuned-{i}" / "adapter_model.safetensors").read_bytes()
                   for i in range(options.n))
        print(f"fleet adapters byte-identical to the separate runs': {same}")
        print(f"I/O floor: base once + {options.n} fine-tunes once, cold, {floor_s:.1f} s ({size / 1e9:.2f} GB)\n")
        print("| way | time | vs N separate | vs I/O floor | storage read | bytes asked | peak RssAnon (driver / worker RSS) |")
        print("|---|---|---|---|---|---|---|")
        for name, s, b, a, p, w in rows:
            worker = f" / {w / 1e9:.2f} GB" if w else ""
            print(f"| {name} | {s:.1f} s | {s / rows[0][1]:.2f}× | {s / floor_s:.1f}× | {b / 1e9:.2f} GB |"
                  f" {a / 1e9:.2f} GB | {p / 1e9:.2f} GB{worker} |")
        if len(rows) == 3:
            print(f"\nRay / local fleet: {rows[2][1] / rows[1][1]:.2f}×")
    finally:
        if ray_started is not None:
            os.killpg(ray_started.pid, signal.SIGTERM)
            ray_started.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
