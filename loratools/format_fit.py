"""Fitting an extraction to its output format: which planned layers a format cannot hold (kohya, diffusers: no
embedding or Conv1D LoRAs; GGUF: what llama.cpp takes as LoRA on this base), and which layers a loader cannot
map by name. Plans are changed in place; layers left out are reported like a changed norm."""

from __future__ import annotations

import os

from loratools.adapter import Adapter
from loratools.errors import FormatError
from loratools.formats import ORIGINAL_NAMESPACES
from loratools.formats.gguf import GgufBase, gguf_refusal, gguf_tensor_names
from loratools.names import matches, natural_key, short_list
from loratools.options import Selection
from loratools.plan import Plan, WholeTensor


def fit_plan_to_format(plan: Plan, format: str, selection: Selection = Selection(), config: dict | None = None,
                       base: str | os.PathLike = "base") -> None:
    """Fit the plan to what `format` can hold (kohya, diffusers: no embedding or Conv1D LoRAs; GGUF: the layers
    llama.cpp takes as LoRA on this base; none of them whole tensors).

    A layer the format cannot hold is compared whole instead of extracted: reported when changed (warning and
    report), like a changed norm. It is an error only when the user named it with an ``--include`` pattern.
    Whole tensors asked for (--save-full, --embeddings full) are refused.
    """
    if format == "peft":
        return
    refusals = _gguf_refusals(plan, config, base) if format == "gguf" else {
        p.module: f"{p.kind}: {format} has no {p.kind} layout" for p in plan.pairs if p.kind in ("embedding", "conv1d")}
    kept = []
    for pair in plan.pairs:
        if pair.module not in refusals:
            kept.append(pair)
            continue
        pattern = matches(pair.tensor, selection.include) if selection.include else None
        if pattern is not None:
            raise FormatError(f"{pair.tensor}: {format} cannot hold it ({refusals[pair.module]}), but --include"
                              f" {pattern!r} asks for it; use --format peft, or an --include pattern that leaves it out")
        why = f"{refusals[pair.module]} (--format peft keeps it)"
        plan.whole.append(WholeTensor(pair.tensor, pair.shape, False, why, left_out=True))
    if len(kept) != len(plan.pairs):
        plan.pairs = kept
        plan.whole.sort(key=lambda w: natural_key(w.tensor))
    saved = [w for w in plan.whole if w.save]
    if saved:
        raise FormatError(f"{saved[0].tensor}: {format} files cannot hold whole tensors (--save-full/--embeddings"
                          " full); use --format peft")


def _gguf_refusals(plan: Plan, config: dict | None, base: str | os.PathLike) -> dict[str, str]:
    """Module -> why llama.cpp cannot take it as LoRA, for the planned pairs (`formats.gguf.gguf_refusal`)."""
    if config is None:
        raise FormatError(f"{base}: --format gguf needs the base model's config.json (llama.cpp's architecture and"
                          " tensor names); pass a model folder as BASE")
    layout = GgufBase.from_config(config, f"{base}/config.json")
    names = gguf_tensor_names(layout)
    refusals = {p.module: gguf_refusal(p.module, p.kind, layout, names) for p in plan.pairs}
    return {module: why for module, why in refusals.items() if why is not None}


def unmapped_layers(modules: list[str], names: dict[str, str] | None) -> list[str]:
    """Original single-file modules that have no diffusers pipeline name."""
    return [m for m in modules if names is not None and m not in names and m.startswith(tuple(ORIGINAL_NAMESPACES))]


def check_pipeline_names(plan: Plan, names: dict[str, str] | None, format: str) -> None:
    """FormatError when a diffusers output would hold original-layout layers that have no diffusers name."""
    odd = unmapped_layers([p.module for p in plan.pairs], names)
    if format == "diffusers" and odd:
        raise FormatError(f"{odd[0]}: no diffusers name for this original-layout layer ({len(odd)} such layers:"
                          f" {short_list(odd)}); --exclude them, or use --format kohya")


def unmapped_notes(adapter: Adapter, names: dict[str, str] | None, format: str) -> list[str]:
    """Warnings for an adapter written in `format` whose layers some loader cannot map (diffusers names)."""
    notes = []
    odd = unmapped_layers(list(adapter.modules), names)
    if odd:
        notes.append(
            f"{len(odd)} layer(s) have no diffusers name and keep their original kohya names, which diffusers'"
            f" loader cannot map (A1111 and ComfyUI can): {short_list(odd)}"
        )
    if format != "kohya" or names is None:
        return notes
    for space in ("text_encoder.", "text_encoder_2."):  # diffusers reads kohya q/k/v keys only next to out_proj's
        modules = [n for n in (names.get(m, m) for m in adapter.modules) if n.startswith(space)]
        attention = [n for n in modules if n.endswith(("q_proj", "k_proj", "v_proj"))]
        if attention and not any(n.endswith("out_proj") for n in modules):
            notes.append(
                f"{space[:-1]}: attention LoRAs with none on out_proj ({short_list(attention)}): diffusers' kohya"
                " loader refuses or drops them; add the out_proj layers, or use --format diffusers"
            )
    return notes
