"""onnxruntime (fp32, int8) vs PyTorch eager on the same merged model: prefill and per-token decode with the cache.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_onnx.py [--threads 2] [--hidden 512] [--layers 4] [--repeats 10]

(PASSIVE: on a loaded machine PyTorch's spinning OpenMP workers make eager 5–20× slower and the table meaningless.)

Builds a random Llama (hidden 512, 4 layers, GQA 8/4 heads, vocab 8192) in a temporary folder, makes a rank-8
PEFT-style adapter for it, exports base + adapter with ``export_onnx(..., options=ExportOptions(with_past=True))`` in fp32 and int8
(each verified), then times, with the same thread count for both runtimes:
- prefill: one forward over a (batch, seq) prompt, empty cache;
- decode: per-token latency of 16 greedy steps after a 128-token prompt (cache reused between steps).
Prints the best of --repeats runs in milliseconds (the minimum: robust to other load on a shared machine), ratios (PyTorch / ORT fp32: > 1 means ORT is faster; int8 / fp32) and sizes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_onnx.py --multilora [--threads 2] [--rank 16]

onnxruntime multi-LoRA instead: the same model exported once with LoRA slots on every projection of every layer
(``--lora-slots``), a rank-16 adapter on all of them (``export-adapter``), against the plain export with that
adapter merged: prefill and per-token decode with no adapter and with the adapter active (the cost of the LoRA
branch), then the switch: loading an adapter file, and decode steps that alternate two adapters run by run
against steps that keep one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from safetensors.torch import load_file, save_file

from loratools.export import ExportOptions, export_onnx

DECODE_STEPS = 16
PREFILL = ((1, 16), (1, 128), (4, 128), (1, 512))
DECODE_BATCHES = (1, 4)


def build_model(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      vocab_size=8192, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder / "base"))
    adapter = folder / "adapter"
    adapter.mkdir()
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            out_features = hidden if module == "q_proj" else hidden // 2
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, hidden) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 8) * 0.02
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "bias": "none",
    }))
    return folder / "base", adapter


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def torch_prefill(model, batch: int, seq: int):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)

    return run


def torch_decode(model, batch: int, prompt: int):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))

    def run():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for step in range(DECODE_STEPS):
                mask = torch.ones(batch, prompt + step + 1, dtype=torch.long)
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True,
                            position_ids=torch.full((batch, 1), prompt + step))
                token = out.logits[:, -1:].argmax(-1)
            run.per_token = (time.perf_counter() - start) / DECODE_STEPS

    return run


def ort_feeds(sess, batch: int, seq: int, past: int = 0, vocab: int = 8192) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.arange(past, past + seq, dtype=np.int64)[None].repeat(batch, 0)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3]), dtype=np.float32)
    return feeds


def ort_prefill(sess, batch: int, seq: int):
    feeds = ort_feeds(sess, batch, seq)
    return lambda: sess.run(None, feeds)


def ort_decode(sess, batch: int, prompt: int, options: list | None = None):
    """Per-token decode with the cache; step i runs with options[i % len(options)] (RunOptions: the active
    adapter; None or one entry: no switching)."""
    names = [o.name for o in sess.get_outputs()]
    feeds = ort_feeds(sess, batch, prompt)
    options = options or [None]

    def run():
        out = dict(zip(names, sess.run(names, feeds, options[0]), strict=True))
        start = time.perf_counter()
        for step in range(DECODE_STEPS):
            token = out["logits"][:, -1:].argmax(-1).astype(np.int64)
            step_feeds = {"input_ids": token, "attention_mask": np.ones((batch, prompt + step + 1), np.int64),
                          "position_ids": np.full((batch, 1), prompt + step, np.int64)}
            step_feeds |= {n.replace("present.", "past_key_values."): v for n, v in out.items()
                           if n.startswith("present.")}
            out = dict(zip(names, sess.run(names, step_feeds, options[step % len(options)]), strict=True))
        run.per_token = (time.perf_counter() - start) / DECODE_STEPS

    return run


def per_token_ms(run, repeats: int) -> float:
    run()
    values = []
    for _ in range(repeats):
        run()
        values.append(run.per_token)
    return min(values) * 1000


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_rank_adapter(folder: Path, base: Path, rank: int, seed: int) -> Path:
    """A PEFT adapter of `rank` on every projection of every layer, random (scaled to matter, not to explode)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS):
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.02
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(PROJECTIONS), "fan_in_fan_out": False, "bias": "none",
    }))
    return folder


KEEP_ALIVE: list = []  # RunOptions does not keep its LoraAdapter alive


def run_options(path: Path | None) -> ort.RunOptions:
    options = ort.RunOptions()
    if path is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        options.add_active_adapter(adapter)
        KEEP_ALIVE.append(adapter)
    return options


def multilora(args) -> None:
    from loratools.export import export_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, _ = build_model(root, args.hidden, args.layers)
        first = build_rank_adapter(root / "a16", base, args.rank, seed=1)
        second = build_rank_adapter(root / "b16", base, args.rank, seed=2)
        merged = export_onnx(base, root / "merged.onnx", adapters=[first], options=ExportOptions(with_past=True))
        slotted = export_onnx(base, root / "slots.onnx",
                              options=ExportOptions(with_past=True, lora_slots=",".join(PROJECTIONS)))
        files = {}
        for name, adapter in (("a", first), ("b", second)):
            result = export_adapter(adapter, root / f"{name}.onnx_adapter", onnx=root / "slots.onnx", verify=base)
            files[name] = result.out
            check = result.verification.outputs[0]
            print(f"adapter {name}: rank {args.rank} on {result.filled} slots, {result.bytes / 2**20:.2f} MiB,"
                  f" logits max abs diff vs merged PyTorch {check.max_abs_diff:.2e}"
                  f" ({'passed' if result.verification.passed else 'FAILED'})")
        print(f"merged export {sum(merged.files.values()) / 2**20:.1f} MiB, slotted export"
              f" {sum(slotted.files.values()) / 2**20:.1f} MiB with {len(slotted.slots)} slots")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {name: ort.InferenceSession(str(root / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                    for name in ("merged", "slots")}
        none, active, other = run_options(None), run_options(files["a"]), run_options(files["b"])
        columns = {"merged": (sessions["merged"], none), "slots, none": (sessions["slots"], none),
                   f"slots, r{args.rank}": (sessions["slots"], active)}
        rows: dict[str, dict[str, float]] = {}
        for column, (sess, opts) in columns.items():
            for batch, seq in PREFILL[:3]:
                feeds = ort_feeds(sess, batch, seq)
                rows.setdefault(f"prefill b{batch} s{seq}", {})[column] = best_ms(
                    lambda sess=sess, feeds=feeds, opts=opts: sess.run(None, feeds, opts), args.repeats)
            for batch in DECODE_BATCHES:
                rows.setdefault(f"decode b{batch} past128 /token", {})[column] = per_token_ms(
                    ort_decode(sess, batch, 128, [opts]), max(3, args.repeats // 3))
        sess = sessions["slots"]
        switch = {
            "same adapter every step": per_token_ms(ort_decode(sess, 1, 128, [active]), max(3, args.repeats // 3)),
            "alternate a/b every step": per_token_ms(ort_decode(sess, 1, 128, [active, other]),
                                                     max(3, args.repeats // 3)),
        }
        load_ms = best_ms(lambda: ort.LoraAdapter().Load(str(files["a"])), args.repeats)

    print(f"\nmulti-LoRA: Llama hidden {args.hidden}, {args.layers} layers, vocab 8192, {args.threads} threads;"
          f" onnxruntime {ort.__version__}; best of {args.repeats}, ms")
    names = list(columns)
    header = f"{'case':<26}" + "".join(f"{n:>14}" for n in names) + f"{'none/merged':>13}{'r/merged':>10}"
    print(header)
    print("-" * len(header))
    for case, row in rows.items():
        values = [row[n] for n in names]
        print(f"{case:<26}" + "".join(f"{v:>14.2f}" for v in values)
              + f"{values[1] / values[0]:>12.2f}×{values[2] / values[0]:>9.2f}×")
    print(f"\nadapter switch: LoraAdapter.Load {load_ms:.2f} ms per file;"
          f" decode b1 past128 /token: same adapter {switch['same adapter every step']:.2f} ms,"
          f" alternating two adapters {switch['alternate a/b every step']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multilora", action="store_true", help="Time onnxruntime multi-LoRA instead (see above).")
    parser.add_argument("--rank", type=int, default=16, help="--multilora: the adapters' rank.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.multilora:
        multilora(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = build_model(root, args.hidden, args.layers)
        exports = {}
        for precision in ("fp32", "int8"):
            options = ExportOptions(with_past=True, quantize="int8" if precision == "int8" else None)
            result = export_onnx(base, root / f"{precision}.onnx", adapters=[adapter], options=options)
            exports[precision] = result
            logits = result.verification.outputs[0]
            print(f"{precision}: {sum(result.files.values()) / 2**20:.1f} MiB, export {sum(result.timings.values()):.1f}s,"
                  f" logits max abs diff {logits.max_abs_diff:.2e}, cosine {logits.cosine:.6f},"
                  f" top-1 {logits.top1:.1%}, verification {'passed' if result.verification.passed else 'FAILED'}")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        # the same merged weights as the export: W + 2·B@A on q_proj and v_proj
        raw = load_file(str(adapter / "adapter_model.safetensors"))
        with torch.no_grad():
            for key, a in raw.items():
                if ".lora_A." in key:
                    name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                    model.get_parameter(name).add_(2.0 * raw[key.replace("lora_A", "lora_B")] @ a)
        # one runtime at a time (PyTorch first, then each session): idle worker threads of one runtime spinning
        # while the other runs would distort both on a 2-core machine
        timings: dict[str, dict[str, float]] = {"torch": {}}
        for batch, seq in PREFILL:
            timings["torch"][f"prefill b{batch} s{seq}"] = best_ms(torch_prefill(model, batch, seq), args.repeats)
        for batch in DECODE_BATCHES:
            timings["torch"][f"decode b{batch} past128 /token"] = per_token_ms(torch_decode(model, batch, 128),
                                                                             max(3, args.repeats // 3))
        del model
        for precision in exports:
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(root / f"{precision}.onnx"), options, providers=["CPUExecutionProvider"])
            row = timings[precision] = {}
            for batch, seq in PREFILL:
                row[f"prefill b{batch} s{seq}"] = best_ms(ort_prefill(sess, batch, seq), args.repeats)
            for batch in DECODE_BATCHES:
                row[f"decode b{batch} past128 /token"] = per_token_ms(ort_decode(sess, batch, 128),
                                                                      max(3, args.repeats // 3))
            del sess
        rows = [(case, timings["torch"][case], timings["fp32"][case], timings["int8"][case]) for case in timings["torch"]]

    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab 8192, {args.threads} threads;"
          f" torch {torch.__version__}, onnxruntime {ort.__version__}; best of {args.repeats}, ms")
    header = f"{'case':<26} {'torch':>9} {'ort fp32':>9} {'ort int8':>9} {'torch/fp32':>11} {'int8/fp32':>10}"
    print(header)
    print("-" * len(header))
    for name, t, f, q in rows:
        print(f"{name:<26} {t:>9.2f} {f:>9.2f} {q:>9.2f} {t / f:>10.2f}× {q / f:>9.2f}×")
    sizes = {p: sum(r.files.values()) for p, r in exports.items()}
    print(f"\nsizes: fp32 {sizes['fp32'] / 2**20:.1f} MiB, int8 {sizes['int8'] / 2**20:.1f} MiB"
          f" ({sizes['int8'] / sizes['fp32']:.2f}× of fp32)")


if __name__ == "__main__":
    main()
