"""What every command shares: option decorators that build the library's option objects, and `run`, the one
path from a library call to the terminal (progress bar, warnings, ``--json`` or the rendered tables).

Option decorators add their flags and pass ONE keyword to the command: ``output`` (--json, -q),
``policy`` (the rank-policy flags), ``selection`` (--include / --exclude …), ``svd`` (--exact, --seed …).
Argument rules live in the library (the option objects validate themselves), so API callers get the
same errors as the CLI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loratools.options import (
    EMBEDDING_MODES,
    OUTPUT_DTYPE_NAMES,
    QUANTIZED_DTYPE_NAMES,
    RankPolicy,
    Selection,
    SvdSettings,
)
from loratools.progress import Progress as ProgressCallback

Command = Callable[..., Any]


class Result(Protocol):
    """What every library command returns: a JSON form, and warnings for the user."""

    @property
    def notes(self) -> list[str]: ...

    def to_json(self) -> dict: ...


R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class Output:
    """How a command presents its result: ``--json`` (one document on stdout), ``-q`` (summary only)."""

    as_json: bool = False
    quiet: bool = False


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def print_json(data: object) -> None:
    """Print a JSON document on stdout (for --json)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@contextlib.contextmanager
def progress_bar(description: str, hidden: bool = False) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr; yields a callback ``(done, total, current_name)`` or None when hidden
    (asked, or stderr is not a terminal)."""
    console = Console(stderr=True)
    if hidden or not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None, current="")

        def update(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, current=name)

        yield update


def run(output: Output, label: str, call: Callable[[ProgressCallback | None], R],
        render: Callable[[R, bool], None]) -> R:
    """Call the library with a progress bar, print its warnings on stderr, then its JSON or its rendering.

    Args:
        label: the progress bar's label.
        call: the library call, given the progress callback (None when no bar is shown).
        render: prints the result for people; its second argument is ``quiet`` (summary only).
    """
    with progress_bar(label, hidden=output.quiet or output.as_json) as update:
        result = call(update)
    show_result(output, result, render)
    return result


def show_result(output: Output, result: R, render: Callable[[R, bool], None]) -> None:
    """A finished command's warnings on stderr, then its result as JSON (``--json``) or through `render`."""
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    if output.as_json:
        print_json(result.to_json())
    else:
        render(result, output.quiet)


def _decorate(func: Command, options: list[Callable[[Command], Command]]) -> Command:
    for option in reversed(options):
        func = option(func)
    return func


def output_options(func: Command) -> Command:
    """``--json`` and ``-q/--quiet``; passes ``output: Output``."""

    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, quiet: bool, **kwargs: Any) -> Any:
        return func(*args, output=Output(as_json, quiet), **kwargs)

    return _decorate(wrapper, [
        click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document on stdout."),
        click.option("-q", "--quiet", is_flag=True,
                     help="No progress bar and no per-layer tables: summary lines only (warnings still on stderr)."),
    ])


def write_options(output_help: str = "Where to write.", dtype_help: str = "Cast the written tensors to this dtype.",
                  quantized: bool = False) -> Callable[[Command], Command]:
    """``-o/--output`` (required), ``--dtype`` (with ``q8_0`` when `quantized`: GGUF adapters) and ``--force``;
    passes ``out``, ``dtype``, ``force``."""
    dtypes = [*OUTPUT_DTYPE_NAMES, *QUANTIZED_DTYPE_NAMES] if quantized else list(OUTPUT_DTYPE_NAMES)

    def decorate(func: Command) -> Command:
        return _decorate(func, [
            click.option("-o", "--output", "out", required=True, type=click.Path(), metavar="PATH", help=output_help),
            click.option("--dtype", type=click.Choice(dtypes), help=dtype_help),
            click.option("--force", is_flag=True, help="Replace the output if it exists (never an input)."),
        ])

    return decorate


def rank_policy_options(default_rank: int | None = 16, required: bool = True) -> Callable[[Command], Command]:
    """--rank/--energy/--max-error/--sv-ratio/--threshold/--max-rank; passes ``policy``.

    With ``default_rank=None`` a policy must be given, unless ``required=False`` (then ``policy=None``).
    """

    def decorate(func: Command) -> Command:
        @functools.wraps(func)
        def wrapper(*args: Any, rank: int | None, energy: float | None, max_error: float | None,
                    sv_ratio: float | None, threshold: float | None, max_rank: int, **kwargs: Any) -> Any:
            candidates = (("rank", rank), ("energy", energy), ("max_error", max_error), ("sv_ratio", sv_ratio),
                          ("threshold", threshold))
            given = {kind: value for kind, value in candidates if value is not None}
            if len(given) > 1:
                raise click.UsageError(f"choose one rank policy, got {', '.join('--' + k.replace('_', '-') for k in given)}")
            if not given and default_rank is None:
                if not required:
                    return func(*args, policy=None, **kwargs)
                raise click.UsageError("give a rank policy: --rank, --energy, --max-error, --sv-ratio or --threshold")
            kind, value = next(iter(given.items())) if given else ("rank", float(default_rank or 0))
            return func(*args, policy=RankPolicy(kind, value, max_rank), **kwargs)

        return _decorate(wrapper, [
            click.option("--rank", type=int, default=None,
                         help="Fixed rank" + (f" (default {default_rank})." if default_rank else ".")),
            click.option("--energy", type=float, default=None, help="Smallest rank keeping this fraction of ‖ΔW‖²_F."),
            click.option("--max-error", type=float, default=None,
                         help="Smallest rank with relative Frobenius error ≤ E."),
            click.option("--sv-ratio", type=float, default=None, help="Keep σ_i ≥ σ_1 / R (kohya resize)."),
            click.option("--threshold", type=float, default=None, help="Keep σ_i > T (mergekit sv-epsilon)."),
            click.option("--max-rank", type=int, default=128, show_default=True,
                         help="The largest rank a dynamic policy may choose."),
        ])

    return decorate


def selection_options(writes_adapter: bool = False) -> Callable[[Command], Command]:
    """--include/--exclude (and, for commands that write an adapter, --embeddings, --save-full,
    --skip-mismatched); passes ``selection: Selection``."""

    def decorate(func: Command) -> Command:
        @functools.wraps(func)
        def wrapper(*args: Any, include: tuple[str, ...], exclude: tuple[str, ...], **kwargs: Any) -> Any:
            extra = {k: kwargs.pop(k) for k in ("embeddings", "save_full", "skip_mismatched") if k in kwargs}
            return func(*args, selection=Selection(include=include, exclude=exclude, **extra), **kwargs)

        options: list[Callable[[Command], Command]] = [
            click.option("--include", multiple=True, metavar="PATTERN",
                         help="Only tensors matching (glob; plain words: substring). Repeatable."),
            click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out tensors matching. Repeatable."),
        ]
        if writes_adapter:
            options += [
                click.option("--embeddings", type=click.Choice(EMBEDDING_MODES), default="lora", show_default=True,
                             help="Embeddings as LoRA, saved whole when changed, or only reported."),
                click.option("--save-full", multiple=True, metavar="PATTERN",
                             help="Save matching changed tensors whole (PEFT modules_to_save), e.g. '*norm*'."
                                  " Repeatable."),
                click.option("--skip-mismatched", is_flag=True,
                             help="Skip (and list) tensors whose shapes differ instead of failing."),
            ]
        return _decorate(wrapper, options)

    return decorate


def svd_options(func: Command) -> Command:
    """--exact, --seed, --oversample, --power-iters, --precision, --device, --threads; passes ``svd``."""

    @functools.wraps(func)
    def wrapper(*args: Any, exact: bool, seed: int, oversample: int | None, power_iters: int | None, precision: str,
                device: str, threads: int | None, **kwargs: Any) -> Any:
        if threads:
            import torch

            torch.set_num_threads(threads)
        svd = SvdSettings(exact=exact, seed=seed, oversample=oversample, power_iters=power_iters,
                          precision=precision, device=device)
        return func(*args, svd=svd, **kwargs)

    return _decorate(wrapper, [
        click.option("--exact", is_flag=True, help="Full SVD per layer instead of the randomized one (slow)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD."),
        click.option("--oversample", type=click.IntRange(min=0), help="Extra sketch columns [default: max(10, rank)]."),
        click.option("--power-iters", type=click.IntRange(min=0),
                     help="Power iterations of the randomized SVD [default: adaptive, until what more would gain is"
                          " < 0.5% of the error; 1 to 6]."),
        click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
                     help="Precision of ΔW and the SVD."),
        click.option("--device", default="cpu", show_default=True, help="Where ΔW is formed and factored: cpu, cuda, cuda:1 …"),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch."),
    ])


def hidden_alias(new: str, old: str, value: Any, alias_value: Any) -> Any:
    """The value of option `new`, or of its hidden old spelling `old` (kept so documented commands still run)."""
    if alias_value is not None and value is not None and alias_value != value:
        raise click.UsageError(f"{old} is the old name of {new}; give one of them")
    return alias_value if alias_value is not None else value
