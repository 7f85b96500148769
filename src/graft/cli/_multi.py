"""``graft merge`` for a recipe file of several documents (mergekit-multi's format)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from graft.cli._progress import tensor_progress
from graft.cli._safe import echo_json, safe
from graft.io._atomic import check_output
from graft.plan import default_threads, run_plan
from graft.plan.multi import plan_steps, run_steps
from graft.recipe import RecipeStep


def merge_documents(
    recipe: Path,
    steps: list[RecipeStep],
    out: Path,
    *,
    intermediate_dir: Path | None,
    dry_run: bool,
    seed: int | None,
    allow_drop: list[str],
    as_json: bool,
    quiet: bool,
    force: bool,
    force_any: bool,
    threads: int,
    device: str,
    shard_bytes: int,
    strict: bool,
) -> None:
    """Plan (``--dry-run``) or run every document, the final merge into OUT."""
    from graft.cli.merge import _print_plan, plan_summary

    console = Console(stderr=as_json)
    kept = intermediate_dir is not None
    if dry_run:
        planned = plan_steps(
            steps, out, intermediate_dir=intermediate_dir, seed=seed, allow_drop=allow_drop
        )
        try:
            docs = [
                {
                    "name": step.recipe.name,
                    "final": step.final,
                    "uses": list(step.needs),
                    "output": str(target)
                    if step.final or kept
                    else f"(temporary)/{step.recipe.name}",
                    "plan": plan_summary(plan),
                }
                for step, target, plan in planned
            ]
        finally:
            for _, _, plan in planned:
                plan.close()
        if as_json:
            echo_json({"documents": docs})
            return
        for doc in docs:
            uses = f", uses {', '.join(doc['uses'])}" if doc["uses"] else ""
            console.print(
                f"[bold]document {safe(doc['name'] or '(final merge)')}[/] -> "
                f"{safe(doc['output'])}{safe(uses)}"
            )
            _print_plan(console, doc["plan"])
        return

    check_output(out, inputs=[recipe], force=force, overwrite_anything=force_any)
    options = dict(
        threads=threads or default_threads(),
        device=device,
        max_shard_bytes=shard_bytes,
        force=force,
        overwrite_anything=force_any,
        strict=strict,
    )

    def execute(plan, target: Path, step: RecipeStep):
        total = sum(plan.input_bytes(j) for j in plan.jobs) + plan.output_bytes()
        label = f"merging {step.label}"
        with tensor_progress(label, len(plan.jobs), total, enabled=not quiet) as hook:
            return run_plan(plan, target, progress=hook, **options)

    results = run_steps(
        steps,
        out,
        execute=execute,
        intermediate_dir=intermediate_dir,
        seed=seed,
        allow_drop=allow_drop,
        force=force,
        overwrite_anything=force_any,
    )
    err = Console(stderr=True)
    for r in results:
        for w in r.stats.warnings:
            err.print(f"[yellow]warning ({safe(r.step.label)}):[/] {safe(w)}")
    summary = [
        {
            "name": r.step.recipe.name,
            "final": r.step.final,
            "output": str(r.output) if r.step.final or kept else None,
            "tensors": r.stats.tensors,
            "shards": r.stats.shards,
            "bytes_written": r.stats.bytes_written,
            "seconds": round(r.stats.seconds, 3),
            "warnings": r.stats.warnings,
        }
        for r in results
    ]
    if as_json:
        echo_json({"output": str(out), "documents": summary})
        return
    for doc in summary:
        where = doc["output"] or "(temporary, removed)"
        console.print(
            f"{safe(doc['name'] or 'final merge')}: {doc['tensors']} tensors -> {safe(where)} "
            f"in {doc['seconds']:.1f}s"
        )
    console.print(f"wrote {safe(out)} ({len(results)} documents merged)")
