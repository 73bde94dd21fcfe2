"""merge: streaming one tensor at a time vs the naive whole-model merge, time and peak anonymous memory.

    python benchmarks/bench_merge.py [--layers 24] [--hidden 2048] [--rank 16] [--shards 4] [--threads 2]

Writes a synthetic fp32 model (per layer four hidden×hidden matrices, in `--shards` safetensors shards with an
index) and a rank-`--rank` PEFT adapter on every matrix into a temporary folder, then runs each path in a
fresh subprocess while a thread samples ``RssAnon`` from /proc/self/status every millisecond:
- ``loratools.merging`` (plan from headers, stream each output tensor: load, fp32 sum, write);
- naive: ``safetensors.torch.load_file`` every shard into one dict, add every delta, ``save_file`` each shard.
Both outputs are compared tensor by tensor. Peak RssAnon excludes the page cache / mmapped file pages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_adapter, save_adapter
from loratools.merging import merge

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_inputs(folder: Path, layers: int, hidden: int, rank: int, shards: int) -> None:
    """A sharded fp32 model (with index) and a PEFT adapter covering every matrix, under `folder`."""
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in PROJECTIONS]
    (folder / "base").mkdir()
    per = -(-len(names) // shards)
    weight_map = {}
    for n in range(shards):
        file = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"{m}.weight": 0.02 * torch.randn(hidden, hidden, generator=gen) for m in names[n * per:(n + 1) * per]}
        save_file(part, str(folder / "base" / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": len(names) * hidden * hidden * 4}, "weight_map": weight_map}
    (folder / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "base" / "config.json").write_text("{}")
    modules = {
        m: LoraModule(m, torch.randn(rank, hidden, generator=gen) / hidden**0.5,
                      0.01 * torch.randn(hidden, rank, generator=gen), 2.0 * rank)
        for m in names
    }
    save_adapter(Adapter(modules), folder / "adapter")


def naive_merge(base: Path, adapter: Path, out: Path) -> None:
    """Load the whole model, add every delta, save: memory grows with the model."""
    out.mkdir()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(base / file)))
    for name, module in load_adapter(adapter).modules.items():
        state[f"{name}.weight"] = state[f"{name}.weight"] + module.delta()
    for file in sorted(set(index["weight_map"].values())):
        save_file({k: state[k] for k, f in index["weight_map"].items() if f == file}, str(out / file))


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def run_one(path: str, folder: Path, threads: int) -> None:
    """Child process: run one path, print {"seconds", "peak_rss_anon_mib", "start_rss_anon_mib"} as JSON."""
    torch.set_num_threads(threads)
    start_rss, peak, stop = rss_anon_kib(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if path == "loratools":
        merge(folder / "base", [folder / "adapter"], folder / "out-loratools")
    else:
        naive_merge(folder / "base", folder / "adapter", folder / "out-naive")
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_rss_anon_mib": peak[0] / 1024, "start_rss_anon_mib": start_rss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", choices=["loratools", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.folder, args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder, args.layers, args.hidden, args.rank, args.shards)
        model_mib = args.layers * len(PROJECTIONS) * args.hidden**2 * 4 / 2**20
        print(f"model: {args.layers * len(PROJECTIONS)} tensors {args.hidden}×{args.hidden} fp32 = {model_mib:.0f} MiB"
              f" in {args.shards} shards; adapter rank {args.rank}; {args.threads} threads")
        results = {}
        for path in ("loratools", "naive"):
            command = [sys.executable, __file__, "--run", path, "--folder", str(folder), "--threads", str(args.threads)]
            results[path] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        ours, naive = load_merged(folder / "out-loratools"), load_merged(folder / "out-naive")
        worst = max(float((ours[k] - naive[k]).abs().max()) for k in naive)
    print("\n| path | time (s) | peak RssAnon (MiB) | growth over start (MiB) |")
    print("|---|---:|---:|---:|")
    for path, r in results.items():
        growth = r["peak_rss_anon_mib"] - r["start_rss_anon_mib"]
        print(f"| {path} | {r['seconds']:.2f} | {r['peak_rss_anon_mib']:.0f} | {growth:.0f} |")
    lt, nv = results["loratools"], results["naive"]
    ours_growth = max(1e-9, lt["peak_rss_anon_mib"] - lt["start_rss_anon_mib"])
    growth = (nv["peak_rss_anon_mib"] - nv["start_rss_anon_mib"]) / ours_growth
    print(f"\nnaive / loratools: time {nv['seconds'] / lt['seconds']:.2f}×, memory growth {growth:.1f}×;"
          f" max |difference| between outputs {worst:.1e}")


def load_merged(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


if __name__ == "__main__":
    main()
