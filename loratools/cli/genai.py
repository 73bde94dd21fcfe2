"""onnxruntime-genai on the command line: the ``--genai`` options of export-onnx (bundle folders) and
``loratools generate`` (text from a bundle, streamed). Each command parses, calls one library function
through `run` (or, for generate, streams through its callback) and renders."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import click

from loratools.cli.app import cli
from loratools.cli.options import Command, Output, output_options, show_result, stdout_console
from loratools.cli.render import human_bytes

if TYPE_CHECKING:  # result types only: importing loratools.export here would load torch with the CLI
    from loratools.export.genai_bundle import BundleResult
    from loratools.export.genai_generate import GenerateResult

GENAI_ONLY = ("tokenizer", "no_tokenizer", "serve", "verify_tokens", "verify_prompt")


def genai_options(func: Command) -> Command:
    """export-onnx's ``--genai`` and the options that go with it; with ``--genai`` the command writes a bundle
    folder (`export_genai`) instead of a graph file, else these options must stay unset."""

    @functools.wraps(func)
    def wrapper(*args: Any, genai: bool, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in GENAI_ONLY}
        if genai:
            return _export_bundle(**kwargs, **given)
        used = [k for k in GENAI_ONLY if given[k] not in (None, False, ())]
        if used:
            raise click.UsageError(f"--{used[0].replace('_', '-')} needs --genai")
        return func(*args, **kwargs)

    options = [
        click.option("--genai", is_flag=True, help="Write an onnxruntime-genai bundle folder at -o: model.onnx,"
                     " genai_config.json, the tokenizer (--with-past implied), checked by generating in"
                     " onnxruntime-genai."),
        click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
                     help="--genai: the folder to take the tokenizer files from (default: MODEL)."),
        click.option("--no-tokenizer", is_flag=True, help="--genai: bundle without a tokenizer (token ids only)."),
        click.option("--serve", multiple=True, metavar="[NAME=]ADAPTER",
                     help="--genai with --lora-slots: write ADAPTER as DIR/adapters/NAME.onnx_adapter (NAME: the"
                          " adapter's file or folder name by default). Repeatable."),
        click.option("--verify-tokens", type=click.IntRange(min=1), default=None,
                     help="--genai: tokens the onnxruntime-genai check generates [default: 16]."),
        click.option("--verify-prompt", metavar="TEXT", default=None, help="--genai: the check's prompt."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _export_bundle(model: str, out: str, adapters: tuple[str, ...], weights: tuple[float, ...], no_verify: bool,
                   atol: float | None, keep_on_fail: bool, force: bool, output: Output, tokenizer: str | None,
                   no_tokenizer: bool, serve: tuple[str, ...], verify_tokens: int | None, verify_prompt: str | None,
                   block_size: int, asymmetric: bool, accuracy_level: int, **graph: Any) -> None:
    """export-onnx's other options (--dtype, --quantize, --lora-slots …) are the fields of `ExportOptions` by name,
    the int4 ones those of `Int4Options`; --with-past is implied."""
    from loratools.cli.options import run
    from loratools.export import ExportOptions, Int4Options, VerifyOptions
    from loratools.export.genai_bundle import BundleOptions, ServedAdapter, export_genai

    bundle = BundleOptions(tokenizer=tokenizer, no_tokenizer=no_tokenizer,
                           serve=tuple(ServedAdapter.parse(s) for s in serve),
                           verify_tokens=verify_tokens or BundleOptions.verify_tokens,
                           prompt=verify_prompt or BundleOptions.prompt)
    run(output, "export-onnx --genai", lambda progress: export_genai(
        model, out, adapters=adapters, weights=weights or None,
        options=ExportOptions(**{**graph, "with_past": True}, int4=Int4Options(
            block_size=block_size, symmetric=not asymmetric, accuracy_level=accuracy_level)),
        bundle=bundle, checks=VerifyOptions(verify=not no_verify, atol=atol, keep_on_fail=keep_on_fail),
        force=force, progress=progress,
    ), show_bundle)


def show_bundle(result: BundleResult, quiet: bool) -> None:
    """``export-onnx --genai``: the folder's files, the config's essentials, the adapters and both checks."""
    console = stdout_console()
    model = result.config["model"]
    eos = model.get("eos_token_id")
    console.print(f"bundle {result.out} for onnxruntime-genai: type {result.model_type}, {result.graph.architecture}"
                  f" {model['decoder']['num_hidden_layers']} layers, context {model['context_length']}, eos {eos}")
    if not quiet:
        for name, size in result.files.items():
            console.print(f"  {name}  {human_bytes(size)}")
    for name, adapter in result.adapters.items():
        console.print(f"  adapter {name}: {adapter.filled} of {len(adapter.ranks)} slot(s) filled, from {adapter.adapter}")
    console.print("  timings: " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.timings.items()))
    graph = result.graph
    merged = f", {graph.merged_tensors} tensor(s) merged from {len(graph.adapters)} adapter(s)" if graph.adapters else ""
    slots = f", {len(graph.slots)} LoRA slot(s)" if graph.slots else ""
    console.print(f"  graph: {graph.precision}, opset {graph.opset}{merged}{slots}")
    if graph.verification is not None:
        worst = max(graph.verification.outputs, key=lambda m: m.max_abs_diff / max(m.tolerance, 1e-300))
        generation = graph.verification.generation or {}
        console.print(f"verified in onnxruntime: {'passed' if graph.verification.passed else 'FAILED'}; worst output"
                      f" {worst.name} max abs diff {worst.max_abs_diff:.2e} (tolerance {worst.tolerance:.1e});"
                      f" greedy {generation.get('matched')}/{generation.get('steps')} tokens equal")
    check = result.verification
    if check is None:
        if not result.notes:
            console.print("  not verified in onnxruntime-genai (--no-verify)")
        return
    prompt = "the chat template" if check.chat_template else "a plain prompt"
    console.print(f"verified in {check.runtime}: {len(check.prompt_tokens)}-token prompt through {prompt};"
                  f" greedy tokens vs transformers' generate():")
    for run in check.runs:
        which = f"adapter {run.adapter}" if run.adapter else "no adapter" if result.adapters else "model"
        console.print(f"  {which}: {run.matched}/{len(run.transformers)} tokens equal"
                      f" ({'ok' if run.passed else '[red]FAIL[/red]'})")


@cli.command("generate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", required=True, help="The prompt text.")
@click.option("--adapter", help="A served adapter (DIR/adapters/NAME.onnx_adapter) to activate.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the bundle's chat template.")
@click.option("--greedy", is_flag=True, help="Greedy search whatever the bundle's defaults.")
@click.option("--temperature", type=float, help="Sample with this temperature.")
@click.option("--top-p", type=float, help="Sample from the smallest token set of this probability.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the K likeliest tokens.")
@click.option("--seed", type=int, help="Random seed of the sampler (same seed, same text).")
@output_options
def generate_command(bundle: str, prompt: str, adapter: str | None, max_new_tokens: int, chat: bool, greedy: bool,
                     temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
                     output: Output) -> None:
    """Generate text from BUNDLE (a folder from export-onnx --genai) with onnxruntime-genai, streamed.

    The bundle's search defaults apply (genai_config.json, from the model's generation config) unless
    --greedy or a sampling option is given. Needs pip install 'loratools[genai]'.

    \b
    Examples:
      loratools generate out/bundle --prompt "Tell me a story" --chat
      loratools generate out/bundle -p "def fib(n):" --adapter code -n 64 --greedy
      loratools generate out/bundle -p "Hello" --temperature 0.8 --top-p 0.95 --seed 1 --json
    """
    from loratools.export.genai_generate import GenerateOptions, generate

    options = GenerateOptions(adapter=adapter, max_new_tokens=max_new_tokens, chat=chat, greedy=greedy,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    streaming = not output.as_json

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(bundle, prompt, options=options, on_text=write if streaming else None)
    show_result(output, result, show_generation)


def show_generation(result: GenerateResult, quiet: bool) -> None:
    """After the streamed text: one line of counts and speed (on stderr when -q keeps stdout to the text)."""
    line = (f"{len(result.tokens)} tokens ({result.finish}) after a {result.prompt_tokens}-token prompt:"
            f" first token {result.prefill_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s")
    click.echo("")
    click.echo(line, err=quiet)
