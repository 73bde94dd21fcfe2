"""--behaviour memory: peak RSS of ``verify --behaviour`` / ``spectrum --behaviour`` against the model's size.

    python benchmarks/bench_behaviour.py                  # hidden 1024, 2 layers, vocab 32000: minutes on 2 cores
    python benchmarks/bench_behaviour.py --layers 8 --max-tokens 2048 --bf16

A Llama pair is written to a temporary folder (fp32; tuned = base + a rank-8 delta on every projection + changed
norms) and a rank-16 adapter extracted from it. Every line is its own process; its peak VmRSS (all resident
memory, memory-mapped checkpoint pages included: transformers 5 keeps part of an fp32 checkpoint mapped) and
peak RssAnon (what the process allocated) are sampled from /proc every few milliseconds while it runs. Reference lines: the import floor (torch + transformers imported), one
model (load it, one forward pass) and the obvious approach (tuned and base + adapter loaded side by side, one
forward pass each). loratools should sit at "one model" plus the tuned model's buffer (tokens × vocabulary ×
4 bytes), whatever the number of ranks swept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from loratools.extraction import extract
from loratools.options import RankPolicy

MB = 1024 * 1024
REFERENCE = """
import sys, torch, transformers
folders = sys.argv[1:]
ids = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0))
models = [transformers.LlamaForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in folders]
with torch.inference_mode():
    for model in models:
        model(ids)
"""


def make_pair(folder: Path, layers: int) -> tuple[Path, Path, int]:
    """base/ and tuned/ Llama folders; returns them and the model's size in bytes."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                out, inp = param.shape
                param += torch.randn(out, 8, generator=gen) @ torch.randn(8, inp, generator=gen) * 0.01
            elif "norm" in name:
                param += 0.01
    model.save_pretrained(folder / "tuned")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return folder / "base", folder / "tuned", size


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a running process in bytes; zeros once it has exited."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status
                      if line.startswith(("VmRSS:", "RssAnon:"))}
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


def peak_of(command: list[str]) -> tuple[int, int, float]:
    """Peak VmRSS, peak RssAnon (bytes) and wall seconds of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[:] = [max(a, b) for a, b in zip(peaks, memory(process.pid), strict=True)]
            time.sleep(0.003)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return peaks[0], peaks[1], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="also spectrum --behaviour --dtype bf16 (slow on CPUs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned, size = make_pair(Path(tmp), args.layers)
        lora = Path(tmp) / "lora"
        extract(base, tuned, lora, policy=RankPolicy("rank", 16))
        buffer = args.max_tokens * 32000 * 4
        print(f"model: Llama hidden 1024, {args.layers} layers, vocab 32000: {size / MB:.0f} MB in fp32;"
              f" tuned model's buffer at --max-tokens {args.max_tokens}: {buffer / MB:.0f} MB")
        print(f"{'process':52} {'peak VmRSS':>11} {'× model':>8} {'peak RssAnon':>13} {'seconds':>8}", flush=True)

        def show(name: str, rss: int, anon: int, seconds: float) -> None:
            print(f"{name:52} {rss / MB:>8.0f} MB {rss / size:>8.2f} {anon / MB:>10.0f} MB {seconds:>8.1f}",
                  flush=True)

        python = [sys.executable, "-c"]
        show("import floor: torch + transformers imported", *peak_of([*python, "import torch, transformers"]))
        show("one model loaded, one forward pass", *peak_of([*python, REFERENCE, str(base)]))
        show("two models side by side (tuned, base + adapter)", *peak_of([*python, REFERENCE, str(tuned), str(base)]))
        cli = [sys.executable, "-m", "loratools"]
        tokens = ["--behaviour", "--max-tokens", str(args.max_tokens), "--json"]
        show("loratools verify --behaviour", *peak_of([*cli, "verify", str(base), str(tuned), str(lora), *tokens]))
        sweep = [*cli, "spectrum", str(base), str(tuned), *tokens, "--ranks", "4,8,16,32"]
        show("loratools spectrum --behaviour --ranks 4,8,16,32", *peak_of(sweep))
        if args.bf16:
            show("  … --dtype bf16", *peak_of([*sweep, "--dtype", "bf16"]))


if __name__ == "__main__":
    main()
