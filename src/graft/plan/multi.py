"""Run a multi-document recipe (`graft.recipe.multi`): each document in turn, later ones
reading earlier outputs.

Where outputs go (mergekit-multi's layout, with one choice of graft's):

* the final merge (the unnamed document, else the one no other document uses) is written
  to OUT;
* a named document is written to ``INTERMEDIATE_DIR/<name>`` when an intermediate folder
  is given (mergekit-multi's required ``--intermediate-dir``) and kept there; every
  document then runs, as in mergekit-multi;
* without one (*graft*), named documents go to a hidden temp folder beside OUT, removed
  when the run ends (also on failure). A document the final merge does not use would be
  thrown away unseen, so it is an error there.

Every document is planned (headers only, against stand-ins for the outputs not written
yet) before the first merge starts, so a bad document fails before anything is written.
graft rebuilds every intermediate output on each run; mergekit-multi's ``--lazy``
(default) reuses any folder that already holds a model, even one made from another
recipe. An existing ``INTERMEDIATE_DIR/<name>`` is replaced only with ``--force`` (and
only when graft wrote it), like OUT. A document failing while it runs stops the run; OUT
is not written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from graft.io import Checkpoint, GraftIOError, TensorInfo, check_output, scratch_dir
from graft.plan.plan import MergePlan, PlanError, plan_merge
from graft.recipe import RecipeError, RecipeStep
from graft.recipe.multi import with_outputs


@dataclass
class StepResult:
    """One document's run: where its output went and the run's statistics."""

    step: RecipeStep
    output: Path
    stats: object


class PlannedOutput:
    """A header-only stand-in for a document's output that a ``--dry-run`` does not write:
    its planned tensor names, shapes and dtypes and its output config, so documents that
    use it can be planned too. Reading tensors from it is an error."""

    def __init__(self, plan: MergePlan, path: Path):
        self.path = path
        vocab = plan.vocab
        side = plan.checkpoints[plan.sidecar_model]
        self.root = (vocab.copy_root if vocab and vocab.tokenizer is None else None) or side.root
        self.modules_root = None
        self.metadata: dict[str, str] = {}
        self.planned_tokenizer = vocab.tokenizer if vocab is not None else None
        self.config = plan.config
        infos = [
            TensorInfo(j.name, j.out_dtype, tuple(j.shape), _nbytes(j), path) for j in plan.jobs
        ]
        self.names = [i.name for i in infos]
        self._infos = {i.name: i for i in infos}

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise GraftIOError(f"tensor {name!r} is not in the planned output {self.path}")
        return self._infos[name]

    def get(self, name: str):
        raise PlanError(f"{self.path} is not written yet (dry run); cannot read {name!r}")

    def fingerprint(self) -> str:
        raise PlanError(
            f"{self.path} is not written yet (dry run); statistics files cannot be checked "
            "against it"
        )

    def close(self) -> None:
        pass


def _nbytes(job) -> int:
    return math.prod(job.shape) * job.out_dtype.itemsize


def plan_steps(
    steps: Sequence[RecipeStep],
    out: Path,
    *,
    intermediate_dir: Path | None = None,
    seed: int | None = None,
    allow_drop: Sequence[str] = (),
) -> list[tuple[RecipeStep, Path, MergePlan]]:
    """Plan every document without writing anything (``--dry-run``): documents that use
    another's output are planned against its `PlannedOutput`.

    Returns:
        (step, where its output would go, its plan) per document, in run order; the caller
        closes the plans.
    """
    folder = intermediate_dir or out.parent / f".{out.name}.intermediate"
    stand_ins: dict[str, Checkpoint] = {}
    planned: list[tuple[RecipeStep, Path, MergePlan]] = []
    try:
        for step in steps:
            target = _target(step, out, folder)
            plan = _plan(step, folder, seed, allow_drop, stand_ins)
            planned.append((step, target, plan))
            if step.recipe.name is not None:
                stand_ins[step.recipe.name] = PlannedOutput(plan, target)  # type: ignore[assignment]
    except BaseException:
        for _, _, plan in planned:
            plan.close()
        raise
    return planned


def run_steps(
    steps: Sequence[RecipeStep],
    out: Path,
    *,
    execute: Callable[[MergePlan, Path, RecipeStep], object],
    intermediate_dir: Path | None = None,
    seed: int | None = None,
    allow_drop: Sequence[str] = (),
    force: bool = False,
    overwrite_anything: bool = False,
) -> list[StepResult]:
    """Plan and run every document in order (see the module docstring).

    Args:
        steps: from `graft.recipe.load_recipes`, in run order.
        out: the final merge's output folder.
        execute: writes one plan to a folder (e.g. `graft.plan.run_plan` with options)
            and returns its statistics.
        intermediate_dir: where named documents' outputs are kept; None: a temp folder.
        force / overwrite_anything: may existing intermediate outputs be replaced.

    Raises:
        RecipeError: a document fails to plan (the message names it); GraftIOError.
    """
    if intermediate_dir is None:
        _check_all_used(steps)
    # Plan everything first (headers only), so a bad document fails before any merge.
    for _, _, plan in plan_steps(
        steps, out, intermediate_dir=intermediate_dir, seed=seed, allow_drop=allow_drop
    ):
        plan.close()
    with _intermediates(out, intermediate_dir) as folder:
        for step in steps:
            if not step.final:
                check_output(
                    _target(step, out, folder), force=force, overwrite_anything=overwrite_anything
                )
        results = []
        for step in steps:
            target = _target(step, out, folder)
            plan = _plan(step, folder, seed, allow_drop, None)
            try:
                results.append(StepResult(step, target, execute(plan, target, step)))
            finally:
                plan.close()
        return results


def _target(step: RecipeStep, out: Path, folder: Path) -> Path:
    return out if step.final else folder / str(step.recipe.name)


def _plan(
    step: RecipeStep,
    folder: Path,
    seed: int | None,
    allow_drop: Sequence[str],
    stand_ins: Mapping[str, Checkpoint] | None,
) -> MergePlan:
    # the documents a step uses are named, never the final merge (nothing uses that one)
    outputs = {name: folder / name for name in step.needs}
    try:
        return plan_merge(
            with_outputs(step, outputs), seed=seed, allow_drop=allow_drop, stand_ins=stand_ins
        )
    except (RecipeError, GraftIOError) as e:
        raise type(e)(f"document '{step.label}': {e}") from None


@contextlib.contextmanager
def _intermediates(out: Path, folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GraftIOError(f"cannot create intermediate folder {folder}: {e.strerror}") from e
        yield folder
        return
    with scratch_dir(out) as tmp:
        yield tmp


def _check_all_used(steps: Sequence[RecipeStep]) -> None:
    """Without an intermediate folder, every document must feed the final merge."""
    by_name = {s.recipe.name: s for s in steps}
    final = next(s for s in steps if s.final)
    needed, todo = set(), list(final.needs)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].needs
    unused = [s.recipe.name for s in steps if not s.final and s.recipe.name not in needed]
    if unused:
        raise RecipeError(
            f"document(s) {', '.join(map(str, unused))} are not used by the final merge, so "
            "their output would be thrown away; pass --intermediate-dir DIR to keep them "
            "there, or remove them"
        )
