"""graft's main job: build the real-data digits zoo, merge it with every method, evaluate.

Every merge goes through the same path a user's does: a recipe (YAML text), the planner
and the streaming engine into a model folder, then evaluation of that folder with each
task's own fine-tuned head. Data-aware methods first run their statistics pass (Fisher
diagonals, Gram matrices) or learn their coefficients (AdaMerging), and then merge with
the engine too. Hyperparameters that need choosing (λ of task arithmetic, TIES, LiNeS)
are chosen on the validation split; every number reported is on the test split.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from graft.eval.adamerging import adamerging_zoo
from graft.eval.evaluate import evaluate, evaluate_task
from graft.eval.search import search_zoo
from graft.eval.soups import soup_zoo
from graft.eval.stats import write_stats
from graft.io import write_text
from graft.merge import METHODS
from graft.models.digits_net import load_backbone, load_head
from graft.plan import plan_merge, run_plan
from graft.recipe import parse_recipe
from graft.zoo.build import Zoo, build_zoo
from graft.zoo.tasks import task_data

# Methods whose λ is searched on validation data, and the fixed settings of the others.
# DARE/breadcrumbs/DELLA reuse the λ found for their family's base method (task
# arithmetic for the *_linear ones, TIES for the *_ties ones) at density 0.5.
SEARCHED = ("task_arithmetic", "ties", "lines")
FAMILY = {
    "dare_linear": ("task_arithmetic", {"density": 0.5}),
    "dare_ties": ("ties", {"density": 0.5}),
    "breadcrumbs": ("task_arithmetic", {"density": 0.5, "gamma": 0.01}),
    "breadcrumbs_ties": ("ties", {"density": 0.5, "gamma": 0.01}),
    "della_linear": ("task_arithmetic", {"density": 0.5, "epsilon": 0.1}),
    "della": ("ties", {"density": 0.5, "epsilon": 0.1}),
}
NOT_APPLICABLE = {
    "slerp": "interpolates exactly two models",
    "nuslerp": "interpolates exactly two models",
    "passthrough": "stacks layers (depth up-scaling); nothing to average",
}


@dataclass
class Row:
    """One line of the results table: accuracy per task on the test split."""

    method: str
    accuracy: dict[str, float]
    kind: str  # reference | data-free | data-aware | soup
    settings: str = ""
    seconds: float = 0.0

    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


@dataclass
class DemoResult:
    tasks: list[str]
    rows: list[Row]
    soup: list[Row]
    soup_task: str
    skipped: dict[str, str]
    zoo_report: dict
    seed: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def normalized(self, row: Row) -> float:
        """Mean over tasks of merged accuracy / fine-tuned accuracy."""
        ft = next(r for r in self.rows if r.method == "fine-tuned (individual)").accuracy
        return sum(row.accuracy[t] / ft[t] for t in self.tasks) / len(self.tasks)

    def to_json(self) -> dict:
        rows = [{**asdict(r), "average": r.mean(), "normalized": self.normalized(r)}
                for r in self.rows]
        return {
            "seed": self.seed,
            "tasks": self.tasks,
            "split": "test",
            "rows": rows,
            "soup": {"task": self.soup_task, "rows": [{**asdict(r), "average": r.mean()}
                                                      for r in self.soup]},
            "not_applicable": self.skipped,
            "zoo": self.zoo_report,
            "seconds": self.seconds,
        }


class _Runner:
    def __init__(self, zoo: Zoo, workdir: Path, threads: int, log: Callable[[str], None]):
        self.zoo, self.workdir, self.threads, self.log = zoo, workdir, threads, log
        self.tasks = list(zoo.finetuned)

    def merge(self, name: str, text: str) -> Path:
        """Run one recipe through the engine; also keep the recipe next to the output."""
        out = self.workdir / "merged" / name
        plan = plan_merge(parse_recipe(text))
        try:
            run_plan(plan, out, threads=self.threads, force=True)
        finally:
            plan.close()
        write_text(self.workdir / "recipes" / f"{name}.yaml", text)
        return out

    def score(self, model: Path) -> dict[str, float]:
        return {t: evaluate_task(model, t, self.zoo)["accuracy"] for t in self.tasks}

    def recipe(self, method: str, per_model: dict, shared: dict) -> str:
        doc: dict = {"merge_method": method}
        if METHODS[method].base != "none":
            doc["base_model"] = str(self.zoo.base)
        doc["models"] = [
            {"model": str(self.zoo.finetuned[t]), "parameters": dict(per_model)}
            for t in self.tasks
        ]
        if shared:
            doc["parameters"] = dict(shared)
        return yaml.safe_dump(doc, sort_keys=False)

    def row(self, method: str, kind: str, text: str, settings: str) -> Row:
        start = time.perf_counter()
        out = self.merge(method, text)
        return Row(method, self.score(out), kind, settings, time.perf_counter() - start)


def run_demo(
    workdir: Path,
    *,
    seed: int = 0,
    quick: bool = False,
    threads: int = 2,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Build (or reuse) the zoo in ``workdir/zoo`` and evaluate every merge method on it."""
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    log("building the digits zoo (reused when already built)")
    zoo = build_zoo(workdir / "zoo", seed=seed, quick=quick, log=lambda m: None)
    r = _Runner(zoo, workdir, threads, log)
    rows = [
        _pretrained_row(zoo, r.tasks),
        Row("pretrained (fine-tuned heads)", r.score(zoo.base), "reference",
            "base backbone with each task's fine-tuned head (= any merge at λ=0)"),
        _finetuned_row(zoo, r.tasks),
    ]

    best: dict[str, float] = {}
    for method in SEARCHED:
        log(f"{method}: choosing λ on the validation split")
        t0 = time.perf_counter()
        found = search_zoo(zoo, method)
        best[method] = found.best_value
        row = r.row(method, "data-free", found.recipe,
                    f"{found.param}={found.best_value:g} (val {found.best_score:.3f})")
        row.seconds += time.perf_counter() - t0
        rows.append(row)

    skipped = dict(NOT_APPLICABLE)
    for method in METHODS:
        if method in SEARCHED or method in skipped or METHODS[method].stats:
            continue
        log(f"{method}: merging")
        per_model, shared, settings = _fixed_settings(method, best)
        rows.append(r.row(method, "data-free", r.recipe(method, per_model, shared), settings))

    rows += _data_aware_rows(r, quick)
    soup = _soup_rows(zoo)
    result = DemoResult(r.tasks, rows, soup, zoo.soup_task, skipped, zoo.report, seed)
    result.seconds = time.perf_counter() - start
    _write_outputs(workdir, result)
    return result


def _fixed_settings(method: str, best: dict[str, float]) -> tuple[dict, dict, str]:
    if method in FAMILY:
        parent, extra = FAMILY[method]
        lam = best[parent]
        settings = ", ".join(f"{k}={v}" for k, v in extra.items()) + f", λ={lam:g} (from {parent})"
        return {"weight": 1.0, **extra}, {"lambda": lam}, settings
    if method == "linear":
        return {"weight": 1.0}, {}, "uniform weights (simple average)"
    if method == "multislerp":
        return {"weight": 1.0}, {}, "uniform weights"
    if method == "model_stock":
        return {}, {}, "per-tensor t from the deltas' mean cosine"
    raise ValueError(f"the demo has no settings for {method}; add them to graft._demo")


def _data_aware_rows(r: _Runner, quick: bool) -> list[Row]:
    rows = []
    stats_dir = r.workdir / "stats"
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        log_start = time.perf_counter()
        r.log(f"{method}: {kind} statistics pass, then merging")
        files = {}
        for t in r.tasks:
            files[t] = write_stats(kind, r.zoo.finetuned[t], t, stats_dir / f"{t}.{kind}.safetensors",
                                   r.zoo, n_samples=64 if quick else 256, force=True)
        doc = {"merge_method": method, "models": [
            {"model": str(r.zoo.finetuned[t]),
             "parameters": {"weight": 1.0, "statistics": str(files[t])}} for t in r.tasks]}
        settings = "256 train examples per task" if not quick else "64 examples per task"
        settings += ", Fisher normalised per model" if method == "fisher" else ", α=0.9"
        row = r.row(method, "data-aware", yaml.safe_dump(doc, sort_keys=False), settings)
        row.seconds = time.perf_counter() - log_start
        rows.append(row)
    for mode in ("task", "layer"):
        t0 = time.perf_counter()
        r.log(f"adamerging ({mode}-wise): learning coefficients on unlabeled test inputs")
        options = {"steps": 50} if quick else {}
        found, text = adamerging_zoo(r.zoo, mode=mode, **options)
        row = r.row(f"adamerging_{mode}", "data-aware", text,
                    f"entropy {found.entropy_initial:.2f} -> {found.entropy_final:.2f}")
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    return rows


def _pretrained_row(zoo: Zoo, tasks: list[str]) -> Row:
    backbone, _ = load_backbone(zoo.base)
    acc = {}
    for t in tasks:
        X, y = task_data(t, "test", seed=zoo.seed)
        acc[t] = evaluate(backbone, load_head(zoo.probe_heads[t]), X, y)["accuracy"]
    return Row("pretrained (linear probe)", acc, "reference", "base backbone, probe heads")


def _finetuned_row(zoo: Zoo, tasks: list[str]) -> Row:
    acc = {t: evaluate_task(zoo.finetuned[t], t, zoo)["accuracy"] for t in tasks}
    return Row("fine-tuned (individual)", acc, "reference", "each task's own fine-tune")


def _soup_rows(zoo: Zoo) -> list[Row]:
    """Model soups on the soup family: best ingredient, uniform and greedy (test split)."""
    from graft.eval.evaluate import evaluate as run_eval
    from graft.eval.soups import average

    result, _ = soup_zoo(zoo)
    module, _ = load_backbone(zoo.base)
    X, y = task_data(zoo.soup_task, "test", seed=zoo.seed)

    def test_acc(backbone: dict, head: dict) -> float:
        import torch

        module.load_state_dict(backbone)
        linear = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        linear.load_state_dict(head)
        return run_eval(module, linear, X, y)["accuracy"]

    from graft.io import load_state_dict

    ingredients = [(str(p), load_state_dict(p), load_state_dict(h))
                   for p, h in zip(zoo.soup, zoo.soup_heads, strict=True)]
    best_name = max(result.scores, key=result.scores.get)
    best = next(i for i in ingredients if i[0] == best_name)
    uniform = (average([i[1] for i in ingredients]), average([i[2] for i in ingredients]))
    task = zoo.soup_task
    return [
        Row("best single ingredient (by val)", {task: test_acc(best[1], best[2])}, "soup"),
        Row("uniform soup", {task: test_acc(*uniform)}, "soup", f"{len(ingredients)} ingredients"),
        Row("greedy soup", {task: test_acc(result.backbone, result.head)}, "soup",
            f"{len(result.chosen)} of {len(ingredients)} ingredients"),
    ]


def short(task: str) -> str:
    return task.removesuffix("-digit")


def markdown_table(result: DemoResult) -> str:
    """The results table as markdown (test accuracy, %)."""
    head = ["method", *map(short, result.tasks), "avg", "norm. avg", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        cells = [f"{100 * row.accuracy[t]:.1f}" for t in result.tasks]
        lines.append(f"| {row.method} | " + " | ".join(cells)
                     + f" | {100 * row.mean():.1f} | {100 * result.normalized(row):.1f} | {row.settings} |")
    lines += ["", f"Model soups on `{result.soup_task}` (test accuracy, %):", "",
              "| soup | accuracy | settings |", "|---|---|---|"]
    for row in result.soup:
        lines.append(f"| {row.method} | {100 * row.mean():.1f} | {row.settings} |")
    return "\n".join(lines) + "\n"


def _write_outputs(workdir: Path, result: DemoResult) -> None:
    write_text(workdir / "results.json", json.dumps(result.to_json(), indent=2))
    write_text(workdir / "results.md", markdown_table(result))
