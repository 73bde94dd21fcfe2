"""The command line: the only importer of click and rich. Each command parses, calls one library function, renders.

Errors: any LoratoolsError becomes one line ``error: …`` on stderr and exit code 2 (``--debug`` shows the
traceback). Progress bars go to stderr, only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loratools import __version__
from loratools.errors import LoratoolsError
from loratools.linalg import RankPolicy

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class LoratoolsGroup(click.Group):
    """A click group that turns library errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoratoolsError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            ctx.exit(130)


@click.group(cls=LoratoolsGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Extract, inspect, merge, combine, resize and convert LoRA adapters.

    \b
    Examples:
      loratools extract fixtures/llama-base fixtures/llama-tuned -o out/adapter --rank 8
      loratools inspect out/adapter
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="loratools")


# ---- shared helpers for commands -------------------------------------------------------------------------


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def print_json(data: object) -> None:
    """Print a JSON document on stdout (for --json)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


ProgressCallback = Callable[[int, int, str], None]


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool = False) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr; yields a callback ``(done, total, current_name)`` or None when hidden."""
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
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


def rank_policy_options(default_rank: int | None = 16) -> Callable:
    """Decorator adding --rank/--energy/--max-error/--sv-ratio/--threshold/--max-rank; passes ``policy``."""

    def decorate(func: Callable) -> Callable:
        @click.option("--rank", "rank", type=int, default=None, help=f"Fixed rank (default {default_rank}).")
        @click.option("--energy", type=float, default=None, help="Smallest rank keeping this fraction of ‖ΔW‖²_F.")
        @click.option("--max-error", type=float, default=None, help="Smallest rank with relative Frobenius error ≤ E.")
        @click.option("--sv-ratio", type=float, default=None, help="Keep σ_i ≥ σ_1 / R (kohya resize).")
        @click.option("--threshold", type=float, default=None, help="Keep σ_i > T (mergekit sv-epsilon).")
        @click.option("--max-rank", type=int, default=128, show_default=True, help="Cap for dynamic policies.")
        @functools.wraps(func)
        def wrapper(*args, rank, energy, max_error, sv_ratio, threshold, max_rank, **kwargs):
            given = {
                k: v
                for k, v in (
                    ("rank", rank),
                    ("energy", energy),
                    ("max_error", max_error),
                    ("sv_ratio", sv_ratio),
                    ("threshold", threshold),
                )
                if v is not None
            }
            if len(given) > 1:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise click.UsageError(f"choose one rank policy, got {names}")
            if not given and default_rank is None:
                raise click.UsageError("give a rank policy: --rank, --energy, --max-error, --sv-ratio or --threshold")
            kind, value = next(iter(given.items())) if given else ("rank", default_rank)
            kwargs["policy"] = RankPolicy(kind, value, max_rank)
            return func(*args, **kwargs)

        return wrapper

    return decorate


# ---- commands ----------------------------------------------------------------------------------------------


# ---- extract (issue 3) -------------------------------------------------------------------------------------


# ---- inspect / spectrum / verify (issue 4) -----------------------------------------------------------------


# ---- merge / combine / rescale / resize / convert (issue 5) ------------------------------------------------
