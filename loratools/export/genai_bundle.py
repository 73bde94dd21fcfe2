"""`export_genai`: a folder onnxruntime-genai runs as it is (``loratools export-onnx --genai``).

The folder holds ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` (`genai_config`), the tokenizer
files and, with LoRA slots, ``adapters/NAME.onnx_adapter`` per served adapter. Steps: graph (`export_onnx` with
the KV cache, its onnxruntime check included), adapters (`export_adapter`, then each file checked against the
graph), config, tokenizer, verify (onnxruntime-genai).

Decisions:
- The folder is staged beside DIR and renamed into place once verified (`writer.atomic_output`): it appears
  whole or not at all; an existing DIR needs ``force``.
- Everything that can be refused without weights is refused first (architecture, causal LM, tokenizer, adapter
  names, DIR), so a bad call costs no export.
- Verification (on by default): the bundle is loaded with onnxruntime-genai, the prompt made with the bundle's
  own tokenizer (its chat template applied when it has one), and `verify_tokens` tokens generated greedily; they
  must equal transformers' ``generate(do_sample=False)`` on the merged model (strict for fp32; reported for
  fp16 / int8, where near-ties may flip). With served adapters: each adapter active against the base with it
  merged, none active against the base. Both sides search greedily with the same eos ids whatever the
  bundle's search defaults say. Without onnxruntime-genai installed, the onnxruntime checks of the graph (and
  of each adapter) run and a note says how to install the generation check.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.algebra import adapter_weights
from loratools.checkpoint import read_model_config
from loratools.errors import CheckpointError, ExportError, LoratoolsError
from loratools.export.adapter_export import AdapterExportResult, export_adapter
from loratools.export.genai_config import eos_ids, genai_config, model_sizes, model_type
from loratools.export.kit import Steps, VerifyOptions, require_extras, result_json
from loratools.export.model import load_merged_model
from loratools.export.onnx_export import ExportOptions, ExportResult, export_onnx
from loratools.export.slots import A_SUFFIX, B_SUFFIX, METADATA_KEY
from loratools.hf_model import read_config
from loratools.progress import Progress
from loratools.writer import atomic_output, check_output

GRAPH, CONFIG, ADAPTERS = "model.onnx", "genai_config.json", "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")  # onnxruntime-genai reads one of these
DEFAULT_PROMPT = "Tell me about LoRA adapters."
DEFAULT_TOKENS = 16
NO_TOKENIZER_PROMPT = (3, 5, 7, 11, 13)  # ids verified with when the bundle has no tokenizer
INSTALL_HINT = "pip install 'loratools[genai]'"
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter served by name from a slotted bundle: ``DIR/adapters/<name>.onnx_adapter``."""

    name: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> ServedAdapter:
        """``NAME=PATH`` or ``PATH`` (named after the file or folder, without its extension)."""
        name, sep, path = spec.partition("=")
        if not sep or not NAME.match(name):
            name, path = Path(spec.rstrip("/")).stem, spec
        return cls(name, path)


@dataclass(frozen=True)
class BundleOptions:
    """What goes into the bundle besides the graph.

    Attributes:
        tokenizer: a folder with the tokenizer files; None: the model folder's.
        no_tokenizer: write the bundle without a tokenizer (callers then feed token ids).
        serve: adapters written as ``adapters/NAME.onnx_adapter`` (needs LoRA slots in the graph).
        verify_tokens: how many tokens the onnxruntime-genai check generates.
        prompt: the check's prompt text (as one user message when there is a chat template).
    """

    tokenizer: str | None = None
    no_tokenizer: bool = False
    serve: tuple[ServedAdapter, ...] = ()
    verify_tokens: int = DEFAULT_TOKENS
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        names = [a.name for a in self.serve]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise LoratoolsError(f"--serve: adapter name {twice[0]!r} given twice; name each adapter once"
                                 " (--serve NAME=PATH)")
        bad = [n for n in names if not NAME.match(n)]
        if bad:
            raise LoratoolsError(f"--serve: {bad[0]!r} is not a usable adapter name; use letters, digits, '_', '-', '.'"
                                 " (--serve NAME=PATH)")
        if self.tokenizer and self.no_tokenizer:
            raise LoratoolsError("--tokenizer and --no-tokenizer contradict each other; give one")
        if self.verify_tokens < 1:
            raise LoratoolsError(f"--verify-tokens {self.verify_tokens}: generate at least 1 token")


@dataclass
class GenerationCheck:
    """One greedy generation in onnxruntime-genai against transformers: `adapter` active (None: the base)."""

    adapter: str | None
    genai: list[int]
    transformers: list[int]
    matched: int
    passed: bool

    def to_json(self) -> dict:
        return result_json(self)


@dataclass
class BundleCheck:
    """The onnxruntime-genai check of a bundle.

    Attributes:
        runtime: "onnxruntime-genai <version>"; prompt: the text (None without a tokenizer);
        chat_template: whether the prompt went through the chat template; prompt_tokens: the ids fed;
        tokenizer_agrees: the bundle's tokenizer gave transformers' ids for the prompt (None: not compared);
        runs: one per adapter served, and the base.
    """

    runtime: str
    prompt: str | None
    chat_template: bool
    prompt_tokens: list[int]
    tokenizer_agrees: bool | None
    runs: list[GenerationCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.runs)

    def failure(self) -> str:
        run = next(r for r in self.runs if not r.passed)
        which = f"with adapter {run.adapter!r}" if run.adapter else "without an adapter"
        return (f"onnxruntime-genai generated {run.genai[: run.matched + 1]} {which} where transformers generated"
                f" {run.transformers[: run.matched + 1]} (first {run.matched} tokens equal)")

    def to_json(self) -> dict:
        return result_json(self, passed=self.passed)


@dataclass
class BundleResult:
    """What `export_genai` wrote and how it checked.

    Attributes:
        out: the bundle folder; files: relative path → bytes of every file in it.
        model_type: onnxruntime-genai's ``model.type``; config: the genai_config.json written.
        tokenizer: the tokenizer files copied (empty with ``no_tokenizer``).
        adapters: served name → its `AdapterExportResult` (rank per slot, bytes).
        graph: the `ExportResult` of the graph (interface, onnxruntime check).
        verification: the onnxruntime-genai check (None when skipped or not installed: see `notes`).
        timings: seconds per step.
    """

    out: Path
    model_type: str
    files: dict[str, int]
    config: dict
    tokenizer: list[str]
    adapters: dict[str, AdapterExportResult]
    graph: ExportResult
    verification: BundleCheck | None
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return result_json(self)


def genai_installed() -> bool:
    """Whether onnxruntime-genai can be imported (without importing it)."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def tokenizer_files(model: Path, options: BundleOptions) -> list[Path]:
    """The tokenizer files to copy; CheckpointError naming ``--tokenizer`` when there is no tokenizer model, and
    when it is WordPiece (onnxruntime-genai takes BPE and SentencePiece tokenizers)."""
    if options.no_tokenizer:
        return []
    source = Path(options.tokenizer) if options.tokenizer else model
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(f.name in TOKENIZER_MODELS for f in files):
        where = "--tokenizer folder" if options.tokenizer else "model folder"
        raise CheckpointError(f"{source}: no tokenizer.json (or tokenizer.model) in the {where}; pass --tokenizer"
                              " PATH (a folder with the tokenizer files), or --no-tokenizer to bundle the graph alone")
    if (source / "tokenizer.json").is_file():
        kind = read_model_config(source / "tokenizer.json").get("model", {}).get("type")
        if kind == "WordPiece":
            raise CheckpointError(f"{source / 'tokenizer.json'}: a WordPiece tokenizer; onnxruntime-genai takes BPE and"
                                  " SentencePiece (Unigram) tokenizers only; pass --tokenizer PATH with one of those")
    return files


def check_served_adapters(graph: Path, files: dict[str, Path]) -> None:
    """Every parameter of every adapter file is a LoRA slot input of `graph`, of its dtype, A (in, r) / B (r, out)
    with the graph's static width and one rank r per slot; ExportError naming the first misfit."""
    from loratools.export.slot_runtime import read_adapter, read_slots

    inputs, _ = read_slots(graph, suffixes=(A_SUFFIX, B_SUFFIX), metadata_key=METADATA_KEY)
    slots = {i.name: i for i in inputs}
    for name, path in files.items():
        params = read_adapter(path)
        for key, array in params.items():
            slot = slots.get(key)
            if slot is None:
                raise ExportError(f"{path}: parameter {key} is no LoRA slot input of {graph}; adapter {name!r} was"
                                  " made for another graph")
            if str(array.dtype) != slot.dtype:
                raise ExportError(f"{path}: {key} is {array.dtype} but the graph takes {slot.dtype}")
            static = 0 if key.endswith(A_SUFFIX) else 1
            if array.ndim != 2 or array.shape[static] != slot.shape[static] or isinstance(slot.shape[1 - static], int):
                raise ExportError(f"{path}: {key} has shape {tuple(array.shape)}; the graph takes {slot.shape}")
            partner = key.removesuffix(A_SUFFIX) + B_SUFFIX if static == 0 else key.removesuffix(B_SUFFIX) + A_SUFFIX
            if partner not in params or params[partner].shape[static] != array.shape[1 - static]:
                raise ExportError(f"{path}: {key} has rank {array.shape[1 - static]} but {partner} does not match it")


def _has_chat_template(files: Sequence[Path]) -> bool:
    for f in files:
        if f.name.startswith("chat_template"):
            return True
        if f.name == "tokenizer_config.json" and read_model_config(f).get("chat_template"):
            return True
    return False


def export_genai(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] | None = None,
    options: ExportOptions = ExportOptions(),
    bundle: BundleOptions = BundleOptions(),
    checks: VerifyOptions = VerifyOptions(),
    force: bool = False,
    progress: Progress | None = None,
) -> BundleResult:
    """Export a causal LM folder (adapters merged) as an onnxruntime-genai bundle folder and verify it there.

    Args:
        model: a Hugging Face causal LM folder (config.json, weights, tokenizer files).
        out: the bundle folder to create (``force`` replaces an existing one).
        adapters, weights: merged into the base as in `export_onnx` (W + Σ wᵢ·ΔWᵢ).
        options: the graph (`ExportOptions`; ``with_past`` is implied); ``lora_slots`` for served adapters.
        bundle: tokenizer, served adapters, the check's prompt and length (`BundleOptions`).
        checks: verification on/off, onnxruntime tolerance, keep the folder when a check fails.
        progress: called as (step, steps, name).
    Returns:
        BundleResult: files, genai_config.json, tokenizer files, adapters, both checks.
    Raises:
        ExportError (architecture without an onnxruntime-genai type, not a causal LM, failed check),
        CheckpointError (no tokenizer), OutputError (DIR exists), LoratoolsError (bad options); nothing is written.

    Example:
        >>> export_genai("models/tiny-llama", "bundles/tiny").verification.passed
        True
    """
    model_dir, out = Path(model), Path(out)
    weights = adapter_weights(len(adapters), weights)
    options = dataclasses.replace(options, with_past=True)
    if bundle.serve and not options.lora_slots:
        raise LoratoolsError("--serve needs a graph with LoRA slots: add --lora-slots (e.g. the first adapter's path,"
                             " or q_proj,v_proj)")
    sources = [model, *adapters, *(a.path for a in bundle.serve)] + ([bundle.tokenizer] if bundle.tokenizer else [])
    check_output(out, sources, force)
    config = read_config(model)
    kind = model_type(config, label=str(model_dir / "config.json"))
    model_sizes(config, label=str(model_dir / "config.json"))  # refused now, not after the export
    tokenizer = tokenizer_files(model_dir, bundle)
    for adapter in bundle.serve:
        if not Path(adapter.path).exists():
            raise CheckpointError(f"{adapter.path}: no such adapter (--serve {adapter.name}={adapter.path})")
    require_extras("export-onnx --genai")
    generation_path = model_dir / "generation_config.json"
    generation = read_model_config(generation_path) if generation_path.is_file() else {}
    verify_genai = checks.verify and genai_installed()
    steps = Steps(["graph"] + (["adapters"] if bundle.serve else []) + ["config"]
                  + (["verify"] if verify_genai else []), progress)
    notes: list[str] = []
    strict = options.precision == "fp32"
    served: dict[str, AdapterExportResult] = {}
    check: BundleCheck | None = None
    with atomic_output(out, sources, force, folder=True) as tmp:
        with steps("graph"):
            graph = export_onnx(model, tmp / GRAPH, adapters=adapters, weights=weights, options=options, checks=checks)
        if bundle.serve:
            with steps("adapters"):
                (tmp / ADAPTERS).mkdir()
                files = {a.name: tmp / ADAPTERS / f"{a.name}{ADAPTER_SUFFIX}" for a in bundle.serve}
                for a in bundle.serve:  # without onnxruntime-genai, each adapter gets onnxruntime's check instead
                    served[a.name] = export_adapter(a.path, files[a.name], onnx=tmp / GRAPH, atol=checks.atol,
                                                    verify=model if checks.verify and not verify_genai and not adapters
                                                    else None)
                check_served_adapters(tmp / GRAPH, files)
        with steps("config"):
            written = genai_config(config, generation, inputs=graph.inputs, outputs=graph.outputs, filename=GRAPH,
                                   label=str(model_dir / "config.json"))
            (tmp / CONFIG).write_text(json.dumps(written, indent=2) + "\n")
            for source in tokenizer:
                shutil.copyfile(source, tmp / source.name)
        if verify_genai:
            with steps("verify"):
                check = verify_bundle(tmp, model_dir, adapters=adapters, weights=weights, bundle=bundle,
                                      eos=eos_ids(written["model"]), has_chat=_has_chat_template(tokenizer))
            if not check.passed and strict and not checks.keep_on_fail:
                raise ExportError(f"{out}: verification failed: {check.failure()}; nothing was written"
                                  " (--keep-on-fail keeps the folder)")
        files_written = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    steps.done()
    if checks.verify and not verify_genai:
        notes.append(f"onnxruntime-genai is not installed: the bundle was checked with onnxruntime only;"
                     f" {INSTALL_HINT} adds the generation check")
    if check is not None and check.tokenizer_agrees is False:
        notes.append("the bundle's tokenizer encodes the check's prompt differently from the tokenizers library")
    if check is not None and not check.passed and not strict:
        notes.append(f"{options.precision}: {check.failure()} (near-ties may flip below fp32)")
    placed = {name: dataclasses.replace(a, out=out / ADAPTERS / f"{name}{ADAPTER_SUFFIX}", onnx=out / GRAPH)
              for name, a in served.items()}  # the paths the files have now, not the staging folder's
    result = BundleResult(out, kind, files_written, written, [f.name for f in tokenizer], placed,
                          dataclasses.replace(graph, out=out / GRAPH), check, steps.timings, notes)
    if check is not None and not check.passed and strict:
        raise ExportError(f"{out}: verification failed: {check.failure()}; the folder was kept (--keep-on-fail)")
    return result


def verify_bundle(folder: Path, model: Path, *, adapters: Sequence[str | os.PathLike], weights: Sequence[float],
                  bundle: BundleOptions, eos: list[int], has_chat: bool) -> BundleCheck:
    """Generate greedily in onnxruntime-genai from the bundle in `folder` and with transformers from `model` +
    `adapters` merged (+ each served adapter); see the module docstring."""
    import loratools.export.genai_runtime as genai

    loaded = genai.GenaiBundle(folder, tokenizer=not bundle.no_tokenizer)
    text: str | None = None
    if bundle.no_tokenizer:
        prompt = list(NO_TOKENIZER_PROMPT)
    else:
        text = loaded.chat_prompt(bundle.prompt) if has_chat else bundle.prompt
        prompt = loaded.encode(text)
    agrees = None if bundle.no_tokenizer else _tokenizer_agrees(folder, text or "", prompt)
    check = BundleCheck(f"onnxruntime-genai {genai.VERSION}", text, has_chat, prompt, agrees)
    runs: list[tuple[str | None, list, list]] = [(None, list(adapters), list(weights))]
    for served in bundle.serve:
        loaded.load_adapter(served.name, folder / ADAPTERS / f"{served.name}{ADAPTER_SUFFIX}")
        runs.append((served.name, [*adapters, served.path], [*weights, 1.0]))
    for name, merged, merged_weights in runs:
        ours = loaded.generate(prompt, max_length=len(prompt) + bundle.verify_tokens, adapter=name,
                               search={"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}).tokens
        reference = _transformers_greedy(model, merged, merged_weights, prompt, steps=bundle.verify_tokens, eos=eos)
        matched = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b),
                       min(len(ours), len(reference)))
        check.runs.append(GenerationCheck(name, ours, reference, matched, ours == reference))
    return check


def _transformers_greedy(model: Path, adapters: Sequence[str | os.PathLike], weights: Sequence[float],
                         prompt: list[int], *, steps: int, eos: list[int]) -> list[int]:
    import torch

    from loratools.silence import quiet_transformers

    merged: Any = load_merged_model(model, adapters=adapters, weights=weights).model
    ids = torch.tensor([prompt], dtype=torch.long)
    # a fresh GenerationConfig: greedy, nothing of the model's own (repetition penalty, suppressed tokens …)
    config = type(merged.generation_config)(do_sample=False, num_beams=1, max_new_tokens=steps,
                                            eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    with torch.no_grad(), quiet_transformers():
        out = merged.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out[0, len(prompt):]]


def _tokenizer_agrees(folder: Path, text: str, ids: list[int]) -> bool | None:
    """Whether the Hugging Face tokenizers library encodes `text` with the bundle's tokenizer.json as
    onnxruntime-genai did (None without tokenizer.json or the library)."""
    if not (folder / "tokenizer.json").is_file() or importlib.util.find_spec("tokenizers") is None:
        return None
    from tokenizers import Tokenizer

    return [int(t) for t in Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids] == ids
