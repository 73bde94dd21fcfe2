"""onnxruntime-genai's ``genai_config.json`` from a model folder's ``config.json`` and ``generation_config.json``.

Pure: dicts in, dicts out (no torch, no onnxruntime_genai), so the mapping is testable on its own and every
value written can be traced to the model's own files.

Decisions:
- ``model.type`` comes from MODEL_TYPES, the architectures whose onnxruntime-genai type is on the runtime's
  fixed list of language models (0.18: ``ModelType::IsLLM``) and that `export_onnx` traces as a plain decoder.
  An architecture not in the table is refused (one line) rather than written as the generic ``decoder``: the
  runtime special-cases some types, and a wrong guess would pass silently where a refusal is explicit.
- Token ids follow transformers' ``generate``: generation_config.json first, then config.json; several eos ids
  stay a list; the pad id falls back to the first eos id (as onnxruntime-genai's own builder does).
- ``search``: the sampling defaults the generation config sets (transformers' defaults for the rest: greedy
  unless it says ``do_sample``); ``max_length`` is the context length; ``past_present_share_buffer`` is false
  because our graph concatenates past and new keys (``present`` grows) instead of writing into a preallocated
  buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

from loratools.errors import CheckpointError, ExportError

GENAI_TESTED = "0.18"
MODEL_TYPES: dict[str, str] = {  # Hugging Face architecture → onnxruntime-genai model.type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "GPT2LMHeadModel": "decoder",  # not "gpt2": that type expects a combined past_%d tensor, ours are key/value
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "OlmoForCausalLM": "olmo",
    "SmolLM3ForCausalLM": "smollm3",
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' causal LM heads (as export.model tells them)
SIZE_KEYS: dict[str, tuple[str, ...]] = {  # genai field → config.json spellings, first found wins
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab_size": ("vocab_size",),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
}
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}  # transformers'
DECODER_SIZES = ("head_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST, PRESENT = ("past_key_values.%d.key", "past_key_values.%d.value"), ("present.%d.key", "present.%d.value")


def model_type(config: dict, *, label: str) -> str:
    """The onnxruntime-genai ``model.type`` of a config.json's architecture; ExportError when there is none."""
    architectures = [str(a) for a in config.get("architectures") or []]
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise ExportError(f"{label}: {', '.join(architectures)} is not a causal LM; --genai bundles text generators"
                          " (…ForCausalLM); export encoders with export-onnx without --genai")
    for architecture in architectures:
        if architecture in MODEL_TYPES:
            return MODEL_TYPES[architecture]
    shown = ", ".join(architectures) or f"model_type {config.get('model_type', '?')!r} without architectures"
    raise ExportError(
        f"{label}: {shown} has no onnxruntime-genai model type (known: {', '.join(sorted(MODEL_TYPES))});"
        " export a plain graph with export-onnx --with-past instead of --genai"
    )


def _integer(config: dict, genai_key: str, *, label: str) -> int:
    for key in SIZE_KEYS[genai_key]:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{label}: {key} is {value!r}; expected a positive integer")
        return value
    raise CheckpointError(f"{label}: no {' / '.join(SIZE_KEYS[genai_key])}; onnxruntime-genai needs the {genai_key}")


def model_sizes(config: dict, *, label: str) -> dict[str, int]:
    """The sizes onnxruntime-genai needs (DECODER_SIZES, vocab_size, context_length) from a config.json;
    CheckpointError naming the key that is missing or not a positive integer."""
    sizes = {key: _integer(config, key, label=label) for key in SIZE_KEYS}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    if head_size is None:
        raise CheckpointError(f"{label}: hidden_size {hidden} is not a multiple of {heads} heads and no head_dim"
                              " is given")
    for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{label}: {key} is {value!r}; expected a positive integer")
    return {**sizes, "head_size": head_size, "num_key_value_heads": kv_heads}


def token_ids(config: dict, generation: dict) -> dict[str, int | list[int]]:
    """bos / eos / pad ids as transformers' ``generate`` reads them (generation config first); absent ids are
    left out, several eos ids stay a list (duplicates dropped)."""
    found: dict[str, int | list[int]] = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation.get(name, config.get(name))
        if isinstance(value, list):
            ids = list(dict.fromkeys(int(v) for v in value))
            if ids:
                found[name] = ids[0] if len(ids) == 1 else ids
        elif isinstance(value, int) and not isinstance(value, bool):
            found[name] = value
    if "pad_token_id" not in found and "eos_token_id" in found:
        eos = found["eos_token_id"]
        found["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return found


def eos_ids(ids: dict[str, int | list[int]]) -> list[int]:
    """The eos ids of `token_ids` as a list (empty when the model has none)."""
    eos = ids.get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def search_defaults(generation: dict, *, context_length: int) -> dict:
    """The ``search`` section: greedy unless the generation config samples, its sampling values where it sets
    them (transformers' defaults otherwise), at most `context_length` tokens, no shared past/present buffer."""
    search: dict = {
        "do_sample": bool(generation.get("do_sample", False)),
        "num_beams": int(generation.get("num_beams", 1) or 1),
        "num_return_sequences": 1,
        "min_length": 0,
        "max_length": context_length,
        "past_present_share_buffer": False,
    }
    for key, default in SAMPLING_DEFAULTS.items():
        value = generation.get(key)
        search[key] = type(default)(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else default
    return search


def decoder_io(inputs: Sequence[str], outputs: Sequence[str], *, layers: int, label: str) -> tuple[dict, dict]:
    """The decoder's ``inputs`` / ``outputs`` name maps for a graph with these input and output names.

    Raises:
        ExportError naming the first expected input or output the graph lacks (a graph without the KV cache, or
        with another layer count than config.json).
    """
    have_in, have_out = set(inputs), set(outputs)
    needed_in = ["input_ids", "attention_mask"] + [t % i for i in range(layers) for t in PAST]
    needed_out = ["logits"] + [t % i for i in range(layers) for t in PRESENT]
    missing = [n for n in needed_in if n not in have_in] + [n for n in needed_out if n not in have_out]
    if missing:
        raise ExportError(f"{label}: the graph has no {missing[0]} ({len(missing)} name(s) missing); onnxruntime-genai"
                          " needs the KV-cache interface of export-onnx --with-past")
    extra = [n for n in outputs if n.startswith("present.") and n not in needed_out]
    if extra:
        raise ExportError(f"{label}: the graph has {extra[0]} beyond the {layers} layers of config.json")
    names_in = {name: name for name in DECODER_INPUTS if name in have_in}
    names_in.update(past_key_names=PAST[0], past_value_names=PAST[1])
    names_out = {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]}
    return names_in, names_out


def genai_config(config: dict, generation: dict | None, *, inputs: Sequence[str], outputs: Sequence[str],
                 filename: str = "model.onnx", label: str = "config.json") -> dict:
    """The whole ``genai_config.json`` for a decoder graph.

    Args:
        config: the model's config.json; generation: its generation_config.json (None or {} when absent).
        inputs, outputs: the graph's input and output names (LoRA slot inputs may be among them).
        filename: the graph file, relative to the bundle folder.
        label: the config's path, for error messages.
    Returns:
        {"model": {type, context_length, vocab_size, ids, decoder: {filename, sizes, inputs, outputs}}, "search": …}
    Raises:
        ExportError (architecture without a model type, graph without the KV cache), CheckpointError (a size
        missing or not a positive integer).

    Example:
        >>> genai_config(json.load(open("config.json")), None, inputs=[...], outputs=[...])["model"]["type"]
        'llama'
    """
    generation = generation or {}
    kind = model_type(config, label=label)
    sizes = model_sizes(config, label=label)
    names_in, names_out = decoder_io(inputs, outputs, layers=sizes["num_hidden_layers"], label=label)
    model: dict = {
        "type": kind,
        **token_ids(config, generation),
        "context_length": sizes["context_length"],
        "vocab_size": sizes["vocab_size"],
        "decoder": {
            "filename": filename,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            **{key: sizes[key] for key in DECODER_SIZES},
            "inputs": names_in,
            "outputs": names_out,
        },
    }
    return {"model": model, "search": search_defaults(generation, context_length=sizes["context_length"])}
