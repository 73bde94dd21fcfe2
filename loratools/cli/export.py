"""The ONNX commands: export-onnx, export-adapter and merge-onnx; each parses, calls one library function of
`loratools.export` through `run`, and renders."""

from __future__ import annotations

import click

from loratools.cli.app import cli
from loratools.cli.genai import genai_options
from loratools.cli.options import Command, Output, output_options, run
from loratools.cli.render_export import show_adapter_export, show_export, show_onnx_merge
from loratools.options import DEFAULT_ATOL, EXPORT_DTYPES

DTYPE_CHOICE = click.Choice(EXPORT_DTYPES)
ATOL_DEFAULTS = ", ".join(f"{precision} {atol:g}" for precision, atol in DEFAULT_ATOL.items())


def verify_options(func: Command) -> Command:
    """--no-verify, --atol and --keep-on-fail (the fields of `export.VerifyOptions`)."""
    func = click.option("--keep-on-fail", is_flag=True, help="Keep the files when verification fails (still exits 2).")(func)
    func = click.option("--atol", type=float, help=f"Verification tolerance (default {ATOL_DEFAULTS}; scaled by"
                        " max(1, max |output|)).")(func)
    return click.option("--no-verify", "no_verify", is_flag=True, help="Skip the onnxruntime vs PyTorch check.")(func)


def int4_options(func: Command) -> Command:
    """--block-size, --asymmetric and --accuracy-level (the fields of `export.quantize.Int4Options`)."""
    func = click.option("--accuracy-level", type=int, default=4, show_default=True,
                        help="int4: MatMulNBits compute on CPU (4 int8, 1 fp32).")(func)
    func = click.option("--asymmetric", is_flag=True, help="int4: a zero point per block besides the scale.")(func)
    return click.option("--block-size", type=int, default=32, show_default=True,
                        help="int4: weights per scale (16, 32, 64, 128, 256).")(func)


@cli.command("export-onnx")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Graph file, e.g. model.onnx (with --genai: the bundle folder).")
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(exists=True),
              help="Adapter to merge first (PEFT or kohya); repeat for several.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per --adapter, in order (default 1).")
@click.option("--with-past", is_flag=True, help="Causal LMs: KV-cache inputs past_key_values.* and outputs present.*.")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True,
              help="Graph precision (bf16 checkpoints are upcast; inputs and outputs stay fp32).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]),
              help="int8: onnxruntime dynamic quantization; int4: weight-only MatMulNBits (the base of a --lora-slots"
                   " graph only: LoRA branches stay float).")
@int4_options
@click.option("--external-data", is_flag=True, help="Tensors in OUT.data beside the graph (automatic above 2 GB).")
@verify_options
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@click.option("--lora-slots", "lora_slots", metavar="SPEC",
              help="onnxruntime multi-LoRA: add a LoRA slot (inputs <module>.lora_A/B.weight, dynamic rank, empty by"
                   " default) on the modules of an adapter, or on comma-separated module names / globs.")
@output_options
@genai_options
def export_onnx_command(model: str, out: str, adapters: tuple[str, ...], weights: tuple[float, ...], with_past: bool,
                        dtype: str, quantize: str | None, block_size: int, asymmetric: bool, accuracy_level: int,
                        external_data: bool, no_verify: bool, atol: float | None, keep_on_fail: bool, force: bool,
                        lora_slots: str | None, output: Output) -> None:
    """Export MODEL (a Hugging Face folder), with adapters merged in memory, to ONNX and verify it.

    Causal LMs (Llama, Qwen2, GPT-2 …) get inputs input_ids, attention_mask, position_ids and output logits;
    encoders (BERT …) input_ids, attention_mask, token_type_ids and output last_hidden_state. Batch and
    sequence axes are dynamic. The graph is run in onnxruntime and compared with the merged model in PyTorch on
    other shapes than traced; a failed check exits 2 and writes nothing. Needs pip install 'loratools[export]'.

    --lora-slots exports the base once with a LoRA branch (x·A)·B on each chosen module for onnxruntime's
    multi-LoRA (adapter files: export-adapter); without an adapter the graph is the base model.

    \b
    Examples:
      loratools export-onnx fixtures/llama-base -o out/llama.onnx --with-past
      loratools export-onnx fixtures/llama-base -a fixtures/llama-lora-peft -o out/merged.onnx --quantize int8
      loratools export-onnx base -a style.safetensors -w 0.7 -a subject -o out/model.onnx --external-data
      loratools export-onnx fixtures/llama-base --lora-slots q_proj,v_proj -o out/base.onnx --with-past
      loratools export-onnx fixtures/llama-base -o out/int4.onnx --with-past --quantize int4 --block-size 64
      loratools export-onnx my-llama -a my-lora --genai -o out/bundle        (then: loratools generate out/bundle)
      loratools export-onnx my-llama --genai --lora-slots q_proj,v_proj --serve chat=lora1 --serve lora2 -o out/b
    """
    from loratools.export import ExportOptions, Int4Options, VerifyOptions, export_onnx

    run(output, "export-onnx", lambda progress: export_onnx(
        model, out, adapters=adapters, weights=weights or None,
        options=ExportOptions(with_past=with_past, dtype=dtype, quantize=quantize, external_data=external_data,
                              lora_slots=lora_slots, int4=Int4Options(block_size=block_size, symmetric=not asymmetric,
                                                                      accuracy_level=accuracy_level)),
        checks=VerifyOptions(verify=not no_verify, atol=atol, keep_on_fail=keep_on_fail), force=force,
        progress=progress,
    ), show_export)


@cli.command("merge-onnx")
@click.argument("onnx_model", metavar="ONNX", type=click.Path(exists=True, dir_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True),
              help="The checkpoint the ONNX model was exported from (identifies its weights).")
@click.option("-a", "--adapter", "adapters", multiple=True, required=True, type=click.Path(exists=True),
              help="Adapter to merge (PEFT or kohya); repeat for several.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per --adapter, in order (default 1).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The merged graph file.")
@click.option("--external-data", is_flag=True, help="Tensors in OUT.data beside the graph (automatic above 2 GB).")
@click.option("--no-verify", "no_verify", is_flag=True, help="Skip the onnxruntime vs PyTorch check.")
@click.option("--atol", type=float, help=f"Verification tolerance (default {ATOL_DEFAULTS}; scaled by"
              " max(1, max |output|)).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@output_options
def merge_onnx_command(onnx_model: str, base: str, adapters: tuple[str, ...], weights: tuple[float, ...], out: str,
                       external_data: bool, no_verify: bool, atol: float | None, force: bool, output: Output) -> None:
    """Merge adapters into ONNX, a graph exported elsewhere (Optimum, Olive, torch.onnx …) from BASE.

    Each tensor the adapters change is found among the graph's initializers by name, or by value (the base
    tensor's bytes, as stored or transposed); the merged graph is verified against BASE + adapters in PyTorch
    when BASE is a Hugging Face folder.

    \b
    Examples:
      loratools merge-onnx optimum/model.onnx --base base/ -a adapter -o out/merged.onnx
    """
    from loratools.export import VerifyOptions, merge_onnx

    run(output, "merge-onnx", lambda progress: merge_onnx(
        onnx_model, out, base=base, adapters=adapters, weights=weights or None, external_data=external_data,
        checks=VerifyOptions(verify=not no_verify, atol=atol), force=force, progress=progress,
    ), show_onnx_merge)


@cli.command("export-adapter")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--onnx", "onnx_model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The graph exported with export-onnx --lora-slots.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="The onnxruntime adapter file, e.g. name.onnx_adapter.")
@click.option("-w", "--weight", type=float, default=1.0, show_default=True, help="Multiplies the adapter's delta.")
@click.option("--dtype", type=DTYPE_CHOICE, help="Must be the graph's slot dtype (the default).")
@click.option("--verify", "verify_model", type=click.Path(exists=True, file_okay=False), metavar="MODEL",
              help="Run the graph with the adapter active against MODEL + adapter merged in PyTorch.")
@click.option("--atol", type=float, help=f"Verification tolerance (default {ATOL_DEFAULTS}).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@output_options
def export_adapter_command(adapter: str, onnx_model: str, out: str, weight: float, dtype: str | None,
                           verify_model: str | None, atol: float | None, force: bool, output: Output) -> None:
    """Write ADAPTER (PEFT or kohya) as an onnxruntime adapter file for a graph with LoRA slots.

    A and B per slot in the graph's dtype, the scale (alpha/r, rsLoRA, rank and alpha patterns, --weight)
    folded into B; slots the adapter does not touch get rank 0. Load it with onnxruntime.LoraAdapter and
    RunOptions.add_active_adapter, one session for the base and every adapter.

    \b
    Examples:
      loratools export-onnx fixtures/llama-base --lora-slots q_proj,v_proj -o out/base.onnx
      loratools export-adapter fixtures/llama-lora-peft --onnx out/base.onnx -o out/a.onnx_adapter \\
          --verify fixtures/llama-base
    """
    from loratools.export import export_adapter

    run(output, "export-adapter", lambda progress: export_adapter(
        adapter, out, onnx=onnx_model, weight=weight, dtype=dtype, verify=verify_model, atol=atol, force=force,
        progress=progress,
    ), show_adapter_export)
