"""``graft merge RECIPE OUT``: run a mergekit-compatible recipe, streaming."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._progress import tensor_progress
from graft.cli._safe import echo_json, safe
from graft.io import parse_size
from graft.io._atomic import check_output
from graft.plan import MergePlan, default_threads, plan_merge, resolve_device, run_plan
from graft.recipe import RecipeError, load_recipes

FORCE_ANY_HELP = (
    "Like --force, but replace OUT even if graft did not write it (deletes everything in "
    "it). Without it, --force replaces only folders graft wrote (they hold a .graft file)."
)


def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's format)."),
    out: Path = typer.Argument(..., help="Output model folder (created atomically)."),
    device: str = typer.Option("cpu", help="Device for the math: cpu, cuda, cuda:1, ..."),
    threads: int = typer.Option(
        0, help="Tensors computed at once (0 = cores, at most 4). Memory grows with it."
    ),
    out_shard_size: str = typer.Option(
        "5GB", "--out-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the recipe against all headers and print the plan."
    ),
    seed: int | None = typer.Option(
        None, help="Seed for random methods (DARE, DELLA); default: the recipe's, else 0."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it exists and graft wrote it."
    ),
    force_any: bool = typer.Option(False, "--force-overwrite-anything", help=FORCE_ANY_HELP),
    allow_drop: list[str] = typer.Option(
        [],
        "--allow-drop",
        help="Tensor names (glob, e.g. 'classifier.*'; * crosses dots) that may be left out "
        "of OUT when some models lack them. Repeatable. Without it such a merge fails.",
    ),
    strict: bool = typer.Option(False, "--strict", help="NaN/Inf in an input is an error."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan or the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    intermediate_dir: Path | None = typer.Option(
        None,
        "--intermediate-dir",
        "-I",
        help="Multi-document recipes: keep each named document's output in DIR/<name> "
        "(mergekit-multi's -I). Default: a temp folder beside OUT, removed afterwards.",
    ),
    ray: str | None = typer.Option(
        None,
        "--ray",
        help="Split the merge by output shards across a Ray cluster: auto (the cluster "
        "running here), local (start one here) or its address. Inputs and OUT must be on "
        "storage every node sees. Needs graft[ray]; see docs/scale-out.md.",
    ),
    workers: int = typer.Option(
        0,
        "--workers",
        min=0,
        help="With --ray: Ray tasks (0 = the cluster's CPUs), at most "
        "one per output shard (a smaller --out-shard-size spreads wider).",
    ),
) -> None:
    """Merge the models a RECIPE names into OUT, one tensor at a time.

    Reads mergekit YAML unchanged for the methods in `graft methods`. Memory stays near
    threads x inputs x largest tensor; the output appears at OUT only when complete.
    """
    if threads < 0:
        raise RecipeError("--threads must be >= 0")
    force = force or force_any
    if not dry_run:
        check_output(out, inputs=[recipe], force=force, overwrite_anything=force_any)
    shard_bytes = parse_size(out_shard_size, what="--out-shard-size")
    resolve_device(device)
    steps = load_recipes(recipe)
    if len(steps) > 1:  # several documents (mergekit-multi): graft/cli/_multi.py
        from graft.cli._multi import merge_documents

        if ray is not None:
            raise RecipeError("--ray runs one recipe document; drop it for multi-document recipes")
        return merge_documents(
            recipe, steps, out, intermediate_dir=intermediate_dir, dry_run=dry_run,
            seed=seed, allow_drop=allow_drop, as_json=as_json, quiet=quiet, force=force,
            force_any=force_any, threads=threads, device=device, shard_bytes=shard_bytes,
            strict=strict,
        )  # fmt: skip
    if intermediate_dir is not None:
        raise RecipeError("--intermediate-dir is for recipes of several documents; drop it")
    parsed = steps[0].recipe
    plan = plan_merge(parsed, seed=seed, allow_drop=allow_drop)
    console = Console(stderr=as_json)
    try:
        if not dry_run:
            inputs = [recipe, *plan.input_paths()]
            check_output(out, inputs=inputs, force=force, overwrite_anything=force_any)
        if dry_run:
            summary = plan_summary(plan)
            if as_json:
                echo_json(summary)
            else:
                _print_plan(console, summary)
            return
        n_threads = threads or default_threads()
        total = sum(plan.input_bytes(j) for j in plan.jobs) + plan.output_bytes()
        options = dict(
            threads=n_threads,
            device=device,
            max_shard_bytes=shard_bytes,
            force=force,
            overwrite_anything=force_any,
            strict=strict,
        )
        emr = plan.method.name == "emr"  # the unified model plus per-task modulators
        if emr and ray is not None:
            raise RecipeError(
                "merge_method emr writes per-task modulators on one machine; drop --ray"
            )
        if ray is not None:
            from graft._ray import connect
            from graft.plan.distributed import run_plan_ray

            connect(ray)  # before the bar: joining a cluster prints Ray's own lines
            options.update(address=ray, workers=workers or None)
        run = run_plan if ray is None else run_plan_ray
        if emr:
            from graft.delta.emr import run_emr as run
        with tensor_progress("merging", len(plan.jobs), total, enabled=not quiet) as hook:
            stats = run(plan, out, progress=hook, **options)
    finally:
        plan.close()
    err = Console(stderr=True)
    for w in stats.warnings:
        err.print(f"[yellow]warning:[/] {safe(w)}")
    result = {
        "output": str(out),
        "method": plan.method.name,
        "tensors": stats.tensors,
        "shards": stats.shards,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        "seconds": round(stats.seconds, 3),
        "gb_per_s": round(stats.gb_per_s, 3),
        "warnings": stats.warnings,
    }
    if plan.method.name == "emr":
        from graft.delta.emr import read_manifest

        result["emr_tasks"] = {t.name: t.scale for t in read_manifest(out).tasks}
    if as_json:
        echo_json(result)
    else:
        console.print(
            f"wrote {safe(out)} ({stats.tensors} tensors, {stats.shards} shard(s), "
            f"{stats.bytes_written / 1e9:.2f} GB) in {stats.seconds:.1f}s, "
            f"{stats.gb_per_s:.2f} GB/s"
        )
        if "emr_tasks" in result:
            console.print(
                f"EMR modulators in {safe(out)}/emr for tasks "
                f"{safe(', '.join(result['emr_tasks']))}; task T's own model: graft apply "
                f"BASE {safe(out)}/emr/T.safetensors -o DIR, or graft eval {safe(out)} --task T"
            )


def plan_summary(plan: MergePlan) -> dict:
    """A JSON-able description of a plan: models, output, and sample parameters."""
    models = []
    for ref, ckpt in plan.checkpoints.items():
        dtypes = sorted({str(ckpt.info(n).dtype).replace("torch.", "") for n in ckpt.names})
        models.append(
            {
                "model": str(ref),
                "path": str(ckpt.path),
                "tensors": len(ckpt.names),
                "bytes": ckpt.total_bytes,
                "dtypes": dtypes,
            }
        )
    computed = [j for j in plan.jobs if not j.copy]
    samples = {}
    for job in computed[:1] + [j for j in computed if j.layer is not None][:1] + computed[-1:]:
        samples[job.name] = {
            "inputs": [str(s.model) for s in job.inputs],
            "base": str(job.base.model) if job.base else None,
            "layer": job.layer,
            "method": (job.method or plan.method).name,
            "params": dict(job.params),
        }
    modules = plan.recipe.modules
    return {
        "method": plan.method.name,
        "modules": {m.name: m.method.name for m in modules} if modules else None,
        "base_model": str(plan.recipe.base_model) if plan.recipe.base_model else None,
        "models": models,
        "output": {
            "tensors": len(plan.jobs),
            "merged": len(computed),
            "copied": len(plan.jobs) - len(computed),
            "bytes": plan.output_bytes(),
            "num_layers": plan.num_layers,
            "dtypes": sorted({str(j.out_dtype).replace("torch.", "") for j in plan.jobs}),
        },
        "sample_tensors": samples,
        "completeness": {
            "input_tensors": plan.input_tensors,
            "dropped": len(plan.dropped),
            "dropped_tensors": [
                {"model": str(d.model), "tensor": d.name, "reason": d.reason} for d in plan.dropped
            ],
        },
        "notes": plan.notes,
    }


def _print_plan(console: Console, s: dict) -> None:
    console.print(f"[bold]plan[/]: {safe(s['method'])}, base {safe(s['base_model'] or '(none)')}")
    table = Table("model", "tensors", "GB", "dtypes")
    for m in s["models"]:
        gb = f"{m['bytes'] / 1e9:.3f}"
        table.add_row(safe(m["model"]), str(m["tensors"]), gb, safe(",".join(m["dtypes"])))
    console.print(table)
    if s["modules"]:
        shown = ", ".join(f"{name} ({method})" for name, method in s["modules"].items())
        console.print(f"modules: {safe(shown)}")
    o = s["output"]
    console.print(
        f"output: {o['tensors']} tensors ({o['merged']} merged, {o['copied']} copied), "
        f"{o['num_layers']} layers, {o['bytes'] / 1e9:.3f} GB, dtypes {safe(','.join(o['dtypes']))}"
    )
    for name, info in s["sample_tensors"].items():
        console.print(f"  {safe(name)}: layer={info['layer']} params={safe(info['params'])}")
    c = s["completeness"]
    console.print(
        f"input tensors: {c['input_tensors']}, every one used for the output"
        if not c["dropped"]
        else f"input tensors: {c['input_tensors']}, {c['dropped']} left out of the output "
        "(--json lists them and why)"
    )
    for note in s["notes"]:
        console.print(f"note: {safe(note)}")
    console.print("[green]recipe and headers check out; nothing was read or written[/]")
