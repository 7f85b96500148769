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
from graft.delta._common import ProgressHook, Report
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
    progress: ProgressHook | None = None,
) -> Report:
    """Compress a dense delta file into a patch with ``method`` (see `graft.delta.COMPRESSORS`).

    Args:
        params: the method's parameters (missing ones take its defaults; unknown ones are
            an error).

    Raises:
        DeltaError: unknown or invalid parameters, an input that is not a dense delta,
            a tensor the parameters do not fit (e.g. rank too large).
    """
    dev = resolve_device(device)
    p = _method_params(method, params)
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
                codec, parts = method.encode(
                    src.delta(name, dev),
                    value_dtype=value_dtype,
                    generator=gen if method.uses_seed else None,
                    **p,
                )
            with lock:
                layout[name] = {"codec": codec, "shape": list(entry.shape)}
            for part, t in parts.items():
                writer.write(codecs.part_name(name, part), t.contiguous())
            return sum(t.numel() * t.element_size() for t in parts.values())

        meta = {k: v for k, v in src.metadata.items() if k.startswith("graft_")}
        meta.update(graft_delta_method=method.name, graft_params=json.dumps(p, sort_keys=True))
        with atomic_output_file(out, force=force) as path, SpoolWriter(path) as writer:
            stats = run_pass(
                list(src.layout),
                lambda n: work(n, writer),
                threads=threads or default_threads(),
                input_bytes=src.nbytes,
                progress=progress,
            )
            writer.finish({**meta, "graft_layout": json.dumps(layout, sort_keys=True)})
        report = Report(stats, Path(out))
        report.bytes_before = os.path.getsize(src.path)
        report.bytes_on_disk = os.path.getsize(out)
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
