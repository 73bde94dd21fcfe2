"""extract: loratools' randomized SVD vs the full-SVD path other tools use; I/O floor; whole-process time and memory.

    python benchmarks/bench_extract.py                       # default sizes: a few minutes on 2 cores
    python benchmarks/bench_extract.py --big --threads 16    # adds the 4096-hidden MLP shapes (11008×4096)
    python benchmarks/bench_extract.py --device cuda         # SVDs on the GPU (per-layer and whole-process)

Part 1, per layer, in memory. A synthetic ΔW per Llama layer shape (hidden 2048: 2048×2048 and 5632×2048;
hidden 4096: 4096×4096, and with --big 11008×4096) whose spectrum is a power law σ_i ∝ i^-0.8 over 256
directions plus a Gaussian noise floor, like real fine-tunes. Per method: wall time, peak RssAnon above the
process's level before the call (sampled from /proc in a thread), relative error and error / optimum, where the
optimum is the error of the full SVD truncated at the same rank (Eckart–Young), measured the same way.
Methods: ``loratools.rsvd.low_rank`` (randomized SVD at --rank) and full ``torch.linalg.svd`` per layer (what
kohya, mergekit, LyCORIS and PEFT do).

Part 2, checkpoints on disk. A two-layer Llama pair at hidden 2048 / intermediate 5632 (bf16, tuned = base +
the synthetic deltas on every projection + changed norms) in a temporary folder:
- the I/O floor: open both checkpoints, read every weight pair extract reads and form the fp32 deltas, the way
  extract does (one workspace, reading ahead), cold (both checkpoints evicted from the page cache first, so the
  bytes come from disk, as they do for real checkpoints larger than memory) and warm (already cached);
- ``loratools.extraction.extract`` in this process (everything: plan, read, SVD, write) vs those floors;
- whole processes ``python -m loratools extract`` (start-up included) with the randomized default vs
  ``--exact`` (full SVD per layer, same I/O and start-up), with peak RssAnon sampled from /proc; the default
  process once more with transformers made unimportable, to show what building the model on the meta device
  for layer kinds costs at start-up;
- mergekit-extract-lora as a process, when installed;
- peak RssAnon of the randomized process again on a --memory-layers deep pair, to show it does not grow
  with depth. Target: ≤ 3 × the largest layer's fp32 size + 400 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.checkpoint import open_checkpoint
from loratools.deltas import layer_deltas
from loratools.extraction import ExtractResult, extract
from loratools.linalg import frobenius_energy, residual_energy
from loratools.options import RankPolicy, SvdSettings
from loratools.plan import plan_extract
from loratools.rsvd import low_rank

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


MEMORY_FIELD = "RssAnon" if "RssAnon:" in Path("/proc/self/status").read_text() else "VmRSS"  # gVisor lacks RssAnon


def rss_anon(pid: int | str = "self") -> int:
    """RssAnon (else VmRSS) of a process in bytes; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(MEMORY_FIELD + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class PeakRss:
    """Samples RssAnon of `pid` every few milliseconds in a thread while the block runs; `peak` in bytes."""

    def __init__(self, pid: int | str = "self"):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon(self.pid))
            time.sleep(0.003)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon(self.pid))


def synthetic_delta(rows: int, cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """(rows, cols) fp32: power-law spectrum σ_i = scale · i^-0.8 over 256 directions + a noise floor ~0.01·scale."""
    gen = torch.Generator().manual_seed(seed)
    k = min(256, rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen)).Q
    s = scale * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    delta = (u * s) @ v.T
    delta += torch.randn(rows, cols, generator=gen) * (0.01 * scale / math.sqrt(max(rows, cols)))
    return delta


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(on: str, func, *args, **kwargs):
    """(seconds, peak RssAnon above the level before, peak GPU bytes or None, result) of func(*args, **kwargs)."""
    before = rss_anon()
    if on.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        start = time.perf_counter()
        result = func(*args, **kwargs)
        sync(on)
        seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() if on.startswith("cuda") else None
    return seconds, max(0, peak.peak - before), gpu, result


def per_layer(args) -> list[dict]:
    shapes = [(2048, 2048), (5632, 2048), (4096, 4096)] + ([(11008, 4096)] if args.big else [])
    warm = torch.randn(256, 256, device=args.device)  # thread pools and kernels start before any timing
    low_rank(warm, RankPolicy("rank", 4))
    torch.linalg.svd(warm)
    rows = []
    for number, (m, n) in enumerate(shapes):
        delta = synthetic_delta(m, n, seed=number).to(args.device)
        sync(args.device)
        r = args.rank
        t_rand, mem_rand, gpu_rand, lr = measure(args.device, low_rank, delta, RankPolicy("rank", r), settings=SvdSettings(seed=0))
        t_full, mem_full, gpu_full, (U, S, Vh) = measure(args.device, torch.linalg.svd, delta, full_matrices=False)
        energy = frobenius_energy(delta)  # both errors measured the same way: the full SVD's is the optimum
        optimal = math.sqrt(residual_energy(delta, U[:, :r] * S[:r], Vh[:r]) / energy)
        rand_error = math.sqrt(residual_energy(delta, *lr.factors()) / energy)
        del U, S, Vh
        shape = f"{m}×{n}"
        rows.append(dict(shape=shape, method=f"loratools randomized (rank {r})", seconds=t_rand, rss=mem_rand,
                         gpu=gpu_rand, error=rand_error, ratio=rand_error / optimal, speedup=t_full / t_rand))
        rows.append(dict(shape=shape, method="full torch.linalg.svd", seconds=t_full, rss=mem_full, gpu=gpu_full,
                         error=optimal, ratio=1.0, speedup=1.0))
        print(f"  {shape}: randomized {t_rand:.3f} s, full SVD {t_full:.2f} s", file=sys.stderr, flush=True)
    return rows


def write_llama_pair(folder: Path, layers: int, hidden: int, intermediate: int, dtype: torch.dtype) -> tuple[Path, Path]:
    """A Llama base/tuned pair in HF layout: tuned = base + synthetic deltas on every projection, changed norms."""
    vocab = 2048
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "head_dim": 128, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    gen = torch.Generator().manual_seed(1)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for proj in PROJECTIONS:
            out, inp = {"mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                        "mlp.down_proj": (hidden, intermediate)}.get(proj, (hidden, hidden))
            shapes[p + proj + ".weight"] = (out, inp)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    base, tuned = {}, {}
    for number, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            w = torch.ones(shape)
            base[name], tuned[name] = w.to(dtype), (w + 0.01 * torch.randn(shape, generator=gen)).to(dtype)
            continue
        w = 0.02 * torch.randn(shape, generator=gen)
        base[name] = w.to(dtype)
        if ".layers." in name:  # ‖ΔW‖_F = 5% of ‖W‖_F
            delta = synthetic_delta(*shape, seed=100 + number)
            w += delta * (0.05 * float(w.norm()) / float(delta.norm()))
        tuned[name] = w.to(dtype)
    for side, state in (("base", base), ("tuned", tuned)):
        (folder / side).mkdir(parents=True)
        (folder / side / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(folder / side / "model.safetensors"), metadata={"format": "pt"})
    return folder / "base", folder / "tuned"


def evict(*folders: Path) -> None:
    """Drop the folders' files from the OS page cache (fsync, then posix_fadvise DONTNEED): the next read of
    them comes from disk, as it does for checkpoints larger than memory or not read recently."""
    for folder in folders:
        for file in folder.iterdir():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def io_floor(base: Path, tuned: Path) -> float:
    """Seconds to open both checkpoints, read every weight pair extract reads and form the fp32 deltas, as
    extract does (one workspace, reading ahead)."""
    start = time.perf_counter()
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for delta in layer_deltas(b, t, plan_extract(b, t).pairs, reuse=True):
            del delta
    return time.perf_counter() - start


def run_process(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RssAnon bytes) of a child process, sampled from /proc while it runs."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRss(child.pid) as peak:
        _, err = child.communicate()
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err}")
    return seconds, peak.peak


# `python -m loratools` with transformers made unimportable: layer kinds then come from names and shapes
NO_TRANSFORMERS = "import sys; sys.modules['transformers'] = None; from loratools.cli import main; main()"


def extract_argv(base: Path, tuned: Path, out: Path, args, *extra: str, transformers: bool = True) -> list[str]:
    start = ["-m", "loratools"] if transformers else ["-c", NO_TRANSFORMERS]
    return [sys.executable, *start, "extract", str(base), str(tuned), "-o", str(out), "--rank", str(args.rank),
            "--threads", str(args.threads), "--device", args.device, "--quiet", *extra]


def mergekit_row(base: Path, tuned: Path, out: Path, args) -> dict | None:
    tool = shutil.which("mergekit-extract-lora")
    if tool is None or importlib.util.find_spec("mergekit") is None:
        return None
    seconds, rss = run_process([tool, "--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
                                "--max-rank", str(args.rank)] + (["--cuda"] if args.device.startswith("cuda") else []))
    return dict(method="mergekit-extract-lora (process)", seconds=seconds, rss=rss)


def on_disk(args, work: Path) -> None:
    hidden, intermediate = 2048, 5632
    base, tuned = write_llama_pair(work / "pair", args.layers, hidden, intermediate, torch.bfloat16)
    layer_bytes = intermediate * hidden * 4
    def in_process(out: str) -> tuple[float, ExtractResult]:
        seconds, _, _, result = measure(args.device, extract, base, tuned, work / out,
                                        policy=RankPolicy("rank", args.rank), svd=SvdSettings(device=args.device))
        shutil.rmtree(work / out)
        return seconds, result

    cold_io, cold_lib = [], []
    for _ in range(2):  # cold: both checkpoints evicted from the page cache, so reads come from disk
        evict(base, tuned)
        cold_io.append(io_floor(base, tuned))
        evict(base, tuned)
        cold_lib.append(in_process("cold")[0])
    io_floor(base, tuned)  # warm: the checkpoints stay in the page cache, reads are memory copies
    t_io = min(io_floor(base, tuned) for _ in range(2))
    t_lib, result = min((in_process("warm") for _ in range(2)), key=lambda timed: timed[0])
    t_rand, rss_rand = run_process(extract_argv(base, tuned, work / "rand", args, "--report", str(work / "rand.json")))
    t_names, rss_names = run_process(extract_argv(base, tuned, work / "names", args, transformers=False))
    print(f"  randomized process {t_rand:.1f} s; now the full-SVD process", file=sys.stderr, flush=True)
    t_exact, rss_exact = run_process(extract_argv(base, tuned, work / "exact", args, "--exact", "--report",
                                                  str(work / "exact.json")))
    rand = {x["name"]: x for x in json.loads((work / "rand.json").read_text())["layers"]}
    exact = json.loads((work / "exact.json").read_text())["layers"]
    worst = max(rand[x["name"]]["rel_error"] / x["optimal_rel_error"] for x in exact)
    print(f"\nPart 2: two-layer Llama pair, hidden {hidden} / intermediate {intermediate}, bf16, {args.layers} layers,"
          f" {len(result.layers)} projections, rank {args.rank}, device {args.device}, {args.threads} threads")
    print(f"  I/O floor, cold (read both checkpoints from disk, form fp32 deltas) {min(cold_io):6.2f} s")
    print(f"  loratools extract() in process, cold (read, SVD, write)           {min(cold_lib):6.2f} s"
          f"   {min(cold_lib) / min(cold_io):5.2f}× the cold floor  (target ≤ 2×)")
    print(f"  I/O floor, warm (both checkpoints already in the page cache)      {t_io:6.2f} s")
    print(f"  loratools extract() in process, warm                              {t_lib:6.2f} s"
          f"   {t_lib / t_io:5.2f}× the warm floor")
    print(f"  process: loratools extract (randomized)             {t_rand:8.2f} s   peak RssAnon {rss_rand / 1e6:6.0f} MB")
    print(f"  process: same, layer kinds from names (no transformers) {t_names:6.2f} s   peak RssAnon"
          f" {rss_names / 1e6:6.0f} MB")
    print(f"  process: loratools extract --exact (full SVD)       {t_exact:8.2f} s   peak RssAnon {rss_exact / 1e6:6.0f} MB")
    print(f"  whole-process speed-up {t_exact / t_rand:.1f}× ({t_exact / t_names:.1f}× without the transformers"
          f" import; target ≥ 12×); worst layer error / optimal {worst:.4f} (target ≤ 1.01)")
    row = mergekit_row(base, tuned, work / "mergekit", args)
    if row is None:
        print("  mergekit-extract-lora: not installed, not measured")
    else:
        print(f"  process: {row['method']:<42} {row['seconds']:8.2f} s   peak RssAnon {row['rss'] / 1e6:6.0f} MB")
    limit = 3 * layer_bytes + 400e6
    print(f"  memory target: 3 × largest layer fp32 ({layer_bytes / 1e6:.0f} MB) + 400 MB = {limit / 1e6:.0f} MB;"
          f" randomized process peak {rss_rand / 1e6:.0f} MB")
    if args.memory_layers > args.layers:
        shutil.rmtree(work / "pair")
        deep_base, deep_tuned = write_llama_pair(work / "deep", args.memory_layers, hidden, intermediate, torch.bfloat16)
        t_deep, rss_deep = run_process(extract_argv(deep_base, deep_tuned, work / "deep-out", args))
        print(f"  process on a {args.memory_layers}-layer pair: {t_deep:.2f} s, peak RssAnon {rss_deep / 1e6:.0f} MB"
              f" (vs {rss_rand / 1e6:.0f} MB at {args.layers} layers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--big", action="store_true", help="add the 11008×4096 shape to part 1")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the part-2 pair")
    parser.add_argument("--memory-layers", type=int, default=6, help="depth of the memory-flatness run (0: skip)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-disk", action="store_true", help="part 1 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = (Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(" :\t")
           if Path("/proc/cpuinfo").exists() else "?")
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {args.threads} threads on {cpu}{gpu}; memory from /proc: {MEMORY_FIELD}",
          flush=True)
    rows = per_layer(args)
    print(f"\nPart 1: per layer, in memory, rank {args.rank}, device {args.device}")
    memory = "peak GPU MB" if args.device.startswith("cuda") else "peak ΔRssAnon MB"
    print(f"  {'shape':<11} {'method':<32} {'wall s':>9} {memory:>17} {'rel error':>10} {'err/optimal':>12} {'speed-up':>9}")
    for r in rows:
        mem = r["gpu"] if r["gpu"] is not None else r["rss"]
        print(f"  {r['shape']:<11} {r['method']:<32} {r['seconds']:9.3f} {mem / 1e6:17.0f} {r['error']:10.4f}"
              f" {r['ratio']:12.4f} {r['speedup']:8.1f}×")
    if not args.skip_disk:
        with tempfile.TemporaryDirectory() as tmp:
            on_disk(args, Path(tmp))


if __name__ == "__main__":
    main()
