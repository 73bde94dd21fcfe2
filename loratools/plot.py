"""``--plot``: spectra as a PNG, one row per module type. The only importer of matplotlib (lazily, at call time).

Readable for hundreds of modules: modules are grouped by type (`module_group`: the name without the layer
index, e.g. ``self_attn.q_proj`` or ``mlp.down_proj``), one row of two panels per group — singular values on
a log scale, and the cumulative energy Σ_{j≤i} σ_j² / ‖ΔW‖²_F — with one thin line per module coloured by
its position (first to last layer). Beyond MAX_GROUPS groups, the smallest are merged into "other".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

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
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise LoratoolsError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise LoratoolsError(f"--plot {path}: folder {path.parent} does not exist")
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
