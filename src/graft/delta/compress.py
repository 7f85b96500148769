"""``graft compress``: a dense delta in, a patch out, one tensor at a time.

Patch sizes are known only once each tensor is encoded (how many entries DARE keeps, which
rank an energy threshold picks), so the output goes through `graft.io.SpoolWriter`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from graft.delta import codecs
from graft.delta._common import FiniteCheck, ProgressHook, Report, file_output
from graft.delta._spec import Compressor
from graft.delta.patch import DeltaError, open_delta
from graft.io import SpoolWriter, atomic_output_file
from graft.plan import default_threads, resolve_device, run_pass, tensor_seed


def compress(
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: Compressor,
    params: dict[str, Any],
    threads: int | None = None,
    device: str = "cpu",
    force: bool = False,
    strict: bool = False,
    progress: ProgressHook | None = None,
) -> Report:
    """Compress a dense delta file into a patch with ``method`` (see `graft.delta.COMPRESSORS`).

    Args:
        out: the patch file; ``.safetensors`` is appended when it has another extension.
        params: the method's parameters (missing ones take its defaults; unknown ones are
            an error).
        strict: NaN or Inf in the delta is an error, not a warning. In a matrix that
            the method factorizes (``Compressor.needs_finite``: lowrank) it always is.

    Raises:
        DeltaError: unknown or invalid parameters, an input that is not a dense delta,
            a tensor the parameters do not fit, a tensor the method cannot encode.
    """
    dev = resolve_device(device)
    p = _method_params(method, params)
    out = file_output(out)
    fix = f"{method.name} cannot factorize it; fix the models and run graft diff again"
    check, hard = FiniteCheck(strict), FiniteCheck(True, fix)
    src = open_delta(delta)
    try:
        if src.method != "dense":
            raise DeltaError(
                f"{src.path} is a {src.method} patch, not a dense delta; compress the output "
                "of `graft diff`"
            )
        for name, entry in src.layout.items():
            problem = entry.codec == "dense" and method.check_tensor(name, entry.shape, p)
            if problem:
                raise DeltaError(problem)
        layout: dict[str, dict] = {}
        lock = threading.Lock()
        seed = p.get("seed", 0)

        def work(name: str, writer: SpoolWriter) -> int:
            entry = src.layout[name]
            if entry.codec == "replace":
                codec, parts = "replace", {"": src.replacement(name)}
            else:
                gen = torch.Generator().manual_seed(tensor_seed(seed, name))
                value_dtype = src.file.info(entry.parts[""]).dtype
                d = src.delta(name, dev)
                (hard if method.needs_finite and d.ndim == 2 else check)(
                    d, name, f"delta {src.path}"
                )
                try:
                    codec, parts = method.encode(
                        d, value_dtype=value_dtype, generator=gen if method.uses_seed else None, **p
                    )
                except torch.linalg.LinAlgError:
                    raise DeltaError(
                        f"{method.name} cannot encode tensor {name} of {src.path}: the SVD did "
                        "not converge (ill-conditioned delta); use another method or --energy"
                    ) from None
            with lock:
                layout[name] = {"codec": codec, "shape": list(entry.shape)}
            for part, t in parts.items():
                writer.write(codecs.part_name(name, part), t.contiguous())
            return sum(t.numel() * t.element_size() for t in parts.values())

        meta = {k: v for k, v in src.metadata.items() if k.startswith("graft_")}
        meta.update(graft_delta_method=method.name, graft_params=json.dumps(p, sort_keys=True))
        with (
            atomic_output_file(out, force=force, inputs=[delta]) as path,
            SpoolWriter(path) as writer,
        ):
            stats = run_pass(
                list(src.layout),
                lambda n: work(n, writer),
                threads=threads or default_threads(),
                input_bytes=src.nbytes,
                progress=progress,
            )
            writer.finish({**meta, "graft_layout": json.dumps(layout, sort_keys=True)})
        report = Report(stats, Path(out), warnings=check.warnings)
        report.bytes_before = os.path.getsize(src.path)
        report.bytes_on_disk = os.path.getsize(out)
        report.notes = method.describe(layout, p) if method.describe else []
        return report
    finally:
        src.close()


def _method_params(method: Compressor, params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        valid = ", ".join(method.params)
        raise DeltaError(
            f"{method.name} takes no parameter {unknown[0]!r}; its parameters: {valid}"
        )
    p = {**method.params, **params}
    problem = method.check(p)
    if problem:
        raise DeltaError(f"{method.name}: {problem}")
    return p
