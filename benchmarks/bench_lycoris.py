"""LoHa / LoKr → plain LoRA: loratools' exact structured route vs forming ΔW and a full SVD.

    python benchmarks/bench_lycoris.py                          # 2 LoHa + 2 LoKr layers of 4096×4096, rank 64
    python benchmarks/bench_lycoris.py --size 4096 --layers 4 --rank 32 --threads 2

Per layer type, LLM-sized synthetic layers (seeded, N(0, 1) factors as after training):
- LoHa: (W1a·W1b) ⊙ (W2a·W2b) with W1a, W2a (size, r) and W1b, W2b (r, size), r = --loha-dim (rank ≤ r²);
- LoKr: kron(W₁, W₂) with W₁ full (--lokr-factor², LyCORIS's default) and W₂ = W2a·W2b of rank --lokr-dim
  (size / factor square), rank ≤ factor·dim.
Methods, both truncating at --rank:
- ``structured``: `structured_convert.plain_lora` (LoHa: QR of the r²-wide Hadamard factors + a small SVD;
  LoKr: the SVDs of W₁ and W₂; ΔW never formed);
- ``full svd``: form ΔW and ``torch.linalg.svd`` (what PEFT PR #2939, kohya's resize and sd-scripts do).
Figures: wall time per type (all its layers), relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F pooled over the layers
(measured against the formed ΔW for both methods), and the ratios structured / full svd.
"""

from __future__ import annotations

import argparse
import time

import torch

from loratools.adapter import Adapter
from loratools.linalg import frobenius_energy, pooled_rel_error, residual_energy
from loratools.options import RankPolicy
from loratools.structured_convert import plain_lora
from loratools.structured_modules import LohaModule, LokrModule, StructuredModule


def make_loha(name: str, size: int, dim: int, gen: torch.Generator) -> LohaModule:
    w = [torch.randn(shape, generator=gen) / dim**0.5 for shape in ((size, dim), (dim, size), (size, dim), (dim, size))]
    return LohaModule(name, *w, alpha=dim, scale=1.0)


def make_lokr(name: str, size: int, factor: int, dim: int, gen: torch.Generator) -> LokrModule:
    half = size // factor
    return LokrModule(name, alpha=dim, scale=1.0, w1=torch.randn(factor, factor, generator=gen),
                      w2a=torch.randn(half, dim, generator=gen) / dim**0.5, w2b=torch.randn(dim, half, generator=gen))


def full_svd_route(module: StructuredModule, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Form ΔW and truncate its full SVD: (left (rows, rank), right (rank, cols))."""
    U, S, Vh = torch.linalg.svd(module.matrix(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def run(kind: str, modules: dict[str, StructuredModule], rank: int) -> dict[str, float]:
    start = time.perf_counter()
    converted, _ = plain_lora(Adapter({}, structured=modules), policy=RankPolicy("rank", rank))
    structured_time = time.perf_counter() - start
    start = time.perf_counter()
    full = {name: full_svd_route(module, rank) for name, module in modules.items()}
    full_time = time.perf_counter() - start
    ours, theirs = [], []
    for name, module in modules.items():
        delta = module.matrix()
        total = frobenius_energy(delta)
        b, a = converted.modules[name].factors()
        ours.append((residual_energy(delta, b * converted.modules[name].scale, a), total))
        theirs.append((residual_energy(delta, *full[name]), total))
    return {"structured_s": structured_time, "full_s": full_time, "structured_err": pooled_rel_error(ours),
            "full_err": pooled_rel_error(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2, help="layers per type")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--loha-dim", type=int, default=16)
    parser.add_argument("--lokr-factor", type=int, default=16)
    parser.add_argument("--lokr-dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    types = {
        "LoHa": {f"loha.{i}": make_loha(f"loha.{i}", args.size, args.loha_dim, gen) for i in range(args.layers)},
        "LoKr": {f"lokr.{i}": make_lokr(f"lokr.{i}", args.size, args.lokr_factor, args.lokr_dim, gen)
                 for i in range(args.layers)},
    }
    print(f"{args.layers} layers per type of {args.size}×{args.size}, rank {args.rank}, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads")
    print("| type | structured (s) | full svd (s) | speed-up | rel. error structured | rel. error full svd | error ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, modules in types.items():
        r = run(kind, modules, args.rank)
        print(f"| {kind} | {r['structured_s']:.2f} | {r['full_s']:.2f} | {r['full_s'] / r['structured_s']:.0f}× |"
              f" {r['structured_err']:.6e} | {r['full_err']:.6e} | {r['structured_err'] / r['full_err']:.6f} |")


if __name__ == "__main__":
    main()
