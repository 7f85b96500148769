"""The streaming pass: compute each planned output tensor and write it, a few at a time.

Memory stays proportional to ``threads x inputs x largest tensor``: a bounded window of
jobs is in flight, each reads its inputs (one read per tensor, no cache of the model),
computes in float32 (or the method's dtype) on the chosen device, casts to the output
dtype and writes the bytes at their planned offset in the output shard. Nothing of the
model is ever held whole.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from graft import __version__
from graft.io import (
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    copy_tokenizer,
    fp8_scale_name,
    fp8_scale_shape,
    plan_shards,
    quantize_fp8,
    recipe_hash,
    save_tokenizer,
    write_chat_template,
    write_model_card,
)
from graft.merge import _fused
from graft.plan.plan import MergePlan, PlanError, TensorJob
from graft.plan.vocab import align_rows

# Stored dtypes a ``native_inputs`` method receives as they are (it widens them itself).
_NATIVE = (torch.float32, torch.bfloat16, torch.float16)


_STRICT_FIX = "fix the checkpoint or drop --strict"


class NonFiniteInputError(PlanError):
    """An input tensor holds NaN or Inf and ``strict`` was asked for."""


@dataclass
class RunStats:
    """What a run did, for the CLI summary and benchmarks."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    shards: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / max(self.seconds, 1e-9)


ProgressHook = Callable[[int, int], None]  # (tensors_done_delta, bytes_delta)
J = TypeVar("J")


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


_DEVICES = "cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device``: the CPU, a CUDA GPU that exists, or Apple's MPS.

    Raises:
        PlanError: not a device name, a device graft cannot compute on (``meta``...), or a
            GPU that is not there.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PlanError(f"unknown --device {device!r}; use {_DEVICES}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PlanError(f"--device {device} cannot compute graft's outputs; use {_DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlanError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise PlanError(
                f"--device {device}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                "choose one of them"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PlanError("--device mps asked for, but torch sees no MPS device; use --device cpu")
    return dev


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry of ``t`` is NaN or Inf (integer tensors always are)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    fast = _fused.all_finite(t)  # the stored bits, no float32 sum
    if fast is not None:
        return fast
    # A sum is NaN/Inf when any entry is (one pass, no temporary); only then, or on an
    # overflow of huge finite values, look entry by entry.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def run_plan(
    plan: MergePlan,
    out: str | Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    strict: bool | str = False,
    progress: ProgressHook | None = None,
) -> RunStats:
    """Execute a plan into the model folder ``out`` (atomically).

    Args:
        plan: from ``plan_merge``.
        out: output folder; must not exist unless ``force``.
        threads: tensors computed concurrently (default: cores, at most 4).
        device: torch device for the math (``cpu``, ``cuda``, ``cuda:1``...).
        max_shard_bytes: shard size limit for the output safetensors files.
        force: replace an existing ``out`` that graft wrote (`graft.io.atomic_output_dir`).
        overwrite_anything: with ``force``, replace whatever folder ``out`` is.
        strict: NaN/Inf in an input tensor is an error instead of a warning; a string is
            the fix the error ends with (default: fix the checkpoint or drop --strict).
        progress: called after each tensor with (1, bytes read + written).
    """
    threads = threads or default_threads()
    resolve_device(device)
    start = time.perf_counter()
    with atomic_output_dir(
        Path(out), force=force, inputs=plan.input_paths(), overwrite_anything=overwrite_anything
    ) as tmp:
        stats = write_shards(
            plan,
            tmp,
            threads=threads,
            device=device,
            max_shard_bytes=max_shard_bytes,
            strict=strict,
            progress=progress,
        )
        _write_sidecars(plan, tmp, stats.warnings.append)
    stats.seconds = time.perf_counter() - start
    return stats


def write_shards(
    plan: MergePlan,
    out_dir: Path,
    *,
    shards: Sequence[int] | None = None,
    threads: int,
    device: str = "cpu",
    max_shard_bytes: int | str = 5_000_000_000,
    strict: bool | str = False,
    progress: ProgressHook | None = None,
) -> RunStats:
    """The merge's unit of work: compute the jobs of some output shards and write those
    shards into ``out_dir`` (an existing folder), each byte for byte as in the whole output.

    `run_plan` calls it once for all shards (and so also gets the shard index); a
    distributed merge (`graft.plan.distributed`) calls it on each worker for that worker's
    shards, and the driver writes the index. One implementation, so both give the same bytes.

    Args:
        plan: from ``plan_merge``.
        out_dir: the folder the shard files are created in.
        shards: indices into `graft.io.plan_shards` of the output; None for all (then
            the index is written too when there are several).
        threads, device, max_shard_bytes, strict, progress: as for `run_plan`.

    Returns:
        The pass's statistics; ``shards`` counts the shard files written, ``warnings``
        the inputs with NaN/Inf.
    """
    dev = resolve_device(device)
    entries = output_entries(plan)
    jobs = plan.jobs
    if shards is not None:
        layout = plan_shards(entries, max_shard_bytes=max_shard_bytes)
        mine = {name for i in shards for name, _ in layout[i]}
        jobs = [j for j in plan.jobs if j.name in mine or _scale_of(j) in mine]
    with ShardedWriter(
        out_dir,
        entries,
        max_shard_bytes=max_shard_bytes,
        metadata=_metadata(plan),
        only_shards=shards,
    ) as writer:  # closed on any error; finished below
        worker = _Worker(plan, writer, dev, strict)
        worker.owned = mine if shards is not None else None
        stats = run_pass(
            jobs, worker, threads=threads, input_bytes=plan.input_bytes, progress=progress
        )
        writer.finish()
    stats.shards = len(writer.files) if shards is None else len(shards)
    stats.warnings = worker.warnings
    return stats


def output_entries(plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Every output tensor as ``(name, dtype, shape)``, in output order: what the writer
    lays shards out from (`graft.io.plan_shards`)."""
    entries = []
    for j in plan.jobs:
        entries.append((j.name, j.out_dtype, j.shape))
        if j.fp8_block is not None:  # its block scales follow it
            entries.append(
                (fp8_scale_name(j.name), torch.float32, fp8_scale_shape(j.shape, j.fp8_block))
            )
    return entries


def _scale_of(job: TensorJob) -> str | None:
    return fp8_scale_name(job.name) if job.fp8_block is not None else None


def _metadata(plan: MergePlan) -> dict[str, str]:
    return {
        "format": "pt",
        "graft_version": __version__,
        "graft_recipe_sha256": recipe_hash(plan.recipe.text),
        "graft_method": plan.method.name,
    }


def merge_in_memory(
    plan: MergePlan,
    *,
    threads: int | None = None,
    device: str = "cpu",
    strict: bool | str = False,
) -> dict[str, torch.Tensor]:
    """Execute a plan into a dict of tensors instead of a folder: the same jobs, worker
    and math as `run_plan`, for evaluating candidate merges (searches, soups) without
    writing them. Holds the whole output in memory.

    Returns:
        Output tensor name -> tensor in its output dtype, on the CPU.
    """
    threads = threads or default_threads()
    out = _MemoryWriter()
    worker = _Worker(plan, out, resolve_device(device), strict)
    run_pass(plan.jobs, worker, threads=threads, input_bytes=plan.input_bytes)
    return out.tensors


class _MemoryWriter:
    """The writer interface `_Worker` needs, keeping tensors in a dict."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


def run_pass(
    jobs: Sequence[J],
    work: Callable[[J], int],
    *,
    threads: int,
    input_bytes: Callable[[J], int],
    progress: ProgressHook | None = None,
) -> RunStats:
    """The streaming pass every graft job shares: run ``work`` on each job, a few at once.

    At most ``threads`` jobs are in flight, so memory stays near ``threads`` x (one job's
    inputs and output). torch's intra-op threads are shared out between the workers.

    Args:
        jobs: one per output tensor (or group of output tensors), in output order.
        work: reads a job's inputs, computes and writes its output; returns bytes written.
            Called from worker threads; must be thread-safe.
        threads: workers (1 runs in the calling thread).
        input_bytes: bytes a job reads, for the statistics and the progress hook.
        progress: called after each job with (1, bytes read + written).

    Returns:
        Tensor (job) count, bytes read and written, and the seconds the pass took.
    """
    stats = RunStats()
    start = time.perf_counter()
    with _torch_threads(threads):
        for job, nbytes in _run_bounded(jobs, work, threads, input_bytes):
            read = input_bytes(job)
            stats.tensors += 1
            stats.bytes_read += read
            stats.bytes_written += nbytes
            if progress is not None:
                progress(1, read + nbytes)
    stats.seconds = time.perf_counter() - start
    return stats


def _run_bounded(
    jobs: Sequence[J], worker: Callable[[J], int], threads: int, cost: Callable[[J], int]
) -> Iterator[tuple[J, int]]:
    """Run jobs on ``threads`` workers, at most ``threads`` in flight, results in order of
    completion.

    A byte budget keeps the largest jobs apart: jobs start only while the bytes in flight
    stay within ``(1 + (threads - 1) / 4)`` x the largest job, so two vocabulary-sized
    tensors (embeddings and head) never run at once, while the many small per-layer tensors
    still fill every worker. Peak memory is then about that budget, not threads x largest.

    Jobs start largest first, and a free worker takes the largest waiting job that fits
    the budget (a list schedule): the big tensors run beside small ones instead of one
    another, and the pass ends on the smallest jobs, so no worker idles through a long tail
    behind the output head. One worker runs the jobs in their given order.
    """
    if threads == 1:
        for job in jobs:
            yield job, worker(job)
        return
    sizes = [cost(j) for j in jobs]
    budget = max(sizes, default=0) * (1 + (threads - 1) / 4)
    # waiting jobs, largest first (stable: equal sizes keep their order), so the first
    # one that fits (a bisect on -size) is the largest that does
    waiting = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    pending: dict[Future, int] = {}
    in_flight = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="graft") as pool:
        try:
            while waiting or pending:
                while waiting and len(pending) < threads:
                    # nothing in flight: the largest job starts whatever its size
                    room = budget - in_flight
                    at = bisect_left(waiting, -room, key=lambda j: -sizes[j]) if pending else 0
                    if at == len(waiting):
                        break
                    i = waiting.pop(at)
                    pending[pool.submit(worker, jobs[i])] = i
                    in_flight += sizes[i]
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    in_flight -= sizes[i]
                    yield jobs[i], fut.result()
        finally:
            for fut in pending:
                fut.cancel()


class _Worker:
    """Computes and writes one job; safe to call from several threads."""

    def __init__(
        self, plan: MergePlan, writer: ShardedWriter, device: torch.device, strict: bool | str
    ):
        self.plan = plan
        self.writer = writer
        self.device = device
        self.strict = strict
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self.owned: set[str] | None = None  # the output tensors this worker's shards hold
        self._cuda = device.type == "cuda"
        self._local = threading.local()  # each worker thread's CUDA stream

    def __call__(self, job: TensorJob) -> int:
        with self._stream():
            out = self._copy(job) if job.copy else self._compute(job)
        out = out.contiguous()
        if job.fp8_block is None:
            self.writer.write(job.name, out)
            return out.numel() * out.element_size()
        q, scale = quantize_fp8(out, job.fp8_block)
        written = 0
        for name, t in ((job.name, q), (fp8_scale_name(job.name), scale)):
            if self.owned is None or name in self.owned:  # a shard may end between the two
                self.writer.write(name, t)
                written += t.numel() * t.element_size()
        return written

    def _stream(self):
        """On CUDA, each worker thread issues its copies and kernels on a stream of its
        own, so one job's host-to-device copy overlaps another's compute and a third's
        copy back (the threads are the pipeline); elsewhere, nothing."""
        if not self._cuda:
            return nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(stream)

    def _to_device(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self._cuda:
            return t.to(device=self.device, dtype=dtype)
        # Staged through pinned memory (torch caches those blocks), copied asynchronously
        # on this thread's stream, widened on the GPU.
        return t.pin_memory().to(self.device, non_blocking=True).to(dtype)

    def _to_host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self._cuda:
            return t.to(device="cpu", dtype=dtype)
        t = t.to(dtype)  # narrowed on the GPU: fewer bytes to copy back
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def _read(self, src) -> torch.Tensor:
        return self.plan.checkpoints[src.model].get(src.name)

    def _copy(self, job: TensorJob) -> torch.Tensor:
        src = job.base or job.inputs[0]
        return self._read(src).to(job.result_dtype)

    def _compute(self, job: TensorJob) -> torch.Tensor:
        spec = job.method or self.plan.method
        cdt = spec.compute_dtype
        # Vocabulary alignment averages rows in the tensors' dtype: it gets float32 copies.
        native = spec.native_inputs and job.vocab is None
        inputs = [self._load(s, cdt, native) for s in job.inputs]
        base = self._load(job.base, cdt, native) if job.base is not None else None
        if job.vocab is not None:  # every input's rows onto the output vocabulary first
            aligned = align_rows([*([base] if base is not None else []), *inputs], job.vocab)
            base, inputs = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
        kwargs = dict(job.params)
        if spec.stats:
            kwargs["stats"] = [
                None if s is None else self._stat(s, spec.stats, cdt) for s in job.stats
            ]
        if spec.uses_seed:
            # A CPU generator whatever the device: the same seed gives the same masks on
            # CPU and GPU, so a merge is reproducible across machines.
            gen = torch.Generator()
            gen.manual_seed(job.seed)
            kwargs["generator"] = gen
        if spec.uses_layer:
            kwargs["layer"] = job.layer
            kwargs["num_layers"] = job.depth or self.plan.num_layers  # its own stack's
        if spec.native_output:  # rounded by the method: no float32 result to cast
            kwargs["out_dtype"] = job.result_dtype
        if job.transpose:
            inputs = [t.T for t in inputs]
            base = base.T if base is not None else None
        result = spec.fn(inputs, base, **kwargs)
        if job.transpose:
            result = result.T.contiguous()
        return self._to_host(result, job.result_dtype)

    def _stat(self, src, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """A statistic as the method reads it. A corrupt one is an error, never a warning: a
        NaN Gram or Fisher entry turns the whole merged tensor into NaN, and both are sums of
        squares (a Fisher's entries, a Gram's diagonal), so a negative one is no statistic."""
        t = self._to_device(self._read(src), dtype)
        fix = f"recompute it with `graft stats {kind}`"
        if not all_finite(t):
            raise PlanError(f"statistics file {src.model} has NaN or Inf in {src.name}; {fix}")
        gram = kind == "gram" and t.dim() == 2
        squares = t.diagonal() if gram else t
        if squares.numel() and float(squares.min()) < 0:
            what = "a negative diagonal entry" if gram else "a negative entry"
            raise PlanError(
                f"statistics file {src.model} has {what} in {src.name} (a sum of squares "
                f"cannot be negative); {fix}"
            )
        return t

    def _load(self, src, dtype: torch.dtype, native: bool = False) -> torch.Tensor:
        t = self._read(src)
        if not (native and self.device.type == "cpu" and t.dtype in _NATIVE):
            t = self._to_device(t, dtype)
        if not all_finite(t):
            msg = f"tensor {src.name} of model {src.model} contains NaN or Inf"
            if self.strict:
                fix = self.strict if isinstance(self.strict, str) else _STRICT_FIX
                raise NonFiniteInputError(f"{msg}; {fix}")
            with self._lock:
                self.warnings.append(msg)
        return t


@contextmanager
def _torch_threads(workers: int):
    """Share the cores between our workers and torch's own intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_sidecars(plan: MergePlan, dst: Path, warn: Callable[[str], None]) -> None:
    recipe = plan.recipe
    side = plan.checkpoints[plan.sidecar_model]
    copy_sidecar_files(
        side.root, dst, config=plan.config, warn=warn, modules_root=side.modules_root
    )
    own_files = getattr(side, "write_sidecars", None)  # a GGUF file's tokenizer (graft.io)
    if own_files is not None:
        own_files(dst, warn)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        save_tokenizer(plan.vocab.tokenizer, dst)
    elif plan.vocab is not None and plan.vocab.copy_root is not None:
        copy_tokenizer(plan.vocab.copy_root, dst, warn=warn)
    elif plan.tokenizer_model is not None:
        copy_tokenizer(plan.checkpoints[plan.tokenizer_model].root, dst, warn=warn)
    if plan.chat_template is not None and not write_chat_template(dst, plan.chat_template):
        warn("chat_template given, but the output has no tokenizer_config.json; not written")
    write_model_card(
        dst,
        base_models=[str(m) for m in recipe.referenced_models()],
        relation="merge",
        tags=("graft", "merge"),
        recipe_yaml=recipe.text,
    )
