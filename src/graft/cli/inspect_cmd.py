"""``graft inspect PATH``: what a checkpoint holds, read from its headers only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._safe import echo_json, safe
from graft.io import open_checkpoint
from graft.plan.arch import count_blocks


def inspect(
    path: Path = typer.Argument(
        ...,
        help="Model folder, .safetensors, .gguf or .bin/.pt file, or a hub id in the local cache.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
) -> None:
    """Show architecture, parameter count, dtypes and tensors of a checkpoint (headers only)."""
    if not path.exists():  # a hub id (org/name) in the local Hugging Face cache, as merge does
        from graft.plan.models import resolve_model_path
        from graft.recipe import ModelRef

        path = resolve_model_path(ModelRef(str(path)), None)
    with open_checkpoint(path) as ckpt:
        infos = [ckpt.info(n) for n in ckpt.names]
        config = ckpt.config or {}
        dtype_params = Counter()
        for i in infos:
            dtype_params[str(i.dtype).replace("torch.", "")] += i.numel
        summary = {
            "path": str(path),
            "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"),
            "num_layers": count_blocks(ckpt.names, config),
            "num_tensors": len(infos),
            "num_params": sum(i.numel for i in infos),
            "bytes": sum(i.nbytes for i in infos),
            "params_by_dtype": dict(dtype_params),
            # a file with no tensors is still the one file read
            "files": sorted({str(i.file) for i in infos})
            or ([str(path)] if path.is_file() else []),
        }
        quant = getattr(ckpt, "quantization", None)  # FP8 / GGUF, dequantized as read
        if quant is not None:
            summary["quantization"] = quant.summary()
        if tensors or as_json:
            summary["tensors"] = [
                {
                    "name": i.name,
                    "dtype": str(i.dtype).replace("torch.", ""),
                    "shape": list(i.shape),
                }
                for i in infos
            ]
    if as_json:
        echo_json(summary)
        return
    console = Console()
    console.print(f"[bold]{safe(summary['path'])}[/]")
    for key in ("architecture", "model_type", "num_layers", "num_tensors"):
        console.print(f"  {key}: {safe(summary[key])}")
    console.print(f"  parameters: {summary['num_params']:,} ({summary['bytes'] / 1e9:.3f} GB)")
    for dt, n in summary["params_by_dtype"].items():
        console.print(f"    {safe(dt)}: {n:,}")
    console.print(f"  files: {len(summary['files'])}")
    if "quantization" in summary:
        console.print(f"  stored as: {safe(summary['quantization'])}")
    if tensors:
        table = Table("tensor", "dtype", "shape")
        for t in summary["tensors"]:
            shape = "x".join(map(str, t["shape"])) or "scalar"
            table.add_row(safe(t["name"]), safe(t["dtype"]), shape)
        console.print(table)
