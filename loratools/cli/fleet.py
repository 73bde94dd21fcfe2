"""Fleet runs of ``extract``: ``extract BASE TUNED1 TUNED2 … -o OUTDIR`` or ``--manifest FILE`` (the options,
the call to `loratools.fleet.extract_fleet` and the table of entries).

`extract` is a fleet run when it gets two or more TUNED checkpoints or a --manifest; `fleet_options` adds the
options only fleet runs take and `run_fleet` is what the extract command calls then.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from loratools.cli.options import Command, Output, run, stdout_console

if TYPE_CHECKING:
    from loratools.extraction import ExtractSettings
    from loratools.fleet import FleetResult

FLEET_ONLY = ("manifest", "resume", "executor", "address", "batch")


def fleet_options(func: Command) -> Command:
    """--manifest, --resume, --executor, --address, --batch; passes ``fleet: dict`` of the values given."""

    @functools.wraps(func)
    def wrapper(*args: Any, manifest: str | None, resume: bool, executor: str, address: str | None,
                batch: int | None, **kwargs: Any) -> Any:
        fleet = {"manifest": manifest, "resume": resume, "executor": executor, "address": address, "batch": batch}
        return func(*args, fleet=fleet, **kwargs)

    options = [
        click.option("--manifest", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="Fleet: a JSON object NAME -> TUNED path (or {\"path\": …, \"rank\": 8, …} with the entry's"
                          " own rank policy); adapters go to OUTDIR/NAME."),
        click.option("--resume", is_flag=True,
                     help="Fleet: keep the adapters already complete in OUTDIR (same inputs and settings), make the rest."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Fleet: run here, or as tasks on an existing Ray cluster (pip install 'loratools[ray]')."),
        click.option("--address", metavar="HOST:PORT",
                     help="Fleet with --executor ray: the cluster [default: RAY_ADDRESS, or the one on this machine]."),
        click.option("--batch", type=click.IntRange(min=1), metavar="N",
                     help="Fleet: fine-tunes per pass over the base [default: all, the base read once]; adapters are"
                          " written at the end of each pass."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def is_fleet(tuned: tuple[str, ...], fleet: dict) -> bool:
    """A fleet run: two or more TUNED, or a --manifest. Fleet-only options on a single run are a usage error."""
    if len(tuned) >= 2 or fleet["manifest"]:
        return True
    if not tuned:
        raise click.UsageError("give a TUNED checkpoint (or several, or --manifest FILE)")
    given = [f"--{name}" for name in FLEET_ONLY if fleet[name] not in (None, False, "local")]
    if given:
        raise click.UsageError(f"{', '.join(given)} apply to fleet runs: give two or more TUNED, or --manifest FILE")
    return False


def run_fleet(base: str, tuned: tuple[str, ...], out: str, fleet: dict, *, settings: ExtractSettings, force: bool,
              report: str | None, dry_run: bool, output: Output) -> None:
    """Call `extract_fleet` with the options given; exit 1 when an entry failed."""
    from loratools.fleet import FleetOptions, entries_from_paths, extract_fleet, read_manifest

    if report is not None:
        raise click.UsageError("a fleet run writes its report to OUTDIR/fleet-report.json (and OUTDIR/NAME.report.json);"
                               " drop --report")
    entries = entries_from_paths(tuned)
    if fleet["manifest"]:
        entries += read_manifest(fleet["manifest"], max_rank=settings.policy.max_rank)
    options = FleetOptions(resume=fleet["resume"], force=force, batch=fleet["batch"], executor=fleet["executor"],
                           address=fleet["address"], dry_run=dry_run)
    result = run(output, "fleet", lambda progress: extract_fleet(
        base, entries, out, settings=settings, options=options, progress=progress), show_fleet)
    if result.failed:
        raise click.exceptions.Exit(1)


def show_fleet(result: FleetResult, quiet: bool) -> None:
    """A row per fine-tune (status, layers, error, size, time), then the totals."""
    console = stdout_console()
    s = result.summary
    if not quiet:
        table = Table(show_edge=False, header_style="bold")
        for column in ("fine-tune", "status", "layers", "rank policy", "rel error", "adapter", "seconds", "output / reason"):
            table.add_column(column, justify="right" if column in ("layers", "rel error", "adapter", "seconds") else "left",
                             overflow="fold")
        for entry in result.entries:
            e = entry.summary()
            planned = entry.result.plan.pairs if entry.status == "planned" and entry.result else None
            layers = str(len(planned)) if planned is not None else str(e.get("layers", ""))
            table.add_row(entry.name, entry.status, layers, e.get("rank_policy", ""),
                          f"{e['rel_error']:.4f}" if "rel_error" in e and entry.status != "planned" else "",
                          f"{e['adapter_bytes'] / 1e6:.2f} MB" if e.get("adapter_bytes") else "",
                          f"{e['seconds']:.1f}" if e.get("seconds") else "",
                          entry.reason or entry.output)
        console.print(table)
        console.print()
    if result.dry_run:
        console.print(f"planned {s.entries} fine-tune(s) against {s.base}; nothing written (--dry-run)")
        return
    console.print(f"fleet of {s.entries} against {s.base} → {s.output}: {s.written} written, {s.reused} reused,"
                  f" {s.failed} failed ({s.executor}); report {s.report}")
    floor = s.bytes_read / s.io_floor_bytes if s.io_floor_bytes else 0
    console.print(f"read {s.bytes_read / 1e6:.1f} MB ({floor:.2f}× the I/O floor of {s.io_floor_bytes / 1e6:.1f} MB;"
                  f" base read in {s.base_reads} pass(es) or task(s)); {s.seconds:.1f} s, peak RSS"
                  f" {s.peak_rss_bytes / 1e6:.0f} MB" + (f", largest worker {s.worker_peak_rss_bytes / 1e6:.0f} MB"
                                                        if s.worker_peak_rss_bytes else ""))
