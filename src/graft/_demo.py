"""graft's quick main job: build the real-data digits zoo, merge it with every method,
evaluate — the same benchmark as the text zoo's (`graft.eval.zoo_bench`), plus the
digits zoo's model soups.

Every merge goes through the same path a user's does: a recipe (YAML text), the planner
and the streaming engine into a model folder (``WORKDIR/merged/<method>``, its recipe in
``WORKDIR/recipes``), then evaluation with each task's own fine-tuned head. Data-aware
methods first run their statistics pass (Fisher diagonals, Gram matrices) or learn their
coefficients (AdaMerging). Hyperparameters that need choosing (λ of task arithmetic and
TIES, β of LiNeS) are chosen on the validation split; every number reported is on the
test split. The digits zoo is small, so its searches use finer grids than the text zoo's
and AdaMerging runs the paper's 500 steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from graft.data import evaluate as run_eval
from graft.data import load_runner
from graft.data.zoo_tasks import zoo_task_data
from graft.eval.soups import average, soup_zoo
from graft.eval.zoo_bench import BenchZoo, Row, run_bench
from graft.io import load_state_dict, write_text
from graft.zoo.build import Zoo, build_zoo

GRIDS = {
    "task_arithmetic": [round(0.05 * i, 2) for i in range(1, 21)],
    "ties": [round(0.1 * i, 2) for i in range(1, 16)],
    "lines": [round(0.1 * i, 2) for i in range(11)],
}


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
        rows = [
            {**asdict(r), "average": r.mean(), "normalized": self.normalized(r)} for r in self.rows
        ]
        return {
            "seed": self.seed,
            "tasks": self.tasks,
            "split": "test",
            "rows": rows,
            "soup": {
                "task": self.soup_task,
                "rows": [{**asdict(r), "average": r.mean()} for r in self.soup],
            },
            "not_applicable": self.skipped,
            "zoo": self.zoo_report,
            "seconds": self.seconds,
        }


def digits_bench_zoo(zoo: Zoo, train_dir: Path | None = None) -> BenchZoo:
    """The digits zoo as a `BenchZoo` (its splits by the zoo's seed)."""
    return BenchZoo(
        "digits",
        zoo.base,
        zoo.finetuned,
        zoo.heads,
        lambda task, split: zoo_task_data(task, split=split, zoo=zoo.root),
        probe_heads=zoo.probe_heads,
        train_dir=train_dir,
    )


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
    (workdir / "stats").mkdir(exist_ok=True)
    bench = run_bench(
        digits_bench_zoo(zoo, workdir / "stats"),
        val_limit=0,
        stats_samples=64 if quick else 256,
        ada_steps=50 if quick else 500,
        batch_size=512,
        threads=threads,
        grids=GRIDS,
        save_to=workdir,
        log=log,
    )
    result = DemoResult(
        bench.tasks,
        bench.rows,
        _soup_rows(zoo),
        zoo.soup_task,
        bench.not_applicable,
        zoo.report,
        seed,
    )
    result.seconds = time.perf_counter() - start
    _write_outputs(workdir, result)
    return result


def _soup_rows(zoo: Zoo) -> list[Row]:
    """Model soups on the soup family: best ingredient, uniform and greedy (test split)."""
    result, _ = soup_zoo(zoo)
    runner = load_runner(zoo.base, head=zoo.soup_heads[0])
    test = runner.prepare(zoo_task_data(zoo.soup_task, split="test", zoo=zoo.root))

    def test_acc(backbone: dict, head: dict) -> float:
        with torch.no_grad():
            runner.module.head.weight.copy_(head["weight"])
            runner.module.head.bias.copy_(head["bias"])
        return run_eval(runner, test, batch_size=512, params=runner.bind(backbone))["accuracy"]

    ingredients = [
        (str(p), load_state_dict(p), load_state_dict(h))
        for p, h in zip(zoo.soup, zoo.soup_heads, strict=True)
    ]
    best_name = max(result.scores, key=result.scores.get)
    best = next(i for i in ingredients if i[0] == best_name)
    uniform = (average([i[1] for i in ingredients]), average([i[2] for i in ingredients]))
    task = zoo.soup_task
    return [
        Row("best single ingredient (by val)", "soup", {task: test_acc(best[1], best[2])}),
        Row("uniform soup", "soup", {task: test_acc(*uniform)}, f"{len(ingredients)} ingredients"),
        Row(
            "greedy soup",
            "soup",
            {task: test_acc(result.backbone, result.head)},
            f"{len(result.chosen)} of {len(ingredients)} ingredients",
        ),
    ]


def short(task: str) -> str:
    return task.removesuffix("-digit")


def markdown_table(result: DemoResult) -> str:
    """The results table as markdown (test accuracy, %)."""
    head = ["method", *map(short, result.tasks), "avg", "norm. avg", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        cells = [f"{100 * row.accuracy[t]:.1f}" for t in result.tasks]
        lines.append(
            f"| {row.method} | "
            + " | ".join(cells)
            + f" | {100 * row.mean():.1f} | {100 * result.normalized(row):.1f} | {row.settings} |"
        )
    lines += [
        "",
        f"Model soups on `{result.soup_task}` (test accuracy, %):",
        "",
        "| soup | accuracy | settings |",
        "|---|---|---|",
    ]
    for row in result.soup:
        lines.append(f"| {row.method} | {100 * row.mean():.1f} | {row.settings} |")
    return "\n".join(lines) + "\n"


def _write_outputs(workdir: Path, result: DemoResult) -> None:
    write_text(workdir / "results.json", json.dumps(result.to_json(), indent=2))
    write_text(workdir / "results.md", markdown_table(result))
