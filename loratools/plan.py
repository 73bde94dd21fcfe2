"""Which tensors of a base/tuned checkpoint pair become which extraction ops — from names and shapes only.

`plan_extract` pairs the tensors two checkpoints share and sorts them into `LayerPair` (extract a LoRA) and
`WholeTensor` (compare; save whole when asked). It reads headers and ``config.json``, never tensor data, so
``--dry-run`` costs nothing. Include / exclude / save-full patterns are shell globs (``*``, ``?``, ``[..]``)
matched against the module name and the tensor name; a pattern without wildcards matches as a substring.

Decision — layer kinds (`layer_kinds`):

- When transformers is importable and ``config.json`` names an architecture whose modeling code uses
  transformers' ``Conv1D`` (the source file is scanned as text, without importing it), the model is built on
  the meta device (no memory, no weights) and each tensor's module type decides: ``nn.Linear`` → linear,
  ``nn.Embedding`` → embedding, transformers ``Conv1D`` (GPT-2 family, stored (in, out)) → conv1d,
  ``nn.Conv2d`` (groups = 1) → conv2d. Any other parameter (norms, biases, grouped or 1-D convolutions,
  raw parameters) cannot be a PEFT LoRA target and is a whole tensor. Names are matched with and without the
  model's ``base_model_prefix``.
  Building the model costs the import of transformers' modeling code (about 6 s on a 2-core machine), so it
  is done only where it is needed: to tell a square Conv1D (stored (in, out)) from a Linear. Architectures
  whose modeling code has no Conv1D (Llama, Mistral, Qwen, Gemma, …) and architectures transformers does not
  ship (remote code) are built too only in the second case.
- Otherwise (single files such as diffusion checkpoints, architectures without Conv1D, no transformers, or
  names the model does not have) names and shapes decide: a 4-D ``*.weight`` → conv2d; a 2-D ``*.weight`` whose
  leaf name is an embedding name (``embed_tokens``, ``wte``, ``*_embedding`` …) → embedding; a 2-D weight
  whose bias has length shape[1] ≠ shape[0] is stored (in, out) → conv1d, and so is any weight sharing a leaf
  name with such a layer unless its own bias says otherwise (GPT-2's square attention ``c_proj``); any
  other 2-D weight → linear; everything else is a whole tensor.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loratools.adapter import TRANSPOSED_KINDS
from loratools.checkpoint import TensorIndex
from loratools.errors import CheckpointError, LoratoolsError, ShapeError
from loratools.names import matches, natural_key, short_list
from loratools.options import Selection
from loratools.silence import quiet_transformers

EMBEDDING_LEAF = re.compile(r"(^|_)(embed|embed_in|embed_tokens|embed_positions|embedding|embeddings|wte|wpe|shared)$")
# architecture class-name suffix -> PEFT task_type (first match wins)
TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)

Kinds = dict[str, tuple[str | None, str]]  # tensor name -> (LoRA kind or None for a whole tensor, why)


@dataclass(frozen=True)
class Mismatch:
    """A tensor name both checkpoints hold, with different shapes."""

    name: str
    base_shape: tuple[int, ...]
    tuned_shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "base": list(self.base_shape), "tuned": list(self.tuned_shape)}


@dataclass
class Pairing:
    """How the tensor names of a base / tuned pair line up, reported by every BASE TUNED command.

    Attributes:
        only_in_base, only_in_tuned: tensor names present in one checkpoint only.
        mismatched: names whose shapes differ (left out with ``skip_mismatched``, else an error).
    """

    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One warning per non-empty list, for the user to read."""
        notes = []
        if self.only_in_tuned:
            notes.append(f"{len(self.only_in_tuned)} tensor(s) only in the tuned checkpoint are not in the adapter:"
                         f" {short_list(self.only_in_tuned)}")
        if self.only_in_base:
            notes.append(f"{len(self.only_in_base)} tensor(s) only in the base checkpoint: {short_list(self.only_in_base)}")
        if self.mismatched:
            notes.append(f"{len(self.mismatched)} tensor(s) with different shapes skipped:"
                         f" {short_list([m.name for m in self.mismatched])}")
        return notes

    def to_json(self) -> dict:
        return {
            "only_in_base": self.only_in_base,
            "only_in_tuned": self.only_in_tuned,
            "mismatched": [m.to_json() for m in self.mismatched],
        }


@dataclass(frozen=True)
class LayerPair:
    """A weight present in both checkpoints with the same shape, to extract as a LoRA module.

    Attributes:
        module: the module path, e.g. ``model.layers.0.self_attn.q_proj``.
        tensor: the weight's tensor name (``<module>.weight``).
        shape: the base layout: (out, in), (out, in, kh, kw), (num, dim) or (in, out) for conv1d.
        kind: linear, conv2d, embedding or conv1d (see `loratools.adapter`).
        why: how the kind was decided, for ``--dry-run``.
    """

    module: str
    tensor: str
    shape: tuple[int, ...]
    kind: str
    why: str

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the LoRA matrix: (out, in), (out, in·kh·kw), (dim, num) or (out, in)."""
        if self.kind in TRANSPOSED_KINDS:
            return self.shape[1], self.shape[0]
        return self.shape[0], int(torch.Size(self.shape[1:]).numel())


@dataclass(frozen=True)
class WholeTensor:
    """A shared tensor that is not extracted as a LoRA: compared, reported when changed, saved whole if `save`.
    `left_out`: a LoRA layer the output format cannot hold (kohya, diffusers: embeddings, Conv1D)."""

    tensor: str
    shape: tuple[int, ...]
    save: bool
    why: str
    left_out: bool = False

    @property
    def module(self) -> str:
        return self.tensor.rsplit(".", 1)[0]


@dataclass
class Plan:
    """Everything `plan_extract` decided, from headers only.

    Attributes:
        pairs: LoRA extractions, in natural name order (``layers.2`` before ``layers.10``).
        whole: tensors compared whole (norms, biases, embeddings with ``--embeddings full|skip``, --save-full).
        pairing: names in one checkpoint only, and shape mismatches (left out with ``skip_mismatched``).
        excluded: tensor names left out by include / exclude patterns.
        kind_source: how layer kinds were decided (transformers model or heuristics, and why).
        architecture: ``config.json`` ``architectures[0]``, when known.
        task_type: the PEFT task type for that architecture, when known.
    """

    pairs: list[LayerPair] = field(default_factory=list)
    whole: list[WholeTensor] = field(default_factory=list)
    pairing: Pairing = field(default_factory=Pairing)
    excluded: list[str] = field(default_factory=list)
    kind_source: str = ""
    architecture: str | None = None
    task_type: str | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict (lists of plain dicts; shapes as lists)."""
        return {
            "pairs": [dict(asdict(p), shape=list(p.shape)) for p in self.pairs],
            "whole": [dict(asdict(w), shape=list(w.shape)) for w in self.whole],
            **self.pairing.to_json(),
            "excluded": self.excluded,
            "kind_source": self.kind_source,
            "architecture": self.architecture,
            "task_type": self.task_type,
        }


def task_type(config: dict | None) -> str | None:
    """PEFT ``task_type`` for a ``config.json`` (e.g. ``LlamaForCausalLM`` -> ``CAUSAL_LM``), None when unknown."""
    config = config or {}
    architectures = config.get("architectures") or []
    if not architectures:
        return None
    arch = architectures[0]
    if arch.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if config.get("is_encoder_decoder") else "CAUSAL_LM"
    return next((task for suffix, task in TASK_TYPES if arch.endswith(suffix)), None)


def layer_kinds(shapes: dict[str, tuple[int, ...]], config: dict | None) -> tuple[Kinds, str]:
    """The LoRA kind of every tensor (None: not a LoRA target) and how it was decided.

    Args:
        shapes: tensor name -> shape, for every tensor of the checkpoint (biases inform the heuristics).
        config: ``config.json`` contents, or None.
    Returns:
        ({tensor: (kind or None, why)}, a sentence naming the source: the transformers class or the
        heuristics and why the model was not used). See the module docstring for the rules.
    """
    module_types, prefix, source = _module_types_from_transformers(config)
    guessed = _heuristic_kinds(shapes)
    if module_types is None:
        return guessed, f"name/shape heuristics ({source})"
    kinds: Kinds = {}
    for name in shapes:
        aliases = (name, f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else name)
        found = next((module_types[a] for a in aliases if a in module_types), None)
        kinds[name] = found if found is not None else guessed[name]
    return kinds, source


def _module_types_from_transformers(config: dict | None) -> tuple[Kinds | None, str, str]:
    """({parameter name: (kind, why)}, base_model_prefix, source) from the model built on the meta device,
    or (None, "", why not)."""
    config = config or {}
    architectures = config.get("architectures") or []
    if not architectures:
        return None, "", "no config.json naming an architecture"
    if _modeling_source_lacks_conv1d(config.get("model_type")):
        return None, "", f"{config.get('model_type')} modeling code has no Conv1D layers"
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, "", "transformers is not installed"
    arch = architectures[0]
    try:
        with quiet_transformers():
            cls = getattr(transformers, arch, None)
            if cls is None or not hasattr(cls, "config_class"):
                return None, "", f"transformers has no model class {arch}"
            with torch.device("meta"):
                model = cls(cls.config_class.from_dict(dict(config)))
    except Exception as exc:  # arbitrary model code: any failure means "decide by names and shapes"
        return None, "", f"building {arch} on the meta device failed: {type(exc).__name__}: {exc}"
    types: Kinds = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, Conv1D):
            kind = "conv1d"
        elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            kind = "conv2d"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        else:
            kind = None
        for param, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param}" if module_name else param
            lora = kind if param == "weight" else None
            types[name] = (lora, f"{type(module).__name__}.{param} in {arch}")
    return types, cls.base_model_prefix, f"transformers: {arch} built on the meta device"


def _modeling_source_lacks_conv1d(model_type: str | None) -> bool:
    """True when transformers ships modeling code for `model_type` and its text never mentions Conv1D."""
    try:
        spec = importlib.util.find_spec("transformers") if model_type else None
    except ValueError:  # transformers is in sys.modules as None: treated as not installed
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(spec.submodule_search_locations[0]) / "models" / (model_type or "").replace("-", "_")
    sources = list(folder.glob("modeling_*.py"))
    return bool(sources) and not any("Conv1D" in source.read_text(errors="replace") for source in sources)


def _heuristic_kinds(shapes: dict[str, tuple[int, ...]]) -> Kinds:
    kinds: Kinds = {}
    transposed_leaves: set[str] = set()
    for name, shape in shapes.items():
        module, _, param = name.rpartition(".")
        bias = shapes.get(f"{module}.bias")
        if param == "weight" and len(shape) == 2 and bias == (shape[1],) and shape[0] != shape[1]:
            transposed_leaves.add(module.rpartition(".")[2])
    for name, shape in shapes.items():
        module, _, param = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        bias = shapes.get(f"{module}.bias")
        if param != "weight" or len(shape) not in (2, 4):
            kinds[name] = (None, f"{len(shape)}-D {param or name}, not a layer weight")
        elif len(shape) == 4:
            kinds[name] = ("conv2d", "4-D weight")
        elif EMBEDDING_LEAF.search(leaf):
            kinds[name] = ("embedding", f"2-D weight named like an embedding ({leaf})")
        elif bias == (shape[1],) and shape[0] != shape[1]:
            kinds[name] = ("conv1d", f"bias has length {shape[1]} = shape[1]: stored (in, out) as HF Conv1D")
        elif leaf in transposed_leaves and not (bias == (shape[0],) and shape[0] != shape[1]):
            kinds[name] = ("conv1d", f"same leaf name ({leaf}) as layers stored (in, out)")
        else:
            kinds[name] = ("linear", "2-D weight")
    return kinds


def plan_extract(base: TensorIndex, tuned: TensorIndex, *, selection: Selection = Selection()) -> Plan:
    """Pair the tensors of `base` and `tuned` into extraction ops, from headers and config.json only.

    Args:
        base, tuned: open checkpoints (`open_checkpoint`).
        selection: which tensors, and what to do with embeddings and --save-full patterns (see `Selection`).
    Returns:
        A Plan; see its attributes.
    Raises:
        ShapeError for a shape mismatch (unless skipped); LoratoolsError when the checkpoints share no names or
        a pattern selects nothing.

    Example:
        >>> with open_checkpoint("base") as b, open_checkpoint("tuned") as t:
        ...     plan = plan_extract(b, t, selection=Selection(exclude=("lm_head",)))
        >>> plan.pairs[0].module, plan.pairs[0].kind, plan.pairs[0].matrix_shape
        ('model.embed_tokens', 'embedding', (64, 256))
    """
    config = base.config or tuned.config
    common = sorted((name for name in base.tensors if name in tuned.tensors), key=natural_key)
    if not common:
        raise CheckpointError(
            f"{base.path} and {tuned.path} have no tensor names in common; are they the same architecture?"
        )
    kinds, source = layer_kinds({n: i.shape for n, i in base.tensors.items()}, config)
    plan = Plan(
        pairing=Pairing(
            only_in_base=[n for n in base.tensors if n not in tuned.tensors],
            only_in_tuned=[n for n in tuned.tensors if n not in base.tensors],
        ),
        kind_source=source,
        architecture=((config or {}).get("architectures") or [None])[0],
        task_type=task_type(config),
    )
    for name in common:
        if (selection.include and not matches(name, selection.include)) or matches(name, selection.exclude):
            plan.excluded.append(name)
            continue
        b, t = base.tensors[name], tuned.tensors[name]
        if b.shape != t.shape:
            plan.pairing.mismatched.append(Mismatch(name, b.shape, t.shape))
            continue
        kind, why = kinds[name]
        pattern = matches(name, selection.save_full)
        if not (b.dtype.is_floating_point and t.dtype.is_floating_point):
            plan.whole.append(WholeTensor(name, b.shape, pattern is not None, f"{b.dtype} tensor"))
        elif pattern is not None:
            plan.whole.append(WholeTensor(name, b.shape, True, f"matches --save-full {pattern!r}"))
        elif kind is None:
            plan.whole.append(WholeTensor(name, b.shape, False, why))
        elif kind == "embedding" and selection.embeddings != "lora":
            mode = selection.embeddings
            plan.whole.append(WholeTensor(name, b.shape, mode == "full", f"embedding, --embeddings {mode}"))
        else:
            plan.pairs.append(LayerPair(name.rpartition(".")[0], name, b.shape, kind, why))
    _check(plan, base, tuned, selection)
    return plan


def _check(plan: Plan, base: TensorIndex, tuned: TensorIndex, selection: Selection) -> None:
    mismatched = plan.pairing.mismatched
    if mismatched and not selection.skip_mismatched:
        first = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ShapeError(
            f"{first.name}: shape {first.base_shape} in {base.path} but {first.tuned_shape} in {tuned.path}{more}"
            " (a resized vocabulary?); pass --skip-mismatched to leave such tensors out, or --exclude them"
        )
    if selection.include and not plan.pairs and not plan.whole:
        raise LoratoolsError(
            f"--include {' '.join(selection.include)} matched no tensor shared by both checkpoints"
        )
