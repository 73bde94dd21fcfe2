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
from loratools.progress import Progress as ProgressCallback

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class LoratoolsGroup(click.Group):
    """A click group that turns library and usage errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context):
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
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            ctx.exit(130)


@click.group("loratools", cls=LoratoolsGroup, context_settings=CONTEXT_SETTINGS)
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


def rank_policy_options(default_rank: int | None = 16, required: bool = True) -> Callable:
    """Decorator adding --rank/--energy/--max-error/--sv-ratio/--threshold/--max-rank; passes ``policy``.

    With ``default_rank=None`` a policy must be given, unless ``required=False`` (then ``policy=None``).
    """

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
                if not required:
                    return func(*args, policy=None, **kwargs)
                raise click.UsageError("give a rank policy: --rank, --energy, --max-error, --sv-ratio or --threshold")
            kind, value = next(iter(given.items())) if given else ("rank", default_rank)
            kwargs["policy"] = RankPolicy(kind, value, max_rank)
            return func(*args, **kwargs)

        return wrapper

    return decorate


# ---- commands ----------------------------------------------------------------------------------------------


# ---- extract (issue 3) -------------------------------------------------------------------------------------


def _render_extract_plan(result) -> None:
    from rich.table import Table

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
    for title, names in (("only in base", plan.only_in_base), ("only in tuned", plan.only_in_tuned),
                         ("shape differs (skipped)", [n for n, _, _ in plan.mismatched]),
                         ("excluded by --include/--exclude", plan.excluded)):
        if names:
            console.print(f"{title} ({len(names)}): " + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    console.print(f"dry run: headers only, no tensor data read; would write a {result.summary.format} adapter to"
                  f" {result.summary.output}")


def _render_extract(result) -> None:
    from rich.table import Table

    console = stdout_console()
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
    s = result.summary
    ratio = s.full_delta_bytes / s.adapter_bytes if s.adapter_bytes else 0
    console.print()
    console.print(f"wrote {s.output} ({s.format}, {s.dtype}): {s.layers} LoRA layers, rank policy {s.rank_policy}")
    console.print(f"overall relative error {s.rel_error:.4f} (energy kept {100 * s.energy:.2f}%, ‖ΔW‖²-weighted);"
                  f" {s.unchanged_tensors} unchanged tensors skipped")
    console.print(f"adapter {s.adapter_bytes / 1e6:.2f} MB vs full delta {s.full_delta_bytes / 1e6:.2f} MB"
                  f" ({ratio:.1f}× smaller); {s.seconds:.1f} s, peak RSS {s.peak_rss_bytes / 1e6:.0f} MB")
    console.print(f"{s.algorithm}; layer kinds: {s.kind_source}")


@cli.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", "out", required=True, metavar="PATH",
              help="A PEFT folder, or a .safetensors file (kohya / bare PEFT).")
@rank_policy_options(default_rank=16)
@click.option("--conv-rank", type=click.IntRange(min=1), help="Fixed rank for conv2d layers (default: the policy).")
@click.option("--embeddings", type=click.Choice(["lora", "full", "skip"]), default="lora", show_default=True,
              help="Embeddings as LoRA, saved whole when changed, or only reported.")
@click.option("--save-full", multiple=True, metavar="PATTERN",
              help="Save matching changed tensors whole (PEFT modules_to_save), e.g. '*norm*'. Repeatable.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only tensors matching (glob; plain words: substring).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out tensors matching. Repeatable.")
@click.option("--skip-mismatched", is_flag=True, help="Skip (and list) tensors whose shapes differ instead of failing.")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True,
              help="PEFT folder (or file), or a kohya / A1111 / ComfyUI file.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), help="Written dtype (default: the tuned weights').")
@click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
              help="Precision of ΔW and the SVD.")
@click.option("--exact", is_flag=True, help="Full SVD per layer (slow); the report gains optimal_rel_error.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--oversample", type=click.IntRange(min=0), help="Extra sketch columns [default: max(10, rank)].")
@click.option("--power-iters", type=click.IntRange(min=0),
              help="Power iterations of the randomized SVD [default: adaptive, until what more would gain is"
                   " < 0.5% of the error; 1 to 6].")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the report as JSON to this file.")
@click.option("--dry-run", is_flag=True, help="Show the plan (from headers only) and stop.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table (warnings still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or plan) as JSON on stdout.")
def extract_command(base, tuned, out, policy, conv_rank, embeddings, save_full, include, exclude, skip_mismatched,
                    fmt, dtype, precision, exact, seed, oversample, power_iters, device, threads, report, dry_run,
                    force, quiet, as_json) -> None:
    """Extract a LoRA adapter from the difference TUNED − BASE.

    BASE and TUNED are model folders (sharded or not) or single .safetensors/.bin files. Each weight pair is
    loaded on its own, ΔW is formed in fp32 and factored by a seeded randomized SVD at the rank the policy
    asks for. Norms, biases and other changed tensors that cannot be a LoRA are listed; --save-full saves them.

    \b
    Examples:
      loratools extract fixtures/llama-base fixtures/llama-tuned -o adapter --rank 8 --save-full '*norm*'
      loratools extract base/ tuned/ -o adapter --energy 0.9 --max-rank 64 --report report.json
      loratools extract sd-base.safetensors sd-tuned.safetensors -o lora.safetensors --format kohya --conv-rank 8
      loratools extract base/ tuned/ -o adapter --dry-run
    """
    import torch

    from loratools.extract import extract
    if threads:
        torch.set_num_threads(threads)
    with progress_bar("extract", quiet or as_json or dry_run) as update:
        result = extract(
            base, tuned, out, policy=policy, conv_rank=conv_rank, embeddings=embeddings, save_full=save_full,
            include=include, exclude=exclude, skip_mismatched=skip_mismatched, format=fmt, dtype=dtype,
            precision=precision, exact=exact, seed=seed, oversample=oversample, power_iters=power_iters,
            device=device, dry_run=dry_run, force=force, report=report, progress=update,
        )
    for note in result.summary.notes:
        click.echo(f"warning: {note}", err=True)
    if as_json:
        print_json(result.to_json())
    elif dry_run:
        _render_extract_plan(result)
    elif not quiet:
        _render_extract(result)


# ---- inspect / spectrum / verify (issue 4) -----------------------------------------------------------------


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while power < len(units) - 1 and n >= 1024 ** (power + 1):
        power += 1
    return f"{n} B" if power == 0 else f"{n / 1024**power:.1f} {units[power]}"


def _key_value_grid(rows: list[tuple[str, str]]):
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _clip(value: object, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _render_inspect(report, show_metadata: bool) -> None:
    from rich.table import Table

    console = stdout_console()
    hist = "  ".join(f"r={rank}: {count}" for rank, count in report.rank_histogram.items())
    per_module = "per module (see rows)" if report.num_modules else "-"
    shown = len(report.modules)
    header = [
        ("adapter", report.source),
        ("format", report.format),
        ("base model", report.base_model or "unknown"),
        ("dtype", ", ".join(report.dtypes) or "-"),
        ("file size", _human_bytes(report.file_size)),
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
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("module", overflow="fold")
    for title in ("kind", "shape", "rank", "alpha", "scale", "‖ΔW‖_F", "σ₁", "eff.rank", "stable", "top¼"):
        table.add_column(title, justify="left" if title in ("kind", "shape") else "right", no_wrap=True)
    table.add_column("spectrum", no_wrap=True)
    from loratools.spectra import sparkline

    for m in report.modules:
        s = m.stats
        table.add_row(
            m.name, m.kind, str(m.shape), str(m.rank), f"{m.alpha:g}", f"{m.scale:.4g}", f"{s.norm:.4g}",
            f"{s.sigma1:.4g}", f"{s.effective_rank:.2f}", f"{s.stable_rank:.2f}", f"{s.top_quarter_energy:.1%}",
            sparkline(m.singular_values),
        )
    console.print()
    console.print(table)
    if report.unsupported:
        console.print()
        console.print(_key_value_grid([(f"unsupported, not analysed ({len(report.unsupported)}):", "")]
                                      + sorted(report.unsupported.items())))
    if report.full:
        console.print()
        console.print(_key_value_grid([(f"full tensors, saved as-is ({len(report.full)}):", "")]
                                      + [(n, str(s)) for n, s in report.full.items()]))
    for note in report.notes:
        console.print(f"note: {note}")


@cli.command("inspect")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--sort", type=click.Choice(["name", "norm", "rank"]), default="name", show_default=True,
              help="Row order: natural name order, or ‖ΔW‖_F / rank descending.")
@click.option("--filter", "pattern", metavar="REGEX", help="Only modules whose name matches REGEX (re.search).")
@click.option("--top", type=int, metavar="N", help="Only the first N rows after sorting.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Print all metadata and config, not a summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also write the spectra as a PNG (needs the plot extra: matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def inspect_command(adapter, sort, pattern, top, show_metadata, as_json, plot, quiet) -> None:
    """Show an adapter's modules, ranks, scales and the exact spectrum of every ΔW.

    ADAPTER is a PEFT folder or file, a kohya file or a diffusers-style file. Spectra come from the factors
    (never forming ΔW). Effective rank is exp(entropy of σ_i / Σσ); stable rank is ‖ΔW‖²_F / σ₁²; top ¼ is the
    share of ‖ΔW‖²_F in the first ceil(rank / 4) singular values.

    \b
    Examples:
      loratools inspect fixtures/sd-lora-kohya.safetensors
      loratools inspect out/adapter --sort norm --top 20 --filter mlp
      loratools inspect out/adapter --json > report.json
      loratools inspect out/adapter --plot spectra.png
    """
    from loratools.inspection import inspect_adapter

    with progress_bar("inspect", quiet) as update:
        report = inspect_adapter(adapter, sort=sort, pattern=pattern, top=top, progress=update)
    if plot:
        from loratools.plot import plot_spectra

        curves = [(m.name, m.singular_values, m.stats.norm**2) for m in report.modules]
        plot_spectra(curves, plot, title=f"{report.source}: spectra of ΔW = scale·B·A")
    if as_json:
        print_json(report.to_json())
    else:
        _render_inspect(report, show_metadata)


def _listing(title: str, rows: list[tuple[str, str]], limit: int = 20):
    shown = rows[:limit] + ([(f"… {len(rows) - limit} more (--json lists all)", "")] if len(rows) > limit else [])
    return _key_value_grid([(f"{title} ({len(rows)}):", "")] + [(f"  {k}", v) for k, v in shown])


def _pairing_listings(report) -> list[tuple[str, list[tuple[str, str]]]]:
    """The base/tuned pairing problems every BASE TUNED report carries, as listings."""
    return [
        ("tensors only in base", [(n, "") for n in report.only_in_base]),
        ("tensors only in tuned", [(n, "") for n in report.only_in_tuned]),
        ("tensors whose shape differs between base and tuned", [(n, "") for n in report.mismatched]),
    ]


def _print_listings(console: Console, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """Print each non-empty (title, rows) listing, separated by blank lines."""
    for title, rows in sections:
        if rows:
            console.print()
            console.print(_listing(title, rows))


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _render_verify(report) -> None:
    from rich.table import Table

    console = stdout_console()
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
    console.print(table)
    summary = report.summary()
    console.print()
    console.print(_key_value_grid([
        ("overall rel error", f"{_fraction(summary['rel_error'])}  (‖ΔW‖²-weighted over {summary['layers']} layers)"),
        ("overall optimal", _fraction(summary["optimal_rel_error"])),
        ("worst layer", f"{summary['worst_layer']}  {_fraction(summary['worst_rel_error'])}"),
        ("unchanged tensors", str(report.unchanged)),
    ]))
    sections = [
        ("changed tensors the adapter does not touch", [(n, str(s)) for n, s in report.uncovered]),
        ("adapter modules matching no tensor", sorted(report.unmatched.items())),
        ("unsupported adapter modules, not verified", sorted(report.unsupported.items())),
    ]
    _print_listings(console, sections + _pairing_listings(report))


@cli.command("verify")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--exact", is_flag=True, help="Optimal errors from a full SVD (default: randomized, top-r only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify_command(base, tuned, adapter, exact, seed, as_json, quiet) -> None:
    """How well ADAPTER reproduces the fine-tune TUNED − BASE, layer by layer.

    Per layer: ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, and the best error any adapter of the same rank could reach
    (Eckart–Young). Also lists changed tensors the adapter does not touch and adapter modules that match no
    tensor. Reads one tensor pair at a time.

    \b
    Examples:
      loratools verify fixtures/llama-base fixtures/llama-tuned fixtures/llama-lora-peft
      loratools verify base.safetensors tuned.safetensors lora.safetensors --json > verify.json
    """
    from loratools.verify import verify_adapter

    with progress_bar("verify", quiet) as update:
        report = verify_adapter(base, tuned, adapter, exact=exact, seed=seed, progress=update)
    if as_json:
        print_json(report.to_json())
    else:
        _render_verify(report)


def _parse_ranks(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of ranks, e.g. 4,8,16,32,64") from None


def _render_spectrum(report) -> None:
    from rich.table import Table

    from loratools.spectra import sparkline

    console = stdout_console()
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
            row.append(f">{report.max_rank}" if rank is None else str(rank))
        if not report.exact:
            row.append("-" if layer.complete else f"{layer.tail_energy:.2%}")
        table.add_row(*row, sparkline(s))
    console.print(table)
    console.print()
    full = sum(layer.shape[0] * layer.shape[1] for layer in report.layers)
    console.print(f"rank sweep over {len(report.layers)} changed layers (overall error weighted by ‖ΔW‖²_F):")
    sweep = Table(show_edge=False, pad_edge=False, header_style="bold")
    for title in ("rank", "overall error", "parameters", f"size ({report.dtype})"):
        sweep.add_column(title, justify="right")
    for row in report.sweep():
        sweep.add_row(str(row["rank"]), _fraction(row["rel_error"]), f"{row['params']:,}", _human_bytes(row["bytes"]))
    sweep.add_row("full ΔW", "0", f"{full:,}", _human_bytes(full * report.itemsize))
    console.print(sweep)
    if rec:
        more = f"none ≤ {report.max_rank}; raise --max-rank"
        per_layer = (f"{rec['params']:,} parameters, {_human_bytes(rec['bytes'])}" if rec["params"] is not None
                     else f"some layers need more than {report.max_rank} singular values; raise --max-rank")
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
        ("changed tensors that cannot be a LoRA", [(n, str(s)) for n, s in report.changed_whole]),
    ]
    _print_listings(console, sections + _pairing_listings(report))


@cli.command("spectrum")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.option("--ranks", default="4,8,16,32,64", show_default=True, callback=_parse_ranks,
              help="Ranks to sweep: each layer's error, the overall error and the adapter size at each.")
@click.option("--max-rank", type=int, default=128, show_default=True,
              help="Singular values computed per layer (randomized SVD); raised to the largest --ranks value.")
@click.option("--exact", is_flag=True, help="Compute every singular value with a full SVD (slow on large layers).")
@click.option("--target-error", type=float, metavar="E", help="Recommend ranks with relative error ≤ E.")
@click.option("--energy", type=float, metavar="F", help="Recommend ranks keeping a fraction F of ‖ΔW‖²_F.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only tensors matching (glob; repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out tensors matching (glob; repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda, cuda:1 …")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also write the spectra as a PNG (needs the plot extra: matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def spectrum_command(base, tuned, ranks, max_rank, exact, target_error, energy, include, exclude, seed, device,
                     as_json, plot, quiet) -> None:
    """What rank does a LoRA of TUNED − BASE need? Spectra of the true deltas, a rank sweep, recommendations.

    Streams one layer pair at a time: the top --max-rank singular values of each ΔW (randomized SVD) and the
    energy beyond them, each layer's error at every --ranks value, the ‖ΔW‖²-weighted overall error and the
    adapter size. With --target-error or --energy: a rank per layer and one global rank.

    \b
    Examples:
      loratools spectrum fixtures/llama-base fixtures/llama-tuned --ranks 2,4,8 --target-error 0.05
      loratools spectrum base/ tuned/ --energy 0.9 --json > spectrum.json
      loratools spectrum base/ tuned/ --plot spectrum.png --device cuda
    """
    from loratools.sweep import rank_spectrum

    with progress_bar("spectrum", quiet) as update:
        report = rank_spectrum(
            base, tuned, ranks=ranks, max_rank=max_rank, exact=exact, target_error=target_error, energy=energy,
            include=include, exclude=exclude, seed=seed, device=device, progress=update,
        )
    if plot:
        from loratools.plot import plot_spectra

        curves = [(layer.name, layer.singular_values, layer.total_energy) for layer in report.layers]
        plot_spectra(curves, plot, title=f"{tuned} − {base}: leading spectra of the true ΔW")
    if as_json:
        print_json(report.to_json())
    else:
        _render_spectrum(report)


# ---- merge / combine / rescale / resize / convert (issue 5) ------------------------------------------------

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


def _torch_dtype(name: str | None):
    from loratools.writer import OUTPUT_DTYPES

    return OUTPUT_DTYPES[name] if name else None


def _render_layers(layers, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("module", "kind", "shape"):
        table.add_column(column)
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right")
    for layer in layers:
        rank = str(layer.rank_out) if layer.rank_in == layer.rank_out else f"{layer.rank_in} → {layer.rank_out}"
        shape = "×".join(map(str, layer.shape))
        table.add_row(layer.name, layer.kind, shape, rank, f"{layer.error:.3e}")
    stdout_console().print(table)


def _render_written(result, as_json: bool, layers_title: str | None = None) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    if layers_title:
        _render_layers(result.layers, layers_title)
    ranks = sorted(set(result.ranks))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    line = f"wrote {result.out} ({result.format}, {result.modules} modules, rank {rank_text}"
    line += f", {result.parameters:,} parameters)"
    if result.layers:
        line += f"; max relative error {result.max_error:.3e}"
    click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}")


def _output_options(func: Callable) -> Callable:
    for decorator in reversed((
        click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write."),
        click.option("--dtype", type=DTYPE_CHOICE, help="Cast the written tensors to this dtype."),
        click.option("--force", is_flag=True, help="Replace the output if it exists (never an input)."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text."),
    )):
        func = decorator(func)
    return func


@cli.command("merge")
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@_output_options
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per adapter, in order (default 1).")
@click.option("--shard-size", metavar="SIZE", help="Re-split into shards of at most SIZE (5GB, 2GiB, 500MB).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge_command(base, adapters, out, dtype, force, as_json, weights, shard_size, quiet) -> None:
    """Merge one or more adapters into BASE and write the full model to OUT.

    BASE is a model folder (sharded or not) or a single checkpoint file; ADAPTER is a PEFT folder or file or a
    kohya file (its names are resolved against BASE). Each tensor is loaded, summed in fp32 and written on
    its own, so memory stays near one tensor. The output keeps BASE's dtype and shard files unless --dtype or
    --shard-size say otherwise; config, tokenizer and other non-weight files are copied.

    \b
    Examples:
      loratools merge fixtures/llama-base fixtures/llama-lora-peft -o out/merged
      loratools merge fixtures/sd-base.safetensors fixtures/sd-lora-kohya.safetensors -o out/sd.safetensors
      loratools merge base style.safetensors subject -o out/merged -w 0.7 -w 1.0 --dtype bf16 --shard-size 5GB
    """
    from loratools.merge import merge
    from loratools.writer import parse_size

    size = parse_size(shard_size) if shard_size else None
    with progress_bar("merge", quiet) as update:
        result = merge(base, adapters, out, list(weights), dtype, size, force, update)
    if as_json:
        print_json(result.to_dict())
        return
    replaced = f" and {result.replaced} full tensor(s)" if result.replaced else ""
    click.echo(
        f"merged {result.modules} LoRA module(s){replaced} from {len(adapters)} adapter(s) into {result.changed} of"
        f" {result.tensors} tensors → {result.out} ({len(result.files)} file(s), {result.dtype})"
    )
    if result.copied:
        click.echo(f"copied: {', '.join(result.copied)}")
    if result.skipped:
        click.echo(f"not copied (weights or folders): {', '.join(result.skipped)}")


@cli.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@_output_options
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per adapter, in order (default 1).")
@click.option("--method", type=click.Choice(["concat", "svd"]), default="concat", show_default=True,
              help="concat: exact, ranks add. svd: the exact sum recompressed to a rank policy.")
@rank_policy_options(default_rank=None, required=False)
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), help="Output format (default: the first's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def combine_command(adapters, out, dtype, force, as_json, weights, method, policy, fmt, quiet) -> None:
    """Combine adapters into one whose delta is Σ wᵢ·ΔWᵢ.

    --method concat stacks the factors along the rank axis: exact, ranks add. --method svd recompresses the
    exact sum from the stacked factors (QR + small SVD) to --rank N or another policy (default: each layer's
    largest input rank) and reports every layer's error against the exact sum. Modules missing from an
    adapter count as zero there; PEFT and kohya adapters mix. A and B are never averaged separately: that is
    not the sum of the deltas.

    \b
    Examples:
      loratools combine style subject -o both --weight 0.7 --weight 1.0
      loratools combine a.safetensors b.safetensors -o ab.safetensors --method svd --rank 16
    """
    from loratools.operations import combine

    if method == "concat" and policy is not None:
        raise click.UsageError("rank policies apply to --method svd; concat keeps every rank (exact)")
    with progress_bar("combine", quiet) as update:
        result = combine(adapters, out, list(weights), method, policy, fmt, _torch_dtype(dtype), force, update)
    _render_written(result, as_json, "svd recompression: error against the exact sum" if method == "svd" else None)


@cli.command("rescale")
@click.argument("adapter", type=click.Path(exists=True))
@_output_options
@click.option("--scale", type=float, help="Multiply every delta by S (alpha × S, factors unchanged).")
@click.option("--alpha", type=float, help="Set alpha to A and keep every delta unchanged (B rescaled).")
def rescale_command(adapter, out, dtype, force, as_json, scale, alpha) -> None:
    """Scale an adapter's deltas (--scale S) or change its alpha keeping the deltas (--alpha A).

    \b
    Examples:
      loratools rescale fixtures/llama-lora-peft -o out/half --scale 0.5
      loratools rescale fixtures/sd-lora-kohya.safetensors -o out/a1.safetensors --alpha 1
    """
    from loratools.operations import rescale

    if (scale is None) == (alpha is None):
        raise click.UsageError("give exactly one of --scale or --alpha")
    _render_written(rescale(adapter, out, scale, alpha, _torch_dtype(dtype), force), as_json)


@cli.command("resize")
@click.argument("adapter", type=click.Path(exists=True))
@_output_options
@rank_policy_options(default_rank=None)
@click.option("--report", type=click.Path(dir_okay=False), metavar="FILE.json", help="Also write the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def resize_command(adapter, out, dtype, force, as_json, policy, report, quiet) -> None:
    """Truncate every module optimally (factor SVD) to a new rank, keeping its scale.

    Each module's delta is decomposed from its factors (QR + small SVD, no dense ΔW) and cut to the rank the
    policy picks; alpha is set so alpha / rank stays the same. The table gives each layer's relative
    Frobenius error, the smallest any rank-k adapter can have.

    \b
    Examples:
      loratools resize fixtures/llama-lora-peft -o out/r2 --rank 2
      loratools resize fixtures/sd-lora-kohya.safetensors -o out/sd-e.safetensors --energy 0.99 --report r.json
    """
    from loratools.operations import resize

    with progress_bar("resize", quiet) as update:
        result = resize(adapter, out, policy, _torch_dtype(dtype), force, report, update)
    _render_written(result, as_json, "resize: relative Frobenius error per layer (optimal for its rank)")


@cli.command("convert")
@click.argument("adapter", type=click.Path(exists=True))
@_output_options
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), required=True, help="Output format.")
@click.option("--prefix", help="kohya key prefix, e.g. lora_unet_ (default: from each module's namespace).")
@click.option("--base", type=click.Path(exists=True), help="The model the adapter is for (resolves kohya names).")
def convert_command(adapter, out, dtype, force, as_json, fmt, prefix, base) -> None:
    """Convert an adapter between PEFT and kohya formats; the deltas stay identical.

    kohya → PEFT needs dotted module names: files written by loratools carry them, others need --base.

    \b
    Examples:
      loratools convert fixtures/sd-lora-kohya.safetensors -o out/sd-peft --format peft \\
          --base fixtures/sd-base.safetensors
      loratools convert fixtures/llama-lora-peft -o out/llama.safetensors --format kohya
    """
    from loratools.operations import convert

    _render_written(convert(adapter, out, fmt, prefix, base, _torch_dtype(dtype), force), as_json)


# ---- export-onnx (issue 10) -------------------------------------------------------------------------------


def _render_export(result) -> None:
    from rich.table import Table

    console = stdout_console()
    precision = result.quantize or result.dtype
    past = ", KV cache" if result.with_past else ""
    merged = f", {result.merged_tensors} tensor(s) merged from {len(result.adapters)} adapter(s)" if result.adapters else ""
    console.print(f"exported {result.architecture} ({result.kind}{past}, {precision}, opset {result.opset}{merged})")
    for name, size in result.files.items():
        console.print(f"  wrote {result.out.parent / name}  {_human_bytes(size)}")
    console.print("  timings: " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.timings.items()))
    report = result.verification
    if report is None:
        console.print("  not verified (--no-verify)")
        return
    table = Table(title=f"verification: onnxruntime vs PyTorch fp32 (batch {report.batch}, {report.sequence} tokens"
                  + (f", past {report.past}" if report.past else "") + ")", title_justify="left")
    for column, justify in (("output", "left"), ("max abs diff", "right"), ("tolerance", "right"),
                            ("cosine", "right"), ("top-1", "right"), ("", "left")):
        table.add_column(column, justify=justify)
    for m in report.outputs:
        top1 = "-" if m.top1 is None else f"{m.top1:.1%}"
        table.add_row(m.name, f"{m.max_abs_diff:.2e}", f"{m.tolerance:.1e}", f"{m.cosine:.6f}", top1,
                      "ok" if m.passed else "[red]FAIL[/red]")
    console.print(table)
    if report.generation:
        g = report.generation
        console.print(f"greedy generation with the cache: {g['matched']}/{g['steps']} tokens equal transformers'"
                      f" generate() ({'ok' if g['passed'] else 'FAIL'})")


@cli.command("export-onnx")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Graph file, e.g. model.onnx.")
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(exists=True),
              help="Adapter to merge first (PEFT or kohya); repeat for several.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per --adapter, in order (default 1).")
@click.option("--with-past", is_flag=True, help="Causal LMs: KV-cache inputs past_key_values.* and outputs present.*.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Graph precision (bf16 checkpoints are upcast; inputs and outputs stay fp32).")
@click.option("--quantize", type=click.Choice(["int8"]), help="onnxruntime dynamic quantization (int8 weights).")
@click.option("--external-data", is_flag=True, help="Tensors in OUT.data beside the graph (automatic above 2 GB).")
@click.option("--no-verify", "no_verify", is_flag=True, help="Skip the onnxruntime vs PyTorch check.")
@click.option("--atol", type=float, help="Verification tolerance (default fp32 1e-4, fp16 2e-2, int8 0.25; scaled by"
              " max(1, max |output|)).")
@click.option("--keep-on-fail", is_flag=True, help="Keep the files when verification fails (still exits 2).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (files, timings, verification) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export_onnx_command(model, out, adapters, weights, with_past, dtype, quantize, external_data, no_verify, atol,
                        keep_on_fail, force, as_json, quiet) -> None:
    """Export MODEL (a Hugging Face folder), with adapters merged in memory, to ONNX and verify it.

    Causal LMs (Llama, Qwen2, GPT-2 …) get inputs input_ids, attention_mask, position_ids and output logits;
    encoders (BERT …) input_ids, attention_mask, token_type_ids and output last_hidden_state. Batch and
    sequence axes are dynamic. The graph is run in onnxruntime and compared with the merged model in PyTorch on
    other shapes than traced; a failed check exits 2 and writes nothing. Needs pip install 'loratools[export]'.

    \b
    Examples:
      loratools export-onnx fixtures/llama-base -o out/llama.onnx --with-past
      loratools export-onnx fixtures/llama-base -a fixtures/llama-lora-peft -o out/merged.onnx --quantize int8
      loratools export-onnx base -a style.safetensors -w 0.7 -a subject -o out/model.onnx --external-data
    """
    from loratools.export import export_onnx

    if weights and len(weights) != len(adapters):
        raise click.UsageError(f"got {len(weights)} --weight for {len(adapters)} --adapter; give one per adapter")
    with progress_bar("export-onnx", quiet or as_json) as update:
        result = export_onnx(model, out, adapters=adapters, weights=list(weights) or None, with_past=with_past,
                             dtype=dtype, quantize=quantize, external_data=external_data, verify=not no_verify,
                             atol=atol, keep_on_fail=keep_on_fail, force=force, progress=update)
    if as_json:
        print_json(result.to_json())
        return
    _render_export(result)
