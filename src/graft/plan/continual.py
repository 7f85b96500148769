"""Continual merging: add one model at a time to a saved merge state (OPCM).

A state folder holds everything the next step needs, and nothing per past model::

    STATE/
      model/                   the current merged model (an HF folder transformers loads)
      recipe.yaml              the one-shot recipe that gives the same model: base_model,
                               the models in arrival order, the parameters
      opcm-state.safetensors   per merged tensor, the running sum Sₜ of projected task
                               vectors (`graft.merge.opcm`), in the dtype it is computed in
      opcm-state.json          per merged tensor, Σᵢ ‖τᵢ‖ (for the adaptive λ)

Adding model ``t + 1`` reads the base, the new model and the state, one tensor at a time
(the same streaming pass as ``graft merge``), and replaces the whole folder atomically:
a reader sees step ``t`` or step ``t + 1``, never a mix. The subspace each new task vector
is projected against is recomputed by SVD from ``Sₜ`` (storing ``U`` and ``V`` as well would
double the state for nothing). Memory: a few tensors at a time; disk: the merged model
plus ``Sₜ`` (float32, float64 for small tensors).

Because the per-tensor math is `graft.merge.opcm`'s, on the same dtypes in the same order,
``graft merge STATE/recipe.yaml OUT`` writes the same bytes as ``STATE/model``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from graft import __version__
from graft.io import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    copy_tokenizer,
    open_checkpoint,
    read_json,
    recipe_hash,
    write_model_card,
    write_text,
)
from graft.merge import opcm
from graft.plan.engine import (
    ProgressHook,
    all_finite,
    default_threads,
    resolve_device,
    run_pass,
)
from graft.plan.plan import MergePlan, PlanError, TensorJob, plan_merge
from graft.recipe import Recipe, load_recipe, parse_recipe

STATE_FILE = "opcm-state.safetensors"
NORMS_FILE = "opcm-state.json"
RECIPE_FILE = "recipe.yaml"
MODEL_DIR = "model"
FORMAT = "graft-continual-opcm/1"


@dataclass
class ContinualResult:
    """What one step did."""

    state: Path
    model: Path
    models: list[str]
    merged_tensors: int
    copied_tensors: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return len(self.models)


def continual_add(
    state: str | Path,
    model: str,
    *,
    base: str | None = None,
    alpha: float | None = None,
    no_project: Sequence[str] = (),
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5_000_000_000,
    progress: ProgressHook | None = None,
) -> ContinualResult:
    """Merge ``model`` into the continual state at ``state`` (created on the first call).

    Args:
        state: the state folder; absent or empty for the first model.
        model: the next model (path, hub id in the local cache, or ``model+adapter``).
        base: the base model; needed for the first model, checked against the state after.
        alpha: OPCM's ``α`` (default 0.5); fixed by the first step.
        no_project: tensor-name substrings whose 2-D tensors are added unprojected (the
            reference's rule for embeddings: ``["embeddings"]``); fixed by the first step.
        threads / device / max_shard_bytes / progress: as for `graft.plan.run_plan`.

    Raises:
        PlanError: the folder is not a state, the options contradict it, the model does
            not fit the state or was merged already, or a task vector holds NaN/Inf.
    """
    start = time.perf_counter()
    root = Path(state)
    dev = resolve_device(device)
    previous = _read_state(root)
    new_ref = _pin(model)
    if previous is None:
        if base is None:
            raise PlanError(f"{root} holds no merge state yet; give the base model (--base)")
        params = _params(0.5 if alpha is None else alpha, no_project)
        base_ref, models, norms = _pin(base), [], {}
    else:
        recipe, norms = previous
        base_ref, models, params = _check_options(root, recipe, base, alpha, no_project)
    if new_ref in models:
        raise PlanError(f"{model} is already merged into {root} (step {models.index(new_ref) + 1})")
    plan = plan_merge(parse_recipe(_recipe_text(base_ref, [new_ref], params)), drop_hint=False)
    old = None
    try:
        old = open_checkpoint(root / STATE_FILE) if previous is not None else None
        jobs = [j for j in plan.jobs if not j.copy]
        if old is not None:
            _check_fits(root, old, norms, jobs, model)
        full_text = _recipe_text(base_ref, [*models, new_ref], params)
        step = _Step(plan, old, norms, len(models) + 1, dev)
        with atomic_output_dir(root, force=True, inputs=plan.input_paths()) as tmp:
            _run(step, plan, full_text, jobs, tmp, threads, max_shard_bytes, progress)
            write_text(tmp / RECIPE_FILE, full_text)
            doc = {"format": FORMAT, "graft_version": __version__, "norm_sums": step.norm_sums}
            write_text(tmp / NORMS_FILE, json.dumps(doc, indent=1) + "\n")
            if old is not None:
                old.close()  # before the old folder is moved aside
    finally:
        if old is not None:
            old.close()
        plan.close()
    return ContinualResult(
        root,
        root / MODEL_DIR,
        [*models, new_ref],
        merged_tensors=len(jobs),
        copied_tensors=len(plan.jobs) - len(jobs),
        seconds=time.perf_counter() - start,
        notes=list(plan.notes),
    )


def read_continual_state(state: str | Path) -> Recipe:
    """The recipe a state folder records (its base, models in arrival order, parameters).

    Raises:
        PlanError: ``state`` is not a continual-merge state folder.
    """
    found = _read_state(Path(state))
    if found is None:
        raise PlanError(f"{state} holds no continual-merge state; `graft continual add` makes one")
    return found[0]


class _Step:
    """Computes one tensor of one step: new running sum, new merged tensor."""

    def __init__(
        self,
        plan: MergePlan,
        old: Checkpoint | None,
        norms: dict[str, float],
        count: int,
        dev: torch.device,
    ):
        self.plan, self.old, self.count, self.dev = plan, old, count, dev
        self.previous_norms: dict[str, float] = norms
        self.norm_sums: dict[str, float] = {}

    def __call__(self, job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
        read = lambda src: self.plan.checkpoints[src.model].get(src.name)  # noqa: E731
        # The same loads and casts as the engine's worker, so the bytes match `graft merge`.
        base = read(job.base).to(device=self.dev, dtype=torch.float32)
        new = read(job.inputs[0]).to(device=self.dev, dtype=torch.float32)
        delta = opcm.task_vector(new, base)
        if not bool(torch.isfinite(delta).all()):
            raise PlanError(
                f"tensor {job.name} of model {job.inputs[0].model} contains NaN or Inf; "
                "fix the checkpoint (adding it would poison the merge state)"
            )
        norm_sum = self.previous_norms.get(job.name, 0.0) + float(torch.linalg.vector_norm(delta))
        prev = None if self.old is None else self.old.get(job.name).to(self.dev)
        if prev is not None and not all_finite(prev):
            raise PlanError(
                f"tensor {job.name} of the running sum {STATE_FILE} contains NaN or Inf; was "
                "it edited? rebuild the state from its models"
            )
        p = job.params
        total = opcm.add_task(prev, delta, alpha=p["alpha"], project=p["project"])
        self.norm_sums[job.name] = norm_sum
        merged = opcm.merged_tensor(base, total, norm_sum, self.count)
        return total.cpu(), merged.to(device="cpu", dtype=job.out_dtype)


def _run(
    step: _Step,
    plan: MergePlan,
    full_text: str,
    jobs: list[TensorJob],
    tmp: Path,
    threads: int | None,
    max_shard_bytes: int,
    progress: ProgressHook | None,
) -> None:
    """Write STATE/model and the new running sums into the temp folder ``tmp``."""
    metadata = {  # as `run_plan` writes it, so the files match `graft merge`'s byte for byte
        "format": "pt",
        "graft_version": __version__,
        "graft_recipe_sha256": recipe_hash(full_text),
        "graft_method": "opcm",
    }
    out_dir = tmp / MODEL_DIR
    out_dir.mkdir()
    entries = [(j.name, j.out_dtype, j.shape) for j in plan.jobs]
    # Sₜ is kept in the dtype opcm computes it in (float64 for small tensors); "meta"
    # tensors carry the shape without allocating it.
    sums = [(j.name, opcm.svd_dtype(torch.empty(j.shape, device="meta")), j.shape) for j in jobs]
    with (
        ShardedWriter(out_dir, entries, max_shard_bytes=max_shard_bytes, metadata=metadata) as out,
        ShardedWriter(
            tmp,
            sums,
            max_shard_bytes=1 << 62,
            metadata={"graft_continual": FORMAT},
            filename=STATE_FILE,
        ) as state,
    ):

        def work(job: TensorJob) -> int:
            if job.copy:
                tensor = plan.checkpoints[job.base.model].get(job.base.name).to(job.out_dtype)
            else:
                total, tensor = step(job)
                state.write(job.name, total.contiguous())
            out.write(job.name, tensor.contiguous())
            return tensor.numel() * tensor.element_size()

        def cost(job: TensorJob) -> int:
            return plan.input_bytes(job) * (1 if job.copy else 2)

        run_pass(
            plan.jobs,
            work,
            threads=threads or default_threads(),
            input_bytes=cost,
            progress=progress,
        )
    recipe = parse_recipe(full_text)
    side = plan.checkpoints[plan.sidecar_model]
    copy_sidecar_files(side.root, out_dir, config=plan.config, modules_root=side.modules_root)
    if plan.tokenizer_model is not None:
        copy_tokenizer(plan.checkpoints[plan.tokenizer_model].root, out_dir)
    write_model_card(
        out_dir,
        base_models=[str(m) for m in recipe.referenced_models()],
        relation="merge",
        tags=("graft", "merge", "continual"),
        recipe_yaml=full_text,
    )


def _read_state(root: Path) -> tuple[Recipe, dict[str, float]] | None:
    """The recorded recipe and norm sums, or None for a folder that is absent or empty."""
    if not root.exists() or (root.is_dir() and next(root.iterdir(), None) is None):
        return None
    missing = [f for f in (STATE_FILE, NORMS_FILE, RECIPE_FILE) if not (root / f).is_file()]
    if missing:
        raise PlanError(
            f"{root} is not a continual-merge state (it lacks {', '.join(missing)}); give a "
            "new or empty folder for a new merge, or the folder an earlier step wrote"
        )
    recipe = load_recipe(root / RECIPE_FILE)
    doc = read_json(root / NORMS_FILE, fix="write the state again from its models")
    sums = doc.get("norm_sums") if isinstance(doc, dict) else None
    if (
        recipe.method.name != "opcm"
        or not isinstance(doc, dict)
        or doc.get("format") != FORMAT
        or not isinstance(sums, dict)
        or not all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in sums.values())
    ):
        raise PlanError(
            f"{root / NORMS_FILE} or {RECIPE_FILE} is not a {FORMAT} state; was it edited?"
        )
    return recipe, sums


def _check_options(
    root: Path, recipe: Recipe, base: str | None, alpha: float | None, no_project: Sequence[str]
) -> tuple[str, list[str], dict]:
    """The state's base, models and parameters; options that contradict them fail."""
    base_ref = str(recipe.base_model)
    models = [str(m.model) for m in recipe.models or ()]
    params = dict(yaml.safe_load(recipe.text).get("parameters") or {})
    params.setdefault("alpha", opcm.SPEC.param("alpha").default)
    if base is not None and _pin(base) != base_ref:
        raise PlanError(f"{root} merges onto base {base_ref}, not {base}; drop --base")
    if alpha is not None and alpha != params["alpha"]:
        raise PlanError(f"{root} was started with alpha {params['alpha']}; drop --alpha")
    if no_project and _params(params["alpha"], no_project) != params:
        raise PlanError(f"{root} fixed which tensors are projected at its first step")
    return base_ref, models, params


def _check_fits(
    root: Path, old: Checkpoint, norms: dict[str, float], jobs: list[TensorJob], model: str
) -> None:
    """The new model's merged tensors are exactly the state's, with the same shapes."""
    have = {j.name: j for j in jobs}
    extra = sorted(set(have) - set(old.names))
    lacking = sorted(set(old.names) - set(have))
    if extra or lacking:
        what = f"has {extra[0]}, which" if extra else f"lacks {lacking[0]}, which"
        raise PlanError(f"model {model} {what} the merge in {root} has not; models must match")
    for name, job in have.items():
        if tuple(old.info(name).shape) != job.shape or name not in norms:
            raise PlanError(f"tensor {name}: the state in {root} does not match model {model}")
        dtype = old.info(name).dtype
        if dtype not in (torch.float32, torch.float64):
            raise PlanError(
                f"tensor {name} of {root / STATE_FILE} is {str(dtype).removeprefix('torch.')}, "
                "not a float32/float64 running sum; was it edited? rebuild the state from its "
                "models"
            )


def _params(alpha: float, no_project: Sequence[str]) -> dict:
    params: dict = {"alpha": float(alpha)}
    if no_project:
        params["project"] = [{"filter": f, "value": False} for f in no_project]
    return params


def _recipe_text(base: str, models: Sequence[str], params: dict) -> str:
    doc = {
        "merge_method": "opcm",
        "base_model": base,
        "models": [{"model": m} for m in models],
        "parameters": params,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _pin(ref: str) -> str:
    """A model reference with local paths made absolute, so the recorded recipe works from
    any folder; hub ids stay as they are."""
    parts = ref.strip().split("+", 1)
    pinned = [
        str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in parts
    ]
    return "+".join(pinned)
