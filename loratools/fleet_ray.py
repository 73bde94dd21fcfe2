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


def run_tasks(tasks: Sequence[Any], function: Callable[[Any], Any], *, address: str | None, threads: int,
              gathered: Callable[[Any, Any, str], bool]) -> None:
    """Run ``function(task)`` for every task on the cluster, each task asking for `threads` CPUs.

    As each finishes, ``gathered(task, result, "")`` is called, or ``gathered(task, None, reason)`` when Ray
    lost it more than MAX_RETRIES times (its worker or node died). When `gathered` returns True (the task's
    ``entry`` failed), the tasks of that entry still queued are cancelled.
    """
    if not tasks:
        return
    ray = _ray()
    connect(address)
    largest = max((node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if largest < threads:
        raise LoratoolsError(f"each task runs {threads} torch threads and asks for as many CPUs, but the largest Ray"
                             f" node has {largest:g}; pass --threads {max(1, int(largest))}")
    remote = ray.remote(num_cpus=threads, max_retries=MAX_RETRIES)(function)
    with contextlib.redirect_stdout(sys.stderr):  # Ray's own notices (a worker died, a retry) stay off stdout
        _gather(ray, remote, tasks, gathered)


def _gather(ray: Any, remote: Any, tasks: Sequence[Any], gathered: Callable[[Any, Any, str], bool]) -> None:
    pending = {remote.remote(task): task for task in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            task = pending.pop(ref)
            try:
                result, lost = ray.get(ref), ""
            except ray.exceptions.TaskCancelledError:
                continue
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError) as exc:
                result, lost = None, (f"Ray lost the task {MAX_RETRIES + 1} times ({type(exc).__name__}); see the"
                                      " cluster's Ray logs")
            if gathered(task, result, lost):
                for other, queued in list(pending.items()):
                    if queued.entry == task.entry:
                        ray.cancel(other)
