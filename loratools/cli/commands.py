"""The commands: each is its arguments, one library call through `run`, and its renderer.

Library modules are imported inside each command, so ``loratools --help`` stays fast.
"""

from __future__ import annotations

import dataclasses

import click

from loratools.cli.app import cli
from loratools.cli.behaviour import behaviour_options, run_spectrum_behaviour, run_verify_behaviour
from loratools.cli.fleet import fleet_options, is_fleet, run_fleet
from loratools.cli.options import (
    Output,
    hidden_alias,
    output_options,
    rank_policy_options,
    run,
    selection_options,
    svd_options,
    write_options,
)
from loratools.cli.render import (
    show_extract,
    show_inspect,
    show_merge,
    show_spectrum,
    show_verify,
    show_written,
)
from loratools.options import ADAPTER_FORMATS, BehaviourOptions, RankPolicy, Selection, SvdSettings

FORMAT_CHOICE = click.Choice(ADAPTER_FORMATS)
GGUF_BASE_HELP = ("The base model folder: its config.json gives a GGUF adapter llama.cpp's architecture, names and"
                  " q/k row order (default: the adapter's base_model when a local folder).")


@cli.command("extract")
@click.argument("base")
@click.argument("tuned", nargs=-1)
@write_options("A folder (PEFT, diffusers), a .safetensors file (kohya / bare PEFT / diffusers) or a .gguf file; for"
               " a fleet, the folder of the adapters.", "Written dtype (default: the tuned weights'; q8_0: GGUF only).",
               quantized=True)
@rank_policy_options(default_rank=16)
@click.option("--conv-rank", type=click.IntRange(min=1), help="Fixed rank for conv2d layers (default: the policy).")
@selection_options(writes_adapter=True)
@click.option("--format", "fmt", type=FORMAT_CHOICE,
              help="PEFT folder (or file), kohya / A1111 / ComfyUI file, diffusers (load_lora_weights) folder or"
                   " file, or llama.cpp GGUF file [default: kohya for Stable Diffusion inputs, else peft].")
@svd_options
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the report as JSON to this file.")
@click.option("--dry-run", is_flag=True, help="Show the plan (from headers only) and stop.")
@fleet_options
@output_options
def extract_command(base: str, tuned: tuple[str, ...], out: str, dtype: str | None, force: bool, policy: RankPolicy,
                    conv_rank: int | None, selection: Selection, fmt: str | None, svd: SvdSettings, report: str | None,
                    dry_run: bool, fleet: dict, output: Output) -> None:
    """Extract a LoRA adapter from the difference TUNED − BASE (several TUNED: one adapter each, a fleet).

    BASE and TUNED are model folders (sharded or not), single .safetensors/.bin files, or Hugging Face hub ids
    org/name[@revision] from the local cache. Each weight pair is loaded on its own, ΔW is formed in fp32 and
    factored by a seeded randomized SVD at the rank the policy asks for. Norms, biases and other changed
    tensors that cannot be a LoRA are listed; --save-full saves them.

    A fleet (two or more TUNED, or --manifest) reads each base tensor once for all fine-tunes and writes
    OUTDIR/NAME per fine-tune plus OUTDIR/fleet-report.json; --resume keeps the adapters a killed run
    finished; --executor ray runs it on a Ray cluster. A fine-tune that fails does not stop the others
    (exit status 1).

    \b
    Examples:
      loratools extract fixtures/llama-base fixtures/llama-tuned -o adapter --rank 8 --save-full '*norm*'
      loratools extract base/ tuned/ -o adapter --energy 0.9 --max-rank 64 --report report.json
      loratools extract sd-base.safetensors sd-tuned.safetensors -o lora.safetensors --conv-rank 8
      loratools extract unet-base/ unet-tuned/ -o lora --format diffusers
      loratools extract base/ tuned/ -o adapter --dry-run
      loratools extract base/ tuned-fr/ tuned-de/ tuned-es/ -o adapters/ --rank 16
      loratools extract base/ --manifest fleet.json -o adapters/ --resume --executor ray
    """
    from loratools.extraction import ExtractSettings, extract

    policy = dataclasses.replace(policy, conv_rank=conv_rank)
    if is_fleet(tuned, fleet):
        run_fleet(base, tuned, out, fleet, settings=ExtractSettings(policy, selection, svd, fmt, dtype), force=force,
                  report=report, dry_run=dry_run, output=output)
        return
    run(output, "extract", lambda progress: extract(
        base, tuned[0], out, policy=policy, selection=selection, svd=svd, format=fmt,
        dtype=dtype, dry_run=dry_run, force=force, report=report, progress=progress,
    ), show_extract)


@cli.command("inspect")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--sort", type=click.Choice(["name", "norm", "rank"]), default="name", show_default=True,
              help="Row order: natural name order, or ‖ΔW‖_F / rank descending.")
@click.option("--filter", "pattern", metavar="REGEX", help="Only modules whose name matches REGEX (re.search).")
@click.option("--top", type=int, metavar="N", help="Only the first N rows after sorting.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Print all metadata and config, not a summary.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also write the spectra as a PNG (needs the plot extra: matplotlib).")
@click.option("--base", type=click.Path(exists=True),
              help="The base model: DoRA rows need it (ΔW = W' − W; shows ΔM and ΔD), flat LyCORIS convs get shapes.")
@output_options
def inspect_command(adapter: str, sort: str, pattern: str | None, top: int | None, show_metadata: bool,
                    plot: str | None, base: str | None, output: Output) -> None:
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

    report = run(output, "inspect",
                 lambda progress: inspect_adapter(adapter, sort=sort, pattern=pattern, top=top, base=base,
                                                  progress=progress),
                 lambda result, quiet: show_inspect(result, quiet, show_metadata))
    if plot:
        from loratools.plot import plot_spectra

        curves = [(m.name, m.singular_values, m.stats.norm**2) for m in report.modules]
        plot_spectra(curves, plot, title=f"{report.source}: spectra of ΔW = scale·B·A")


@cli.command("verify")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.argument("adapter", type=click.Path(exists=True))
@selection_options()
@behaviour_options()
@svd_options
@output_options
def verify_command(base: str, tuned: str, adapter: str, selection: Selection, behaviour: BehaviourOptions | None,
                   svd: SvdSettings, output: Output) -> None:
    """How well ADAPTER reproduces the fine-tune TUNED − BASE, layer by layer.

    Per layer: ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, and the best error any adapter of the same rank could reach
    (Eckart–Young; --exact for a full SVD). Also lists changed tensors the adapter does not touch and adapter
    modules that match no tensor. Reads one tensor pair at a time. With --behaviour, also runs tuned, base and
    base + ADAPTER on text (model folders; one model in memory at a time).

    \b
    Examples:
      loratools verify fixtures/llama-base fixtures/llama-tuned fixtures/llama-lora-peft
      loratools verify base.safetensors tuned.safetensors lora.safetensors --json > verify.json
      loratools verify base/ tuned/ lora/ --behaviour --text sample.txt
    """
    from loratools.verify import verify_adapter

    if behaviour is not None:
        run_verify_behaviour(base, tuned, adapter, selection=selection, svd=svd, options=behaviour, output=output)
        return

    run(output, "verify",
        lambda progress: verify_adapter(base, tuned, adapter, selection=selection, svd=svd, progress=progress),
        show_verify)


def _parse_ranks(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of ranks, e.g. 4,8,16,32,64") from None


@cli.command("spectrum")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.option("--ranks", default="4,8,16,32,64", show_default=True, callback=_parse_ranks,
              help="Ranks to sweep: each layer's error, the overall error and the adapter size at each.")
@click.option("--singular-values", "num_singular_values", type=int, default=None, metavar="K",
              help="Singular values computed per layer (randomized SVD) [default: 128]; raised to the largest"
                   " --ranks value.")
@click.option("--max-rank", "old_max_rank", type=int, hidden=True)
@click.option("--max-error", type=float, metavar="E", help="Recommend ranks with relative error ≤ E.")
@click.option("--target-error", "old_target_error", type=float, hidden=True)
@click.option("--energy", type=float, metavar="F", help="Recommend ranks keeping a fraction F of ‖ΔW‖²_F.")
@selection_options()
@behaviour_options(spectrum=True)
@svd_options
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also write the spectra (with --behaviour: weight error and behaviour per rank) as a PNG (needs"
                   " the plot extra: matplotlib).")
@output_options
def spectrum_command(base: str, tuned: str, ranks: list[int], num_singular_values: int | None,
                     old_max_rank: int | None, max_error: float | None, old_target_error: float | None,
                     energy: float | None, selection: Selection, behaviour: BehaviourOptions | None, recover: float,
                     svd: SvdSettings, plot: str | None, output: Output) -> None:
    """What rank does a LoRA of TUNED − BASE need? Spectra of the true deltas, a rank sweep, recommendations.

    Streams one layer pair at a time: the top --singular-values of each ΔW (randomized SVD) and the energy
    beyond them, each layer's error at every --ranks value, the ‖ΔW‖²-weighted overall error and the adapter
    size. With --max-error or --energy: a rank per layer and one global rank. With --behaviour, also runs
    base + the adapter extract --rank r writes for each rank on text, beside the weight error, and recommends
    the smallest rank recovering --recover of the fine-tune.

    \b
    Examples:
      loratools spectrum fixtures/llama-base fixtures/llama-tuned --ranks 2,4,8 --max-error 0.05
      loratools spectrum base/ tuned/ --energy 0.9 --json > spectrum.json
      loratools spectrum base/ tuned/ --plot spectrum.png --device cuda
      loratools spectrum base/ tuned/ --behaviour --ranks 4,8,16 --recover 0.95 --text sample.txt
    """
    from loratools.spectrum import rank_spectrum

    k = hidden_alias("--singular-values", "--max-rank", num_singular_values, old_max_rank)
    bound = hidden_alias("--max-error", "--target-error", max_error, old_target_error)
    if behaviour is not None:
        run_spectrum_behaviour(base, tuned, ranks=ranks, num_singular_values=128 if k is None else k,
                               max_error=bound, energy=energy, recover=recover, selection=selection, svd=svd,
                               options=behaviour, plot=plot, output=output)
        return
    report = run(output, "spectrum", lambda progress: rank_spectrum(
        base, tuned, ranks=ranks, num_singular_values=128 if k is None else k, max_error=bound, energy=energy,
        selection=selection, svd=svd, progress=progress,
    ), show_spectrum)
    if plot:
        from loratools.plot import plot_spectra

        curves = [(layer.name, layer.singular_values, layer.total_energy) for layer in report.layers]
        plot_spectra(curves, plot, title=f"{tuned} − {base}: leading spectra of the true ΔW")


@cli.command("merge")
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@write_options()
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per adapter, in order (default 1).")
@click.option("--shard-size", metavar="SIZE", help="Re-split into shards of at most SIZE (5GB, 2GiB, 500MB).")
@output_options
def merge_command(base: str, adapters: tuple[str, ...], out: str, dtype: str | None, force: bool,
                  weights: tuple[float, ...], shard_size: str | None, output: Output) -> None:
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
    from loratools.merging import merge

    run(output, "merge", lambda progress: merge(
        base, adapters, out, weights=weights, dtype=dtype, shard_size=shard_size, force=force, progress=progress,
    ), show_merge)


@cli.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@write_options(quantized=True)
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per adapter, in order (default 1).")
@click.option("--method", type=click.Choice(["concat", "svd"]), default="concat", show_default=True,
              help="concat: exact, ranks add. svd: the exact sum recompressed to a rank policy.")
@rank_policy_options(default_rank=None, required=False)
@click.option("--format", "fmt", type=FORMAT_CHOICE, help="Output format (default: the first's).")
@click.option("--base", type=click.Path(exists=True), help=GGUF_BASE_HELP)
@output_options
def combine_command(adapters: tuple[str, ...], out: str, dtype: str | None, force: bool, weights: tuple[float, ...],
                    method: str, policy: RankPolicy | None, fmt: str | None, base: str | None, output: Output) -> None:
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
    from loratools.adapter_commands import combine

    title = "svd recompression: error against the exact sum" if method == "svd" else None
    run(output, "combine", lambda progress: combine(
        adapters, out, weights=weights, method=method, policy=policy, format=fmt, dtype=dtype, force=force,
        base=base, progress=progress,
    ), lambda result, quiet: show_written(result, quiet, title))


@cli.command("rescale")
@click.argument("adapter", type=click.Path(exists=True))
@write_options(quantized=True)
@click.option("--scale", type=float, help="Multiply every delta by S (alpha × S, factors unchanged).")
@click.option("--alpha", type=float, help="Set alpha to A and keep every delta unchanged (B rescaled).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, help="Output format (default: the input's).")
@click.option("--base", type=click.Path(exists=True), help=GGUF_BASE_HELP)
@output_options
def rescale_command(adapter: str, out: str, dtype: str | None, force: bool, scale: float | None,
                    alpha: float | None, fmt: str | None, base: str | None, output: Output) -> None:
    """Scale an adapter's deltas (--scale S) or change its alpha keeping the deltas (--alpha A).

    \b
    Examples:
      loratools rescale fixtures/llama-lora-peft -o out/half --scale 0.5
      loratools rescale fixtures/sd-lora-kohya.safetensors -o out/a1.safetensors --alpha 1
    """
    from loratools.adapter_commands import rescale

    run(output, "rescale",
        lambda _: rescale(adapter, out, scale=scale, alpha=alpha, format=fmt, dtype=dtype, force=force, base=base),
        show_written)


@cli.command("resize")
@click.argument("adapter", type=click.Path(exists=True))
@write_options(quantized=True)
@rank_policy_options(default_rank=None)
@click.option("--report", type=click.Path(dir_okay=False), metavar="FILE.json", help="Also write the report as JSON.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, help="Output format (default: the input's).")
@click.option("--base", type=click.Path(exists=True), help=GGUF_BASE_HELP)
@output_options
def resize_command(adapter: str, out: str, dtype: str | None, force: bool, policy: RankPolicy, report: str | None,
                   fmt: str | None, base: str | None, output: Output) -> None:
    """Truncate every module optimally (factor SVD) to a new rank, keeping its scale.

    Each module's delta is decomposed from its factors (QR + small SVD, no dense ΔW) and cut to the rank the
    policy picks; alpha is set so alpha / rank stays the same. The table gives each layer's relative
    Frobenius error, the smallest any rank-k adapter can have.

    \b
    Examples:
      loratools resize fixtures/llama-lora-peft -o out/r2 --rank 2
      loratools resize fixtures/sd-lora-kohya.safetensors -o out/sd-e.safetensors --energy 0.99 --report r.json
    """
    from loratools.adapter_commands import resize
    from loratools.cli.render_structured import show_converted

    title = "resize: relative Frobenius error per layer (optimal for its rank)"
    run(output, "resize", lambda progress: resize(
        adapter, out, policy=policy, format=fmt, dtype=dtype, force=force, report=report, progress=progress,
    ), lambda result, quiet: show_converted(result, quiet, title))


@cli.command("convert")
@click.argument("adapter", type=click.Path(exists=True))
@write_options(quantized=True)
@click.option("--format", "fmt", type=FORMAT_CHOICE, required=True, help="Output format.")
@click.option("--prefix", help="kohya key prefix, e.g. lora_unet_ (default: from each module's namespace).")
@click.option("--base", type=click.Path(exists=True),
              help="The model the adapter is for (resolves kohya names; GGUF: llama.cpp's architecture and names;"
                   " required for DoRA).")
@rank_policy_options(default_rank=None, required=False)
@svd_options
@output_options
def convert_command(adapter: str, out: str, dtype: str | None, force: bool, fmt: str, prefix: str | None,
                    base: str | None, policy: RankPolicy | None, svd: SvdSettings, output: Output) -> None:
    """Convert an adapter between PEFT, kohya, diffusers and llama.cpp GGUF formats; the deltas stay identical.

    kohya → PEFT or diffusers needs dotted module names: files written by loratools carry them, others need
    --base. With --base, kohya and diffusers keys get the base's diffusers pipeline names.

    LoHa, LoKr (LyCORIS or PEFT) and DoRA modules become the best plain LoRA at the rank policy (default: each
    layer's exact rank, up to 128); the table gives each layer's error next to the Eckart–Young optimum. DoRA
    needs --base (its ΔW = W' − W depends on W).

    \b
    Examples:
      loratools convert fixtures/sd-lora-kohya.safetensors -o out/sd-peft --format peft \\
          --base fixtures/sd-base.safetensors
      loratools convert fixtures/llama-lora-peft -o out/llama.safetensors --format kohya
      loratools convert fixtures/sd-lora-kohya.safetensors -o out/sd-diffusers --format diffusers \\
          --base fixtures/sd-base.safetensors
      loratools convert fixtures/sd-loha-lycoris.safetensors -o out/sd-lora.safetensors --format kohya \\
          --base fixtures/sd-base.safetensors --rank 8
      loratools convert fixtures/llama-dora-peft -o out/llama-lora --format peft --base fixtures/llama-base \\
          --rank 16
      loratools convert fixtures/llama-lora-peft -o out/llama-lora.gguf --format gguf --base fixtures/llama-base
    """
    from loratools.adapter_commands import convert
    from loratools.cli.render_structured import show_converted

    run(output, "convert", lambda progress: convert(
        adapter, out, format=fmt, prefix=prefix, base=base, dtype=dtype, force=force, policy=policy, svd=svd,
        progress=progress,
    ), show_converted)
