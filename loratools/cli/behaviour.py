"""``--behaviour`` on ``verify`` and ``spectrum``: its options, its runs, and its tables (weight error and behaviour
side by side).

The options decorator passes ``behaviour: BehaviourOptions | None`` (None without --behaviour); the commands hand
over to `run_verify_behaviour` / `run_spectrum_behaviour`, which call one library function each through `run`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from loratools.cli.options import Command, Output, run, stdout_console
from loratools.cli.render import show_spectrum, show_verify
from loratools.options import EMBEDDING_MODES, OUTPUT_DTYPE_NAMES, BehaviourOptions, Selection, SvdSettings

if TYPE_CHECKING:  # result types only: the library loads torch, which --help must not
    from loratools.behaviour import BehaviourReport, SpectrumBehaviourReport, VerifyBehaviourReport


def behaviour_options(spectrum: bool = False) -> Callable[[Command], Command]:
    """--behaviour, --text, --max-tokens, --batch-size, --dtype (and for spectrum --recover, --save-full,
    --embeddings); passes ``behaviour: BehaviourOptions | None`` (and ``recover``, ``selection`` amended)."""

    def decorate(func: Command) -> Command:
        @functools.wraps(func)
        def wrapper(*args: Any, behaviour: bool, texts: tuple[str, ...], max_tokens: int, batch_size: int,
                    model_dtype: str, **kwargs: Any) -> Any:
            save_full, embeddings = kwargs.pop("behaviour_save_full", ()), kwargs.pop("behaviour_embeddings", None)
            if not behaviour and (texts or save_full or embeddings):
                raise click.UsageError("--text, --save-full and --embeddings apply with --behaviour")
            if spectrum and behaviour:
                kwargs["selection"] = replace(kwargs["selection"], save_full=save_full, embeddings=embeddings or "lora")
            options = BehaviourOptions(texts, max_tokens, batch_size, model_dtype) if behaviour else None
            return func(*args, behaviour=options, **kwargs)

        options = [
            click.option("--behaviour", is_flag=True,
                         help="Also run the models on text: KL(tuned ‖ base + adapter), top-1 agreement, perplexity"
                              " and the share of the fine-tune recovered (causal LMs); hidden-state cosines"
                              " (encoders). Needs Hugging Face model folders and transformers."),
            click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
                         metavar="FILE", help="With --behaviour: text to run on, tokenized with the model's tokenizer"
                                              " [default: seeded random tokens]. Repeatable."),
            click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
                         help="With --behaviour: at most this many tokens in all (the tuned model's buffer holds"
                              " tokens × vocabulary floats)."),
            click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                         help="With --behaviour: windows per forward pass."),
            click.option("--dtype", "model_dtype", type=click.Choice(OUTPUT_DTYPE_NAMES), default="fp32",
                         show_default=True, help="With --behaviour: the models' dtype in memory (bf16 halves it)."),
        ]
        if spectrum:
            options += [
                click.option("--recover", type=float, default=0.95, show_default=True, metavar="SHARE",
                             help="With --behaviour: recommend the smallest rank recovering this share of the"
                                  " fine-tune."),
                click.option("--save-full", "behaviour_save_full", multiple=True, metavar="PATTERN",
                             help="With --behaviour: as extract, keep matching changed tensors whole in each rank's"
                                  " adapter, e.g. '*norm*'. Repeatable."),
                click.option("--embeddings", "behaviour_embeddings", type=click.Choice(EMBEDDING_MODES),
                             help="With --behaviour: as extract (lora, full or skip) [default: lora]."),
            ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _for_run(options: BehaviourOptions, svd: SvdSettings) -> BehaviourOptions:
    return replace(options, device=svd.device, seed=svd.seed)


def run_verify_behaviour(base: str, tuned: str, adapter: str, *, selection: Selection, svd: SvdSettings,
                         options: BehaviourOptions, output: Output) -> VerifyBehaviourReport:
    """``verify --behaviour``: forward passes on --device with the --seed of the SVD options."""
    from loratools.behaviour import verify_behaviour

    return run(output, "verify --behaviour", lambda progress: verify_behaviour(
        base, tuned, adapter, selection=selection, svd=svd, options=_for_run(options, svd), progress=progress,
    ), show_verify_behaviour)


def run_spectrum_behaviour(base: str, tuned: str, *, ranks: list[int], num_singular_values: int,
                           max_error: float | None, energy: float | None, recover: float, selection: Selection,
                           svd: SvdSettings, options: BehaviourOptions, plot: str | None,
                           output: Output) -> SpectrumBehaviourReport:
    """``spectrum --behaviour``: the sweep with behaviour per rank, and with --plot both curves side by side."""
    from loratools.behaviour import spectrum_behaviour

    report = run(output, "spectrum --behaviour", lambda progress: spectrum_behaviour(
        base, tuned, ranks=ranks, recover=recover, num_singular_values=num_singular_values, max_error=max_error,
        energy=energy, selection=selection, svd=svd, options=_for_run(options, svd), progress=progress,
    ), show_spectrum_behaviour)
    if plot:
        from loratools.plot import plot_rank_curves

        plot_rank_curves(report.rows(), plot, title=f"{tuned} − {base}: weight error and behaviour per rank",
                         recover=recover, kind=report.behaviour.kind)
    return report


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _behaviour_table(report: BehaviourReport, rows: list[tuple[str, dict]]) -> Table:
    causal = report.kind == "causal"
    titles = (["KL mean", "KL p95", "top-1", "perplexity"] if causal
              else ["hidden cos", "hidden cos p5", "pooled cos"]) + ["recovered"]
    keys = (["kl_mean", "kl_p95", "top1_agreement", "perplexity"] if causal
            else ["hidden_cosine_mean", "hidden_cosine_p5", "pooled_cosine_mean"])
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("model")
    for title in titles:
        table.add_column(title, justify="right", no_wrap=True)
    for label, row in rows:
        table.add_row(label, *[_number(row.get(key)) for key in keys], _share(row.get("share_recovered")))
    return table


def _print_behaviour(report: BehaviourReport) -> None:
    console = stdout_console()
    console.print()
    console.print(f"behaviour on {report.source} ({report.positions} positions, {report.architecture},"
                  f" {report.dtype} on {report.device}); a proxy on this text, not a task benchmark:")
    rows = [("tuned", report.tuned.to_json()), ("base", report.row(report.base))]
    rows += [(row.label, report.row(row)) for row in report.adapted]
    if report.with_left_out is not None:
        rows.append((report.with_left_out.label, report.row(report.with_left_out)))
    console.print(_behaviour_table(report, rows))
    share = report.left_out_share()
    if share is not None:
        console.print(f"the {len(report.left_out)} changed tensor(s) no LoRA holds (norms, biases) account for"
                      f" {share:.1%} of the remaining gap; keep them with --save-full")


def show_verify_behaviour(report: VerifyBehaviourReport, quiet: bool) -> None:
    """``verify --behaviour``: the verify tables, then the behaviour of tuned, base and base + adapter."""
    show_verify(report.weights, quiet)
    _print_behaviour(report.behaviour)


def show_spectrum_behaviour(report: SpectrumBehaviourReport, quiet: bool) -> None:
    """``spectrum --behaviour``: the spectrum tables, then weight error and behaviour per rank side by side."""
    show_spectrum(report.spectrum, quiet)
    _print_behaviour(report.behaviour)
    console = stdout_console()
    causal = report.behaviour.kind == "causal"
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for title in ("rank", "weight error", "optimal", "parameters",
                  *(("KL mean", "top-1") if causal else ("hidden cos", "pooled cos")), "recovered"):
        table.add_column(title, justify="right", no_wrap=True)
    for row in report.rows():
        behaviour = ((row["kl_mean"], row["top1_agreement"]) if causal
                     else (row["hidden_cosine_mean"], row["pooled_cosine_mean"]))
        table.add_row(str(row["rank"]), _number(row["rel_error"]), _number(row["optimal_rel_error"]),
                      f"{row['params']:,}", *[_number(v) for v in behaviour], _share(row["share_recovered"]))
    console.print()
    console.print("weight error and behaviour per rank (each rank: the adapter extract --rank writes):")
    console.print(table)
    rank = report.recommended_rank()
    console.print(f"recommended rank to recover {report.recover:.0%} of the fine-tune: "
                  + (str(rank) if rank is not None else "none of the swept ranks"))
