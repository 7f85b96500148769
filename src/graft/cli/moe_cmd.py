"""``graft moe RECIPE OUT``: a mergekit-moe recipe -> a Mixtral / Qwen2-MoE model folder."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from graft.cli._progress import count_progress, tensor_progress
from graft.cli._safe import echo_json, safe
from graft.io import parse_size
from graft.io._atomic import check_output
from graft.moe import MoEPlan, compute_gates, plan_moe, prompt_count, run_moe
from graft.plan import default_threads, resolve_device
from graft.recipe import RecipeError
from graft.recipe.moe import load_moe_recipe

FORCE_ANY_HELP = (
    "Like --force, but replace OUT even if graft did not write it (deletes everything in it)."
)
SAME_HELP = (
    "Build even when every expert is the same model (mergekit's flag of this name): the "
    "result gives the same outputs as that model, at more cost, until trained."
)


def moe(
    recipe: Path = typer.Argument(..., help="mergekit-moe recipe YAML (base_model, experts...)."),
    out: Path = typer.Argument(..., help="Output model folder (created atomically)."),
    device: str = typer.Option(
        "cpu", help="Device for the base model's forward passes (gate_mode hidden)."
    ),
    threads: int = typer.Option(0, help="Tensors written at once (0 = cores, at most 4)."),
    out_shard_size: str = typer.Option(
        "5GB", "--out-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the recipe against all headers and print the plan."
    ),
    seed: int | None = typer.Option(
        None, help="Seed for random gates and noise_scale; default: the recipe's, else 0."
    ),
    allow_same: bool = typer.Option(
        False, "--i-understand-this-is-not-useful-without-training", help=SAME_HELP
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it exists and graft wrote it."
    ),
    force_any: bool = typer.Option(False, "--force-overwrite-anything", help=FORCE_ANY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the plan or the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build a mixture-of-experts model from dense models, as mergekit-moe does.

    Attention, norms and embeddings come from base_model; each expert's MLP, in every
    layer, from that expert's source_model; the routers from gate_mode (hidden: the base's
    hidden states on each expert's prompts; cheap_embed: the prompts' token embeddings;
    random). Llama / Mistral experts give a Mixtral model; with one shared expert,
    Qwen2-MoE. See docs/moe.md.
    """
    if threads < 0:
        raise RecipeError("--threads must be >= 0")
    force = force or force_any
    if not dry_run:
        check_output(out, inputs=[recipe], force=force, overwrite_anything=force_any)
    shard_bytes = parse_size(out_shard_size, what="--out-shard-size")
    resolve_device(device)
    parsed = load_moe_recipe(recipe, allow_same_experts=allow_same)
    plan = plan_moe(parsed, seed=seed)
    console = Console(stderr=as_json)
    try:
        if dry_run:
            summary = plan_summary(plan)
            if as_json:
                echo_json(summary)
            else:
                _print_plan(console, summary)
            return
        check_output(
            out, inputs=[recipe, *plan.input_paths()], force=force, overwrite_anything=force_any
        )
        n_prompts = prompt_count(parsed)
        with count_progress(
            "routing prompts", n_prompts, unit="prompts", enabled=not quiet and n_prompts > 0
        ) as tick:
            gates = compute_gates(plan, device=device, progress=tick)
        total = sum(plan.input_bytes(j) for j in plan.jobs) + plan.output_bytes()
        with tensor_progress("building MoE", len(plan.jobs), total, enabled=not quiet) as hook:
            stats = run_moe(
                plan,
                gates,
                out,
                threads=threads or default_threads(),
                max_shard_bytes=shard_bytes,
                force=force,
                overwrite_anything=force_any,
                progress=hook,
            )
    finally:
        plan.close()
    err = Console(stderr=True)
    for w in [*plan.notes, *stats.warnings]:
        err.print(f"[yellow]warning:[/] {safe(w)}")
    result = {
        "output": str(out),
        "architecture": plan.config["architectures"][0],
        "experts": len(parsed.experts),
        "shared_experts": len(parsed.shared_experts),
        "experts_per_token": parsed.experts_per_token,
        "gate_mode": parsed.gate_mode,
        "layers": plan.num_layers,
        "tensors": stats.tensors,
        "shards": stats.shards,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        "seconds": round(stats.seconds, 3),
        "warnings": [*plan.notes, *stats.warnings],
    }
    if as_json:
        echo_json(result)
    else:
        console.print(
            f"wrote {safe(out)}: {result['architecture']}, {result['experts']} experts "
            f"({parsed.experts_per_token} per token), {plan.num_layers} layers, "
            f"{stats.tensors} tensors, {stats.bytes_written / 1e9:.2f} GB in {stats.seconds:.1f}s"
        )


def plan_summary(plan: MoEPlan) -> dict:
    """A JSON-able description of a MoE plan."""
    r = plan.recipe
    kinds: dict[str, int] = {}
    for j in plan.jobs:
        kinds[j.kind] = kinds.get(j.kind, 0) + 1
    return {
        "architecture": plan.config["architectures"][0],
        "base_model": str(r.base_model),
        "experts": [str(e.model) for e in r.experts],
        "shared_experts": [str(e.model) for e in r.shared_experts],
        "experts_per_token": r.experts_per_token,
        "gate_mode": r.gate_mode,
        "prompts_to_run": prompt_count(r),
        "layers": plan.num_layers,
        "hidden_size": plan.hidden_size,
        "output": {
            "tensors": len(plan.jobs),
            "by_kind": kinds,
            "bytes": plan.output_bytes(),
            "dtypes": sorted({str(j.out_dtype).replace("torch.", "") for j in plan.jobs}),
        },
        "notes": plan.notes,
    }


def _print_plan(console: Console, s: dict) -> None:
    console.print(
        f"[bold]plan[/]: {safe(s['architecture'])} from base {safe(s['base_model'])}, "
        f"{len(s['experts'])} experts ({s['experts_per_token']} per token), "
        f"gate_mode {safe(s['gate_mode'])}, {s['layers']} layers"
    )
    for i, e in enumerate(s["experts"]):
        console.print(f"  expert {i}: {safe(e)}")
    for e in s["shared_experts"]:
        console.print(f"  shared expert: {safe(e)}")
    o = s["output"]
    kinds = ", ".join(f"{n} {k}" for k, n in o["by_kind"].items())
    console.print(
        f"output: {o['tensors']} tensors ({kinds}), {o['bytes'] / 1e9:.3f} GB, "
        f"dtypes {safe(','.join(o['dtypes']))}"
    )
    if s["prompts_to_run"]:
        console.print(f"routers: {s['prompts_to_run']} prompts to run through the base model")
    for note in s["notes"]:
        console.print(f"note: {safe(note)}")
    console.print("[green]recipe and headers check out; nothing was read or written[/]")
