"""How results look in a terminal: one renderer per command, tables with rich, spectra as sparklines.

Every renderer takes the library's result and ``quiet`` (summary lines only, no per-layer tables).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from loratools.cli.options import stdout_console

if TYPE_CHECKING:  # result types only: importing the command modules here would load torch with --help
    from loratools.adapter_commands import AdapterResult
    from loratools.algebra import ModuleChange
    from loratools.extraction import ExtractResult
    from loratools.inspection import InspectReport
    from loratools.merging import MergeResult
    from loratools.plan import Pairing
    from loratools.spectrum import SpectrumReport
    from loratools.verify import VerifyReport

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(S: Iterable[float], width: int = 16, decades: float = 3.0) -> str:
    """A block-character sketch of a descending spectrum S on a log scale: σ_1 is a full block,
    σ_1·10^-decades and below the lowest.

    Spectra longer than `width` are resampled at evenly spaced indices (first and last kept).

    Example:
        >>> sparkline([1.0, 0.1, 0.01, 0.001])
        '█▆▃▁'
    """
    values = [float(v) for v in S]
    if not values:
        return ""
    if len(values) > width:
        step = (len(values) - 1) / (width - 1)
        values = [values[round(i * step)] for i in range(width)]
    top = values[0]
    if top <= 0:
        return SPARK_BLOCKS[0] * len(values)
    top_level = len(SPARK_BLOCKS) - 1
    levels = (round((math.log10(max(v, top * 10**-decades) / top) / decades + 1) * top_level) for v in values)
    return "".join(SPARK_BLOCKS[min(max(level, 0), top_level)] for level in levels)


def show_extract_plan(result: ExtractResult) -> None:
    """``extract --dry-run``: the plan's tables and the pairing problems."""
    plan, console = result.plan, stdout_console()
    table = Table(title="LoRA layers (<module>.weight)", title_justify="left", show_edge=False, header_style="bold")
    for column in ("module", "kind", "shape", "LoRA matrix", "why"):
        table.add_column(column, overflow="fold")
    for pair in plan.pairs:
        rows, cols = pair.matrix_shape
        table.add_row(pair.module, pair.kind, "×".join(map(str, pair.shape)), f"{rows}×{cols}", pair.why)
    console.print(table)
    if plan.whole:
        whole = Table(title="Whole tensors (compared; listed if changed)", title_justify="left", show_edge=False,
                      header_style="bold")
        for column in ("tensor", "shape", "if changed", "why"):
            whole.add_column(column, overflow="fold")
        for item in plan.whole:
            action = "save whole" if item.save else "report only"
            whole.add_row(item.tensor, "×".join(map(str, item.shape)), action, item.why)
        console.print()
        console.print(whole)
    console.print()
    console.print(f"layer kinds: {plan.kind_source}; task type: {plan.task_type or '-'}")
    pairing = plan.pairing
    for title, names in (("only in base", pairing.only_in_base), ("only in tuned", pairing.only_in_tuned),
                         ("shape differs (skipped)", [m.name for m in pairing.mismatched]),
                         ("excluded by --include/--exclude", plan.excluded)):
        if names:
            console.print(f"{title} ({len(names)}): " + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    console.print(f"dry run: headers only, no tensor data read; would write a {result.summary.format} adapter to"
                  f" {result.summary.output}")


def show_extract(result: ExtractResult, quiet: bool) -> None:
    """``extract``: a row per layer, the changed tensors that are not LoRAs, and the summary lines."""
    if result.dry_run:
        show_extract_plan(result)
        return
    console = stdout_console()
    if not quiet:
        _extract_tables(console, result)
    s = result.summary
    ratio = s.full_delta_bytes / s.adapter_bytes if s.adapter_bytes else 0
    console.print(f"wrote {s.output} ({s.format}, {s.dtype}): {s.layers} LoRA layers, rank policy {s.rank_policy}")
    console.print(f"overall relative error {s.rel_error:.4f} (energy kept {100 * s.energy:.2f}%, ‖ΔW‖²-weighted);"
                  f" {s.unchanged_tensors} unchanged tensors skipped")
    console.print(f"adapter {s.adapter_bytes / 1e6:.2f} MB vs full delta {s.full_delta_bytes / 1e6:.2f} MB"
                  f" ({ratio:.1f}× smaller); {s.seconds:.1f} s, peak RSS {s.peak_rss_bytes / 1e6:.0f} MB")
    console.print(f"{s.algorithm}; layer kinds: {s.kind_source}")
    if s.format_reason:
        console.print(f"note: format {s.format_reason}")


def _extract_tables(console: Console, result: ExtractResult) -> None:
    table = Table(show_edge=False, header_style="bold")
    table.add_column("layer", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("kind")
    for column in ("rank", "rel error", "energy", "σ₁", "σ_r"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in result.layers:
        rank = f"{layer.rank}*" if layer.clamped else str(layer.rank)
        table.add_row(layer.name, "×".join(map(str, layer.shape)), layer.kind, rank, f"{layer.rel_error:.4f}",
                      f"{100 * layer.energy:.2f}%", f"{layer.sigma_1:.4g}", f"{layer.sigma_r:.4g}")
    console.print(table)
    if result.changed:
        changed = Table(title="Changed tensors that are not LoRA layers", title_justify="left", show_edge=False,
                        header_style="bold")
        for column in ("tensor", "shape", "max |Δ|", "‖Δ‖/‖W‖", "saved"):
            changed.add_column(column, overflow="fold")
        for item in result.changed:
            changed.add_row(item.name, "×".join(map(str, item.shape)), f"{item.max_abs_change:.3g}",
                            f"{item.rel_change:.3g}", "whole" if item.saved else "no")
        console.print()
        console.print(changed)
    console.print()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while power < len(units) - 1 and n >= 1024 ** (power + 1):
        power += 1
    return f"{n} B" if power == 0 else f"{n / 1024**power:.1f} {units[power]}"


def _key_value_grid(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _clip(value: object, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def show_inspect(report: InspectReport, quiet: bool, show_metadata: bool = False) -> None:
    """``inspect``: the adapter's header, then a row per module with its spectrum."""
    console = stdout_console()
    hist = "  ".join(f"r={rank}: {count}" for rank, count in report.rank_histogram.items())
    per_module = "per module (see rows)" if report.num_modules else "-"
    shown = len(report.modules)
    header = [
        ("adapter", report.source),
        ("format", report.format),
        ("base model", report.base_model or "unknown"),
        ("dtype", ", ".join(report.dtypes) or "-"),
        ("file size", human_bytes(report.file_size)),
        ("parameters", f"{report.num_parameters:,}"),
        ("modules", f"{report.num_modules}" + (f" ({shown} shown)" if shown < report.num_modules else "")),
        ("ranks", hist or "-"),
        ("alpha", per_module if report.alpha is None else f"{report.alpha:g}"),
        ("scale", per_module if report.scale is None else f"{report.scale:g}"),
    ]
    if show_metadata:
        header += [(key, report.metadata[key]) for key in sorted(report.metadata)]
        header += [(f"config.{key}", _clip(report.config[key], 10**6)) for key in sorted(report.config)]
    else:
        summary = report.metadata_summary()
        header += [(key, _clip(value)) for key, value in summary.items()]
        hidden = len(report.metadata) + len(report.config) - len(summary)
        if hidden > 0:
            header.append(("", f"{hidden} more metadata / config fields: --metadata shows all"))
    console.print(_key_value_grid(header))
    if not quiet:
        console.print()
        console.print(_inspect_table(report))
    if report.unsupported:
        console.print()
        console.print(_key_value_grid([(f"unsupported, not analysed ({len(report.unsupported)}):", "")]
                                      + sorted(report.unsupported.items())))
    if report.full:
        console.print()
        console.print(_key_value_grid([(f"full tensors, saved as-is ({len(report.full)}):", "")]
                                      + [(n, str(s)) for n, s in report.full.items()]))


def _inspect_table(report: InspectReport) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("module", overflow="fold")
    for title in ("kind", "shape", "rank", "alpha", "scale", "‖ΔW‖_F", "σ₁", "eff.rank", "stable", "top¼"):
        table.add_column(title, justify="left" if title in ("kind", "shape") else "right", no_wrap=True)
    table.add_column("spectrum", no_wrap=True)
    for m in report.modules:
        s = m.stats
        table.add_row(
            m.name, m.kind, str(m.shape), str(m.rank), f"{m.alpha:g}", f"{m.scale:.4g}", f"{s.norm:.4g}",
            f"{s.sigma1:.4g}", f"{s.effective_rank:.2f}", f"{s.stable_rank:.2f}", f"{s.top_quarter_energy:.1%}",
            sparkline(m.singular_values),
        )
    return table



def _listing(title: str, rows: list[tuple[str, str]], limit: int = 20) -> Table:
    shown = rows[:limit] + ([(f"… {len(rows) - limit} more (--json lists all)", "")] if len(rows) > limit else [])
    return _key_value_grid([(f"{title} ({len(rows)}):", "")] + [(f"  {k}", v) for k, v in shown])


def _pairing_listings(pairing: Pairing) -> list[tuple[str, list[tuple[str, str]]]]:
    """The base/tuned pairing problems every BASE TUNED report carries, as listings."""
    return [
        ("tensors only in base", [(n, "") for n in pairing.only_in_base]),
        ("tensors only in tuned", [(n, "") for n in pairing.only_in_tuned]),
        ("tensors whose shape differs between base and tuned",
         [(m.name, f"{m.base_shape} vs {m.tuned_shape}") for m in pairing.mismatched]),
    ]


def _print_listings(console: Console, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """Print each non-empty (title, rows) listing, separated by blank lines."""
    for title, rows in sections:
        if rows:
            console.print()
            console.print(_listing(title, rows))


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def show_verify(report: VerifyReport, quiet: bool) -> None:
    """``verify``: a row per layer (error, optimum, ratio), the overall figures and the coverage listings."""
    console = stdout_console()
    if not quiet:
        console.print(_verify_table(report))
        console.print()
    summary = report.summary()
    console.print(_key_value_grid([
        ("overall rel error", f"{_fraction(summary['rel_error'])}  (‖ΔW‖²-weighted over {summary['layers']} layers)"),
        ("overall optimal", _fraction(summary["optimal_rel_error"])),
        ("worst layer", f"{summary['worst_layer']}  {_fraction(summary['worst_rel_error'])}"),
        ("unchanged tensors", str(report.unchanged)),
    ]))
    sections = [
        ("changed tensors the adapter does not touch", [(c.name, str(c.shape)) for c in report.uncovered]),
        ("adapter modules matching no tensor", sorted(report.unmatched.items())),
        ("unsupported adapter modules, not verified", sorted(report.unsupported.items())),
    ]
    _print_listings(console, sections + _pairing_listings(report.pairing))


def _verify_table(report: VerifyReport) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("layer", overflow="fold")
    for title in ("kind", "shape", "rank", "‖ΔW‖_F", "rel error", "optimal", "× optimal"):
        table.add_column(title, justify="left" if title in ("kind", "shape") else "right", no_wrap=True)
    for layer in report.layers:
        rel, optimal = layer.rel_error, layer.optimal_rel_error
        times = f"{rel / optimal:.2f}" if optimal > 1e-6 else "-"  # below that both are rounding noise
        rank = "full" if layer.rank is None else str(layer.rank)
        table.add_row(layer.name, layer.kind, str(layer.shape), rank, f"{layer.delta_energy ** 0.5:.4g}",
                      _fraction(rel), _fraction(optimal), times)
    return table


def show_spectrum(report: SpectrumReport, quiet: bool) -> None:
    """``spectrum``: a row per layer, the rank sweep, the recommendation and the listings."""
    console = stdout_console()
    if not quiet:
        console.print(_spectrum_table(report))
        console.print()
    rec = report.recommendation()
    full = sum(layer.shape[0] * layer.shape[1] for layer in report.layers)
    console.print(f"rank sweep over {len(report.layers)} changed layers (overall error weighted by ‖ΔW‖²_F):")
    sweep = Table(show_edge=False, pad_edge=False, header_style="bold")
    for title in ("rank", "overall error", "parameters", f"size ({report.dtype})"):
        sweep.add_column(title, justify="right")
    for row in report.sweep():
        sweep.add_row(str(row["rank"]), _fraction(row["rel_error"]), f"{row['params']:,}", human_bytes(row["bytes"]))
    sweep.add_row("full ΔW", "0", f"{full:,}", human_bytes(full * report.itemsize))
    console.print(sweep)
    k = report.num_singular_values
    if rec:
        more = f"none ≤ {k}; raise --singular-values"
        per_layer = (f"{rec['params']:,} parameters, {human_bytes(rec['bytes'])}" if rec["params"] is not None
                     else f"some layers need more than {k} singular values; raise --singular-values")
        global_rank = (f"{rec['global_rank']}  (overall error {_fraction(rec['global_rel_error'])})"
                       if rec["global_rank"] is not None else more)
        console.print()
        console.print(_key_value_grid([
            (f"{rec['criterion'].replace('_', ' ')} {rec['value']:g}", ""),
            ("  rank per layer (column 'rank')", per_layer),
            ("  global rank", global_rank),
            ("  every layer meets it at rank", more if rec["max_layer_rank"] is None else str(rec["max_layer_rank"])),
        ]))
    console.print()
    console.print(_key_value_grid([("unchanged tensors", str(report.unchanged))]))
    sections = [
        ("changed tensors that cannot be a LoRA", [(c.name, str(c.shape)) for c in report.changed_whole]),
    ]
    _print_listings(console, sections + _pairing_listings(report.pairing))


def _spectrum_table(report: SpectrumReport) -> Table:
    rec = report.recommendation()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("layer", overflow="fold")
    titles = ["kind", "shape", "‖ΔW‖_F", "σ₁"] + [f"err@{r}" for r in report.ranks]
    titles += (["rank"] if rec else []) + ([] if report.exact else ["tail"])
    for title in titles:
        table.add_column(title, justify="left" if title in ("kind", "shape") else "right", no_wrap=True)
    table.add_column("spectrum", no_wrap=True)
    for layer in report.layers:
        s = layer.singular_values
        row = [layer.name, layer.kind, str(layer.shape), f"{layer.total_energy ** 0.5:.4g}",
               f"{float(s[0]) if len(s) else 0.0:.4g}"]
        row += [_fraction(layer.rel_error(r)) for r in report.ranks]
        if rec:
            rank = rec["per_layer"][layer.name]
            row.append(f">{report.num_singular_values}" if rank is None else str(rank))
        if not report.exact:
            row.append("-" if layer.complete else f"{layer.tail_energy:.2%}")
        table.add_row(*row, sparkline(s))
    return table


def _module_changes(changes: list[ModuleChange], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("module", "kind", "shape"):
        table.add_column(column)
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right")
    for change in changes:
        rank = str(change.rank_out) if change.rank_in == change.rank_out else f"{change.rank_in} → {change.rank_out}"
        table.add_row(change.name, change.kind, "×".join(map(str, change.shape)), rank, f"{change.error:.3e}")
    stdout_console().print(table)


def show_written(result: AdapterResult, quiet: bool, layers_title: str | None = None) -> None:
    """combine / rescale / resize / convert: the per-module table (when there is one), then one line."""
    if layers_title and not quiet:
        _module_changes(result.layers, layers_title)
    ranks = sorted(set(result.ranks))
    rank_text = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    line = f"wrote {result.out} ({result.format}, {result.modules} modules, rank {rank_text}"
    line += f", {result.parameters:,} parameters)"
    if result.layers:
        line += f"; max relative error {result.max_error:.3e}"
    click.echo(line)
    if result.format_reason:
        click.echo(f"note: format {result.format_reason}")


def show_merge(result: MergeResult, quiet: bool) -> None:
    """``merge``: what was merged where, and which side files were copied."""
    replaced = f" and {result.replaced} full tensor(s)" if result.replaced else ""
    click.echo(
        f"merged {result.modules} LoRA module(s){replaced} from {result.adapters} adapter(s) into {result.changed}"
        f" of {result.tensors} tensors → {result.out} ({len(result.files)} file(s), {result.dtype})"
    )
    if result.copied:
        click.echo(f"copied: {', '.join(result.copied)}")
    if result.skipped:
        click.echo(f"not copied (weights or folders): {', '.join(result.skipped)}")
