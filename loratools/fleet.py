"""Fleets of fine-tunes: one base, N fine-tuned checkpoints, N adapters; the base read once, resumable.

`extract_fleet` writes one adapter per fine-tune in ``OUT/NAME`` (``OUT/NAME.safetensors`` for kohya), its
report beside it (``OUT/NAME.report.json``) and one combined report (``OUT/fleet-report.json``). Every entry
goes through the per-pair steps `extract` uses (`start_pair`, `factor_layer` / `compare_whole`,
`finish_pair`), so a fleet writes the bytes N separate ``extract`` runs with the same settings write.

Decisions:
- Local runs go base-tensor-major: each base tensor is read once, then the same tensor of every fine-tune of
  the pass is compared or factored against it before the next base tensor is read. Memory: one base tensor,
  one tuned tensor, one ΔW workspace and one factorization, plus the factors gathered so far (small: the
  adapters themselves). ``batch`` splits the fine-tunes into passes (each reads the base once): adapters are
  written at the end of their pass, so smaller passes lose less work to a kill, at the cost of one more base
  read per pass.
- Resumable: an adapter appears only complete (`writer.atomic_output`), so an existing ``OUT/NAME`` is a
  finished one. With ``resume`` it is reused, never recomputed nor rewritten, after checking that its
  provenance (inputs, rank policy, SVD settings) matches this run; without ``resume`` or ``force`` it is an
  error before any work.
- A failure stays with its fine-tune: an unreadable, truncated or corrupt checkpoint, another architecture,
  a non-finite ΔW or an adapter that cannot be written fails that entry with its one-line reason; the others
  go on. A bad base fails the run.
- The Ray executor (`fleet_ray`, the only importer of ray) runs `extract_group` tasks, one per (fine-tune,
  group of consecutive tensors), on workers that read the checkpoints from the same paths; the driver
  gathers the outcomes and writes each adapter when its groups are in. Tasks set the driver's torch thread
  count, since matrix products (and so the factors' bytes) depend on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from loratools.adapter_files import adapter_weights_path
from loratools.checkpoint import TensorIndex, open_checkpoint, read_safetensors_header
from loratools.deltas import layer_delta
from loratools.errors import LoratoolsError, OutputError
from loratools.extraction import (
    ExtractResult,
    ExtractSettings,
    Outcome,
    PairExtraction,
    compare_whole,
    factor_layer,
    finish_pair,
    start_pair,
)
from loratools.formats import default_format
from loratools.hub import resolve_checkpoint
from loratools.names import natural_key
from loratools.options import RankPolicy
from loratools.plan import LayerPair, WholeTensor
from loratools.progress import Progress
from loratools.rsvd import compute_dtype, svd_device
from loratools.writer import check_output, remove_stale_temporaries, write_json

EXECUTORS = ("local", "ray")
FLEET_REPORT = "fleet-report.json"
ENTRY_REPORT = ".report.json"  # OUT/NAME.report.json beside each adapter
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
GROUP_BYTES = 256 * 1024 * 1024  # stored bytes of a fine-tune's tensors in one Ray task (at least one tensor)
POLICY_KEYS = ("rank", "energy", "max_error", "sv_ratio", "threshold")


@dataclass(frozen=True)
class FleetEntry:
    """One fine-tune of a fleet.

    Attributes:
        name: the adapter's name under the output folder (letters, digits, ``.``, ``_``, ``-``).
        tuned: the fine-tuned checkpoint: a path, or a hub id ``org/name[@revision]``.
        policy: this entry's rank policy; None: the run's.
    """

    name: str
    tuned: str
    policy: RankPolicy | None = None


@dataclass(frozen=True)
class FleetOptions:
    """How a fleet run goes.

    Attributes:
        resume: reuse the adapters already complete in the output folder (made from the same inputs and
            settings) and make only the others.
        force: replace existing adapters.
        batch: fine-tunes per pass over the base (local executor); None: all of them, the base read once.
        executor: ``local`` or ``ray``; address: the Ray cluster (None: ``RAY_ADDRESS`` or the local one).
        dry_run: plan every entry from headers, write nothing.
    """

    resume: bool = False
    force: bool = False
    batch: int | None = None
    executor: str = "local"
    address: str | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.force:
            raise LoratoolsError("--resume keeps finished adapters and --force replaces them: give one of them")
        if self.batch is not None and self.batch < 1:
            raise LoratoolsError(f"--batch {self.batch} must be ≥ 1")
        if self.executor not in EXECUTORS:
            raise LoratoolsError(f"--executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.address is not None and self.executor != "ray":
            raise LoratoolsError("--address names a Ray cluster: add --executor ray")


@dataclass
class EntryResult:
    """What became of one fine-tune: ``written``, ``reused``, ``failed`` (with `reason`) or ``planned`` (dry run).

    `result` is the extraction (written, planned); `report` the JSON report a reused adapter was written with.
    """

    name: str
    tuned: str
    output: str
    status: str
    reason: str = ""
    result: ExtractResult | None = None
    report: dict | None = None

    def to_json(self) -> dict:
        data: dict = {"name": self.name, "tuned": self.tuned, "output": self.output, "status": self.status}
        if self.reason:
            data["reason"] = self.reason
        if self.result is not None:
            data.update(self.result.to_json())
        elif self.report is not None:
            data.update(self.report)
        return data

    def summary(self) -> dict:
        """The entry's ``summary`` (from the run or the reused report), or an empty dict."""
        return self.to_json().get("summary", {})


@dataclass
class FleetSummary:
    """Totals of a fleet run.

    Attributes:
        base_reads: passes over the base (local) or tasks that read base tensors (Ray).
        bytes_read: stored bytes of base and tuned tensors read; io_floor_bytes: the base's planned tensors
            once plus each computed fine-tune's once.
        peak_rss_bytes: this process; worker_peak_rss_bytes: the largest Ray worker (0 locally).
    """

    base: str
    output: str
    executor: str
    entries: int = 0
    written: int = 0
    reused: int = 0
    failed: int = 0
    base_reads: int = 0
    bytes_read: int = 0
    io_floor_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    worker_peak_rss_bytes: int = 0
    report: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FleetResult:
    """The outcome of `extract_fleet`: one EntryResult per fine-tune (in the order given) and the totals."""

    summary: FleetSummary
    entries: list[EntryResult] = field(default_factory=list)
    dry_run: bool = False

    @property
    def failed(self) -> list[EntryResult]:
        return [e for e in self.entries if e.status == "failed"]

    @property
    def notes(self) -> list[str]:
        """Each failure's reason, then each written entry's warnings, prefixed with the entry's name."""
        notes = [f"{e.name} failed: {e.reason}" for e in self.failed]
        return notes + [f"{e.name}: {note}" for e in self.entries if e.result is not None for note in e.result.notes]

    def to_json(self) -> dict:
        return {"entries": [e.to_json() for e in self.entries], "summary": self.summary.to_json()}


@dataclass
class GroupTask:
    """A Ray task: some planned tensors of one fine-tune, computed against the base (`extract_group`)."""

    entry: str
    base: str
    tuned: str
    items: list[LayerPair | WholeTensor]
    settings: ExtractSettings
    threads: int


@dataclass
class GroupResult:
    """What `extract_group` sends back: the outcomes, or the one-line reason the entry failed."""

    entry: str
    outcomes: list[Outcome]
    error: str = ""
    bytes_read: int = 0
    peak_rss_bytes: int = 0


@dataclass
class _Running:
    """An entry being computed: its open tuned checkpoint and its extraction so far."""

    entry: FleetEntry
    output: Path
    index: TensorIndex
    job: PairExtraction
    items: dict[str, LayerPair | WholeTensor]
    error: str = ""
    started: float = field(default_factory=time.perf_counter)


def entries_from_paths(tuned: Sequence[str]) -> list[FleetEntry]:
    """One entry per fine-tune path or hub id, named after its last path component (without ``.safetensors``
    or ``@revision``)."""
    entries = []
    for spec in tuned:
        name = Path(str(spec).split("@", 1)[0].rstrip("/")).name
        entries.append(FleetEntry(name.removesuffix(".safetensors"), str(spec)))
    return entries


def read_manifest(path: str | os.PathLike, *, max_rank: int = 128) -> list[FleetEntry]:
    """Entries from a JSON manifest: ``{"NAME": "PATH", "NAME2": {"path": "PATH", "rank": 8}, …}``.

    An entry's object may set one rank policy (``rank``, ``energy``, ``max_error``, ``sv_ratio``,
    ``threshold``) and ``max_rank`` (default `max_rank`); unknown keys are an error naming them.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoratoolsError(f"{path}: cannot read the manifest ({exc}); it is a JSON object NAME -> PATH") from None
    if not isinstance(data, dict) or not data:
        raise LoratoolsError(f"{path}: the manifest must be a non-empty JSON object NAME -> PATH or NAME -> {{...}}")
    entries = []
    for name, value in data.items():
        spec = {"path": value} if isinstance(value, str) else value
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise LoratoolsError(f"{path}: entry {name!r} needs a path: \"{name}\": \"PATH\" or {{\"path\": \"PATH\"}}")
        unknown = sorted(set(spec) - {"path", "max_rank", *POLICY_KEYS})
        if unknown:
            raise LoratoolsError(f"{path}: entry {name!r} has unknown keys {', '.join(unknown)}; allowed: path,"
                                 f" max_rank, {', '.join(POLICY_KEYS)}")
        given = [key for key in POLICY_KEYS if key in spec]
        if len(given) > 1:
            raise LoratoolsError(f"{path}: entry {name!r} sets {' and '.join(given)}; choose one rank policy")
        policy = None
        if given or "max_rank" in spec:
            kind = given[0] if given else "rank"
            value_of = spec.get(kind, 16)
            if not isinstance(value_of, (int, float)) or not isinstance(spec.get("max_rank", max_rank), int):
                raise LoratoolsError(f"{path}: entry {name!r}: {kind} and max_rank must be numbers")
            policy = RankPolicy(kind, float(value_of), spec.get("max_rank", max_rank))
        entries.append(FleetEntry(str(name), spec["path"], policy))
    return entries


def check_entries(entries: Sequence[FleetEntry]) -> None:
    """Names must be valid and distinct. Raises LoratoolsError with the fix."""
    if not entries:
        raise LoratoolsError("a fleet needs at least one fine-tune: give TUNED paths or --manifest FILE")
    seen: dict[str, str] = {}
    for entry in entries:
        if not ENTRY_NAME.fullmatch(entry.name) or entry.name.endswith(ENTRY_REPORT) or entry.name == FLEET_REPORT:
            raise LoratoolsError(f"{entry.tuned}: {entry.name!r} is not a usable adapter name (letters, digits, '.',"
                                 " '_', '-'); name it in a --manifest")
        if entry.name in seen:
            raise LoratoolsError(f"two fine-tunes are named {entry.name!r} ({seen[entry.name]}, {entry.tuned});"
                                 " name them in a --manifest FILE")
        seen[entry.name] = entry.tuned


def extract_fleet(
    base: str | os.PathLike,
    entries: Sequence[FleetEntry],
    out: str | os.PathLike,
    *,
    settings: ExtractSettings = ExtractSettings(),
    options: FleetOptions = FleetOptions(),
    progress: Progress | None = None,
) -> FleetResult:
    """Extract one adapter per fine-tune of `base` into the folder `out`, reading the base once.

    Args:
        base: the base checkpoint (path or hub id); entries: the fine-tunes (`entries_from_paths`,
            `read_manifest`); out: the output folder (created).
        settings: as for `extract` (each entry's `policy` overrides settings.policy).
        options: resume / force / batch / executor / dry run (`FleetOptions`).
        progress: ``progress(done, total, name)`` over every planned tensor of every computed entry.
    Returns:
        A FleetResult; entries that failed say why (the run does not raise for them).
    Raises:
        LoratoolsError for a bad base, output folder or entry list, and for existing adapters without
        ``resume`` or ``force``.

    Example:
        >>> result = extract_fleet("base", entries_from_paths(["tuned-a", "tuned-b"]), "adapters")
        >>> [(e.name, e.status) for e in result.entries]
        [('tuned-a', 'written'), ('tuned-b', 'written')]
    """
    started = time.perf_counter()
    check_entries(entries)
    svd_device(settings.svd)  # a missing GPU is an error before any work
    root = Path(out)
    results: dict[str, EntryResult] = {}
    summary = FleetSummary(str(base), str(root), options.executor, entries=len(entries))
    with open_checkpoint(resolve_checkpoint(base)) as base_index:
        fmt = settings.format or default_format(list(base_index.tensors), base_index.config)[0]
        outputs = {e.name: root / (e.name + (".safetensors" if fmt == "kohya" else "")) for e in entries}
        pending = []
        for entry in entries:
            output = outputs[entry.name]
            if root.is_dir():  # what a killed run left being written (the adapter or its report)
                for path in (output, _entry_report(output, entry)):
                    remove_stale_temporaries(path)
            if os.path.lexists(output) and not options.force:
                if not options.resume:
                    raise OutputError(f"{output}: already exists; pass --resume to keep the adapters already made,"
                                      " --force to replace them, or choose another -o folder")
                results[entry.name] = _reused(entry, output, base, _entry_settings(settings, entry))
            else:
                pending.append(entry)
        batches = [pending] if options.batch is None or options.executor == "ray" else [
            pending[i:i + options.batch] for i in range(0, len(pending), options.batch)]
        tally = _Tally(progress)
        for batch in batches:
            running = _start(base, base_index, batch, outputs, settings, options, results)
            try:
                tally.total += sum(len(r.items) for r in running)
                summary.io_floor_bytes += sum(_stored(r.index, name) for r in running for name in r.items)
                if running and not options.dry_run:
                    if options.executor == "ray":
                        _ray_pass(base, base_index, running, tally, results, options)
                    else:
                        _local_pass(base_index, running, settings, tally)
                        results.update({r.entry.name: _finish(r, options) for r in running})
                    summary.io_floor_bytes += sum(_stored(base_index, n) for n in {n for r in running for n in r.items})
            finally:
                for r in running:
                    r.index.close()
    if progress and tally.total:
        progress(tally.total, tally.total, "")
    ordered = [results[e.name] for e in entries]
    summary.written = sum(e.status == "written" for e in ordered)
    summary.reused = sum(e.status == "reused" for e in ordered)
    summary.failed = sum(e.status == "failed" for e in ordered)
    summary.bytes_read = tally.bytes_read
    summary.base_reads = tally.base_reads
    summary.worker_peak_rss_bytes = tally.worker_peak_rss
    result = FleetResult(summary, ordered, dry_run=options.dry_run)
    summary.seconds = time.perf_counter() - started
    summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not options.dry_run:
        summary.report = str(root / FLEET_REPORT)
        write_json(root / FLEET_REPORT, result.to_json(), inputs=[], force=True)
    return result


@dataclass
class _Tally:
    progress: Progress | None
    total: int = 0
    done: int = 0
    bytes_read: int = 0
    base_reads: int = 0
    worker_peak_rss: int = 0

    def step(self, count: int, name: str) -> None:
        self.done += count
        if self.progress:
            self.progress(self.done, self.total, name)


def _entry_settings(settings: ExtractSettings, entry: FleetEntry) -> ExtractSettings:
    return settings if entry.policy is None else replace(settings, policy=entry.policy)


def _entry_report(output: Path, entry: FleetEntry) -> Path:
    return output.with_name(entry.name + ENTRY_REPORT)


def _stored(index: TensorIndex, name: str) -> int:
    return index.info(name).nbytes


def _failed(entry: FleetEntry, output: Path, reason: str) -> EntryResult:
    return EntryResult(entry.name, entry.tuned, str(output), "failed", reason)


def _reused(entry: FleetEntry, output: Path, base: str | os.PathLike, settings: ExtractSettings) -> EntryResult:
    """The existing adapter at `output`, when its provenance says it was made from these inputs and settings."""
    try:
        metadata = read_safetensors_header(adapter_weights_path(output)[0])[1]
    except LoratoolsError as exc:
        return _failed(entry, output, f"{output}: exists but is not a readable adapter ({exc}); pass --force to"
                                      " replace it")
    expected = {
        "loratools_inputs": json.dumps([str(base), str(entry.tuned)]),
        "loratools_parameters": json.dumps(settings.provenance_parameters(), sort_keys=True, default=str),
    }
    differing = [key.removeprefix("loratools_") for key, value in expected.items() if metadata.get(key) != value]
    if differing:
        return _failed(entry, output, f"{output}: exists, made from other {' and '.join(differing)} than this run's;"
                                      " pass --force to replace it, or choose another -o folder")
    try:  # the report it was written with, unless the run that wrote it was killed before writing that too
        report = json.loads(_entry_report(output, entry).read_text())
    except (OSError, ValueError):
        report = None
    return EntryResult(entry.name, entry.tuned, str(output), "reused", report=report)


def _start(
    base: str | os.PathLike, base_index: TensorIndex, batch: list[FleetEntry], outputs: dict[str, Path],
    settings: ExtractSettings, options: FleetOptions, results: dict[str, EntryResult],
) -> list[_Running]:
    """Open and plan each entry of a batch; one that cannot be opened or planned fails alone."""
    running = []
    for entry in batch:
        output = outputs[entry.name]
        index = None
        try:
            tuned_path = resolve_checkpoint(entry.tuned)
            check_output(output, [base_index.path, tuned_path], force=True)
            index = open_checkpoint(tuned_path)
            job = start_pair(base_index, index, base=base, tuned=entry.tuned, out=output,
                             settings=_entry_settings(settings, entry), dry_run=options.dry_run)
            fmt = job.result.summary.format
            if (fmt == "kohya") != (output.suffix == ".safetensors"):  # the base alone decided the output names
                raise LoratoolsError(f"{entry.tuned}: its adapter would be {fmt}, unlike the fleet's; give --format")
        except (LoratoolsError, OSError) as exc:
            if index is not None:
                index.close()
            results[entry.name] = _failed(entry, output, str(exc))
            continue
        if options.dry_run:
            results[entry.name] = EntryResult(entry.name, entry.tuned, str(output), "planned", result=job.result)
        items = {item.tensor: item for item in job.items()}
        running.append(_Running(entry, output, index, job, items))
    return running


def compute_item(
    base_index: TensorIndex, tuned_index: TensorIndex, item: LayerPair | WholeTensor, base_tensor: torch.Tensor,
    settings: ExtractSettings, workspace: torch.Tensor | None,
) -> Outcome:
    """One planned tensor of one fine-tune against the already-read base tensor (the same steps as `extract`)."""
    if isinstance(item, WholeTensor):
        return compare_whole(item, base_tensor, tuned_index.get(item.tensor))
    svd = settings.svd
    delta = layer_delta(base_index, tuned_index, item, dtype=compute_dtype(svd), device=svd_device(svd),
                        workspace=workspace, base_tensor=base_tensor)
    return factor_layer(item, delta, settings)


def _workspace(items: Sequence[LayerPair | WholeTensor], settings: ExtractSettings) -> torch.Tensor | None:
    sizes = [math.prod(i.shape) for i in items if isinstance(i, LayerPair)]
    svd = settings.svd
    return torch.empty(max(sizes), dtype=compute_dtype(svd), device=svd_device(svd)) if sizes else None


def _local_pass(base_index: TensorIndex, running: list[_Running], settings: ExtractSettings, tally: _Tally) -> None:
    """Each base tensor once, then that tensor of every entry still alive; the next tuned tensor is read ahead."""
    names = sorted({name for r in running for name in r.items}, key=natural_key)
    workspace = _workspace([item for r in running for item in r.items.values()], settings)
    tally.base_reads += 1
    for position, name in enumerate(names):
        holders = [r for r in running if not r.error and name in r.items]
        if not holders:
            continue
        base_tensor = base_index.get(name)
        tally.bytes_read += _stored(base_index, name)
        for number, r in enumerate(holders):
            if number + 1 < len(holders):
                holders[number + 1].index.prefetch(name)
            elif position + 1 < len(names):
                base_index.prefetch(names[position + 1])
            try:
                r.job.record(compute_item(base_index, r.index, r.items[name], base_tensor,
                                          r.job.settings, workspace))
            except (LoratoolsError, OSError) as exc:
                r.error = str(exc)
                r.job.outcomes.clear()
            tally.bytes_read += _stored(r.index, name)
            tally.step(1, f"{r.entry.name}: {name}")


def _finish(r: _Running, options: FleetOptions) -> EntryResult:
    """Write one entry's adapter and its report; any error fails that entry alone."""
    if r.error:
        return _failed(r.entry, r.output, r.error)
    try:
        result = finish_pair(r.job, r.index, force=options.force, started=r.started)
        write_json(_entry_report(r.output, r.entry), result.to_json(), force=True)
    except (LoratoolsError, OSError) as exc:
        return _failed(r.entry, r.output, str(exc))
    finally:
        r.job.outcomes.clear()
    return EntryResult(r.entry.name, r.entry.tuned, str(r.output), "written", result=result)


def tensor_groups(index: TensorIndex, items: Sequence[LayerPair | WholeTensor]) -> list[list[LayerPair | WholeTensor]]:
    """Consecutive items (name order) of about GROUP_BYTES of stored tuned data each: the Ray tasks of an entry."""
    groups: list[list[LayerPair | WholeTensor]] = [[]]
    size = 0
    for item in sorted(items, key=lambda i: natural_key(i.tensor)):
        stored = _stored(index, item.tensor)
        if groups[-1] and size + stored > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += stored
    return [group for group in groups if group]


def extract_group(task: GroupTask) -> GroupResult:
    """Compute one Ray task: each item's base tensor read, then the fine-tune's against it (`compute_item`).

    Runs on a Ray worker with the driver's torch thread count; errors of the input come back as `error`.
    """
    torch.set_num_threads(task.threads)
    outcomes: list[Outcome] = []
    read = 0
    try:
        with open_checkpoint(task.base) as base_index, open_checkpoint(task.tuned) as tuned_index:
            workspace = _workspace(task.items, task.settings)
            for item in task.items:
                base_tensor = base_index.get(item.tensor)
                outcomes.append(compute_item(base_index, tuned_index, item, base_tensor, task.settings, workspace))
                read += _stored(base_index, item.tensor) + _stored(tuned_index, item.tensor)
    except (LoratoolsError, OSError) as exc:
        return GroupResult(task.entry, [], str(exc), read)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return GroupResult(task.entry, outcomes, "", read, peak)


def _ray_pass(
    base: str | os.PathLike, base_index: TensorIndex, running: list[_Running], tally: _Tally,
    results: dict[str, EntryResult], options: FleetOptions,
) -> None:
    """Every entry's groups as Ray tasks; each entry is written by this process as soon as its groups are in."""
    from loratools.fleet_ray import run_tasks

    by_name = {r.entry.name: r for r in running}
    tasks = [
        GroupTask(r.entry.name, str(base_index.path), str(r.index.path), group, r.job.settings,
                  torch.get_num_threads())
        for r in running for group in tensor_groups(r.index, list(r.items.values()))
    ]
    waiting = {r.entry.name: sum(t.entry == r.entry.name for t in tasks) for r in running}

    def gathered(task: GroupTask, group: GroupResult | None, lost: str) -> bool:
        r = by_name[task.entry]
        group = group or GroupResult(task.entry, [], lost)
        tally.bytes_read += group.bytes_read
        tally.worker_peak_rss = max(tally.worker_peak_rss, group.peak_rss_bytes)
        tally.base_reads += 1
        tally.step(len(task.items), task.entry)
        if not r.error:
            try:
                if group.error:
                    raise LoratoolsError(group.error)
                for outcome in group.outcomes:
                    r.job.record(outcome)
            except LoratoolsError as exc:
                r.error = str(exc)
                r.job.outcomes.clear()
                results[r.entry.name] = _failed(r.entry, r.output, r.error)
        waiting[task.entry] -= 1
        if waiting[task.entry] == 0 and not r.error:
            results[r.entry.name] = _finish(r, options)
        return bool(r.error)

    run_tasks(tasks, extract_group, address=options.address, threads=torch.get_num_threads(), gathered=gathered)
