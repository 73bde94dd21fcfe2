"""GGUF: time to write a GGUF adapter vs the PEFT folder for the same adapter, and llama.cpp's own converter.

    python benchmarks/bench_gguf.py                        # Llama-1B-like shapes, rank 16
    python benchmarks/bench_gguf.py --scripts DIR          # also llama.cpp's convert_lora_to_gguf.py (a process)

A synthetic rank-16 adapter on every projection of a Llama with hidden 2048, intermediate 5632, 16 blocks,
8 kv heads (the shapes of TinyLlama / Llama-3.2-1B), fp32. Timed in this process, median of --repeat runs:
``save_adapter(format="peft")`` and ``save_adapter(format="gguf")`` (f32, f16, q8_0; the GGUF path folds scales,
permutes q/k rows and goes through gguf's writer). With --scripts (a folder holding llama.cpp's
convert_lora_to_gguf.py, e.g. the cache tests/gguf_helpers.py fills), the PEFT folder converted by llama.cpp's
converter as a whole process, for scale (its start-up included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import save_adapter

HIDDEN, INTERMEDIATE, BLOCKS, HEADS, KV_HEADS = 2048, 5632, 16, 32, 8
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 4, HIDDEN),
          "self_attn.v_proj": (HIDDEN // 4, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTERMEDIATE)}


def synthetic(rank: int, base: Path) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for block in range(BLOCKS):
        for leaf, (rows, cols) in SHAPES.items():
            name = f"model.layers.{block}.{leaf}"
            modules[name] = LoraModule(name, torch.randn(rank, cols, generator=gen) / cols**0.5,
                                       torch.randn(rows, rank, generator=gen) / rank, 2.0 * rank)
    return Adapter(modules, base_model=str(base), config={"task_type": "CAUSAL_LM"})


def timed(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scripts", type=Path, help="folder with llama.cpp's convert_lora_to_gguf.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": BLOCKS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "vocab_size": 32000, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "model_type": "llama"}))
        adapter = synthetic(args.rank, base)
        mb = adapter.num_parameters() * 4 / 1e6
        print(f"adapter: {len(adapter.modules)} modules, rank {args.rank}, {mb:.0f} MB in fp32; median of"
              f" {args.repeat}")
        peft = timed(lambda: save_adapter(adapter, root / "peft", force=True), args.repeat)
        print(f"{'PEFT folder (safetensors)':34} {peft:7.3f} s   1.00×")
        for dtype in ("fp32", "fp16", "q8_0"):
            seconds = timed(lambda d=dtype: save_adapter(adapter, root / f"a-{d}.gguf", format="gguf", dtype=d,
                                                         force=True), args.repeat)
            size = (root / f"a-{dtype}.gguf").stat().st_size / 1e6
            print(f"{'GGUF ' + dtype + f' ({size:.0f} MB)':34} {seconds:7.3f} s {seconds / peft:6.2f}×")
        if args.scripts:
            command = [sys.executable, str(args.scripts / "convert_lora_to_gguf.py"), str(root / "peft"), "--base",
                       str(base), "--outfile", str(root / "up.gguf"), "--outtype", "f32"]
            seconds = timed(lambda: subprocess.run(command, check=True, capture_output=True), 1)
            print(f"{'convert_lora_to_gguf.py (process)':34} {seconds:7.3f} s {seconds / peft:6.2f}×")


if __name__ == "__main__":
    main()
