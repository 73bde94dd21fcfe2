"""Bounded memory: extract and merge of a checkpoint with many equal layers peak at about the same anonymous
memory as with few (the largest layer bounds it, not the layer count); a header claiming terabytes never
allocates. Each measurement runs in a fresh subprocess sampling ``RssAnon`` of /proc/self/status (file-backed
pages of memory-mapped checkpoints are the page cache's, not the process's)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.checkpoint import open_checkpoint
from loratools.errors import CheckpointError
from tests import bad_inputs

REPO = Path(__file__).resolve().parent.parent
SIDE = 1024  # each layer (SIDE, SIDE) fp32: 4 MiB
MIB = 2**20

WORKER = r"""
import json, sys, threading, time
from pathlib import Path

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon")

import loratools
from loratools.options import RankPolicy

folder, warm = Path(sys.argv[1]), Path(sys.argv[2])
# warm-up on a 1-layer pair of the same layer size: torch's lazily built kernels and buffers are not the model's
loratools.extract(warm / "base", warm / "tuned", warm / "lora", policy=RankPolicy("rank", 2), force=True)
loratools.merge(warm / "base", [warm / "lora"], warm / "merged", force=True)

peak, running = 0, True
def sample():
    global peak
    while running:
        peak = max(peak, rss_anon())
        time.sleep(0.001)

result = {}
for step in ("extract", "merge"):
    start = rss_anon()
    peak = start
    thread = threading.Thread(target=sample, daemon=True)
    running = True
    thread.start()
    if step == "extract":
        loratools.extract(folder / "base", folder / "tuned", folder / "lora", policy=RankPolicy("rank", 2))
    else:
        loratools.merge(folder / "base", [folder / "lora"], folder / "merged")
    running = False
    thread.join()
    result[step] = max(peak, rss_anon()) - start
print(json.dumps(result))
"""


def write_pair(folder: Path, layers: int) -> None:
    gen = torch.Generator().manual_seed(layers)
    for side in ("base", "tuned"):
        (folder / side).mkdir(parents=True)
    base, tuned = {}, {}
    for i in range(layers):
        name = f"model.layers.{i}.mlp.proj.weight"
        base[name] = torch.randn(SIDE, SIDE, generator=gen)
        tuned[name] = base[name] + torch.randn(SIDE, 2, generator=gen) @ torch.randn(2, SIDE, generator=gen)
    save_file(base, str(folder / "base" / "model.safetensors"))
    save_file(tuned, str(folder / "tuned" / "model.safetensors"))


def peak_growth(tmp_path: Path, layers: int) -> dict[str, int]:
    write_pair(tmp_path / f"m{layers}", layers)
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_=str(256 * 1024), MALLOC_ARENA_MAX="2",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / f"m{layers}"), str(tmp_path / "warm")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_largest_layer_not_the_layer_count(tmp_path):
    write_pair(tmp_path / "warm", 1)
    few, many = peak_growth(tmp_path, 4), peak_growth(tmp_path, 32)
    layer = SIDE * SIDE * 4
    for step in ("extract", "merge"):
        # 8x the layers: holding every layer would add 28 layers (112 MiB) per checkpoint read
        assert many[step] < few[step] + 6 * layer, (step, few, many)
        assert many[step] < 12 * layer, (step, few, many)


def test_a_4_terabyte_header_claim_never_allocates(tmp_path):
    (tmp_path / "length").mkdir()
    claims = [bad_inputs.huge_shape(tmp_path), bad_inputs.header_overrun(tmp_path / "length")]  # shape, header
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for bad in claims:
        with pytest.raises(CheckpointError):
            open_checkpoint(bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: < 64 MiB more
