"""The Ray executor of fleet runs: `loratools.fleet.extract_group` tasks on an existing Ray cluster.

The only module that imports ray (the ``ray`` extra: ``pip install 'loratools[ray]'``). The driver connects to
the cluster (`address`, else ``RAY_ADDRESS``, else the one started on this machine with ``ray start --head``),
or uses the connection this process already has; it never starts a cluster. Each task asks for as many CPUs
as it runs torch threads (the driver's count, so every node computes the same bytes), is retried by Ray when
its worker dies (`MAX_RETRIES`), and sends its outcomes back to the driver, which writes the adapters.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loratools.errors import LoratoolsError
from loratools.fleet import GroupResult, GroupTask, extract_group

MAX_RETRIES = 3  # Ray re-runs a task this many times when its worker process dies


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoratoolsError("--executor ray needs Ray: pip install 'loratools[ray]'") from None
    return ray


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (None: ``RAY_ADDRESS`` or this machine's), unless already connected.

    Raises:
        LoratoolsError naming the address and how to start a cluster when there is none.
    """
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ray.init(address=address or "auto", log_to_driver=False, logging_level="error")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "RAY_ADDRESS or this machine"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoratoolsError(f"no Ray cluster at {where} ({first}); start one (ray start --head) or pass"
                             " --address HOST:PORT") from None


def run_tasks(tasks: Sequence[GroupTask], *, address: str | None,
              gathered: Callable[[GroupResult, int], bool]) -> None:
    """Run every task on the cluster; call ``gathered(result, len(task.items))`` as each one finishes.

    When `gathered` returns True (its entry failed), that entry's tasks still queued are cancelled.
    A task whose worker died more than MAX_RETRIES times fails its entry with that reason.
    """
    if not tasks:
        return
    ray = _ray()
    connect(address)
    threads = max(task.threads for task in tasks)
    largest = max((node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if largest < threads:
        raise LoratoolsError(f"each task runs {threads} torch threads and asks for as many CPUs, but the largest Ray"
                             f" node has {largest:g}; pass --threads {max(1, int(largest))}")
    remote = ray.remote(num_cpus=threads, max_retries=MAX_RETRIES)(extract_group)
    with contextlib.redirect_stdout(sys.stderr):  # Ray's own notices (a worker died, a retry) stay off stdout
        _gather(ray, remote, tasks, gathered)


def _gather(ray: Any, remote: Any, tasks: Sequence[GroupTask], gathered: Callable[[GroupResult, int], bool]) -> None:
    pending = {remote.remote(task): task for task in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            task = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                continue
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as exc:
                result = GroupResult(task.entry, [], f"Ray lost the task {MAX_RETRIES + 1} times"
                                                     f" ({type(exc).__name__}); see the Ray logs of the cluster")
            if gathered(result, len(task.items)):
                for other, queued in list(pending.items()):
                    if queued.entry == task.entry:
                        ray.cancel(other)
