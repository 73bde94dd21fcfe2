"""Hugging Face hub ids as checkpoints: ``org/name[@revision]`` resolved to a folder of huggingface_hub's cache.

Offline first, as PEFT and mergekit users expect: the local cache (``HF_HUB_CACHE``) is looked up without any
network access; only a repository missing from it is downloaded (weights and JSON files only), and with no
network (or ``HF_HUB_OFFLINE=1``) that is a one-line error. A path that exists is always a path. The only
module that imports huggingface_hub (installed with transformers; the ``hub`` extra otherwise).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loratools.errors import CheckpointError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
CHECKPOINT_FILES = ["*.safetensors", "*.json", "*.bin"]  # weights, shard indexes, config.json


def hub_id(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo, revision or None) when `spec` is a string naming no local path but shaped like a hub id."""
    if not isinstance(spec, str) or os.path.lexists(spec):
        return None
    match = HUB_ID.fullmatch(spec)
    return (match["repo"], match["revision"]) if match else None


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The local path of a checkpoint: `spec` itself, or the cached snapshot of a hub id.

    Raises:
        CheckpointError when a hub id is neither cached nor downloadable (no network, offline mode, unknown
        repository), or huggingface_hub is missing.
    """
    found = hub_id(spec)
    if found is None:
        return Path(spec)
    repo, revision = found
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(f"{spec}: no such file or folder; to read it as a Hugging Face hub id install"
                              " huggingface_hub (pip install 'loratools[hub]')") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True,
                                                      allow_patterns=CHECKPOINT_FILES))
    except Exception:  # huggingface_hub has many error types for "not in the cache": all mean "try the network"
        pass
    where = f"not a local path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{spec}: {where}, and HF_HUB_OFFLINE is set; download it where there is network"
                              f" (hf download {repo}) or pass a local folder")
    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:  # network errors come as requests, httpx and huggingface_hub types
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{spec}: {where}, and the hub could not be reached ({first}); download it where"
                              f" there is network (hf download {repo}) or pass a local folder") from None
