"""Adapter modules ↔ checkpoint tensors: which base tensor each LoRA module and full tensor changes.

One `match_adapter` serves every command that applies an adapter to a checkpoint (merge, verify, export).

Decisions:
- kohya stems (``lora_unet_…``) are first resolved to the dotted module names of the checkpoint
  (`resolve_kohya_names`, through the namespaces in `formats.KOHYA_NAMESPACES`).
- A module matches ``<module>.weight``, else the one tensor ending in ``.<module>.weight`` (a checkpoint saved
  without the wrapper prefix the adapter was made with), else the module whose Stable Diffusion pipeline name
  (`formats.pipeline_names`: ``unet.down_blocks.0…`` for a bare UNet folder's ``down_blocks.0…`` or a single
  file's ``model.diffusion_model.input_blocks.1…``), or that name's kohya stem, it is (`module_aliases`). A
  full tensor matches its own name the first two ways.
- PEFT has one ``fan_in_fan_out`` flag per adapter and decides per layer from the module's class, so a module
  is fitted to the tensor's shape: a non-square weight whose shape only fits the other layout flips between
  linear and conv1d; a linear LoRA on a 1×1 convolution (out, in, 1, 1) applies as that convolution's delta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.checkpoint import TensorIndex
from loratools.formats import KOHYA_PREFIXES, is_sdxl, kohya_stem, kohya_stems, pipeline_names


def resolve_kohya_names(adapter: Adapter, tensor_names: Iterable[str]) -> Adapter:
    """Rename kohya-stem modules to the dotted module names of a checkpoint's tensors.

    Args:
        tensor_names: every tensor name of the checkpoint the adapter applies to.
    Returns:
        A copy with module names (and their `name` fields) resolved; stems that match nothing are kept, for
        the caller to report. The adapter itself when it has no kohya stems.
    """
    if not any(name.startswith(KOHYA_PREFIXES) for name in adapter.modules):
        return adapter
    by_stem = kohya_stems(tensor_names)
    modules = {}
    for name, module in adapter.modules.items():
        resolved = by_stem.get(name, name) if name.startswith(KOHYA_PREFIXES) else name
        modules[resolved] = dataclasses.replace(module, name=resolved)
    return dataclasses.replace(adapter, modules=modules)


def module_aliases(index: TensorIndex) -> dict[str, str]:
    """Other names adapters give the checkpoint's modules -> the module: Stable Diffusion pipeline names and their
    kohya stems (empty for checkpoints that are not Stable Diffusion components)."""
    pipeline = pipeline_names(list(index.tensors), index.config)
    sdxl = is_sdxl(pipeline.values())
    aliases: dict[str, str] = {}
    for module, name in pipeline.items():
        for alias in (name, kohya_stem(name, sdxl=sdxl)):
            if alias != module:
                aliases.setdefault(alias, module)
    return aliases


def find_tensor(name: str, index: TensorIndex) -> str | None:
    """The checkpoint tensor an adapter entry applies to: `name` itself, else the one tensor ending in
    ``.<name>``; None if none or several match."""
    if name in index:
        return name
    candidates = [t for t in index.tensors if t.endswith("." + name)]
    return candidates[0] if len(candidates) == 1 else None


def fit_module(module: LoraModule, shape: tuple[int, ...]) -> LoraModule | None:
    """`module` as it applies to a base weight of `shape`, or None when its delta cannot fit (module docstring)."""
    if module.base_shape == tuple(shape):
        return module
    if module.kind == "linear" and tuple(shape[2:]) == (1, 1) and module.base_shape == tuple(shape[:2]):
        return module
    if module.kind in ("linear", "conv1d") and module.base_shape[::-1] == tuple(shape):
        return dataclasses.replace(module, kind="linear" if module.kind == "conv1d" else "conv1d")
    return None


@dataclass(frozen=True)
class Target:
    """What an adapter does to one checkpoint tensor.

    Attributes:
        tensor: the checkpoint tensor's name.
        name: the adapter's name for it (the module name, or the full tensor's name for a full-only change).
        module: the LoRA module, fitted to the tensor's layout (`fit_module`), if any.
        full: a full replacement tensor (PEFT ``modules_to_save``), if any; a module on the same tensor adds
            to the replacement.
    """

    tensor: str
    name: str
    module: LoraModule | None = None
    full: torch.Tensor | None = None


@dataclass
class AdapterMatch:
    """An adapter matched to a checkpoint.

    Attributes:
        targets: what the adapter does, by checkpoint tensor name.
        missing: adapter names with no tensor of that name -> why.
        misfit: adapter names whose tensor has a shape the module or full tensor cannot take -> why.
    """

    targets: dict[str, Target] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    misfit: dict[str, str] = field(default_factory=dict)

    @property
    def unmatched(self) -> dict[str, str]:
        """Every adapter name that changes nothing, with why (missing and misfit)."""
        return {**self.missing, **self.misfit}


def match_adapter(adapter: Adapter, index: TensorIndex) -> AdapterMatch:
    """Match every LoRA module and full tensor of `adapter` to a tensor of `index`, from names and shapes only.

    Returns:
        An AdapterMatch; a module or full tensor is missing when no tensor has its name, a misfit when the
        tensor's shape cannot take it (the reason names both shapes).
    """
    adapter = resolve_kohya_names(adapter, index.tensors)
    aliases = module_aliases(index)
    match = AdapterMatch()
    wanted: list[tuple[str, str, LoraModule | None, torch.Tensor | None, tuple[int, ...]]] = [
        (name + ".weight", name, module, None, module.base_shape) for name, module in adapter.modules.items()
    ]
    wanted += [(name, name, None, tensor, tuple(tensor.shape)) for name, tensor in adapter.full.items()]
    for tensor_name, name, module, full, shape in wanted:
        found = find_tensor(tensor_name, index)
        if found is None and module is not None and name in aliases:
            found = find_tensor(aliases[name] + ".weight", index)
        if found is None:
            match.missing[name] = f"no tensor {tensor_name} in {index.path}"
            continue
        base_shape = index.info(found).shape
        fitted = fit_module(module, base_shape) if module is not None else None
        if (fitted is None) if module is not None else (base_shape != shape):
            what = f"a {module.kind} LoRA" if module is not None else "a full tensor"
            match.misfit[name] = f"{what} for shape {shape}, but {found} has shape {base_shape}"
            continue
        old = match.targets.get(found, Target(found, name))
        match.targets[found] = Target(found, old.name, fitted or old.module, full if full is not None else old.full)
    return match
