"""Run `graft check` between each fine-tuned zoo model and each merged model of the demo.

For every task t and merge method m: OLD = zoo/finetuned/t, NEW = merged/m, on t's test
split with t's head (temperature fitted on t's val split). Prints a markdown table of the
means over tasks (the one in docs/check.md) and writes all numbers as JSON.

    .venv/bin/graft demo --workdir graft-demo        # once: the zoo and merged models
    .venv/bin/python benchmarks/check_merges.py graft-demo [out.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from graft.check.run import check_models
from graft.zoo import load_zoo

KEYS = (
    "nfr",
    "multiclass_nfr",
    "pfr",
    "old.accuracy",
    "new.accuracy",
    "old.ece",
    "new.ece",
    "new.ece_mass",
    "new.ts.ece",
    "new.temperature",
)


def main(workdir: Path, out: Path | None) -> None:
    zoo = load_zoo(workdir / "zoo")
    methods = sorted(p.name for p in (workdir / "merged").iterdir() if p.is_dir())
    rows = {}
    for m in methods:
        per_task = {}
        for task, ft in zoo.finetuned.items():
            r = check_models(ft, workdir / "merged" / m, task=task, zoo=zoo.root, find_issues=False)
            per_task[task] = {k: r["metrics"][k] for k in KEYS}
        rows[m] = per_task
    mean = {m: {k: sum(t[k] for t in v.values()) / len(v) for k in KEYS} for m, v in rows.items()}
    print(
        "| merge method | NFR | multi-class NFR | PFR | accuracy | ECE | ECE (equal-mass) "
        "| ECE after T-scaling | T |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ft = next(iter(mean.values()))
    print(
        f"| fine-tuned (OLD) | - | - | - | {ft['old.accuracy']:.1%} | {ft['old.ece']:.3f} | | | |"
    )
    for m, v in sorted(mean.items(), key=lambda kv: kv[1]["nfr"]):
        print(
            f"| {m} | {v['nfr']:.1%} | {v['multiclass_nfr']:.1%} | {v['pfr']:.1%} "
            f"| {v['new.accuracy']:.1%} | {v['new.ece']:.3f} | {v['new.ece_mass']:.3f} "
            f"| {v['new.ts.ece']:.3f} | {v['new.temperature']:.2f} |"
        )
    if out is not None:
        out.write_text(json.dumps({"per_task": rows, "mean": mean}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
