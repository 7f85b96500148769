"""A merge split across a Ray cluster: the output's shards in balanced groups, one Ray task
per group, each running the local engine's `write_shards` on storage every node sees.

How it gives the same bytes as `run_plan`: the shard layout (which tensor goes in which
file, at which offset, under which header) is a function of the plan alone
(`graft.io.plan_shards`), so a task that writes shards 3 and 7 writes exactly the files the
local engine would. The plan travels pickled; its checkpoints pickle as "open this path
again" (`graft.io.Checkpoint.__reduce__`), so inputs must be at paths (or fsspec URLs)
every node resolves alike. Per-tensor seeds come from the plan, so random methods agree.

The driver makes the hidden staging folder beside OUT (`graft.io.atomic_output_dir`); a
task writes its shards into a private sub-folder of it and renames them in when done, so
an attempt killed midway leaves nothing a retry trips on. Ray retries a task whose worker
dies (``max_retries``); when the retries run out (a node lost for good) the driver stops
with one line and the staging folder is removed: nothing appears at OUT. The driver writes
the index, config, tokenizer and model card and renames the folder into place.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections.abc import Sequence
from pathlib import Path

from graft._ray_progress import Tracker
from graft.io import (
    atomic_output_dir,
    plan_shards,
    remove_parts,
    staging_part,
    write_shard_index,
)
from graft.plan.engine import (
    ProgressHook,
    RunStats,
    _write_sidecars,
    default_threads,
    output_entries,
    resolve_device,
    write_shards,
)
from graft.plan.plan import MergePlan

_POLL_S = 0.25


def balance(sizes: Sequence[int], groups: int) -> list[list[int]]:
    """Split items (shards, by bytes) into at most ``groups`` groups of near-equal total:
    largest first onto the lightest group (LPT). Groups hold indices in increasing order
    and are ordered by their first index.
    """
    groups = max(1, min(groups, len(sizes)))
    heap = [(0, g) for g in range(groups)]
    members: list[list[int]] = [[] for _ in range(groups)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, g = heapq.heappop(heap)
        members[g].append(i)
        heapq.heappush(heap, (load + sizes[i], g))
    return sorted((sorted(m) for m in members if m), key=lambda m: m[0])


def run_plan_ray(
    plan: MergePlan,
    out: str | Path,
    *,
    address: str = "auto",
    workers: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    strict: bool = False,
    progress: ProgressHook | None = None,
    max_retries: int = 3,
) -> RunStats:
    """`run_plan` on a Ray cluster: the same output, byte for byte (module docstring).

    Args:
        plan: from ``plan_merge``, with inputs on storage every node sees.
        out: output folder, on storage every node sees (its parent holds the staging folder).
        address: the cluster (`graft._ray.connect`: ``auto``, ``local`` or an address).
        workers: groups of shards, i.e. Ray tasks (default: the cluster's CPUs); at most
            one per output shard, so a smaller ``max_shard_bytes`` spreads a merge wider.
        threads: engine threads inside each task (default as for `run_plan`).
        max_retries: times Ray reruns a task whose worker or node died.
        device, max_shard_bytes, force, overwrite_anything, strict, progress: as for
            `run_plan`; ``progress`` sums every worker's tensors and bytes.

    Raises:
        RayError: Ray is missing, the cluster unreachable, or a task lost for good.
        PlanError, GraftIOError: as `run_plan` (raised on a worker, re-raised here).
    """
    from graft._ray import connect

    ray = connect(address)
    resolve_device(device)
    threads = threads or default_threads()
    entries = output_entries(plan)
    layout = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    if workers is None:
        workers = int(ray.cluster_resources().get("CPU", 1))
    groups = balance([sum(b for _, b in shard) for shard in layout], workers)
    start = time.perf_counter()
    with atomic_output_dir(
        Path(out), force=force, inputs=plan.input_paths(), overwrite_anything=overwrite_anything
    ) as tmp:
        tracker = ray.remote(num_cpus=0)(Tracker).remote()
        task = ray.remote(_merge_group).options(num_cpus=1, max_retries=max_retries)
        plan_ref = ray.put(plan)
        refs = [
            task.remote(
                plan_ref, str(tmp), g, key, threads, device, max_shard_bytes, strict, tracker
            )
            for key, g in enumerate(groups)
        ]
        results = _gather(ray, refs, groups, tracker, progress, max_retries)
        remove_parts(tmp)  # the folders of attempts that were killed
        write_shard_index(tmp, entries, max_shard_bytes=max_shard_bytes)
        stats = _combine(results, len(layout))
        _write_sidecars(plan, tmp, stats.warnings.append)
    stats.seconds = time.perf_counter() - start
    return stats


def _merge_group(
    plan: MergePlan,
    stage: str,
    shards: list[int],
    key: int,
    threads: int,
    device: str,
    max_shard_bytes: int,
    strict: bool,
    tracker,
) -> RunStats:
    """One Ray task: `write_shards` for a group of shards, published into ``stage``."""
    tracker.report.remote(key, 0, 0)  # a retried attempt starts its count again
    done = [0, 0, time.monotonic()]

    def hook(n: int, nbytes: int) -> None:
        done[0] += n
        done[1] += nbytes
        if time.monotonic() - done[2] > _POLL_S:
            done[2] = time.monotonic()
            tracker.report.remote(key, done[0], done[1])

    try:
        with staging_part(stage, str(key)) as part:
            stats = write_shards(
                plan,
                part,
                shards=shards,
                threads=threads,
                device=device,
                max_shard_bytes=max_shard_bytes,
                strict=strict,
                progress=hook,
            )
    finally:
        plan.close()
    tracker.report.remote(key, done[0], done[1])
    return stats


def _gather(ray, refs, groups, tracker, progress, max_retries) -> list[RunStats]:
    """Wait for every task, feeding ``progress``; on a failure cancel the rest and raise
    the worker's own error, or one line when Ray lost the task for good."""
    from graft._ray import RayError

    pending = list(refs)
    shown = [0, 0]
    current = refs[0]

    def show(tensors: int, nbytes: int) -> None:
        if progress is not None and (tensors, nbytes) != tuple(shown):
            progress(tensors - shown[0], nbytes - shown[1])
            shown[:] = [tensors, nbytes]

    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            for current in ready:
                ray.get(current)  # raises here on a failed task
            show(*ray.get(tracker.totals.remote()))
        results = ray.get(list(refs))
    except ray.exceptions.RayTaskError as e:
        _cancel(ray, pending)
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, Exception) else e) from None
    except ray.exceptions.RayError as e:
        _cancel(ray, pending)
        failed = groups[refs.index(current)]
        raise RayError(
            f"Ray lost the task writing output shard(s) {failed} after {max_retries} "
            f"retries ({type(e).__name__}: a worker or node died); nothing was written, "
            "rerun when the cluster is healthy"
        ) from None
    show(sum(r.tensors for r in results), sum(r.bytes_read + r.bytes_written for r in results))
    return results


def _cancel(ray, refs) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # already finished or gone: nothing to stop
            ray.cancel(ref, force=True)


def _combine(results: Sequence[RunStats], shards: int) -> RunStats:
    stats = RunStats(shards=shards)
    for r in results:
        stats.tensors += r.tensors
        stats.bytes_read += r.bytes_read
        stats.bytes_written += r.bytes_written
        stats.warnings.extend(w for w in r.warnings if w not in stats.warnings)
    return stats
