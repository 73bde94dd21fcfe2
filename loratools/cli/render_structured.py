"""Terminal output for LoHa / LoKr / DoRA: the conversion table of ``convert`` and ``resize``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table

from loratools.cli.options import stdout_console
from loratools.cli.render import show_written

if TYPE_CHECKING:
    from loratools.adapter_commands import AdapterResult
    from loratools.structured_convert import ConvertReport


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _ratio(error: float, optimum: float | None) -> str:
    if optimum is None:
        return "-"
    if optimum == 0:
        return "1.000" if error < 1e-6 else "-"
    return f"{error / optimum:.3f}"


def _conversion_table(report: ConvertReport) -> Table:
    table = Table(title="LoHa / LoKr / DoRA → LoRA: relative Frobenius error of the true ΔW per layer",
                  title_justify="left")
    for column in ("module", "type", "shape"):
        table.add_column(column)
    for column in ("rank", "exact rank", "rel. error", "optimum", "× optimum"):
        table.add_column(column, justify="right")
    table.add_column("spectrum")
    for layer in report.layers:
        exact = "?" if layer.exact_rank is None else str(layer.exact_rank)
        table.add_row(layer.name, layer.type, "×".join(map(str, layer.shape)), str(layer.rank), exact,
                      _error(layer.rel_error), _error(layer.optimal_rel_error),
                      _ratio(layer.rel_error, layer.optimal_rel_error), layer.method)
    return table


def show_converted(result: AdapterResult, quiet: bool, layers_title: str | None = None) -> None:
    """convert / resize: the conversion table of structured modules (when any), the overall error, the notes,
    then `show_written`."""
    report = result.conversion
    if report is not None and report.layers:
        if not quiet:
            stdout_console().print(_conversion_table(report))
        click.echo(f"overall (‖ΔW‖²-weighted): rel. error {report.rel_error:.3e}, Eckart–Young optimum"
                   f" {_error(report.optimal_rel_error)}")
        for note in report.notes:
            click.echo(f"note: {note}")
    show_written(result, quiet, layers_title if result.layers else None)
