"""`generate`: text from a bundle folder written by `export_genai`, through onnxruntime-genai
(``loratools generate``).

Decisions:
- The bundle's own search defaults (genai_config.json) apply unless the call sets temperature / top_p / top_k
  (which turn sampling on) or asks for greedy; ``seed`` makes sampling reproducible.
- ``max_new_tokens`` counts new tokens; the total is capped at the bundle's context length (and a note says so).
- The text streams through ``on_text`` as each token is decoded; the result holds the whole text, the token ids
  and the timings (prefill: until the first new token; decode: the rest, tokens/s over it).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loratools.errors import CheckpointError, ExportError, LoratoolsError
from loratools.export.kit import result_json

CONFIG, ADAPTERS, ADAPTER_SUFFIX = "genai_config.json", "adapters", ".onnx_adapter"
INSTALL_HINT = "pip install 'loratools[genai]'"
TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class GenerateOptions:
    """How `generate` samples.

    Attributes:
        adapter: the served adapter to activate (``DIR/adapters/NAME.onnx_adapter``), None for the base.
        max_new_tokens: at most this many new tokens.
        chat: wrap the prompt as one user message with the bundle's chat template.
        greedy: force greedy search whatever the bundle's defaults.
        temperature, top_p, top_k: sampling settings (any of them turns sampling on).
        seed: the sampler's random seed (same seed, same text).
    """

    adapter: str | None = None
    max_new_tokens: int = 128
    chat: bool = False
    greedy: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LoratoolsError(f"--max-new-tokens {self.max_new_tokens}: generate at least 1 token")
        sampling = [self.temperature, self.top_p, self.top_k]
        if self.greedy and any(v is not None for v in sampling):
            raise LoratoolsError("--greedy contradicts --temperature / --top-p / --top-k; give one or the other")
        if self.temperature is not None and self.temperature <= 0:
            raise LoratoolsError(f"--temperature {self.temperature}: must be above 0 (use --greedy for argmax)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LoratoolsError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise LoratoolsError(f"--top-k {self.top_k}: must be at least 1")

    def search(self) -> dict:
        """Search options over the bundle's defaults."""
        if self.greedy:
            return {"do_sample": False}
        chosen = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        search: dict = {k: v for k, v in chosen.items() if v is not None}
        if search:
            search["do_sample"] = True
        if self.seed is not None:
            search["random_seed"] = self.seed
        return search


@dataclass
class GenerateResult:
    """What `generate` produced.

    Attributes:
        text: the new text; tokens: its ids; prompt_tokens: how many ids the prompt was.
        finish: "eos" (an end token came) or "length" (max_new_tokens or the context length).
        prefill_s, decode_s: seconds until the first new token, and for the rest;
        tokens_per_s: decoded tokens per second after the first.
    """

    bundle: Path
    adapter: str | None
    prompt: str
    prompt_tokens: int
    text: str
    tokens: list[int]
    finish: str
    prefill_s: float
    decode_s: float
    search: dict
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return round((len(self.tokens) - 1) / self.decode_s, 2) if len(self.tokens) > 1 and self.decode_s else 0.0

    def to_json(self) -> dict:
        return result_json(self, tokens_per_s=self.tokens_per_s)


def _bundle_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG}; not an onnxruntime-genai bundle (make one with"
                              " loratools export-onnx MODEL --genai -o DIR)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None


def served_adapters(folder: str | os.PathLike) -> list[str]:
    """Names of the adapters a bundle serves (``adapters/NAME.onnx_adapter``), sorted."""
    found = Path(folder) / ADAPTERS
    return sorted(p.name.removesuffix(ADAPTER_SUFFIX) for p in found.glob(f"*{ADAPTER_SUFFIX}")) if found.is_dir() else []


def generate(bundle: str | os.PathLike, prompt: str, *, options: GenerateOptions = GenerateOptions(),
             on_text: TextCallback | None = None) -> GenerateResult:
    """Generate text after `prompt` with a bundle folder in onnxruntime-genai.

    Args:
        bundle: a folder from ``export-onnx --genai`` (genai_config.json, model.onnx, tokenizer files).
        prompt: the text (a user message with ``options.chat``).
        options: adapter, length, chat template, sampling (`GenerateOptions`).
        on_text: called with each decoded piece of text as it comes (streaming).
    Returns:
        GenerateResult: text, token ids, timings.
    Raises:
        CheckpointError (not a bundle, no such adapter), ExportError (onnxruntime-genai not installed or failing).

    Example:
        >>> generate("bundles/tiny", "Hello", options=GenerateOptions(max_new_tokens=8)).text
    """
    folder = Path(bundle)
    config = _bundle_config(folder)
    names = served_adapters(folder)
    if options.adapter is not None and options.adapter not in names:
        raise CheckpointError(f"{folder}: no adapter {options.adapter!r} (served: {', '.join(names) or 'none'});"
                              f" the bundle has {ADAPTERS}/NAME{ADAPTER_SUFFIX} files for --serve NAME=PATH")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ExportError(f"loratools generate runs bundles with onnxruntime-genai: {INSTALL_HINT}")
    import loratools.export.genai_runtime as genai

    loaded = genai.GenaiBundle(folder)
    if options.adapter is not None:
        loaded.load_adapter(options.adapter, folder / ADAPTERS / f"{options.adapter}{ADAPTER_SUFFIX}")
    text = loaded.chat_prompt(prompt) if options.chat else prompt
    ids = loaded.encode(text)
    context = int(config.get("model", {}).get("context_length") or len(ids) + options.max_new_tokens)
    notes = []
    if len(ids) >= context:
        raise LoratoolsError(f"the prompt is {len(ids)} tokens; the bundle's context length is {context}")
    max_length = min(len(ids) + options.max_new_tokens, context)
    if max_length < len(ids) + options.max_new_tokens:
        notes.append(f"capped at the context length ({context} tokens): at most {context - len(ids)} new tokens")
    pieces: list[str] = []

    def stream(_token: int, piece: str) -> None:
        pieces.append(piece)
        if on_text:
            on_text(piece)

    search = options.search()
    run = loaded.generate(ids, max_length=max_length, search=search, adapter=options.adapter, on_token=stream)
    return GenerateResult(folder, options.adapter, prompt, len(ids), "".join(pieces), run.tokens, run.finish,
                          run.prefill_s, run.decode_s, search, notes)
