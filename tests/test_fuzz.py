"""Fuzzing the readers: hypothesis-made safetensors headers, shard indexes, adapter configs and state dicts fed to
the checkpoint reader, format detection, adapter parsing and `inspect`. The only exceptions that may escape are
loratools' own (LoratoolsError subclasses).

Profiles (tests/conftest.py): derandomized by default, so CI sees the same examples every run;
``pytest --hypothesis-profile=explore tests/test_fuzz.py`` searches with fresh ones.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratools.adapter_files import load_adapter
from loratools.checkpoint import SAFETENSORS_DTYPES, open_checkpoint
from loratools.errors import LoratoolsError
from loratools.formats import detect_format, parse
from loratools.inspection import inspect_adapter
from tests.bad_inputs import tiny_adapter

FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
small_int = st.integers(-3, 40) | st.sampled_from([2**31, 2**40, 2**64])


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="loratools-fuzz-") as folder:
        yield Path(folder)


def only_our_errors(call) -> None:
    with suppress(LoratoolsError):
        call()


def read_everything(path: Path) -> None:
    with open_checkpoint(path) as index:
        for name in index:
            index.get(name)


# ---- safetensors headers ----------------------------------------------------------------------------------------

entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*SAFETENSORS_DTYPES, "Q4", "", "f32"]) | json_value,
        "shape": st.lists(small_int, max_size=3) | json_value,
        "data_offsets": st.lists(small_int, min_size=2, max_size=2) | json_value,
    },
) | json_value
headers = st.dictionaries(st.text(max_size=10), entry, max_size=4) | json_value


@FUZZ
@given(header=headers, data=st.binary(max_size=64), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, 2**40]),
       metadata=st.none() | json_value)
def test_fuzzed_safetensors_headers_only_raise_loratools_errors(header, data, length_delta, metadata):
    if isinstance(header, dict) and metadata is not None:
        header = {**header, "__metadata__": metadata}
    encoded = json.dumps(header).encode()
    with scratch() as folder:
        path = folder / "x.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(encoded) + length_delta)) + encoded + data)
        only_our_errors(lambda: read_everything(path))


@FUZZ
@given(names=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
       shapes=st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=3, max_size=3),
       offsets=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=3, max_size=3),
       data=st.integers(0, 48))
def test_fuzzed_tensor_layouts_only_raise_loratools_errors(names, shapes, offsets, data):
    """Well-formed entries with arbitrary offsets: overlaps, gaps, backwards and overrunning tensors."""
    header = {name: {"dtype": "F32", "shape": shape, "data_offsets": list(span)}
              for name, shape, span in zip(names, shapes, offsets, strict=False)}
    encoded = json.dumps(header).encode()
    with scratch() as folder:
        path = folder / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data))
        only_our_errors(lambda: read_everything(path))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_only_raise_loratools_errors(raw):
    with scratch() as folder:
        path = folder / "x.safetensors"
        path.write_bytes(raw)
        only_our_errors(lambda: read_everything(path))
        only_our_errors(lambda: inspect_adapter(path))


# ---- shard indexes ---------------------------------------------------------------------------------------------

shard_names = st.sampled_from(["model-1.safetensors", "model-2.safetensors", "missing.safetensors",
                               "../model-1.safetensors", "/etc/passwd", "", ".", "sub/model-1.safetensors"])
weight_maps = st.dictionaries(st.sampled_from(["w", "v", "u"]), shard_names | json_value, max_size=3) | json_value


@FUZZ
@given(weight_map=weight_maps, wrap=st.booleans())
def test_fuzzed_shard_indexes_only_raise_loratools_errors(weight_map, wrap):
    with scratch() as folder:
        save_file({"w": torch.ones(2)}, str(folder / "model-1.safetensors"))
        save_file({"v": torch.ones(3)}, str(folder / "model-2.safetensors"))
        index = {"metadata": {}, "weight_map": weight_map} if wrap else weight_map
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        only_our_errors(lambda: read_everything(folder))


# ---- adapter configs and state dicts ----------------------------------------------------------------------------

config_keys = st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                               "fan_in_fan_out", "use_rslora", "modules_to_save", "peft_type", "task_type",
                               "base_model_name_or_path", "use_dora"])
config_values = json_value | st.integers(-2, 4) | st.dictionaries(
    st.sampled_from(["net.fc", "fc", "proj", "(", ".*", "net\\.proj"]), json_value | st.integers(-1, 4), max_size=2)
configs = st.dictionaries(config_keys, config_values, max_size=5) | json_value


@FUZZ
@given(config=configs)
def test_fuzzed_adapter_configs_only_raise_loratools_errors(config):
    with scratch() as folder:
        from loratools.adapter_files import save_adapter

        save_adapter(tiny_adapter(), folder / "lora")
        (folder / "lora" / "adapter_config.json").write_text(json.dumps(config))
        only_our_errors(lambda: load_adapter(folder / "lora"))
        only_our_errors(lambda: inspect_adapter(folder / "lora"))


prefixes = st.sampled_from(["base_model.model.", "lora_unet_", "lora_te1_", "", "diffusion_model."])
stems = st.sampled_from(["net.fc", "net_fc", "a.b", "x"])
suffixes = st.sampled_from([".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha",
                            ".lora_embedding_A", ".lora_embedding_B", ".hada_w1_a", ".weight", ".bias", ".diff",
                            ".lora_magnitude_vector", ".other"])
values = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")])
tensors = st.builds(lambda shape, value: torch.full(shape, value),
                    st.lists(st.integers(0, 3), max_size=4).map(tuple), values)
state_dicts = st.dictionaries(st.builds(lambda p, s, x: p + s + x, prefixes, stems, suffixes), tensors, max_size=6)


@FUZZ
@given(state=state_dicts, fmt=st.sampled_from([None, "peft", "kohya", "diffusers"]),
       config=st.none() | configs, names=st.none() | st.text(max_size=20) | json_value.map(json.dumps))
def test_fuzzed_state_dicts_only_raise_loratools_errors(state, fmt, config, names):
    metadata = {"loratools_module_names": names} if names is not None else {}
    only_our_errors(lambda: detect_format(list(state)))
    only_our_errors(lambda: parse(state, format=fmt, config=config, metadata=metadata))


@settings(FUZZ, max_examples=60)
@given(state=state_dicts)
def test_fuzzed_adapter_files_only_raise_loratools_errors_in_inspect(state):
    with scratch() as folder:
        path = folder / "a.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        only_our_errors(lambda: inspect_adapter(path))
