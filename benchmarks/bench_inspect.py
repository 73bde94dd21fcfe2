"""inspect on a 7B-shaped rank-64 adapter: exact spectra from the factors vs dense ΔW + torch.linalg.svdvals.

    python benchmarks/bench_inspect.py [--layers 32] [--rank 64] [--dense-layers 1] [--threads 2]

Generates a Llama-7B-shaped PEFT adapter (per layer q, k, v, o 4096×4096; gate, up 11008×4096; down
4096×11008 — 224 modules over 32 layers) in fp16 in a temporary folder, then times:
- ``inspect_adapter(folder)`` end to end (read the file, every module's exact spectrum, the report);
- the spectrum path alone (`module_singular_values`: float64 Gram matrices of the factors, adapter in memory);
- the QR variant of the factor spectrum (`qr_factor_spectrum` below: QR of B and Aᵀ in float32);
- the reference: form each dense ΔW = scale·B·A in fp32 and call ``torch.linalg.svdvals``. On a few cores this
  takes minutes per layer, so by default it runs on the first ``--dense-layers`` layers and is extrapolated to
  all modules (marked in the table); ``--dense-layers 32`` measures it all.
The top singular values of both paths are compared on the reference modules.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import save_adapter
from loratools.inspection import inspect_adapter
from loratools.spectral import module_singular_values

HIDDEN, INTERMEDIATE = 4096, 11008
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def make_adapter(layers: int, rank: int, seed: int = 0) -> Adapter:
    """A PEFT-style fp16 adapter with trained-looking factors (A ~ N(0, 1/in), B ~ N(0, 0.01²))."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for proj, (out, inp) in PROJECTIONS.items():
            name = f"model.layers.{layer}.{proj}"
            a = (torch.randn(rank, inp, generator=gen) / inp**0.5).half()
            b = (0.01 * torch.randn(out, rank, generator=gen)).half()
            modules[name] = LoraModule(name, a, b, alpha=2.0 * rank)
    return Adapter(modules, format="peft", base_model="llama-7b-shaped", config={"task_type": "CAUSAL_LM"})


def timed(func):
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def qr_factor_spectrum(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of scale·B·A from QR of B and Aᵀ and an r×r SVD: the textbook variant, for comparison."""
    rb = torch.linalg.qr(B.float(), mode="r")[1]
    ra = torch.linalg.qr(A.float().T, mode="r")[1]
    return torch.linalg.svdvals((rb * scale) @ ra.T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dense-layers", type=int, default=1, help="layers the dense reference runs on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = make_adapter(args.layers, args.rank)
    modules = list(adapter.modules.values())
    size = sum(m.A.numel() + m.B.numel() for m in modules) * 2
    print(f"adapter: {len(modules)} modules, rank {args.rank}, {size / 2**20:.0f} MiB fp16; {args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(adapter, Path(tmp) / "adapter")
        t_end_to_end, report = timed(lambda: inspect_adapter(folder))
    t_factor, factor_spectra = timed(lambda: [module_singular_values(m) for m in modules])
    t_qr, _ = timed(lambda: [qr_factor_spectrum(*m.factors(), m.scale) for m in modules])

    dense_modules = modules[: len(PROJECTIONS) * min(args.dense_layers, args.layers)]
    t_dense, dense_spectra = timed(lambda: [torch.linalg.svdvals(m.delta(torch.float32)) for m in dense_modules])
    t_dense_all = t_dense * len(modules) / len(dense_modules)
    worst = max(
        float((f - d[: len(f)]).abs().max() / d[0]) for f, d in zip(factor_spectra, dense_spectra, strict=False)
    )
    assert len(report.modules) == len(modules)

    extrapolated = len(dense_modules) < len(modules)
    dense_label = "dense ΔW + torch.linalg.svdvals" + (
        f" (measured on {len(dense_modules)} modules, extrapolated)" if extrapolated else ""
    )
    rows = [
        ("inspect_adapter end to end (read + spectra + report)", t_end_to_end),
        ("factor spectra only (fp64 Gram of B, A + r×r SVD; inspect's path)", t_factor),
        ("factor spectra only (fp32 QR of B, Aᵀ + r×r SVD)", t_qr),
        (dense_label, t_dense_all),
    ]
    print(f"\n| path | time for {len(modules)} modules (s) | per module (ms) | dense / this |")
    print("|---|---:|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {1000 * seconds / len(modules):.1f} | {t_dense_all / seconds:.0f}× |")
    print(f"\nmax |σ_factor − σ_dense| / σ_1 over the {len(dense_modules)} reference modules: {worst:.1e}")


if __name__ == "__main__":
    main()
