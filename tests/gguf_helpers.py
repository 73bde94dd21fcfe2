"""GGUF test helpers: tiny Llama / Qwen2 bases that llama.cpp's own converter accepts, llama.cpp's converter
scripts from the llama-cpp-python source distribution, logits from llama.cpp, random PEFT adapters.

llama.cpp is the judge: `llama-cpp-python` (built from source by the dev install) runs the models, and its sdist's
``vendor/llama.cpp/convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` (with the ``conversion`` package and the
vendored ``gguf-py`` they import) are fetched once by ``pip download`` into LLAMA_CPP_CACHE and run in
subprocesses, so their vendored gguf never shadows the one loratools imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

LLAMA_CPP_CACHE = Path(os.environ.get("LORATOOLS_TEST_CACHE", Path.home() / ".cache" / "loratools-tests"))
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
VOCAB = 64
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False}
IDS = [1, 5, 9, 17, 33, 40, 41, 63, 12, 7, 3, 28]


def sentencepiece_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A SentencePiece ``tokenizer.model`` of `vocab` pieces written piece by piece (no training): <unk>, <s>,
    </s>, then plain pieces. llama.cpp's converter reads it (ids below vocab_size, no BPE pre-tokenizer check)."""
    spm = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = vocab
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.add_dummy_prefix = True
    for i in range(vocab):
        piece = proto.pieces.add()
        if i < 3:
            piece.piece, piece.type = ("<unk>", "<s>", "</s>")[i], (2, 3, 3)[i]
        else:
            piece.piece, piece.type = (f"▁t{i}" if i % 2 else f"t{i}"), 1
        piece.score = -float(i)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())


def save_tiny_base(folder: Path, arch: str, seed: int = 0, **overrides: object):
    """Save a random tiny `arch` ("llama": GQA Llama, "qwen2": Qwen2 with q/k/v biases) model with a
    SentencePiece tokenizer to `folder`; returns the model (eval mode)."""
    transformers = pytest.importorskip("transformers")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **overrides})).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    sentencepiece_tokenizer(folder)
    return model


def llama_cpp_scripts() -> Path:
    """The folder holding llama.cpp's converter scripts for the installed llama-cpp-python (downloaded once)."""
    version = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the dev install"
                                  " builds it)").__version__
    folder = LLAMA_CPP_CACHE / f"llama.cpp-{version}"
    if (folder / "convert_lora_to_gguf.py").is_file():
        return folder
    downloads = LLAMA_CPP_CACHE / "sdist"
    spec = f"llama-cpp-python=={version}"
    run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", spec,
                          "-d", str(downloads)], capture_output=True, text=True)
    archive = downloads / f"llama_cpp_python-{version}.tar.gz"
    if run.returncode != 0 or not archive.is_file():
        pytest.skip(f"llama.cpp's converter scripts: pip download {spec} failed: {run.stderr.strip()[-300:]}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(CONVERTER_MEMBERS) and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(staging, members=members, filter="data")
    staging.rename(folder)
    return folder


def run_converter(scripts: Path, script: str, *args: str | Path) -> None:
    """Run one of llama.cpp's converter scripts; fail with its stderr when it fails."""
    result = subprocess.run([sys.executable, str(scripts / script), *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def llama_cpp_logits(model: Path, lora: Path | None = None, ids: list[int] = IDS) -> np.ndarray:
    """Logits (tokens, vocab) of llama.cpp on `ids`, with the GGUF adapter `lora` applied at scale 1."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=64, n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(model, ids: list[int] = IDS) -> np.ndarray:
    """Logits (tokens, vocab) of a transformers model on `ids`."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def peft_adapter(model, folder: Path, seed: int, *, targets: list[str] | None = None, r: int = 4,
                 alpha: float = 8, scale_b: float = 1.0, **kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (B times `scale_b`) on `model`, saved to `folder`; the
    model is left unchanged. kwargs go to LoraConfig (use_rslora, alpha_pattern, rank_pattern …)."""
    peft = pytest.importorskip("peft")
    import copy

    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kwargs)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(scale_b)
    wrapped.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def peft_merged_logits(model, adapter: Path, ids: list[int] = IDS) -> np.ndarray:
    """Logits of `model` (copied) with the PEFT adapter merged by PEFT itself."""
    peft = pytest.importorskip("peft")
    import copy

    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().eval()
    return hf_logits(merged, ids)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖actual − expected‖_F / ‖expected‖_F."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
