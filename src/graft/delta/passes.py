"""diff, apply and transfer: each a plan over headers plus one streaming pass.

Every check that can fail on the inputs (missing tensors, shapes, the base's content hash,
a corrupt patch layout) runs while planning, before any tensor is read; the pass itself
is graft's engine (`graft.plan.run_pass`) with a small per-tensor job, and every output is
written atomically, so a failure leaves nothing at the output path. `compress` lives in
`graft.delta.compress` and is re-exported here, so ``passes`` holds every delta verb.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from graft import __version__
from graft.delta._common import (
    FiniteCheck,
    PairDelta,
    ProgressHook,
    Report,
    common_dtype,
    delta_metadata,
    file_output,
    parse_dtype,
    write_file,
)
from graft.delta.compress import compress
from graft.delta.patch import Delta, DeltaError, open_delta
from graft.io import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    open_model,
    write_model_card,
)
from graft.plan import default_threads, resolve_device, run_pass
from graft.plan.arch import count_blocks, split_block_name
from graft.recipe import evaluate_setting
from graft.recipe._settings import Conditional, parse_setting

__all__ = ["PairDelta", "Report", "apply", "compress", "diff", "transfer"]


# --- diff ------------------------------------------------------------------------------


def diff(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
    force: bool = False,
    strict: bool = False,
    progress: ProgressHook | None = None,
) -> Report:
    """Write ``finetuned - base`` as a dense delta file (see `graft.delta.patch`).

    Args:
        finetuned, base: model folders or files with the same tensors and shapes.
        out: the delta file; ``.safetensors`` is appended when it has another extension,
            since graft reads files by their extension (`Report.output` is the path).
        dtype: dtype of the stored delta (float32, float16, bfloat16); default: each
            tensor's own dtype in the fine-tune.
        threads, device, force, strict, progress: as for `graft.plan.run_plan` (NaN or
            Inf in either model is a warning, or with ``strict`` an error).

    Raises:
        DeltaError: the models do not match. GraftIOError: a file problem.
    """
    dev = resolve_device(device)
    value_dtype = parse_dtype(dtype)
    out = file_output(out)
    check = FiniteCheck(strict)
    with open_model(finetuned) as ft, open_model(base) as b:
        pair = PairDelta(ft, b)
        outs = {n: value_dtype or ft.info(n).dtype for n in ft.names}
        for n, e in pair.layout.items():
            if e.codec == "replace":
                outs[n] = ft.info(n).dtype
        layout = {n: {"codec": e.codec, "shape": list(e.shape)} for n, e in pair.layout.items()}
        meta = delta_metadata(
            "dense", b, base, ft, finetuned, {}, layout, dtype or common_dtype(ft, ft.names)
        )

        def work(name: str, writer) -> int:
            entry = pair.layout[name]
            if entry.codec == "replace":
                t = pair.replacement(name)
            else:
                t = pair.delta(name, dev, check).to(device="cpu", dtype=outs[name])
            writer.write(name, t.contiguous())
            return t.numel() * t.element_size()

        entries = [(n, outs[n], pair.layout[n].shape) for n in ft.names]
        report = write_file(
            out, entries, meta, ft.names, work, pair.nbytes, threads, force, progress,
            inputs=[finetuned, base],
        )  # fmt: skip
        report.warnings += check.warnings
        return report


# --- apply / transfer --------------------------------------------------------------------


@dataclass(frozen=True)
class _AddJob:
    name: str
    dtype: torch.dtype
    terms: tuple[tuple[int, float, int | None], ...]  # (source, scale, overlap rows or None)
    replace: int | None = None  # source whose replacement value is written


def apply(
    base: str | os.PathLike,
    deltas: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    scales: Sequence[Any] = (1.0,),
    force_base: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int | str = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    strict: bool = False,
    progress: ProgressHook | None = None,
) -> Report:
    """Write ``base + Σ scaleᵢ·deltaᵢ`` as a model folder (config and tokenizer from base).

    Args:
        base: the model to add to.
        deltas: delta or patch files (any compressor) or PEFT LoRA adapter folders.
        scales: one setting for all deltas or one per delta; a setting is a number, a
            gradient over layers (``[0.5, 1.0]``) or ``{filter, value}`` entries, as in
            merge recipes.
        force_base: apply even where a delta records another base's hash (warns).
        force, overwrite_anything: replace an existing ``out`` (`graft.io.check_output`).
        strict: NaN or Inf in the base or a delta is an error, not a warning.

    Raises:
        DeltaError: hash or shape mismatch, a corrupt patch, bad scales.
    """
    opened: list[Delta] = []
    try:
        for d in deltas:
            opened.append(open_delta(d))
        with open_model(base) as b:
            warnings = _check_base(b, opened, force_base)
            report = _add(
                b,
                opened,
                scales,
                out,
                "apply",
                [str(d) for d in deltas],
                inputs=[base, *deltas],
                threads=threads,
                device=device,
                max_shard_bytes=max_shard_bytes,
                force=force,
                overwrite_anything=overwrite_anything,
                strict=strict,
                progress=progress,
            )
            report.warnings[:0] = warnings
            return report
    finally:
        for d in opened:
            d.close()


def transfer(
    from_base: str | os.PathLike,
    from_ft: str | os.PathLike,
    onto: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scale: Any = 1.0,
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int | str = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    strict: bool = False,
    progress: ProgressHook | None = None,
) -> Report:
    """Write ``onto + scale·(from_ft - from_base)`` in one pass, never writing the delta.

    Tensors whose first dimension differs between the versions (an extended vocabulary)
    get the delta over the overlapping rows; `Report.overlapped` lists them. NaN or Inf
    in any of the three models is a warning, or with ``strict`` an error.
    """
    with (
        open_model(from_base) as b1,
        open_model(from_ft) as f1,
        open_model(onto) as b2,
    ):
        pair = PairDelta(f1, b1, keep_ints=False)
        return _add(
            b2,
            [pair],
            [scale],
            out,
            "transfer",
            [str(from_ft), str(from_base)],
            inputs=[from_base, from_ft, onto],
            threads=threads,
            device=device,
            max_shard_bytes=max_shard_bytes,
            force=force,
            overwrite_anything=overwrite_anything,
            strict=strict,
            progress=progress,
        )


def _check_base(base: Checkpoint, deltas: list[Delta], force_base: bool) -> list[str]:
    recorded = [d for d in deltas if d.base_fingerprint]
    if not recorded:
        return []
    have = base.fingerprint()
    warnings = []
    for d in recorded:
        if d.base_fingerprint == have:
            continue
        msg = (
            f"delta {d.path} was taken against {d.metadata.get('graft_base', '?')} (hash "
            f"{d.base_fingerprint}), but {base.path} hashes to {have}"
        )
        if not force_base:
            raise DeltaError(msg + "; apply it to that base, or pass --force-base to apply anyway")
        warnings.append(msg + "; applied anyway (--force-base)")
    return warnings


def _add(
    base: Checkpoint,
    sources,
    scales,
    out,
    verb,
    names,
    *,
    inputs,
    threads,
    device,
    max_shard_bytes,
    force,
    overwrite_anything,
    strict,
    progress,
) -> Report:
    dev = resolve_device(device)
    settings = _scale_settings(scales, len(sources))
    jobs, overlapped, untouched = _plan_add(base, sources, settings)
    check = FiniteCheck(strict)
    warnings: list[str] = _unmatched_filters(settings, base.names)

    def work(job: _AddJob, writer: ShardedWriter) -> int:
        if job.replace is not None:
            t = sources[job.replace].replacement(job.name).to(job.dtype)
        elif not job.terms:
            t = base.get(job.name)
        else:
            acc = base.get(job.name).to(device=dev, dtype=torch.float32)
            check(acc, job.name, f"model {base.path}")
            for i, scale, rows in job.terms:
                d = _delta(sources[i], job.name, dev, check)
                target = acc if rows is None else acc[:rows]
                target.add_(d if rows is None else d[:rows], alpha=scale)
            t = acc.to(device="cpu", dtype=job.dtype)
        writer.write(job.name, t.contiguous())
        return t.numel() * t.element_size()

    def read_bytes(job: _AddJob) -> int:
        own = base.info(job.name).nbytes if job.replace is None else 0
        return own + sum(sources[i].nbytes(job.name) for i, _, _ in job.terms)

    entries = [(j.name, j.dtype, tuple(base.info(j.name).shape)) for j in jobs]
    card = yaml.safe_dump(
        {
            "graft": verb,
            "base": str(base.path),
            "inputs": names,
            "scales": [_plain(s) for s in scales],
        },
        sort_keys=False,
    )
    with atomic_output_dir(
        Path(out), force=force, inputs=inputs, overwrite_anything=overwrite_anything
    ) as tmp:
        with ShardedWriter(
            tmp,
            entries,
            max_shard_bytes=max_shard_bytes,
            metadata={"graft_version": __version__, "graft_method": verb},
        ) as writer:
            stats = run_pass(
                jobs,
                lambda j: work(j, writer),
                threads=threads or default_threads(),
                input_bytes=read_bytes,
                progress=progress,
            )
            writer.finish()
        stats.shards = len(writer.files)
        copy_sidecar_files(
            base.root, tmp, config=base.config, warn=warnings.append, modules_root=base.modules_root
        )
        write_model_card(
            tmp,
            base_models=[str(base.path)],
            relation="finetune",
            tags=("graft", verb),
            recipe_yaml=card,
            title=f"graft {verb} onto {Path(base.path).name}",
        )
    return Report(stats, Path(out), overlapped, untouched, warnings=check.warnings + warnings)


def _delta(source, name: str, dev, check: FiniteCheck) -> torch.Tensor:
    """One source's float32 delta of ``name``, NaN/Inf reported with the file holding it."""
    if isinstance(source, PairDelta):
        return source.delta(name, dev, check)
    d = source.delta(name, dev)
    check(d, name, f"delta {source.path}")
    return d


def _plan_add(base: Checkpoint, sources, settings) -> tuple[list[_AddJob], list[str], list[str]]:
    for src in sources:
        missing = [n for n in src.layout if n not in base]
        if missing:
            raise DeltaError(
                f"tensor {missing[0]} of delta {src.path} is not in {base.path} "
                f"({len(missing)} such); give the base the delta was made for"
            )
    num_layers = count_blocks(base.names, base.config)
    jobs, overlapped, untouched = [], [], []
    for name in base.names:
        info = base.info(name)
        shape = tuple(info.shape)
        block = split_block_name(name)
        t = 0.0 if block is None else (block.index / (num_layers - 1) if num_layers > 1 else 1.0)
        terms, replace = [], None
        for i, src in enumerate(sources):
            entry = src.layout.get(name)
            if entry is None:
                continue
            rows = _overlap(name, shape, entry.shape, src.path)
            if entry.codec == "replace":
                if rows is not None:
                    raise DeltaError(f"tensor {name}: replacement shape {entry.shape} != {shape}")
                replace = i
                continue
            if not info.dtype.is_floating_point:
                raise DeltaError(
                    f"tensor {name} of {base.path} is {info.dtype}; a delta cannot apply"
                )
            scale = evaluate_setting(settings[i], name, t, kind=float, where=f"scale of {src.path}")
            terms.append((i, 1.0 if scale is None else scale, rows))
            if rows is not None and name not in overlapped:
                overlapped.append(name)
        if not terms and replace is None:
            untouched.append(name)
        jobs.append(_AddJob(name, info.dtype, tuple(terms), replace if not terms else None))
    return jobs, overlapped, untouched


def _overlap(name: str, have: tuple, delta: tuple, path) -> int | None:
    """None when shapes match; the overlapping row count when only dim 0 differs."""
    if have == delta:
        return None
    if len(have) == len(delta) and len(have) >= 1 and have[1:] == delta[1:]:
        return min(have[0], delta[0])
    if len(have) == 2 and have == delta[::-1]:
        raise DeltaError(
            f"shape mismatch for {name}: the base has {have}, delta {path} has {delta}, the "
            "transpose; for a LoRA adapter, its fan_in_fan_out setting does not fit this base"
        )
    raise DeltaError(
        f"shape mismatch for {name}: the base has {have}, delta {path} has {delta}; only "
        "tensors differing in their first dimension (vocabulary rows) can be transferred"
    )


def _unmatched_filters(settings: list[Any], names: Sequence[str]) -> list[str]:
    """A ``--scale`` filter no tensor name contains (a typo) leaves those tensors at 1;
    say so rather than apply scale 1 silently."""
    out = []
    for setting in settings:
        if not (isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional)):
            continue
        for cond in setting:
            if cond.filter not in (None, "*") and not any(cond.filter in n for n in names):
                out.append(f"--scale filter {cond.filter!r} matches no tensor of the base")
    return out


def _scale_settings(scales: Sequence[Any], n: int) -> list[Any]:
    scales = list(scales) or [1.0]
    if len(scales) == 1:
        scales = scales * n
    if len(scales) != n:
        raise DeltaError(f"got {len(scales)} scales for {n} deltas; give one, or one per delta")
    return [parse_setting(s, "--scale") for s in scales]


def _plain(setting: Any) -> Any:
    return setting if isinstance(setting, int | float | str) else str(setting)
