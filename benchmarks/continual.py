"""Continual merging on a zoo: OPCM over random task orders against task arithmetic applied
sequentially, FusionBench-style (Tang et al. 2025, Table 1 setting).

The models arrive one at a time in a random order; after the last one the merged backbone
is judged with each task's own head on each task's test split (mean over tasks). Per
order, OPCM's merge is the recipe ``STATE/recipe.yaml`` that ``graft continual add``
records (the same bytes, tests/test_merge_opcm.py), run in memory. The baselines do not
depend on the order: continual task arithmetic ``θ₀ + λ Σ τₜ`` at FusionBench's fixed
``λ = 0.3`` (in a continual setting λ cannot be tuned on tasks that have not arrived),
and the running average (``λ = 1/T``).

    python benchmarks/continual.py [--zoo digits|text] [--root DIR] [--orders 10]
        [--alpha 0.5] [--quick] [--out FILE]

``--zoo digits`` builds (or reuses) the digits zoo under ``--root``; ``--zoo text`` reads a
text zoo that ``graft zoo build --zoo text`` (or benchmarks/text_zoo.py) built there.
Results go to ``benchmarks/results/continual-<zoo>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", choices=("digits", "text"), default="digits")
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache" / "graft" / "continual")
    ap.add_argument("--orders", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random task orders")
    ap.add_argument("--quick", action="store_true", help="the quick digits zoo")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    import yaml

    from graft.eval.tasks import score
    from graft.eval.zoo_bench import _Bench

    zoo = _bench_zoo(args)
    bench = _Bench(zoo, val_limit=0, threads=None, batch_size=256, log=_log)
    tasks = list(zoo.finetuned)

    def test_mean(method: str, order: list[str], params: dict) -> float:
        doc = {
            "merge_method": method,
            "base_model": str(zoo.base),
            "models": [{"model": str(zoo.finetuned[t])} for t in order],
            "parameters": params,
        }
        state = bench.state(yaml.safe_dump(doc, sort_keys=False))
        _, per_task = score(bench.test, state, batch_size=256)
        return statistics.fmean(per_task.values())

    rng = random.Random(args.seed)
    orders = [rng.sample(tasks, len(tasks)) for _ in range(args.orders)]
    t0 = time.perf_counter()
    opcm = [test_mean("opcm", o, {"alpha": args.alpha}) for o in orders]
    _log(f"opcm: {100 * statistics.fmean(opcm):.1f} ± {100 * statistics.stdev(opcm):.1f}")
    ta = {"weight": 1.0}
    rows = {
        f"opcm (α={args.alpha:g}, {args.orders} random orders)": opcm,
        "continual task arithmetic (λ=0.3)": [
            test_mean("task_arithmetic", tasks, {**ta, "lambda": 0.3, "normalize": False})
        ],
        "running average (λ=1/T)": [test_mean("task_arithmetic", tasks, {**ta, "normalize": True})],
    }
    _, pre = score(bench.test, _load(zoo.base), batch_size=256)
    summary = {
        name: {
            "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v),
            "max": max(v),
            "runs": v,
        }
        for name, v in rows.items()
    }
    doc = {
        "zoo": f"{args.zoo}{' (quick)' if args.quick else ''}",
        "tasks": tasks,
        "orders": orders,
        "pretrained_test_mean": statistics.fmean(pre.values()),
        "rows": summary,
        "seconds": time.perf_counter() - t0,
        "machine": f"{platform.node()} ({platform.machine()}), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    out = (
        args.out or HERE / "results" / f"continual-{args.zoo}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| method | test mean (%) | std | min | max |\n|---|---|---|---|---|")
    for name, s in summary.items():
        cells = [f"{100 * s[k]:.1f}" for k in ("mean", "std", "min", "max")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\npretrained (fine-tuned heads): {100 * doc['pretrained_test_mean']:.1f}; wrote {out}")


def _bench_zoo(args):
    if args.zoo == "text":
        from graft.eval.zoo_bench import text_bench_zoo

        return text_bench_zoo(args.root)
    from graft._demo import digits_bench_zoo
    from graft.zoo.build import build_zoo

    zoo = build_zoo(
        args.root / ("digits-quick" if args.quick else "digits"), quick=args.quick, log=_log
    )
    return digits_bench_zoo(zoo)


def _load(path):
    from graft.io import load_state_dict

    return load_state_dict(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
