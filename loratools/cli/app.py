"""The click group: ``-h/--help``, ``--version``, ``--debug``, and the error boundary every command shares.

Errors: any LoratoolsError (and any stray OSError) becomes one line ``error: …`` on stderr and exit code 2
(``--debug`` shows the traceback); usage errors are one line too, naming the command's ``--help``. Ctrl-C,
SIGTERM and SIGHUP unwind the run (temporaries removed) and exit with 128 + the signal number.
"""

from __future__ import annotations

import signal
from typing import Any

import click

from loratools.errors import LoratoolsError
from loratools.version import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class LoratoolsGroup(click.Group):
    """A click group that turns library and usage errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
            ctx.exit(2)
        except LoratoolsError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # not one of ours: still one line (a disk error reading an input, ...)
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}; no output was written", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); no output was written", err=True)
            ctx.exit(128 + signum)


@click.group("loratools", cls=LoratoolsGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Extract, inspect, merge, combine, resize and convert LoRA adapters (PEFT, kohya, diffusers, GGUF); export
    models and adapters to ONNX and onnxruntime-genai bundles.

    Every command takes --json (the result as one JSON document on stdout) and -q/--quiet (no progress bar
    and no per-layer tables: the summary lines only). Warnings go to stderr.

    \b
    Examples:
      loratools extract fixtures/llama-base fixtures/llama-tuned -o out/adapter --rank 8
      loratools inspect out/adapter
    """


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM (or SIGHUP) arrives, so it unwinds like Ctrl-C: temporaries removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP end the run the way Ctrl-C does (no output, no temporaries)."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_terminated)
    cli(prog_name="loratools")
