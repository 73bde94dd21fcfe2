"""The one importer of onnxruntime_genai: load a bundle folder, tokenize (chat template included), load adapters
and generate token by token, greedy or sampled, with one adapter active or none.

Token ids cross as Python ints; text as str. Errors of the runtime become one-line ExportErrors naming the
folder (the runtime raises RuntimeError with its own message; the user needs that message, not a traceback).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime_genai as og

from loratools.errors import ExportError

VERSION = og.__version__
TokenCallback = Callable[[int, str], None]  # (token id, its decoded text) as each token is generated


@dataclass(frozen=True)
class Generation:
    """One generation: the new token ids and timings (prefill: the prompt until the first new token)."""

    tokens: list[int]
    prefill_s: float
    decode_s: float
    finish: str  # "eos" or "length"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class GenaiBundle:
    """A bundle folder loaded in onnxruntime-genai (CPU): the model, its tokenizer (unless `tokenizer` is False)
    and the adapters loaded by name."""

    def __init__(self, folder: str | os.PathLike, *, tokenizer: bool = True):
        self.folder = Path(folder)
        try:
            self.model = og.Model(str(self.folder))
            self.tokenizer = og.Tokenizer(self.model) if tokenizer else None
        except Exception as exc:  # the runtime raises RuntimeError / OrtException; one line is what the user needs
            raise ExportError(f"{self.folder}: onnxruntime-genai {VERSION} cannot load this bundle"
                              f" ({_first_line(exc)})") from None
        self.adapters: og.Adapters | None = None
        self.adapter_names: list[str] = []

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load an ``.onnx_adapter`` file under `name` (then `generate(adapter=name)` activates it)."""
        if self.adapters is None:
            self.adapters = og.Adapters(self.model)
        try:
            self.adapters.load(str(path), name)
        except Exception as exc:
            raise ExportError(f"{path}: onnxruntime-genai cannot load this adapter ({_first_line(exc)})") from None
        self.adapter_names.append(name)

    def _require_tokenizer(self) -> og.Tokenizer:
        if self.tokenizer is None:
            raise ExportError(f"{self.folder}: the bundle was loaded without its tokenizer")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the bundle's tokenizer makes them (special tokens in the text are parsed)."""
        return [int(t) for t in self._require_tokenizer().encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self._require_tokenizer().decode(list(tokens)))

    def chat_prompt(self, text: str) -> str:
        """`text` as one user message rendered by the bundle's chat template, with the generation prompt."""
        messages = json.dumps([{"role": "user", "content": text}])
        try:
            return str(self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True))
        except Exception as exc:
            raise ExportError(f"{self.folder}: onnxruntime-genai cannot apply the chat template"
                              f" ({_first_line(exc)})") from None

    def generate(self, prompt: Sequence[int], *, max_length: int, search: dict | None = None,
                 adapter: str | None = None, on_token: TokenCallback | None = None) -> Generation:
        """Generate after `prompt` until an eos token or `max_length` tokens in all (prompt included).

        Args:
            search: search options over the bundle's defaults, e.g. {"do_sample": False} or
                {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "random_seed": 1}.
            adapter: the name of a loaded adapter to activate, or None for the base graph.
            on_token: called with (token id, decoded text piece) as each token comes.
        """
        if adapter is not None and adapter not in self.adapter_names:
            raise ExportError(f"{self.folder}: no adapter {adapter!r} loaded (have: {', '.join(self.adapter_names)})")
        try:
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=max_length, **(search or {}))
            generator = og.Generator(self.model, params)
            if adapter is not None:
                generator.set_active_adapter(self.adapters, adapter)
            stream = self.tokenizer.create_stream() if self.tokenizer is not None and on_token else None
            start = time.perf_counter()
            generator.append_tokens([int(t) for t in prompt])
            tokens: list[int] = []
            first = start
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                tokens.append(token)
                if len(tokens) == 1:
                    first = time.perf_counter()
                if on_token:
                    on_token(token, stream.decode(token) if stream is not None else "")
            end = time.perf_counter()
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"{self.folder}: onnxruntime-genai failed to generate ({_first_line(exc)})") from None
        finish = "length" if len(prompt) + len(tokens) >= max_length else "eos"
        return Generation(tokens, round(first - start, 6), round(end - first, 6), finish)
