"""Faults while writing: a full disk or a refused write at any step is one line and leaves nothing partial;
SIGINT, SIGTERM and SIGKILL at any point leave the previous output (``--force``) or none, and no temporaries
once the next run starts; two processes writing one output leave one complete output.

Kill tests run the real CLI in subprocesses (`tests.paused_run`), stopped at a named point of the writer.
"""

from __future__ import annotations

import builtins
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratools import writer
from loratools.adapter_files import load_adapter
from loratools.checkpoint import open_checkpoint
from tests.bad_inputs import Inputs, make_inputs, snapshot, temporaries
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("good")).root


def inputs_in(good: Path, folder: Path) -> Inputs:
    shutil.copytree(good, folder)
    return Inputs(folder, folder / "base.safetensors", folder / "tuned.safetensors", folder / "adapter",
                  folder / "adapter2", folder / "out")


# ---- ENOSPC / EACCES at every kind of write ------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullDisk:
    """A file object whose `nth` write raises ENOSPC (what a full disk does mid-file)."""

    def __init__(self, handle, nth: int):
        self.handle, self.nth, self.count = handle, nth, 0

    def write(self, data):
        self.count += 1
        if self.count >= self.nth:
            raise OSError(errno.ENOSPC, "No space left on device", self.handle.name)
        return self.handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fail_at(monkeypatch, where: str) -> None:
    real_write_text = pathlib.Path.write_text
    if where.startswith("tensor write"):
        nth = int(where.rsplit(" ", 1)[1])
        monkeypatch.setattr(writer, "open", lambda path, mode="r": FullDisk(builtins.open(path, mode), nth),  # noqa: SIM115
                            raising=False)
    elif where == "json write":
        def write_text(self, *args, **kwargs):
            if writer.TMP_MARK in str(self):
                enospc()
            return real_write_text(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    elif where == "copy":
        monkeypatch.setattr(shutil, "copy2", enospc)
    elif where == "mkdir":
        def mkdir(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    elif where == "rename":
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(writer, "_rename2", refuse)
        monkeypatch.setattr(os, "replace", refuse)


def merge_folder_base(root: Path) -> Path:
    """A base model folder (weights, config, tokenizer file) so merge also copies files."""
    folder = root / "model"
    folder.mkdir()
    shutil.copy(root / "base.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


FAULTS = {  # command -> the writes it makes
    "extract": ["tensor write 1", "tensor write 3", "json write", "rename"],
    "merge": ["tensor write 2", "tensor write 4", "copy", "mkdir", "rename"],
    "convert": ["tensor write 1", "tensor write 3", "rename"],
    "resize": ["tensor write 3", "json write", "rename"],
}


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "replacing"])
@pytest.mark.parametrize(("command", "where"), [(c, w) for c, ws in FAULTS.items() for w in ws])
def test_write_fault_is_one_line_and_leaves_nothing_partial(tmp_path, good, monkeypatch, command, where, force):
    p = inputs_in(good, tmp_path / "in")
    out = tmp_path / "deep" / "out" if where == "mkdir" else tmp_path / "out"
    args = {
        "extract": ["extract", p.base, p.tuned, "--rank", "2", "--report", tmp_path / "report.json"],
        "merge": ["merge", merge_folder_base(p.root), p.adapter],
        "convert": ["convert", p.adapter, "--format", "peft"],
        "resize": ["resize", p.adapter, "--rank", "1", "--report", tmp_path / "report.json"],
    }[command]
    if force:
        if where == "mkdir":
            pytest.skip("an existing output has its folder")
        out.mkdir()
        (out / "previous.txt").write_text("keep me")
    before = snapshot(tmp_path)
    fail_at(monkeypatch, where)
    done = run_cli(*args, "-o", out, *(["--force"] if force else []), expect=2)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.output
    if where != "json write":  # the report write follows the adapter's: its own path is named
        assert str(out) in done.stderr
    assert ("No space left on device" if where not in ("mkdir", "rename") else "Permission denied") in done.stderr
    monkeypatch.undo()
    after = snapshot(tmp_path)
    if where == "json write":  # the adapter was complete and is kept; the report is not there
        after = {k: v for k, v in after.items() if not (k == "out" or k.startswith("out/"))} | {
            k: v for k, v in before.items() if k == "out" or k.startswith("out/")}
    assert after == before
    assert temporaries(tmp_path) == []


# ---- signals -------------------------------------------------------------------------------------------------


def start(point: str, marker: Path, *args: object) -> subprocess.Popen:
    """`python -m tests.paused_run` (the CLI) stopped at `point`; returns once it is there."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "tests.paused_run", point, str(marker), *map(str, args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never reached {point}: {proc.communicate()}")
        time.sleep(0.01)
    return proc


def convert_args(p, out: Path) -> list[object]:
    return ["convert", p.adapter, "-o", out, "--format", "peft", "-q"]


SIGNAL_CASES = [  # (point, signal, force)
    ("writing", signal.SIGINT, False),
    ("writing", signal.SIGTERM, True),
    ("writing", signal.SIGKILL, False),
    ("committing", signal.SIGINT, True),
    ("committing", signal.SIGTERM, False),
    ("committing", signal.SIGKILL, True),
    ("swapped", signal.SIGKILL, True),
    ("two-step", signal.SIGTERM, True),
    ("two-step", signal.SIGKILL, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "signum", "force"), SIGNAL_CASES,
                         ids=[f"{p}-{s.name}-{'force' if f else 'fresh'}" for p, s, f in SIGNAL_CASES])
def test_signal_leaves_previous_output_or_none(tmp_path, good, point, signum, force):
    p = inputs_in(good, tmp_path / "in")
    out = tmp_path / "out"
    if force:
        run_cli("convert", p.adapter2, "-o", out, "--format", "peft", "-q")
    previous = snapshot(out) if force else None
    expected = tmp_path / "expected"
    run_cli(*convert_args(p, expected))

    proc = start(point, tmp_path / "marker", *convert_args(p, out), *(["--force"] if force else []))
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # handled: unwound like Ctrl-C, one line, temporaries removed
        assert proc.returncode == 128 + signum, stderr
        assert stderr.startswith("error: interrupted") and stderr.count("\n") == 1 and "Traceback" not in stderr
        assert temporaries(tmp_path) == []

    state = snapshot(out) if out.exists() else None
    if point == "swapped":
        assert state == snapshot(expected)  # the swap is the commit: the new output is complete
    elif point == "two-step" and signum == signal.SIGKILL:
        assert state is None  # killed between the two renames: the previous output waits beside it ...
    else:
        assert state == previous
    # ... and the next run that writes there restores or removes what the killed one left
    writer.remove_stale_temporaries(writer.output_path(out))
    assert temporaries(tmp_path) == []
    assert (snapshot(out) if out.exists() else None) == (snapshot(expected) if point == "swapped" else previous)
    run_cli(*convert_args(p, out), "--force")
    assert snapshot(out) == snapshot(expected) and temporaries(tmp_path) == []


@pytest.mark.slow
def test_next_run_removes_what_a_killed_run_left(tmp_path, good):
    """Through the CLI: a SIGKILLed run's temporary is gone once the next write to that output starts."""
    p = inputs_in(good, tmp_path / "in")
    out = tmp_path / "out.safetensors"
    proc = start("writing", tmp_path / "marker", "convert", p.adapter, "-o", out, "--format", "kohya")
    proc.kill()
    proc.communicate(timeout=60)
    assert temporaries(tmp_path) == [f".out.safetensors.loratools-tmp-{proc.pid}"]
    run_cli("convert", p.adapter, "-o", out, "--format", "kohya", "-q")
    assert temporaries(tmp_path) == [] and load_adapter(out).modules


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
def test_two_processes_writing_one_output_leave_one_complete_output(tmp_path, good, force):
    p = inputs_in(good, tmp_path / "in")
    out = tmp_path / "merged.safetensors"
    if force:
        out.write_bytes(b"previous")
    extra = ["--force"] if force else []
    procs = [start("committing", tmp_path / f"marker{i}", "merge", p.base, adapter, "-o", out, "-q", *extra)
             for i, adapter in enumerate((p.adapter, p.adapter2))]
    for i in range(2):  # both hold a complete temporary; let them rename at once
        (tmp_path / f"marker{i}.go").touch()
    results = [proc.communicate(timeout=60) + (proc.returncode,) for proc in procs]
    codes = sorted(code for _, _, code in results)
    if force:
        assert codes == [0, 0], results
    else:  # the second finds the first's output: refused, one line
        assert codes == [0, 2], results
        assert "already exists" in next(err for _, err, code in results if code == 2)
    with open_checkpoint(out) as index:
        assert len(index) == 3 and all(index.get(name).isfinite().all() for name in index)
    assert temporaries(tmp_path) == []
