"""A Ray worker setup hook for the fleet tests (no test functions here): kill one worker in the middle of a task.

`tests/test_fleet.py` starts its local Ray cluster with ``worker_process_setup_hook="tests.ray_hooks.arm"`` and
``LORATOOLS_TEST_RAY_KILL_DIR`` in the workers' environment. While the file ``armed`` exists in that folder, the
first worker to compute a tensor renames it to ``fired`` (one rename wins) and SIGKILLs itself: Ray sees the
worker die and runs the task again, as it would after a node's out-of-memory kill.
"""

from __future__ import annotations

import os
import signal
from typing import Any


def arm() -> None:
    from loratools import fleet

    folder = os.environ["LORATOOLS_TEST_RAY_KILL_DIR"]
    compute = fleet.compute_item

    def compute_or_die(*args: Any, **kwargs: Any) -> Any:
        try:
            os.rename(os.path.join(folder, "armed"), os.path.join(folder, "fired"))
        except FileNotFoundError:
            return compute(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    fleet.compute_item = compute_or_die
