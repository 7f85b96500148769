"""``graft diff | apply | transfer | compress | extract-lora | merge-lora``: deltas between
checkpoints, streaming like merges. The work is in `graft.delta`; these only parse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from graft.cli._progress import tensor_progress
from graft.cli._safe import echo_json, safe
from graft.delta import get_compressor, passes
from graft.delta._common import file_output
from graft.delta.lora import extract_lora as _extract_lora
from graft.delta.lora import merge_adapters
from graft.delta.patch import DeltaError
from graft.io import parse_size
from graft.io._atomic import check_output
from graft.plan import resolve_device

THREADS = typer.Option(0, help="Tensors computed at once (0 = cores, at most 4).")
DEVICE = typer.Option("cpu", help="Device for the math: cpu, cuda, cuda:1, ...")
FORCE = typer.Option(
    False, "--force", help="Replace the output if it exists (a folder: only one graft wrote)."
)
FORCE_ANY = typer.Option(
    False,
    "--force-overwrite-anything",
    help="Like --force, but replace the output folder even if graft did not write it "
    "(deletes everything in it).",
)
STRICT = typer.Option(False, "--strict", help="NaN/Inf in an input is an error.")
JSON = typer.Option(False, "--json", help="Print the summary as JSON.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
SCALE_HELP = (
    "Scale of the delta: a number, or a per-layer gradient / filter list in YAML "
    "('[0.5, 1.0]'). Give once for all deltas or once per delta."
)


def diff(
    finetuned: Path = typer.Argument(..., help="The fine-tuned model (folder or file)."),
    base: Path = typer.Argument(..., help="The base it was fine-tuned from."),
    out: Path = typer.Option(..., "--out", "-o", help="Output delta .safetensors file."),
    dtype: str | None = typer.Option(
        None, help="Store the delta as float32, float16 or bfloat16 (default: the model's)."
    ),
    threads: int = THREADS,
    device: str = DEVICE,
    force: bool = FORCE,
    strict: bool = STRICT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Write FINETUNED - BASE as a delta file that records BASE's content hash.

    OUT gets the .safetensors extension when it has none (graft reads files by it).
    """
    out, notes = _file_out(out)
    _check(out, [finetuned, base], force, threads, device, kind="file")
    with _bar("diff", quiet) as hook:
        report = passes.diff(
            finetuned,
            base,
            out,
            dtype=dtype,
            threads=threads or None,
            device=device,
            force=force,
            strict=strict,
            progress=hook,
        )
    report.notes[:0] = notes
    _done(report, as_json, f"wrote delta {out} ({_mb(report.bytes_on_disk)})")


def apply(
    base: Path = typer.Argument(..., help="The model to add the deltas to."),
    deltas: list[Path] = typer.Argument(
        ..., help="Delta or patch files (any compression) or PEFT LoRA adapter folders."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder."),
    scale: list[str] = typer.Option([], "--scale", help=SCALE_HELP),
    force_base: bool = typer.Option(
        False, "--force-base", help="Apply even if a delta records another base's hash."
    ),
    threads: int = THREADS,
    device: str = DEVICE,
    out_shard_size: str = typer.Option("5GB", "--out-shard-size", help="Largest output shard."),
    force: bool = FORCE,
    force_any: bool = FORCE_ANY,
    strict: bool = STRICT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Write BASE + sum of scale x DELTA, one tensor at a time (patches decoded on the fly)."""
    force = force or force_any
    _check(out, [base, *deltas], force, threads, device, force_any=force_any)
    parse_size(out_shard_size, what="--out-shard-size")
    with _bar("apply", quiet) as hook:
        report = passes.apply(
            base,
            deltas,
            out,
            scales=_scales(scale),
            force_base=force_base,
            threads=threads or None,
            device=device,
            max_shard_bytes=out_shard_size,
            force=force,
            overwrite_anything=force_any,
            strict=strict,
            progress=hook,
        )
    _done(report, as_json, f"wrote {out} ({report.stats.tensors} tensors)")


def transfer(
    from_base: Path = typer.Option(..., "--from-base", help="The old base version (B1)."),
    from_ft: Path = typer.Option(..., "--from-ft", help="The fine-tune of the old base (F1)."),
    onto: Path = typer.Option(..., "--onto", help="The new base version (B2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder."),
    scale: str = typer.Option("1.0", "--scale", help=SCALE_HELP),
    threads: int = THREADS,
    device: str = DEVICE,
    out_shard_size: str = typer.Option("5GB", "--out-shard-size", help="Largest output shard."),
    force: bool = FORCE,
    force_any: bool = FORCE_ANY,
    strict: bool = STRICT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Write ONTO + scale x (FROM_FT - FROM_BASE) in one pass, without writing the delta.

    Tensors whose first dimension changed between versions (an extended vocabulary) get
    the delta over the overlapping rows; the summary lists them.
    """
    force = force or force_any
    _check(out, [from_base, from_ft, onto], force, threads, device, force_any=force_any)
    parse_size(out_shard_size, what="--out-shard-size")
    with _bar("transfer", quiet) as hook:
        report = passes.transfer(
            from_base,
            from_ft,
            onto,
            out,
            scale=_scales([scale])[0],
            threads=threads or None,
            device=device,
            max_shard_bytes=out_shard_size,
            force=force,
            overwrite_anything=force_any,
            strict=strict,
            progress=hook,
        )
    _done(report, as_json, f"wrote {out} ({report.stats.tensors} tensors)")


def compress(
    delta: Path = typer.Argument(..., help="A dense delta file from `graft diff`."),
    method: str = typer.Option(
        ...,
        "--method",
        "-m",
        help="compeft, dare, lowrank, or nonzero (lossless, for sparse fine-tunes).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output patch .safetensors file."),
    density: float | None = typer.Option(None, help="compeft/dare: fraction kept per tensor."),
    alpha: float | None = typer.Option(None, help="compeft: scale = alpha x std of the delta."),
    quantize: bool | None = typer.Option(
        None, "--quantize/--no-quantize", help="compeft: ternary values (default) or exact."
    ),
    seed: int | None = typer.Option(None, help="dare/lowrank: seed of the random draws."),
    rank: int | None = typer.Option(None, help="lowrank: rank of every 2-D tensor."),
    energy: float | None = typer.Option(
        None, help="lowrank: per tensor, the smallest rank keeping this fraction of ||delta||^2."
    ),
    threads: int = THREADS,
    device: str = DEVICE,
    force: bool = FORCE,
    strict: bool = STRICT,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Compress a delta into a patch; `graft apply` reads patches as it reads deltas.

    OUT gets the .safetensors extension when it has none.
    """
    spec = get_compressor(method)
    given = {
        "density": density,
        "alpha": alpha,
        "quantize": quantize,
        "seed": seed,
        "rank": rank,
        "energy": energy,
    }
    params = {k: v for k, v in given.items() if v is not None}
    out, notes = _file_out(out)
    _check(out, [delta], force, threads, device, kind="file")
    with _bar("compress", quiet) as hook:
        report = passes.compress(
            delta,
            out,
            method=spec,
            params=params,
            threads=threads or None,
            device=device,
            force=force,
            strict=strict,
            progress=hook,
        )
    report.notes[:0] = notes
    _done(
        report,
        as_json,
        f"wrote {method} patch {out}: {_mb(report.bytes_on_disk)} on disk, dense delta "
        f"{_mb(report.bytes_before)}, {report.ratio:.1f}x smaller",
    )


def extract_lora(
    finetuned: Path = typer.Argument(..., help="The fine-tuned model."),
    base: Path = typer.Argument(..., help="The base it was fine-tuned from."),
    rank: int = typer.Option(..., "--rank", "-r", help="LoRA rank of every adapted layer."),
    out: Path = typer.Option(..., "--out", "-o", help="Output PEFT adapter folder."),
    dtype: str | None = typer.Option(None, help="Adapter dtype (default: the model's)."),
    threads: int = THREADS,
    device: str = DEVICE,
    force: bool = FORCE,
    force_any: bool = FORCE_ANY,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Write the rank-r LoRA adapter of FINETUNED - BASE (truncated SVD) as a PEFT folder."""
    force = force or force_any
    _check(out, [finetuned, base], force, threads, device, force_any=force_any)
    with _bar("extract-lora", quiet) as hook:
        report = _extract_lora(
            finetuned,
            base,
            out,
            rank=rank,
            dtype=dtype,
            threads=threads or None,
            device=device,
            force=force,
            overwrite_anything=force_any,
            progress=hook,
        )
    _done(
        report,
        as_json,
        f"wrote adapter {out} ({report.stats.tensors} layers, rank {rank}, "
        f"{_mb(report.bytes_on_disk)}); deltas of {len(report.untouched)} other tensors "
        "(norms, biases, embeddings) are not in it",
    )


def merge_lora(
    adapters: list[Path] = typer.Argument(..., help="PEFT LoRA adapter folders of one base."),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter folder."),
    weight: list[float] = typer.Option([], "--weight", help="One per adapter (default 1)."),
    rank: int | None = typer.Option(
        None, help="Re-factorize to this rank by SVD (default: concatenate, exact)."
    ),
    threads: int = THREADS,
    device: str = DEVICE,
    force: bool = FORCE,
    force_any: bool = FORCE_ANY,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Merge LoRA adapters into one: concatenated factors, or SVD to a target rank."""
    force = force or force_any
    _check(out, adapters, force, threads, device, force_any=force_any)
    with _bar("merge-lora", quiet) as hook:
        report = merge_adapters(
            adapters,
            out,
            weights=weight or None,
            rank=rank,
            threads=threads or None,
            device=device,
            force=force,
            overwrite_anything=force_any,
            progress=hook,
        )
    _done(report, as_json, f"wrote adapter {out} ({report.stats.tensors} layers)")


# --- helpers ---------------------------------------------------------------------------


def _check(
    out: Path,
    inputs: list[Path],
    force: bool,
    threads: int,
    device: str,
    *,
    kind: str = "dir",
    force_any: bool = False,
) -> None:
    """Every argument check that needs no tensor read, before any work starts."""
    if threads < 0:
        raise DeltaError(f"--threads must be >= 0, got {threads}")
    resolve_device(device)
    check_output(out, inputs=inputs, force=force, overwrite_anything=force_any, kind=kind)


def _file_out(out: Path) -> tuple[Path, list[str]]:
    """OUT with the .safetensors extension graft's readers need, and a note when added."""
    fixed = file_output(out)
    if fixed == out:
        return out, []
    return fixed, [f"wrote {fixed.name}, not {out.name}: graft reads these files by extension"]


def _scales(raw: list[str]) -> list[Any]:
    out = []
    for text in raw:
        try:
            out.append(yaml.safe_load(text))
        except yaml.YAMLError:
            raise DeltaError(f"--scale {text!r} is not a number or YAML list") from None
    return out


def _bar(label: str, quiet: bool):
    return tensor_progress(label, 0, 0, enabled=not quiet)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _done(report: passes.Report, as_json: bool, line: str) -> None:
    err = Console(stderr=True)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {safe(w)}")
    summary = {
        "output": str(report.output),
        "tensors": report.stats.tensors,
        "bytes_read": report.stats.bytes_read,
        "bytes_written": report.stats.bytes_written,
        "seconds": round(report.stats.seconds, 3),
        "gb_per_s": round(report.stats.gb_per_s, 3),
        "overlapped": report.overlapped,
        "untouched": len(report.untouched),
        "warnings": report.warnings,
        "notes": report.notes,
    }
    if report.bytes_on_disk:
        summary["bytes_on_disk"] = report.bytes_on_disk
    if report.bytes_before:
        summary["dense_delta_bytes"] = report.bytes_before
        summary["ratio"] = round(report.ratio, 3)
    if as_json:
        echo_json(summary)
        return
    speed = f"{report.stats.seconds:.1f}s, {report.stats.gb_per_s:.2f} GB/s"
    typer.echo(f"{safe(line, markup=False)} in {speed}")
    for note in report.notes:
        typer.echo(f"note: {safe(note, markup=False)}")
    if report.overlapped:
        typer.echo(
            f"shapes differ between versions; transferred over the overlapping rows only: "
            f"{safe(', '.join(report.overlapped), markup=False)}"
        )
