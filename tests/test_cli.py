"""The CLI shell: help, version, and the error boundary (one line, exit 2, no traceback)."""

from __future__ import annotations

import click

from loratools import __version__
from loratools.cli import LoratoolsGroup
from loratools.errors import CheckpointError
from tests.helpers import run_cli


def test_help_lists_usage():
    for flag in ("-h", "--help"):
        result = run_cli(flag)
        assert result.exit_code == 0 and "Usage: " in result.output and "--version" in result.output


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"loratools, version {__version__}"


def group_with_failing_command() -> click.Group:
    @click.group(cls=LoratoolsGroup)
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command()
    def fail():
        raise CheckpointError("model.safetensors: truncated file, tensor 'w' ends past the data; re-download it")

    return group


def test_library_error_is_one_line_exit_2():
    result = run_cli("fail", group=group_with_failing_command(), expect=None)
    assert result.exit_code == 2
    assert result.stderr == "error: model.safetensors: truncated file, tensor 'w' ends past the data; re-download it\n"
    assert "Traceback" not in result.output


def test_debug_shows_the_exception():
    result = run_cli("--debug", "fail", group=group_with_failing_command(), expect=None)
    assert isinstance(result.exception, CheckpointError)


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "loratools", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"loratools, version {__version__}"


def test_usage_errors_are_one_line_too():
    result = run_cli("inspect", "/no/such/adapter.safetensors", expect=None)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "/no/such/adapter.safetensors" in result.stderr and "loratools inspect --help" in result.stderr
