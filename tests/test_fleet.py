"""Fleet runs of extract: the same bytes as separate runs, the base read once, failures kept to their entry,
SIGKILL then --resume, the Ray executor on a local cluster (also with a worker killed mid-task), hub ids from
the local cache, and fsync before the rename.

Judges: separate `extract` runs (bytes), PEFT (the adapters load and reproduce the fine-tunes' logits), Ray's
own retry (a worker killed by a setup hook, `tests/ray_hooks.py`), the kernel's /proc/self/fd (what was fsynced).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import writer
from loratools.checkpoint import TensorIndex
from loratools.extraction import ExtractSettings, extract
from loratools.fleet import FleetEntry, FleetOptions, entries_from_paths, extract_fleet, read_manifest
from loratools.options import RankPolicy
from tests.helpers import llama_from, logits, peft_logits, run_cli, save_tiny_gpt2, save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
NAMES = ("tuned-a", "tuned-b", "tuned-c")
CHANGED = {  # two fine-tunes change different layers; the third changes every projection and a norm
    "tuned-a": ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"),
    "tuned-b": ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"),
    "tuned-c": ("proj", "model.norm.weight"),
}


def fine_tune(base: Path, folder: Path, changed: tuple[str, ...], seed: int) -> Path:
    """A copy of the base model folder with rank-2 deltas on the `changed` weights (``proj``: every projection)."""
    shutil.copytree(base, folder)
    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, weight in state.items():
        if name in changed or ("proj" in changed and name.endswith("proj.weight")):
            if weight.dim() == 1:
                state[name] = weight + 0.05
                continue
            rows, cols = weight.shape
            state[name] = weight + 0.3 * torch.randn(rows, 2, generator=gen) @ torch.randn(2, cols, generator=gen)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("fleet")
    save_tiny_llama(root / "base")
    tuned = {name: fine_tune(root / "base", root / name, CHANGED[name], seed) for seed, name in enumerate(NAMES)}
    return root / "base", tuned


@pytest.fixture(scope="module")
def separate(fleet, tmp_path_factory) -> Path:
    """Each fine-tune extracted on its own (rank 4, seed 0): the reference bytes."""
    base, tuned = fleet
    out = tmp_path_factory.mktemp("separate")
    for name, path in tuned.items():
        extract(base, path, out / name, policy=RankPolicy("rank", 4))
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_adapters(out: Path, separate: Path, names=NAMES) -> None:
    for name in names:
        assert tree(out / name) == tree(separate / name), name


def test_fleet_writes_the_bytes_of_separate_runs_and_reads_the_base_once(fleet, separate, tmp_path, monkeypatch):
    base, tuned = fleet
    reads: dict[tuple[str, str], int] = {}
    get = TensorIndex.get

    def counted(self, name):
        reads[(str(self.path), name)] = reads.get((str(self.path), name), 0) + 1
        return get(self, name)

    monkeypatch.setattr(TensorIndex, "get", counted)
    out = tmp_path / "out"
    result = run_cli("extract", base, *tuned.values(), "-o", out, "--rank", "4", "--json")
    assert_same_adapters(out, separate)
    base_reads = {name: count for (path, name), count in reads.items() if path == str(base)}
    assert base_reads and max(base_reads.values()) == 1
    report = json.loads(result.stdout)
    assert [e["status"] for e in report["entries"]] == ["written"] * 3
    assert report["summary"]["bytes_read"] == report["summary"]["io_floor_bytes"]
    assert json.loads((out / "fleet-report.json").read_text())["summary"]["written"] == 3
    layers = {e["name"]: {layer["name"] for layer in e["layers"]} for e in report["entries"]}
    assert layers["tuned-a"] == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert layers["tuned-b"] == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}


def test_manifest_policy_override_equals_a_separate_run_with_that_policy(fleet, separate, tmp_path):
    base, tuned = fleet
    manifest = tmp_path / "fleet.json"
    manifest.write_text(json.dumps({"a2": {"path": str(tuned["tuned-a"]), "rank": 2}, "tuned-b": str(tuned["tuned-b"])}))
    out = tmp_path / "out"
    run_cli("extract", base, "--manifest", manifest, "-o", out, "--rank", "4", "-q")
    extract(base, tuned["tuned-a"], tmp_path / "a2", policy=RankPolicy("rank", 2))
    assert tree(out / "a2") == tree(tmp_path / "a2")
    assert tree(out / "tuned-b") == tree(separate / "tuned-b")
    assert json.loads((out / "a2" / "adapter_config.json").read_text())["r"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"path": "p", "rank": 2, "energy": 0.9}}))
    with pytest.raises(Exception, match="choose one rank policy"):
        read_manifest(bad)


def test_a_bad_fine_tune_fails_alone_and_the_others_load_in_peft(fleet, separate, tmp_path):
    base, tuned = fleet
    other = tmp_path / "gpt2"
    save_tiny_gpt2(other)
    truncated = shutil.copytree(tuned["tuned-a"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    out = tmp_path / "out"
    result = run_cli("extract", base, tuned["tuned-a"], other, truncated, tuned["tuned-b"], "-o", out, "--rank", "4",
                     expect=1)
    failures = [line for line in result.output.splitlines() if " failed: " in line]
    assert len(failures) == 2 and "no tensor names in common" in failures[0] and "truncated" in failures[1]
    report = json.loads((out / "fleet-report.json").read_text())
    assert {e["name"]: e["status"] for e in report["entries"]} == {
        "tuned-a": "written", "gpt2": "failed", "truncated": "failed", "tuned-b": "written"}
    assert not (out / "gpt2").exists() and not (out / "truncated").exists()
    assert_same_adapters(out, separate, ("tuned-a", "tuned-b"))
    for name in ("tuned-a", "tuned-b"):  # PEFT loads each adapter and reproduces its fine-tune
        expected = logits(llama_from(tuned[name]))
        got = peft_logits(base, out / name)
        assert float((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.slow
def test_sigkill_then_resume_finishes_and_keeps_finished_adapters(fleet, separate, tmp_path):
    base, tuned = fleet
    out = tmp_path / "out"
    args = [sys.executable, "-m", "loratools", "extract", base, *tuned.values(), "-o", out, "--rank", "4",
            "--batch", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "tuned-a").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(random.Random(20).uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {name: (tree(out / name), (out / name / "adapter_model.safetensors").stat().st_mtime_ns)
                for name in NAMES if (out / name).exists()}
    assert "tuned-a" in finished
    run_cli("extract", base, *tuned.values(), "-o", out, "--rank", "4", "-q", expect=2)  # no --resume: refused
    result = run_cli("extract", base, *tuned.values(), "-o", out, "--rank", "4", "--resume", "--json")
    assert_same_adapters(out, separate)
    for name, (files, mtime) in finished.items():
        assert tree(out / name) == files and (out / name / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    statuses = {e["name"]: e["status"] for e in json.loads(result.stdout)["entries"]}
    assert statuses == {name: "reused" if name in finished else "written" for name in NAMES}
    assert not [p for p in out.iterdir() if writer.TMP_MARK in p.name]
    # an adapter made with other settings is not reused
    other = run_cli("extract", base, *tuned.values(), "-o", out, "--rank", "8", "--resume", expect=1)
    assert "made from other parameters" in other.output


def test_hub_ids_resolve_from_the_local_cache_offline(fleet, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    base, tuned = fleet
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tuned-a"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tuned["tuned-a"], repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    extract(base, "org/tuned-a", tmp_path / "single", policy=RankPolicy("rank", 4))
    entries = [*entries_from_paths(["org/tuned-a@main"]), FleetEntry("missing", "org/missing")]
    result = extract_fleet(base, entries, tmp_path / "out", settings=ExtractSettings(policy=RankPolicy("rank", 4)))
    assert [e.status for e in result.entries] == ["written", "failed"]
    assert "not in the Hugging Face cache" in result.entries[1].reason and "\n" not in result.entries[1].reason
    written = load_file(str(tmp_path / "out" / "tuned-a" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert written.keys() == single.keys() and all(torch.equal(written[k], single[k]) for k in single)


def test_fleet_only_options_need_a_fleet(fleet, tmp_path):
    base, tuned = fleet
    result = run_cli("extract", base, tuned["tuned-a"], "-o", tmp_path / "x", "--resume", expect=2)
    assert "apply to fleet runs" in result.output


def test_outputs_are_fsynced_before_the_rename(fleet, tmp_path, monkeypatch):
    """The writer fsyncs every file and the temporary folder before renaming it into place, then the folders
    that hold the new names (checked with a double on os.fsync that asks the kernel which file each fd is)."""
    base, tuned = fleet
    events: list[tuple[str, str]] = []
    fsync, commit = os.fsync, writer._commit

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_commit(tmp, out, *args):
        events.append(("rename", str(out)))
        commit(tmp, out, *args)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(writer, "_commit", recorded_commit)
    out = tmp_path / "new" / "folder" / "adapter"
    extract(base, tuned["tuned-a"], out, policy=RankPolicy("rank", 4))
    rename = events.index(("rename", str(out)))
    before = [path for kind, path in events[:rename] if kind == "fsync"]
    tmp = str(out.with_name(f".adapter{writer.TMP_MARK}{os.getpid()}"))
    assert {f"{tmp}/adapter_model.safetensors", f"{tmp}/adapter_config.json", tmp} <= set(before)
    after = [path for kind, path in events[rename + 1:] if kind == "fsync"]
    assert after[:3] == [str(out.parent), str(out.parent.parent), str(tmp_path)]


# ---- Ray ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the session (2 CPUs), whose workers can be told to die (`tests/ray_hooks.py`)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    kill_dir = tmp_path_factory.mktemp("ray-kill")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error",
             runtime_env={"worker_process_setup_hook": "tests.ray_hooks.arm",
                          "env_vars": {"LORATOOLS_TEST_RAY_KILL_DIR": str(kill_dir), "PYTHONPATH": str(REPO)}})
    yield kill_dir
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_gives_the_same_bytes(fleet, separate, ray_cluster, tmp_path):
    base, tuned = fleet
    options = FleetOptions(executor="ray")
    result = extract_fleet(base, entries_from_paths([str(p) for p in tuned.values()]), tmp_path / "out",
                           settings=ExtractSettings(policy=RankPolicy("rank", 4)), options=options)
    assert [e.status for e in result.entries] == ["written"] * 3
    assert result.summary.worker_peak_rss_bytes > 0
    assert_same_adapters(tmp_path / "out", separate)


@pytest.mark.slow
def test_ray_worker_killed_mid_task_still_gives_the_same_bytes(fleet, separate, ray_cluster, tmp_path):
    base, tuned = fleet
    (ray_cluster / "armed").touch()
    out = tmp_path / "out"
    result = run_cli("extract", base, *tuned.values(), "-o", out, "--rank", "4", "--executor", "ray", "--json")
    assert (ray_cluster / "fired").exists() and not (ray_cluster / "armed").exists()  # a worker did die
    assert [e["status"] for e in json.loads(result.stdout)["entries"]] == ["written"] * 3
    assert_same_adapters(out, separate)
