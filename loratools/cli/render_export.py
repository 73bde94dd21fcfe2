"""Terminal output of the ONNX commands (export-onnx, export-adapter, merge-onnx)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from loratools.cli.options import stdout_console
from loratools.cli.render import human_bytes

if TYPE_CHECKING:  # result types only: importing loratools.export here would load torch with the CLI
    from loratools.export import AdapterExportResult, ExportCheck, ExportResult, OnnxMergeResult


def show_export(result: ExportResult, quiet: bool) -> None:
    """``export-onnx``: the files and their sizes, the timings, the verification table and the generation check."""
    console = stdout_console()
    past = ", KV cache" if result.with_past else ""
    merged = f", {result.merged_tensors} tensor(s) merged from {len(result.adapters)} adapter(s)" if result.adapters else ""
    console.print(f"exported {result.architecture} ({result.kind}{past}, {result.precision}, opset {result.opset}{merged})")
    for name, size in result.files.items():
        console.print(f"  wrote {result.out.parent / name}  {human_bytes(size)}")
    if result.slots:
        console.print(f"  {len(result.slots)} LoRA slot(s): inputs <module>.lora_A.weight (in, r) and"
                      f" <module>.lora_B.weight (r, out), r dynamic, empty by default; e.g. {result.slots[0]}")
    if result.int4 is not None:
        o = result.int4.options
        kept = f"; {len(result.int4.kept_float)} LoRA MatMul(s) kept float" if result.int4.kept_float else ""
        console.print(f"  int4: {result.int4.quantized} MatMul(s) as MatMulNBits (block {o.block_size},"
                      f" {'symmetric' if o.symmetric else 'asymmetric'}, accuracy level {o.accuracy_level}){kept}")
    if result.precision != "fp32" and result.fp32_bytes:
        written = sum(result.files.values())
        console.print(f"  size: {human_bytes(written)} written, {written / result.fp32_bytes:.0%} of the fp32 weights"
                      f" ({human_bytes(result.fp32_bytes)})")
    console.print("  timings: " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.timings.items()))
    check = result.verification
    if check is None:
        console.print("  not verified (--no-verify)")
        return
    _show_check(console, check, quiet, "no adapter active: " if result.slots else "")
    if result.accuracy is not None:
        a = result.accuracy
        greedy = f", greedy tokens {a.greedy_matched}/{a.greedy_steps} equal" if a.greedy_steps is not None else ""
        console.print(f"accuracy of {result.precision} vs PyTorch fp32: logits cosine {a.logits_cosine:.5f}, top-1"
                      f" agreement {a.top1:.1%}{greedy}")


def _show_check(console: Console, check: ExportCheck, quiet: bool, prefix: str = "") -> None:
    if not quiet:
        title = (f"verification: {prefix}onnxruntime vs PyTorch fp32 (batch {check.batch}, {check.sequence} tokens"
                 + (f", past {check.past}" if check.past else "") + ")")
        table = Table(title=title, title_justify="left")
        for column, justify in (("output", "left"), ("max abs diff", "right"), ("tolerance", "right"),
                                ("cosine", "right"), ("top-1", "right"), ("", "left")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for m in check.outputs:
            top1 = "-" if m.top1 is None else f"{m.top1:.1%}"
            table.add_row(m.name, f"{m.max_abs_diff:.2e}", f"{m.tolerance:.1e}", f"{m.cosine:.6f}", top1,
                          "ok" if m.passed else "[red]FAIL[/red]")
        console.print(table)
    worst = max(check.outputs, key=lambda m: m.max_abs_diff / max(m.tolerance, 1e-300), default=None)
    if worst is not None:
        console.print(f"verified in onnxruntime: {'passed' if check.passed else 'FAILED'}; worst output {worst.name}"
                      f" max abs diff {worst.max_abs_diff:.2e} (tolerance {worst.tolerance:.1e})")
    if check.generation:
        g = check.generation
        console.print(f"greedy generation with the cache: {g['matched']}/{g['steps']} tokens equal transformers'"
                      f" generate() ({'ok' if g['passed'] else 'FAIL'})")


def show_adapter_export(result: AdapterExportResult, quiet: bool) -> None:
    """``export-adapter``: the file, the ranks per slot, the check with the adapter active."""
    console = stdout_console()
    ranks = sorted({r for r in result.ranks.values() if r})
    console.print(f"wrote {result.out}  {human_bytes(result.bytes)}: {result.filled} of {len(result.ranks)} slot(s)"
                  f" of {result.onnx} filled (rank {', '.join(map(str, ranks)) or '-'}), {result.dtype},"
                  f" weight {result.weight:g}")
    if not quiet:
        table = Table(title="slots", title_justify="left")
        table.add_column("module")
        table.add_column("rank", justify="right")
        for module, rank in result.ranks.items():
            table.add_row(module, str(rank) if rank else "- (empty)")
        console.print(table)
    if result.verification is not None:
        _show_check(console, result.verification, quiet, "adapter active: ")


def show_onnx_merge(result: OnnxMergeResult, quiet: bool) -> None:
    """``merge-onnx``: which initializers took which tensors, by name or by value, and the check."""
    console = stdout_console()
    console.print(f"merged {len(result.adapters)} adapter(s) into {result.source}: {result.by_name} tensor(s) found by"
                  f" name, {result.by_value} by value; {len(result.placements)} initializer(s) updated")
    for name, size in result.files.items():
        console.print(f"  wrote {result.out.parent / name}  {human_bytes(size)}")
    if not quiet:
        table = Table(title="placements", title_justify="left")
        for column in ("checkpoint tensor", "initializer", "found by", "layout"):
            table.add_column(column)
        for p in result.placements:
            table.add_row(p.tensor, p.initializer, p.how, "transposed (MatMul)" if p.transposed else "as stored")
        console.print(table)
    if result.verification is not None:
        _show_check(console, result.verification, quiet, "merged graph: ")
