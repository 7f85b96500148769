"""Every merge method on a zoo of fine-tunes with per-task heads, FusionBench-style: the
merged backbone is judged with each task's own head on each task's test split.

Any zoo whose models graft can run works (the text zoo's MiniLM, a digits zoo, a user's
own family): a base, one fine-tune per task, one head per task, and each task's splits.
Every merge is a recipe run by graft's planner and engine — the same jobs and math as
``graft merge`` — into memory (`graft.plan.merge_in_memory`) rather than into a folder.

Choices, in the order rows are made (hyperparameters are picked on the **validation**
split, every reported number is on the **test** split):

* references: the base with a linear probe per task (when the zoo keeps probes), the base
  with each task's fine-tuned head (any merge at λ = 0), and each fine-tune on its task;
* searched on validation (``val_limit`` examples per task): task arithmetic ``lambda``
  (sum form), TIES ``lambda`` at density 0.2 (mean form, graft's default), LiNeS ``beta``
  (inner task arithmetic, ``alpha: auto``);
* Iso-C and Iso-CTS: ``lambda`` in 0.4…2.0 on validation (their papers tune the scale on
  held-out data; Iso-CTS with common-space fraction 0.8);
* DARE-TIES, breadcrumbs-TIES and DELLA (TIES-style sign election) search their own
  ``lambda`` in 0.2…2.0 at density 0.5 (DELLA ε 0.1, breadcrumbs γ 0.01); the linear
  DARE / breadcrumbs / DELLA variants reuse task arithmetic's λ, and so do the consensus (TALL mask) variants of task
  arithmetic and TIES (k 2, λ_tall 0.6); TSV-M runs at the paper's λ = 1 with 1/T of each
  task's components; OPCM (continual, the models in the zoo's task order) at
  α = 0.5; linear (simple average), Model Stock, multi-SLERP, Karcher, SCE,
  RAM and RAM+ have nothing to tune (mergekit's defaults); WUDI at the paper's settings
  (300 Adam steps at lr 1e-5 from the task-arithmetic sum, λ = 1) and, as the row
  ``wudi+closed_form``, its objective's exact minimiser;
* EMR is tuning-free and is **not one merged model**: each task is judged with its own
  modulated model, base + λₜ·Mₜ⊙τ_uni (the EMR folder `graft merge` writes);
* data-aware: Fisher (empirical, normalised per model) and RegMean (α 0.9) from
  ``stats_samples`` training examples per task; AdaMerging task-wise and layer-wise (one
  coefficient per tensor) by entropy on the unlabeled **test** inputs, the paper's
  test-time setting;
* Twin-Merging (kind ``data-aware (routed)``, **not one merged model**: each input gets
  its own mix): shared expert = task arithmetic at the searched λ, exclusive parts at the
  paper's 10% rank, router trained on the validation inputs, every test input routed on
  its own; the settings give the routing accuracy and the storage in models.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from graft.data import Dataset, evaluate, load_runner
from graft.eval.tasks import Task, score
from graft.io import load_state_dict

SEARCH_GRIDS = {
    "task_arithmetic": ("lambda", [round(0.1 * i, 2) for i in range(1, 11)]),
    "ties": ("lambda", [round(0.2 * i, 2) for i in range(2, 11)]),
    "lines": ("beta", [round(0.1 * i, 2) for i in range(0, 11)]),
    "iso_c": ("lambda", [round(0.2 * i, 2) for i in range(2, 11)]),
    "iso_cts": ("lambda", [round(0.2 * i, 2) for i in range(2, 11)]),
    # The TIES family gets its own λ: DARE's 1/p rescale and breadcrumbs' band change
    # the scale of what survives, so TIES's λ can be far off (on the text zoo it
    # collapsed both, 69-77%).
    "dare_ties": ("lambda", [round(0.2 * i, 2) for i in range(1, 11)]),
    "breadcrumbs_ties": ("lambda", [round(0.2 * i, 2) for i in range(1, 11)]),
    "della": ("lambda", [round(0.2 * i, 2) for i in range(1, 11)]),
}
SEARCH_PARAMS: dict[str, tuple[dict, dict]] = {  # method -> (per model, shared)
    "task_arithmetic": ({"weight": 1.0}, {"normalize": False}),
    "ties": ({"weight": 1.0, "density": 0.2}, {}),
    "lines": ({"weight": 1.0}, {"alpha": "auto", "method": "task_arithmetic"}),
    "iso_c": ({"weight": 1.0}, {}),
    "iso_cts": ({"weight": 1.0}, {"common_space_fraction": 0.8}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
}
# Consensus (TALL) masks: an option of task arithmetic and TIES, at their searched λ.
CONSENSUS = {"consensus_k": 2, "tall_mask_lambda": 0.6}
FAMILY = {
    "dare_linear": ("task_arithmetic", {"density": 0.5}),
    "breadcrumbs": ("task_arithmetic", {"density": 0.5, "gamma": 0.01}),
    "della_linear": ("task_arithmetic", {"density": 0.5, "epsilon": 0.1}),
}
NOT_APPLICABLE = {
    "slerp": "interpolates exactly two models",
    "nuslerp": "interpolates exactly two models",
    "passthrough": "stacks layers (depth up-scaling); nothing to average",
    "nearswap": "interpolates a base and exactly one model",
    "arcee_fusion": "fuses a base and exactly one model",
}
# Methods whose rows are made by their own code: EMR gives each task its own model.
PER_TASK_MODELS = {"emr"}


@dataclass(frozen=True)
class BenchZoo:
    """What the benchmark needs of a zoo: models, heads, and a split reader."""

    name: str
    base: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]
    split: Callable[[str, str], Dataset]  # (task, split) -> data
    probe_heads: dict[str, Path] | None = None  # linear probes of the frozen base, if any
    train_dir: Path | None = None  # where statistics files go (default: a temp folder)


@dataclass
class Row:
    """One line of the table: test accuracy per task."""

    method: str
    kind: str  # reference | data-free | data-aware
    accuracy: dict[str, float]
    settings: str = ""
    seconds: float = 0.0
    val_score: float | None = None

    def mean(self) -> float:
        return float(np.mean(list(self.accuracy.values())))


@dataclass
class BenchResult:
    zoo: str
    tasks: list[str]
    rows: list[Row]
    not_applicable: dict[str, str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def normalized(self, row: Row) -> float:
        """Mean over tasks of merged accuracy / fine-tuned accuracy (NaN without the
        fine-tuned reference row)."""
        if not any(r.method == "fine-tuned (individual)" for r in self.rows):
            return float("nan")
        ft = self.row("fine-tuned (individual)").accuracy
        return float(np.mean([row.accuracy[t] / ft[t] for t in self.tasks]))

    def to_json(self) -> dict:
        rows = [
            {**asdict(r), "average": r.mean(), "normalized": self.normalized(r)} for r in self.rows
        ]
        return {
            "zoo": self.zoo,
            "tasks": self.tasks,
            "split": "test",
            "rows": rows,
            "not_applicable": self.not_applicable,
            "seconds": self.seconds,
            "notes": self.notes,
        }


class _Bench:
    def __init__(
        self,
        zoo: BenchZoo,
        *,
        val_limit: int,
        threads: int | None,
        batch_size: int,
        log: Callable[[str], None],
        save_to: Path | None = None,
    ):
        from graft.eval.candidates import CandidateMerger

        self.zoo, self.log, self.batch_size, self.save_to = zoo, log, batch_size, save_to
        self.threads = threads
        self.tasks = list(zoo.finetuned)
        self.runners = {t: load_runner(zoo.base, head=zoo.heads[t]) for t in self.tasks}
        self.test = [
            Task(t, self.runners[t], self.runners[t].prepare(zoo.split(t, "test")))
            for t in self.tasks
        ]
        self.val = []
        for t in self.tasks:
            data = self.runners[t].prepare(zoo.split(t, "val"))
            if val_limit and len(data) > val_limit:
                data = data.subset(np.arange(val_limit))
            self.val.append(Task(t, self.runners[t], data))
        self.merge = CandidateMerger(threads=threads)

    def recipe(
        self,
        method: str,
        per_model: Mapping,
        shared: Mapping,
        *,
        stats: Mapping[str, Path] | None = None,
        base: bool = True,
    ) -> str:
        doc: dict[str, Any] = {"merge_method": method}
        if base:
            doc["base_model"] = str(self.zoo.base)
        doc["models"] = [
            {
                "model": str(self.zoo.finetuned[t]),
                "parameters": {**per_model, **({"statistics": str(stats[t])} if stats else {})},
            }
            for t in self.tasks
        ]
        if shared:
            doc["parameters"] = dict(shared)
        return yaml.safe_dump(doc, sort_keys=False)

    def state(self, text: str, name: str | None = None) -> dict[str, torch.Tensor]:
        """The merge of a recipe: in memory, or written to ``save_to/merged/<name>`` (and
        its recipe to ``save_to/recipes/<name>.yaml``) and read back."""
        from graft.io import write_text
        from graft.plan import plan_merge, run_plan
        from graft.recipe import parse_recipe

        plan = plan_merge(parse_recipe(text), drop_hint=False)
        try:
            if self.save_to is None or name is None:
                return self.merge(plan)
            out = self.save_to / "merged" / name
            run_plan(plan, out, threads=self.threads, force=True)
        finally:
            plan.close()
        write_text(self.save_to / "recipes" / f"{name}.yaml", text)
        return load_state_dict(out)

    def test_row(
        self,
        method: str,
        kind: str,
        text: str,
        settings: str,
        t0: float,
        val_score: float | None = None,
    ) -> Row:
        _, per_task = score(self.test, self.state(text, method), batch_size=self.batch_size)
        row = Row(method, kind, per_task, settings, time.perf_counter() - t0, val_score)
        self.log(f"{method}: test mean {row.mean():.1%} ({settings})")
        return row


def run_bench(
    zoo: BenchZoo,
    *,
    methods: Sequence[str] | None = None,
    val_limit: int = 250,
    stats_samples: int = 256,
    ada_steps: int = 100,
    ada_lr: float = 1e-3,
    batch_size: int = 64,
    threads: int | None = None,
    grids: Mapping[str, Sequence[float]] | None = None,
    save_to: Path | None = None,
    references: bool = True,
    skip: Collection[str] = (),
    on_row: Callable[[Row], None] | None = None,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Run every method (or ``methods``) on ``zoo``; see the module docstring.

    Args:
        zoo: the models, heads and splits.
        methods: which rows to make (default: every method graft has).
        val_limit: validation examples per task for the searches (0: all).
        stats_samples: training examples per task for the Fisher and Gram passes.
        ada_steps / ada_lr: AdaMerging's Adam steps and learning rate.
        batch_size: examples per forward pass.
        threads: engine threads.
        grids: searched values per method, replacing `SEARCH_GRIDS`' values.
        save_to: write each row's merged model and recipe under this folder.
        references: make the reference rows (probe, pretrained, fine-tuned); off when
            only some methods' rows are remade for a kept result.
        skip: rows not to make (an interrupted run's finished rows); the searches they
            share with rows still to make are redone.
        on_row: called with each row as soon as it is made (to keep partial results).
        log: progress, one line at a time.
    """
    from graft.eval.search import search_recipe
    from graft.merge import METHODS

    start = time.perf_counter()
    b = _Bench(
        zoo, val_limit=val_limit, threads=threads, batch_size=batch_size, log=log, save_to=save_to
    )
    wanted = set(methods) if methods is not None else None
    skipped = set(skip)

    def make(name: str) -> bool:
        return (wanted is None or name in wanted) and name not in skipped

    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if references:
        for row in _references(b):
            if row.method not in skipped:
                add(row)
    best: dict[str, float] = {}
    for method, (param, grid) in SEARCH_GRIDS.items():
        grid = list((grids or {}).get(method, grid))
        dependents = [m for m, (parent, _) in FAMILY.items() if parent == method]
        dependents.append(f"{method}+consensus")
        if method == "task_arithmetic":
            dependents.append("twin-merging")  # its shared expert is TA at the searched λ
        if not make(method) and not any(map(make, dependents)):
            continue
        t0 = time.perf_counter()
        per_model, shared = SEARCH_PARAMS[method]
        found = search_recipe(
            b.recipe(method, per_model, shared),
            {param: grid},
            lambda s: score(b.val, s, batch_size=batch_size),
            merge=b.merge,
        )
        best[method] = found.best["params"][param]
        log(f"{method}: {param}={best[method]} on validation ({found.best['score']:.1%})")
        if make(method):
            text = b.recipe(method, per_model, {**shared, param: best[method]})
            add(
                b.test_row(
                    method,
                    "data-free",
                    text,
                    f"{param}={best[method]:g} (val {found.best['score']:.3f})",
                    t0,
                    found.best["score"],
                )
            )
    for parent in ("task_arithmetic", "ties"):
        name = f"{parent}+consensus"
        if parent not in best or not make(name):
            continue
        t0 = time.perf_counter()
        per_model, shared = SEARCH_PARAMS[parent]
        text = b.recipe(parent, per_model, {**shared, "lambda": best[parent], **CONSENSUS})
        settings = (
            f"TALL consensus k={CONSENSUS['consensus_k']}, "
            f"λ_tall={CONSENSUS['tall_mask_lambda']}, λ={best[parent]:g} (from {parent})"
        )
        add(b.test_row(name, "data-free", text, settings, t0))
    for method in METHODS:
        if method in SEARCH_GRIDS or method in NOT_APPLICABLE or METHODS[method].stats:
            continue
        if method in PER_TASK_MODELS:
            continue
        if not make(method):
            continue
        t0 = time.perf_counter()
        per_model, shared, settings = _fixed(method, best)
        add(
            b.test_row(
                method,
                "data-free",
                b.recipe(method, per_model, shared, base=METHODS[method].base != "none"),
                settings,
                t0,
            )
        )
    if make("wudi+closed_form"):
        t0 = time.perf_counter()
        text = b.recipe("wudi", {}, {"solver": "closed_form"})
        add(b.test_row("wudi+closed_form", "data-free", text, WUDI_EXACT, t0))
    if make("emr"):
        add(_emr_row(b))
    _data_aware(b, make, add, stats_samples, ada_steps, ada_lr)
    if make("twin-merging"):
        add(_twin_row(b, best.get("task_arithmetic")))
    b.merge.close()
    return BenchResult(zoo.name, b.tasks, rows, dict(NOT_APPLICABLE), time.perf_counter() - start)


def _references(b: _Bench) -> list[Row]:
    t0 = time.perf_counter()
    rows = []
    if b.zoo.probe_heads:
        probe = {}
        for task in b.test:
            runner = load_runner(b.zoo.base, head=b.zoo.probe_heads[task.name])
            probe[task.name] = evaluate(runner, task.data, batch_size=b.batch_size)["accuracy"]
        rows.append(
            Row(
                "pretrained (linear probe)",
                "reference",
                probe,
                "base with a probe head per task",
                time.perf_counter() - t0,
            )
        )
        t0 = time.perf_counter()
    base = load_state_dict(b.zoo.base)
    _, pre = score(b.test, base, batch_size=b.batch_size)
    rows.append(
        Row(
            "pretrained (fine-tuned heads)",
            "reference",
            pre,
            "base with each task's fine-tuned head (= any merge at λ=0)",
            time.perf_counter() - t0,
        )
    )
    t0 = time.perf_counter()
    ft = {}
    for task in b.test:
        params = task.runner.bind(load_state_dict(b.zoo.finetuned[task.name]))
        ft[task.name] = evaluate(task.runner, task.data, batch_size=b.batch_size, params=params)[
            "accuracy"
        ]
    rows.append(
        Row(
            "fine-tuned (individual)",
            "reference",
            ft,
            "each task's own fine-tune",
            time.perf_counter() - t0,
        )
    )
    b.log(
        f"references: pretrained {np.mean(list(pre.values())):.1%}, fine-tuned "
        f"{np.mean(list(ft.values())):.1%}"
    )
    return rows


def _fixed(method: str, best: dict[str, float]) -> tuple[dict, dict, str]:
    if method in FAMILY:
        parent, extra = FAMILY[method]
        lam = best[parent]
        settings = ", ".join(f"{k}={v}" for k, v in extra.items()) + f", λ={lam:g} (from {parent})"
        shared = {"lambda": lam, **({"normalize": False} if parent == "task_arithmetic" else {})}
        return {"weight": 1.0, **extra}, shared, settings
    if method == "linear":
        return {"weight": 1.0}, {}, "uniform weights (simple average)"
    if method == "multislerp":
        return {"weight": 1.0}, {}, "uniform weights"
    if method == "model_stock":
        return {}, {}, "per-tensor t from the deltas' mean cosine"
    if method == "tsv_m":
        return {"weight": 1.0}, {"lambda": 1.0}, "top 1/T components per task, λ=1 (the paper's)"
    if method == "opcm":
        return {}, {"alpha": 0.5}, "models in the zoo's task order, α=0.5, per-tensor norm λ"
    if method in ("karcher", "sce", "ram", "ramplus_tl"):
        return {}, {}, "mergekit's defaults"
    if method == "wudi":
        shared = {"solver": "adam", "steps": 300, "lr": 1e-5}
        return {}, shared, "300 Adam steps, lr 1e-5, from the sum; λ=1 (the paper's)"
    raise ValueError(
        f"the benchmark has no settings for {method}; add them to graft.eval.zoo_bench"
    )


WUDI_EXACT = "closed-form minimiser of WUDI's objective; λ=1"


def _emr_row(b: _Bench) -> Row:
    """EMR: merge into an EMR folder (under ``save_to/merged/emr`` or a temp folder), then
    judge each task with its own model, base + λₜ·Mₜ⊙τ_uni."""
    import tempfile

    from graft.delta.emr import read_manifest, run_emr, task_state
    from graft.io import write_text
    from graft.plan import plan_merge
    from graft.recipe import parse_recipe

    t0 = time.perf_counter()
    text = b.recipe("emr", {}, {})
    with tempfile.TemporaryDirectory(prefix="graft-bench-emr-") as tmp:
        out = (b.save_to / "merged" / "emr") if b.save_to is not None else Path(tmp) / "emr"
        plan = plan_merge(parse_recipe(text), drop_hint=False)
        try:
            run_emr(plan, out, threads=b.threads, force=True)
        finally:
            plan.close()
        if b.save_to is not None:
            write_text(b.save_to / "recipes" / "emr.yaml", text)
        tasks = read_manifest(out).tasks  # in recipe order, which is b.tasks' order
        accuracy = {}
        for task, own in zip(b.test, tasks, strict=True):
            _, acc = score([task], task_state(out, own.name), batch_size=b.batch_size)
            accuracy[task.name] = acc[task.name]
    scales = [t.scale for t in tasks]
    settings = (
        f"per-task models, not one merged model: base + λₜ·Mₜ⊙τ_uni, λₜ "
        f"{min(scales):.2f}–{max(scales):.2f}; 1 bit per weight per task"
    )
    row = Row("emr", "data-free", accuracy, settings, time.perf_counter() - t0)
    b.log(f"emr: test mean {row.mean():.1%} ({settings})")
    return row


def _data_aware(
    b: _Bench,
    make: Callable[[str], bool],
    add: Callable[[Row], None],
    stats_samples: int,
    ada_steps: int,
    ada_lr: float,
) -> None:
    import tempfile

    from graft.eval.adamerging import learn, recipe_yaml
    from graft.eval.stats import write_stats

    folder = b.zoo.train_dir or Path(tempfile.mkdtemp(prefix="graft-bench-stats-"))
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        if not make(method):
            continue
        t0 = time.perf_counter()
        files = {}
        for t in b.tasks:
            runner = load_runner(b.zoo.finetuned[t], head=b.zoo.heads[t])
            files[t] = write_stats(
                kind,
                runner,
                b.zoo.split(t, "train"),
                folder / f"{t}.{kind}.safetensors",
                n_samples=stats_samples,
                force=True,
            )
        settings = f"{stats_samples} train examples per task" + (
            ", Fisher normalised per model" if method == "fisher" else ", α=0.9"
        )
        add(
            b.test_row(
                method,
                "data-aware",
                b.recipe(method, {"weight": 1.0}, {}, stats=files, base=False),
                settings,
                t0,
            )
        )
    modes = [mode for mode in ("task", "layer") if make(f"adamerging_{mode}")]
    if not modes:
        return
    base = load_state_dict(b.zoo.base)
    finetuned = [load_state_dict(b.zoo.finetuned[t]) for t in b.tasks]
    for mode in modes:
        t0 = time.perf_counter()
        inputs = [Task(t.name, t.runner, _unlabeled(t.data)) for t in b.test]
        found = learn(inputs, base, finetuned, mode=mode, steps=ada_steps, lr=ada_lr)
        text = recipe_yaml(found, str(b.zoo.base), {t: str(b.zoo.finetuned[t]) for t in b.tasks})
        add(
            b.test_row(
                f"adamerging_{mode}",
                "data-aware",
                text,
                f"{ada_steps} steps, lr {ada_lr:g}; entropy "
                f"{found.entropy_initial:.2f} -> {found.entropy_final:.2f}",
                t0,
            )
        )


TWIN_KEEP = 0.1  # the paper's: 10% of each exclusive matrix's spectrum


def _twin_row(b: _Bench, lam: float | None) -> Row:
    """Twin-Merging (`graft.twin`): shared expert = task arithmetic at the λ searched
    above (0.3 without a search), exclusive parts at the paper's keep ratio, the router
    trained on the validation inputs; every test input routed on its own. The folder goes
    to ``save_to/merged/twin-merging`` (or a temp folder)."""
    import tempfile

    from graft.twin import build_twin, open_twin
    from graft.twin.build import task_names

    t0 = time.perf_counter()
    lam = 0.3 if lam is None else lam
    names = task_names(b.tasks)
    with tempfile.TemporaryDirectory(prefix="graft-bench-twin-") as tmp:
        out = Path(tmp) / "twin" if b.save_to is None else b.save_to / "merged" / "twin-merging"
        report = build_twin(
            b.zoo.base,
            [b.zoo.finetuned[t] for t in b.tasks],
            [t.data for t in b.val],
            out,
            names=names,
            head=b.zoo.heads[b.tasks[0]],
            lam=lam,
            keep=TWIN_KEEP,
            threads=b.threads,
            force=True,
        )
        twin = open_twin(out)
        accuracy, own = {}, []
        for name, task in zip(names, b.test, strict=True):
            runner = load_runner(twin.shared, head=b.zoo.heads[task.name])
            r = twin.evaluate(runner, task.data, batch_size=b.batch_size)
            accuracy[task.name] = r["accuracy"]
            own.append(r["routed"][name])
    s, n = report.storage, len(b.tasks)
    settings = (
        f"shared: task arithmetic λ={lam:g}; exclusive rank ⌊{TWIN_KEEP:g}·min side⌋; router "
        f"on {sum(len(t.data) for t in b.val)} val inputs; per input, {np.mean(own):.0%} of "
        f"test inputs routed to their task; storage {s['total'] * n / s['finetuned']:.2f} "
        f"models vs {n} ({s['total'] / s['finetuned']:.0%})"
    )
    row = Row("twin-merging", "data-aware (routed)", accuracy, settings, time.perf_counter() - t0)
    b.log(f"twin-merging: test mean {row.mean():.1%} ({settings})")
    return row


def _unlabeled(data: Dataset) -> Dataset:
    from dataclasses import replace

    return replace(data, labels=None)


def markdown_table(result: BenchResult, *, short: Callable[[str], str] = lambda t: t) -> str:
    """The results as a markdown table (test accuracy, %)."""
    head = ["method", *map(short, result.tasks), "avg", "norm.", "settings (chosen on val)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [f"{100 * r.accuracy[t]:.1f}" for t in result.tasks]
        lines.append(
            f"| {r.method} | "
            + " | ".join(cells)
            + f" | {100 * r.mean():.1f} | {100 * result.normalized(r):.1f} | {r.settings} |"
        )
    return "\n".join(lines) + "\n"


def text_bench_zoo(root: str | os.PathLike) -> BenchZoo:
    """The text zoo in ``root`` as a `BenchZoo`."""
    from graft.zoo.text_zoo import load_text_zoo, task_split

    z = load_text_zoo(root)
    return BenchZoo(
        "text",
        z.base,
        z.finetuned,
        z.heads,
        lambda t, s: task_split(t, s, z.seed, z.config),
        probe_heads=z.probe_heads,
    )
