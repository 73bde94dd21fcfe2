"""GGUF LoRA adapters for llama.cpp: the architecture table, tensor names, ``render_gguf`` / ``write_gguf``, and
``parse_gguf`` (a validated GGUF adapter into an `Adapter`). The only module that imports the ``gguf`` package,
and only when a GGUF file is written or its names are looked up (``pip install 'loratools[gguf]'``).

How llama.cpp applies a GGUF adapter (``llama-adapter.cpp``, ``llama-graph.cpp``): keys ``general.type =
adapter``, ``adapter.type = lora``, ``general.architecture`` (must equal the base model's), one float
``adapter.lora.alpha``; tensor pairs ``<base tensor>.lora_a`` (r, in) / ``.lora_b`` (out, r) in torch order,
delta = alpha / r · B · A with r read from each B (alpha 0 means scale 1). ``token_embd``'s pair is stored as
``lora_a`` (vocab, r) = Aᵀ and ``lora_b`` (dim, r) = B. Norm tensors are ignored; any other tensor is refused.

Decisions:
- One alpha for the file: the most common plain alpha (scale · r) of the modules. Each module's own scale
  (alpha / r, rsLoRA's alpha / √r, alpha and rank patterns, combine weights) is folded into its B, so llama.cpp's
  alpha / r rule gives every tensor its exact delta; for a uniform-rank adapter B is written unchanged.
- Architectures: GGUF_ARCHITECTURES maps the base's ``config.json`` ``architectures`` to llama.cpp's name; PERMUTED
  names those whose q/k rows llama.cpp's converter permutes for its rotary layout (Llama, Mistral); B's rows are
  permuted the same way. Names come from gguf's tensor-name tables (`gguf.get_tensor_name_map`).
- What llama.cpp cannot take as LoRA is refused whole, never written half-right: full tensors (changed norms,
  ``modules_to_save``), conv layers, modules the name table does not know, and — with tied embeddings —
  ``lm_head`` and ``embed_tokens`` (llama.cpp has no separate output tensor then and would apply an embedding
  LoRA to the output projection too: llama.cpp#11554).
- q8_0 quantizes rows whose length is a multiple of 32 and writes the others as f16 (as llama.cpp's converter).
- Reading: module names are the Hugging Face Llama-family names (``model.layers.N.self_attn.q_proj``,
  ``model.embed_tokens``, ``lm_head``) of the architecture; q/k rows are restored with the head counts our
  files record (``loratools_attention_heads``), or the base's config.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.errors import FormatError, LoratoolsError
from loratools.formats.gguf_file import GgufHeader

# config.json "architectures" entry -> llama.cpp architecture (as convert_hf_to_gguf.py registers them); the ones
# checked in llama.cpp by tests/test_gguf_llama_cpp.py (Mistral is llama.cpp's Llama class)
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes for its rotary layout
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
HEADS_KEY = "loratools_attention_heads"
BASE_MODEL_KEY = "loratools_base_model"
# Hugging Face module names of the Llama family, per block and outside blocks (the names read back).
BLOCK_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
TOP_MODULES = ("model.embed_tokens", "lm_head")
INSTALL_HINT = "GGUF adapters need the gguf package: pip install 'loratools[gguf]'"


def _gguf() -> ModuleType:
    try:
        import gguf
    except ImportError:
        raise LoratoolsError(INSTALL_HINT) from None
    return gguf


@dataclass(frozen=True)
class GgufBase:
    """What a GGUF adapter must know of its base model (from its config.json).

    Attributes:
        arch: llama.cpp's architecture name (``llama``, ``qwen2`` …).
        blocks: number of transformer blocks.
        heads, kv_heads: attention heads and key/value heads (q/k row order for permuted architectures).
        tied: whether lm_head shares the token embeddings (then llama.cpp has no ``output`` tensor).
    """

    arch: str
    blocks: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_config(cls, config: Mapping, source: str) -> GgufBase:
        """The GgufBase of a Hugging Face config.json; FormatError for an architecture llama.cpp is not mapped for."""
        names = [a for a in config.get("architectures") or [] if a in GGUF_ARCHITECTURES]
        if not names:
            raise FormatError(
                f"{source}: architecture {', '.join(config.get('architectures') or ['(none)'])} has no GGUF adapter"
                f" mapping here (known: {', '.join(GGUF_ARCHITECTURES)}); use --format peft")
        try:
            heads = int(config["num_attention_heads"])
            return cls(GGUF_ARCHITECTURES[names[0]], int(config["num_hidden_layers"]), heads,
                       int(config.get("num_key_value_heads") or heads), bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{source}: config.json lacks a usable {exc}; is it the base model's config?") from None


def gguf_tensor_names(base: GgufBase) -> dict[str, str]:
    """Hugging Face module name -> llama.cpp base tensor name (``blk.0.attn_q.weight``), from gguf's tables."""
    gguf = _gguf()
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[base.arch]
    table = gguf.get_tensor_name_map(arch, base.blocks)
    names = [f"model.layers.{b}.{m}" for b in range(base.blocks) for m in BLOCK_MODULES] + list(TOP_MODULES)
    return {name: f"{table.get_name(name)}.weight" for name in names if table.get_name(name) is not None}


def _row_order(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf's ``LlamaModel.permute``) as an index vector."""
    index = torch.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _permute_heads(module: str, base: GgufBase) -> int | None:
    if base.arch not in PERMUTED:
        return None
    if module.endswith("self_attn.q_proj"):
        return base.heads
    return base.kv_heads if module.endswith("self_attn.k_proj") else None


def gguf_refusal(module: str, kind: str, base: GgufBase, names: Mapping[str, str]) -> str | None:
    """Why llama.cpp cannot take `module` (a `kind` layer) as a LoRA on `base`, or None when it can.

    Args:
        names: `gguf_tensor_names(base)`.
    """
    target = names.get(module)
    if kind not in ("linear", "embedding") or target is None:
        return f"{kind}: llama.cpp has no {base.arch} LoRA tensor for it"
    if base.tied and module in TOP_MODULES:
        return "tied embeddings: llama.cpp would apply it to the output projection too (llama.cpp#11554)"
    if (kind == "embedding") != target.startswith("token_embd"):
        return f"{kind}: llama.cpp's {target} takes another layout"
    return None


def render_gguf(adapter: Adapter, base: GgufBase) -> tuple[dict[str, torch.Tensor], float]:
    """GGUF LoRA tensors (``blk.0.attn_q.weight.lora_a`` (r, in), ``.lora_b`` (out, r), float32) and the file's
    alpha, each module's scale folded into B so that alpha / r · lora_b · lora_a is its exact delta.

    Raises:
        FormatError listing every module and full tensor llama.cpp cannot take as LoRA (nothing is written).
    """
    names = gguf_tensor_names(base)
    refused = [f"{n} (full tensor)" for n in adapter.full]
    for module in adapter.modules.values():
        why = gguf_refusal(module.name, module.kind, base, names)
        if why is not None:
            refused.append(f"{module.name} ({why})")
    if refused:
        shown = "; ".join(refused[:4]) + (f" … (+{len(refused) - 4})" if len(refused) > 4 else "")
        raise FormatError(f"{len(refused)} tensor(s) llama.cpp cannot take as LoRA: {shown}; --exclude them (or leave"
                          " out --save-full), or use --format peft; nothing was written")
    plain = [m.scale * m.rank for m in adapter.modules.values()]
    alpha = max(set(plain), key=lambda a: (plain.count(a), -a)) if plain else 1.0
    tensors: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        b, a = module.factors(torch.float32)
        fold = module.scale * module.rank / alpha
        if fold != 1.0:
            b = b * fold
        heads = _permute_heads(module.name, base)
        if heads is not None:
            b = b[_row_order(b.shape[0], heads)]
        target = names[module.name]
        if f"{target}.lora_a" in tensors:
            raise FormatError(f"{module.name}: a second module maps to llama.cpp tensor {target}; rename or --exclude it")
        tensors[f"{target}.lora_a"] = (a.T if module.kind == "embedding" else a).contiguous()
        tensors[f"{target}.lora_b"] = b.contiguous()
    return tensors, float(alpha)


def write_gguf(
    tensors: Mapping[str, torch.Tensor], path: Path, *, base: GgufBase, alpha: float, dtype: str,
    metadata: Mapping[str, str],
) -> list[str]:
    """Write a GGUF LoRA adapter (as `render_gguf` returns) to `path` in `dtype` (one of GGUF_DTYPES); returns notes
    (q8_0 rows written as f16). Keys: general.type, general.architecture, adapter.type, adapter.lora.alpha, the
    head counts and `metadata` strings (provenance)."""
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise FormatError(f"--dtype {dtype!r}: a GGUF adapter is one of {', '.join(GGUF_DTYPES)}")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    writer = gguf.GGUFWriter(path, base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(HEADS_KEY, json.dumps([base.heads, base.kv_heads]))
    for key, value in sorted(metadata.items()):
        writer.add_string(key, value)
    fallback = []
    for name, tensor in tensors.items():
        data = tensor.float().numpy()
        kind = qtype
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16
            fallback.append(name)
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not fallback:
        return []
    return [f"q8_0: {len(fallback)} tensor(s) with rows not a multiple of 32 written as f16 (as llama.cpp's"
            f" converter does), e.g. {fallback[0]}"]


def parse_gguf(
    header: GgufHeader, load: Callable[[str], torch.Tensor], *, base: GgufBase | None = None, any_row_order: bool = False
) -> Adapter:
    """A validated GGUF header (and a loader of its tensors) as an Adapter with Hugging Face module names.

    Args:
        base: the base model's GgufBase when known (checks the architecture; gives head counts).
        any_row_order: accept q/k rows in llama.cpp's order when no head counts are known (inspect: spectra and
            norms do not depend on row order).
    Raises:
        FormatError: a model GGUF (not an adapter), another adapter type or architecture, unpaired or unknown
            tensors, shapes that disagree.
    """
    where, meta = header.path, header.metadata
    if meta.get("general.type") != "adapter" or not any(n.endswith(".lora_a") for n in header.tensors):
        raise FormatError(f"{where}: a GGUF {meta.get('general.type', 'model')} file, not a LoRA adapter"
                          " (general.type is not 'adapter'); pass the base model as BASE and the adapter separately")
    if meta.get("adapter.type") != "lora":
        raise FormatError(f"{where}: adapter.type {meta.get('adapter.type')!r}; loratools reads 'lora' GGUF adapters")
    arch = meta.get("general.architecture")
    if base is not None and arch != base.arch:
        raise FormatError(f"{where}: adapter for architecture {arch!r}, but the base model is {base.arch!r};"
                          " pass the base model the adapter was made for")
    blocks = _block_count(header.tensors)
    heads = _heads(meta, base)
    if not isinstance(arch, str) or arch not in set(GGUF_ARCHITECTURES.values()):
        raise FormatError(f"{where}: general.architecture {arch!r} is not one loratools maps"
                          f" ({', '.join(sorted(set(GGUF_ARCHITECTURES.values())))})")
    layout = GgufBase(arch, blocks, *(heads or (1, 1)), tied=False)
    by_tensor = {tensor: module for module, tensor in gguf_tensor_names(layout).items()}
    pairs, ignored = _pairs(header, by_tensor)
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or alpha != alpha:
        raise FormatError(f"{where}: adapter.lora.alpha {alpha!r} is not a number")
    modules: dict[str, LoraModule] = {}
    for tensor, module in sorted(pairs.items(), key=lambda item: item[1]):
        lora_a, lora_b = load(f"{tensor}.lora_a").float(), load(f"{tensor}.lora_b").float()
        embedding = tensor.startswith("token_embd")
        a = lora_a.T if embedding else lora_a
        rank = int(lora_b.shape[-1])
        permute = _permute_heads(module, layout) if heads is not None else None
        if permute is not None:
            lora_b = lora_b[torch.argsort(_row_order(lora_b.shape[0], permute))]
        elif heads is None and _permute_heads(module, GgufBase(arch, blocks, 1, 1, False)) and not any_row_order:
            raise FormatError(f"{where}: {tensor} has q/k rows in llama.cpp's order and the file records no head"
                              " counts; pass --base with the base model's folder (config.json)")
        try:
            modules[module] = LoraModule(module, a.contiguous(), lora_b.contiguous(), float(alpha) or rank,
                                         "embedding" if embedding else "linear")
        except FormatError as exc:
            raise FormatError(f"{where}: {tensor}: {exc}") from None
    notes = [f"{len(ignored)} norm tensor(s) ignored, as llama.cpp ignores them: {', '.join(ignored[:3])}"] \
        if ignored else []
    strings = {k: v for k, v in meta.items() if isinstance(v, str) and k.startswith("loratools_")}
    return Adapter(modules, format="gguf", base_model=strings.pop(BASE_MODEL_KEY, None), metadata=strings,
                   notes=notes)


def _block_count(tensors: Iterable[str]) -> int:
    blocks = [int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t))]
    return max(blocks, default=-1) + 1


def _heads(meta: Mapping[str, object], base: GgufBase | None) -> tuple[int, int] | None:
    if base is not None:
        return base.heads, base.kv_heads
    recorded = meta.get(HEADS_KEY)
    if not isinstance(recorded, str):
        return None
    try:
        heads, kv_heads = (int(h) for h in json.loads(recorded))
    except (ValueError, TypeError):
        return None
    return (heads, kv_heads) if heads > 0 and kv_heads > 0 else None


def _pairs(header: GgufHeader, by_tensor: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    pairs: dict[str, str] = {}
    ignored: list[str] = []
    for name in header.tensors:
        stem, dot, suffix = name.rpartition(".")
        if name.endswith("_norm.weight"):
            ignored.append(name)
            continue
        if not dot or suffix not in ("lora_a", "lora_b"):
            raise FormatError(f"{header.path}: tensor {name} is not a .lora_a / .lora_b tensor; llama.cpp refuses it")
        partner = f"{stem}.{'lora_b' if suffix == 'lora_a' else 'lora_a'}"
        if partner not in header.tensors:
            raise FormatError(f"{header.path}: {name} has no {partner}; the file is incomplete")
        if stem not in by_tensor:
            raise FormatError(f"{header.path}: {stem} is not a tensor loratools maps to a Hugging Face module")
        pairs[stem] = by_tensor[stem]
    return pairs, ignored
