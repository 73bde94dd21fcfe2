"""export-onnx against onnxruntime-genai's own model builder, both bundles run in onnxruntime-genai.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_genai.py [--hidden 1024] [--layers 2] [--threads 2] [--repeats 5]

Builds a random Llama (hidden 1024, GQA 16/4 heads, vocab 32000, --layers layers) with a byte-level BPE tokenizer
and a rank-16 PEFT adapter on the attention projections, in a temporary folder, then exports it at fp32 and int4:
- builder: ``python -m onnxruntime_genai.models.builder -i BASE -o DIR -p fp32|int4 -e cpu -c CACHE`` on the
  folder with the adapter merged (``loratools merge``: the same weights as ours), and with
  ``--extra_options adapter_path=ADAPTER`` (the adapter baked in as a LoRA branch: what its users run);
- ours: ``loratools export-onnx BASE -a ADAPTER --with-past --external-data [--quantize int4]`` (a subprocess, as
  the builder), verification on (its time reported apart), plus a genai_config.json (`genai_config`);
- with --fusions also our graph after onnxruntime's transformer fusions (``optimize_model``, model type gpt2).
Every bundle is loaded once in onnxruntime-genai (CPU, --threads intra-op threads) and timed, bundles interleaved
run by run so load on a shared machine spreads over all of them: prefill of a 64- and a 512-token prompt (one
``append_tokens``) and decode (per-token time of 32 greedy tokens after the 64-token prompt). Prints the best
(minimum) of --repeats runs, tokens/s ratios against the builder on the merged folder, export times (verification
apart), sizes, and whether each bundle's first greedy tokens equal the builder's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import torch
import transformers
from safetensors.torch import save_file

from loratools import merge

RANK, PROMPTS, DECODE_TOKENS = 16, (64, 512), 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_model(folder: Path, *, hidden: int, layers: int) -> tuple[Path, Path]:
    """A random Llama folder (weights, config, tokenizer) and a rank-16 PEFT adapter on q/k/v/o."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    heads, kv_heads = 16, 4
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = folder / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(str(base))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(base))
    adapter = folder / "adapter"
    adapter.mkdir()
    generator = torch.Generator().manual_seed(1)
    head_dim = hidden // heads
    shapes = {"q_proj": hidden, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim, "o_proj": hidden}
    tensors = {}
    for layer in range(layers):
        for module, out_features in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.02
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "target_modules": list(shapes), "fan_in_fan_out": False, "bias": "none",
        "base_model_name_or_path": str(base)}))
    return base, adapter


def genai_config(bundle: Path, model: Path) -> None:
    """genai_config.json for an ``export-onnx --with-past`` graph in `bundle`, from `model`'s config.json, and
    the tokenizer files beside it (a stand-in for ``export-onnx --genai``'s writer: swap it for that one)."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    decoder = {
        "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": config.get("head_dim") or config["hidden_size"] // heads, "hidden_size": config["hidden_size"],
        "num_attention_heads": heads, "num_hidden_layers": config["num_hidden_layers"],
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    context = config["max_position_embeddings"]
    document = {
        "model": {"type": config["model_type"], "bos_token_id": config["bos_token_id"],
                  "eos_token_id": config["eos_token_id"], "pad_token_id": config.get("pad_token_id") or config["eos_token_id"],
                  "context_length": context, "vocab_size": config["vocab_size"], "decoder": decoder},
        "search": {"do_sample": False, "max_length": context, "num_beams": 1, "past_present_share_buffer": False},
    }
    (bundle / "genai_config.json").write_text(json.dumps(document, indent=2))
    for name in TOKENIZER_FILES:
        if (model / name).exists():
            shutil.copy(model / name, bundle / name)


def set_threads(bundle: Path, threads: int) -> None:
    """The same CPU thread settings in every bundle's genai_config.json."""
    path = bundle / "genai_config.json"
    document = json.loads(path.read_text())
    document["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    path.write_text(json.dumps(document, indent=2))


def run_builder(model: Path, out: Path, precision: str, cache: Path, adapter: Path | None) -> float:
    """Seconds the builder takes (a subprocess, as its users run it)."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
    if adapter is not None:
        command += ["--extra_options", f"adapter_path={adapter}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def run_ours(model: Path, adapter: Path, out: Path, precision: str) -> tuple[float, dict[str, float]]:
    """(export seconds without verification, seconds per step) of ``loratools export-onnx`` into bundle `out`, run
    as a subprocess like the builder (both pay their imports and first-trace costs)."""
    out.mkdir()
    command = [sys.executable, "-m", "loratools", "export-onnx", str(model), "-a", str(adapter), "-o",
               str(out / "model.onnx"), "--with-past", "--external-data", "--json", "-q"]
    if precision != "fp32":
        command += ["--quantize", precision]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    timings = json.loads(done.stdout)["timings"]
    genai_config(out, model)
    return total - timings.get("verify", 0.0), timings


def fuse(ours: Path, out: Path) -> float:
    """Seconds to apply onnxruntime's transformer fusions (RMSNorm, skip + RMSNorm) to our graph, as a bundle."""
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    out.mkdir()
    model = optimize_model(str(ours / "model.onnx"), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0)
    model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    for entry in ours.iterdir():
        if not entry.name.startswith("model.onnx"):
            shutil.copy(entry, out / entry.name)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


class Timed:
    """One bundle loaded in onnxruntime-genai, with its timings collected run by run."""

    def __init__(self, folder: Path):
        config = og.Config(str(folder))
        config.clear_providers()
        self.model = og.Model(config)
        self.times: dict[str, list[float]] = {}
        self.tokens: list[int] = []

    def _generator(self, length: int, *, forced: bool) -> og.Generator:
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length if forced else 0, do_sample=False)
        return og.Generator(self.model, params)

    def run(self, prompts: dict[int, np.ndarray]) -> None:
        for size, prompt in prompts.items():
            generator = self._generator(size + 1, forced=False)
            start = time.perf_counter()
            generator.append_tokens(prompt)
            self.times.setdefault(f"prefill {size}", []).append(time.perf_counter() - start)
            del generator
        prompt = prompts[PROMPTS[0]]
        generator = self._generator(len(prompt) + DECODE_TOKENS, forced=True)  # min_length: no stop at eos
        generator.append_tokens(prompt)
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        self.times.setdefault("decode", []).append((time.perf_counter() - start) / DECODE_TOKENS)
        self.tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]

    def best_ms(self, key: str) -> float:
        return min(self.times[key]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--fusions", action="store_true", help="also our graph after onnxruntime's transformer fusions")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = build_model(root, hidden=args.hidden, layers=args.layers)
        merged = root / "merged"
        merge(base, [adapter], merged)  # the same weights as ours, for the builder
        for name in TOKENIZER_FILES:  # copied by merge when present; the builder needs them
            if (base / name).exists() and not (merged / name).exists():
                shutil.copy(base / name, merged / name)
        bundles: dict[str, Path] = {}
        for precision in precisions:
            for label, source, baked in (("builder", merged, None), ("builder+adapter_path", base, adapter)):
                key = f"{label} {precision}"
                bundles[key] = root / key.replace(" ", "-")
                seconds = run_builder(source, bundles[key], precision, root / "cache", baked)
                rows[key] = {"export_s": seconds, "verify_s": None}
            key = f"export-onnx {precision}"
            bundles[key] = root / key.replace(" ", "-")
            seconds, steps = run_ours(base, adapter, bundles[key], precision)
            rows[key] = {"export_s": seconds, "verify_s": steps.get("verify"), "steps": steps}
            if args.fusions:
                fused = f"export-onnx+fusions {precision}"
                bundles[fused] = root / fused.replace(" ", "-")
                rows[fused] = {"export_s": seconds + fuse(bundles[key], bundles[fused]), "verify_s": None}
        for key, folder in bundles.items():
            set_threads(folder, args.threads)
            rows[key]["bytes"] = folder_bytes(folder)
        timed = {key: Timed(folder) for key, folder in bundles.items()}
        rng = np.random.default_rng(0)
        prompts = {size: rng.integers(3, 32000, size).astype(np.int32) for size in PROMPTS}
        for _ in range(args.repeats):
            for bench in timed.values():
                bench.run(prompts)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, GQA 16/4, vocab 32000, rank-{RANK} adapter;"
          f" onnxruntime-genai {og.__version__}, {args.threads} threads, best of {args.repeats}"
          f" (load average {os.getloadavg()[0]:.1f})")
    header = (f"{'bundle':28} {'prefill 64':>11} {'prefill 512':>12} {'decode ms/tok':>14} {'tok/s':>7} {'×builder':>9}"
              f" {'export s':>9} {'verify s':>9} {'MB':>7} {'tokens = builder':>17}")
    print(header)
    for precision in precisions:
        reference = timed[f"builder {precision}"]
        for key in [k for k in timed if k.endswith(f" {precision}")]:
            bench, row = timed[key], rows[key]
            decode = bench.best_ms("decode")
            row.update({name: bench.best_ms(name) for name in bench.times}, tokens_per_s=1000 / decode,
                       speed_ratio=reference.best_ms("decode") / decode, export_ratio=row["export_s"]
                       / rows[f"builder {precision}"]["export_s"], same_tokens=bench.tokens[:16] == reference.tokens[:16])
            verify = f"{row['verify_s']:.1f}" if row["verify_s"] is not None else "-"
            print(f"{key:28} {row['prefill 64']:>9.1f}ms {row['prefill 512']:>10.1f}ms {decode:>12.2f}ms"
                  f" {row['tokens_per_s']:>7.1f} {row['speed_ratio']:>8.2f}× {row['export_s']:>8.1f}s {verify:>8}s"
                  f" {row['bytes'] / 1e6:>7.1f} {str(row['same_tokens']):>17}")
    for key, row in rows.items():
        if "steps" in row:
            print(f"{key}: " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in row["steps"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
