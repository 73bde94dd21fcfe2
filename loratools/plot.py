"""``--plot``: spectra as a PNG, one row per module type; weight error and behaviour per rank side by side
(``spectrum --behaviour``). The only importer of matplotlib (lazily, at call time).

Readable for hundreds of modules: modules are grouped by type (`module_group`: the name without the layer
index, e.g. ``self_attn.q_proj`` or ``mlp.down_proj``), one row of two panels per group — singular values on
a log scale, and the cumulative energy Σ_{j≤i} σ_j² / ‖ΔW‖²_F — with one thin line per module coloured by
its position (first to last layer). Beyond MAX_GROUPS groups, the smallest are merged into "other".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from loratools.errors import LoratoolsError
from loratools.writer import atomic_output

MAX_GROUPS = 12


def module_group(name: str) -> str:
    """The module type of a name: what follows its last numeric component (trailing numbers dropped).

    Example:
        >>> module_group("model.layers.3.self_attn.q_proj"), module_group("lora_unet_up_blocks_1_attentions_0_proj_in")
        ('self_attn.q_proj', 'proj_in')
    """
    sep = "." if "." in name else "_"
    parts = name.split(sep)
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return sep.join(parts[numeric[-1] + 1 :]) if numeric else sep.join(parts)


def _groups(names: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(module_group(name), []).append(i)
    groups = dict(sorted(groups.items()))
    if len(groups) > MAX_GROUPS:
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        groups = dict(ordered[: MAX_GROUPS - 1])
        groups["other"] = sorted(i for _, members in ordered[MAX_GROUPS - 1 :] for i in members)
    return groups


def plot_spectra(spectra: Iterable[tuple[str, torch.Tensor, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG of spectra grouped by module type.

    Args:
        spectra: (module name, S (k,) descending singular values, ‖ΔW‖²_F) per module; when S is only the
            leading part of the spectrum, the cumulative energy curve ends below 1 by the tail's share.
        path: the PNG to write (its folder must exist).
    Returns:
        The path written. Raises LoratoolsError when matplotlib is not installed.
    """
    Figure, path = _figure_class(path)
    from matplotlib.ticker import MaxNLocator

    items = list(spectra)
    if not items:
        raise LoratoolsError("--plot: no modules to plot")
    groups = _groups([name for name, _, _ in items])
    fig = Figure(figsize=(12, 0.8 + 2.2 * len(groups)), dpi=110, layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, (group, members) in enumerate(groups.items()):
        left, right = axes[row]
        colours = _colours(len(members))
        for colour, i in zip(colours, members, strict=True):
            _, s, energy = items[i]
            s = s.double()
            x = torch.arange(1, len(s) + 1).numpy()
            positive = s > 0
            if positive.any():
                left.semilogy(x[positive.numpy()], s[positive].numpy(), color=colour, lw=0.8, alpha=0.8)
            cumulative = torch.cumsum(s * s, 0) / energy if energy > 0 else torch.zeros_like(s)
            right.plot(x, cumulative.numpy(), color=colour, lw=0.8, alpha=0.8)
        count = f"{len(members)} module" + ("s" if len(members) > 1 else "")
        left.set_ylabel(f"{_short(group)}\n({count})", fontsize=9)
        right.set_ylim(0, 1.02)
        right.axhline(0.9, color="grey", lw=0.5, ls=":")
        for ax in (left, right):
            ax.grid(True, which="major", lw=0.3, alpha=0.5)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_title("singular values σ_i (log scale)", fontsize=10)
    axes[0][1].set_title("cumulative energy Σ σ² / ‖ΔW‖²_F (dotted: 0.9)", fontsize=10)
    axes[-1][0].set_xlabel("index i", fontsize=9)
    axes[-1][1].set_xlabel("rank", fontsize=9)
    fig.suptitle(f"{title}\ncolour: first (purple) to last (yellow) module of each type", fontsize=11)
    with atomic_output(path, force=True) as tmp:  # replaces an older plot, never writes through a link
        fig.savefig(tmp, format="png")
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _short(group: str, width: int = 28) -> str:
    return group if len(group) <= width else "…" + group[-(width - 1) :]


def plot_rank_curves(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "", recover: float | None = None,
                     kind: str = "causal") -> Path:
    """Write a PNG of weight error and behaviour per rank, side by side (``spectrum --behaviour --plot``).

    Args:
        rows: `SpectrumBehaviourReport.rows()`: ``rank``, ``rel_error``, ``optimal_rel_error``, ``share_recovered``
            and ``top1_agreement`` (causal) or ``pooled_cosine_mean`` (encoder).
        recover: the share the recommendation asks for (a dotted line).
    Returns:
        The path written. Raises LoratoolsError when matplotlib is not installed.
    """
    Figure, path = _figure_class(path)
    ranks = [row["rank"] for row in rows]
    fig = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(ranks, [row["rel_error"] for row in rows], "o-", label="extracted adapter")
    left.plot(ranks, [row["optimal_rel_error"] for row in rows], "x:", label="optimal (Eckart–Young)")
    left.set_title("weight error ‖ΔW − BA‖ / ‖ΔW‖", fontsize=10)
    left.set_ylim(0, 1.02)
    right.plot(ranks, [row["share_recovered"] for row in rows], "o-", label="share of the fine-tune recovered")
    agreement = ("top1_agreement", "top-1 agreement") if kind == "causal" else ("pooled_cosine_mean", "pooled cosine")
    right.plot(ranks, [row[agreement[0]] for row in rows], "s--", label=agreement[1])
    if recover is not None:
        right.axhline(recover, color="grey", lw=0.8, ls=":", label=f"target {recover:g}")
    right.set_title("behaviour on the text vs the tuned model", fontsize=10)
    right.set_ylim(min(0.0, *(row["share_recovered"] or 0 for row in rows)), 1.02)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank", fontsize=9)
        ax.grid(True, lw=0.3, alpha=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _figure_class(path: str | os.PathLike) -> tuple[Any, Path]:
    """matplotlib's Figure and the checked output path (LoratoolsError: no matplotlib, no such folder)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LoratoolsError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise LoratoolsError(f"--plot {path}: folder {path.parent} does not exist")
    return Figure, path
