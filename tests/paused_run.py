"""Run the loratools CLI exactly as ``python -m loratools`` does, but stop at one point of the writer, so a test
can signal the process at that moment (deterministic kill tests without hooks in the library).

Usage: ``python -m tests.paused_run POINT MARKER ARGS...``. At POINT the process writes its pid to MARKER and
waits until MARKER + ".go" exists (then carries on) or a signal ends it. Points:

- ``writing``: the temporary output exists and holds the safetensors header, no tensor data yet;
- ``committing``: the temporary output is complete, not yet renamed into place;
- ``swapped``: the new output is in place, the previous one (``--force``) still at the temporary name;
- ``two-step``: as on a filesystem without ``renameat2``: the previous output moved aside to
  ``.<name>.loratools-old-<pid>``, the new one not yet renamed into place.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def pause(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not Path(marker + ".go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


class PausingFile:
    """A file whose second write (the first tensor, after the header length and header) pauses first."""

    def __init__(self, handle: Any, marker: str):
        self.handle, self.marker, self.writes = handle, marker, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == 3:
            self.handle.flush()
            pause(self.marker)
        return self.handle.write(data)

    def __enter__(self) -> PausingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def install(point: str, marker: str) -> None:
    from loratools import writer

    if point == "writing":
        writer.open = lambda path, mode="r", *a, **k: PausingFile(open(path, mode, *a, **k), marker)  # noqa: SIM115
    elif point in ("committing", "swapped"):
        commit = writer._commit

        def paused_commit(*args: Any) -> None:
            if point == "committing":
                pause(marker)
            commit(*args)
            if point == "swapped":
                pause(marker)

        writer._commit = paused_commit
    elif point == "two-step":
        writer._rename2 = lambda src, dst, flags: False
        replace = os.replace

        def paused_replace(src: Any, dst: Any) -> None:
            replace(src, dst)
            if writer.OLD_MARK in str(dst):
                pause(marker)

        os.replace = paused_replace
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    sys.argv = ["loratools", *sys.argv[3:]]
    from loratools.cli import main

    main()
