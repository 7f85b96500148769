"""Twin-Merging on the zoos: accuracy against task arithmetic / TIES and the fine-tunes, and
storage against keeping every fine-tune.

``digits``: the full digits zoo (seed 0), `graft.eval.zoo_bench` rows (references, task
arithmetic and TIES searched on validation, ``twin-merging``), then variants of the Twin
folder: keep ratio 0.05 / 0.25 / 1.0 (per input), per-batch routing (64 inputs, one task
per batch as in ``graft eval``) and oracle routing (each input given its own task's part
only: what a perfect router would get).

``text``: the text zoo (``--root``, built by ``benchmarks/text_zoo.py``), in steps that
each fit in a few minutes on 2 cores: ``text-build`` writes the Twin folder (task
arithmetic at ``--lam``, keep 0.1, router on 250 validation inputs per task),
``text-eval --tasks ...`` evaluates it (per input, and the shared expert alone) on those
tasks' test splits (``--limit`` examples each), ``text-report`` prints the table.

    python benchmarks/twin.py digits [--seed 0]        # then: digits-variants
    python benchmarks/twin.py text-build [--lam 0.3]
    python benchmarks/twin.py text-eval --tasks movie-sentiment tweet-sentiment
    python benchmarks/twin.py text-report

Results go to ``benchmarks/results/twin-{digits,text}.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "graft" / "bench"
KEEPS = (0.05, 0.25, 1.0)
# A short grid around the digits demo's choice (λ = 0.05 on its 0.05…1.0 grid), to fit a
# few minutes on a shared 2-core machine; TIES and the rest: docs/benchmarks/merge-quality.md.
GRIDS = {"task_arithmetic": [0.05, 0.1, 0.2, 0.3]}


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


def _save(name: str, doc: dict) -> Path:
    out = HERE / "results" / f"twin-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _oracle(twin, runner, data, task_index: int, batch_size: int) -> float:
    """Accuracy with every input routed to its own task (one-hot weights)."""
    from graft.data.passes import scores
    from graft.twin.dynamic import routed

    data = runner.prepare(data)
    out = []
    with torch.no_grad(), routed(runner, twin.stacks) as holder:
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            w = torch.zeros(stop - start, len(twin.tasks))
            w[:, task_index] = 1.0
            holder.value = w
            out.append(runner.logits(runner.inputs(data, start, stop)).double().numpy())
    return scores(np.concatenate(out), data.labels)["accuracy"]


def digits(args) -> None:
    from graft._demo import digits_bench_zoo
    from graft.eval.zoo_bench import markdown_table, run_bench
    from graft.zoo import build_zoo

    zoo = build_zoo(CACHE / f"digits-zoo-s{args.seed}", seed=args.seed, log=_log)
    bench_zoo = digits_bench_zoo(zoo)
    result = run_bench(
        bench_zoo,
        methods=["task_arithmetic", "twin-merging"],
        val_limit=0,
        batch_size=512,
        grids=GRIDS,
        save_to=CACHE / f"digits-twin-s{args.seed}",
        log=_log,
    )
    table = markdown_table(result, short=lambda t: t.removesuffix("-digit"))
    print(table)
    lam = float(result.row("task_arithmetic").settings.split("=")[1].split(" ")[0])
    doc = {"zoo": "digits", "seed": args.seed, "bench": result.to_json(), "lambda": lam,
           "table": table}  # fmt: skip
    _log(f"wrote {_save('digits', doc)}")


def digits_variants(args) -> None:
    from graft._demo import digits_bench_zoo
    from graft.data import load_runner
    from graft.twin import build_twin, open_twin
    from graft.twin.build import task_names
    from graft.zoo import build_zoo

    saved = HERE / "results" / "twin-digits.json"
    doc = json.loads(saved.read_text()) if saved.is_file() else {"zoo": "digits"}
    lam = args.lam if args.lam is not None else doc["lambda"]
    doc["lambda"] = lam
    bench_zoo = digits_bench_zoo(build_zoo(CACHE / f"digits-zoo-s{args.seed}", seed=args.seed))
    tasks = list(bench_zoo.finetuned)
    names = task_names(tasks)
    val = [bench_zoo.split(t, "val") for t in tasks]
    test = [bench_zoo.split(t, "test") for t in tasks]
    variants = []
    for keep in (0.1, *KEEPS):
        out = CACHE / f"digits-twin-s{args.seed}" / f"keep-{keep:g}"
        report = build_twin(
            bench_zoo.base,
            [bench_zoo.finetuned[t] for t in tasks],
            val,
            out,
            names=names,
            lam=lam,
            keep=keep,
            force=True,
        )
        twin = open_twin(out)
        row = {"keep": keep, "storage": report.storage, "router_train": report.router_accuracy}
        for routing, batch in (("input", 512), ("batch", 64)):
            if routing == "batch" and keep != 0.1:
                continue
            accs, own = {}, []
            for i, (t, data) in enumerate(zip(tasks, test, strict=True)):
                runner = load_runner(twin.shared, head=bench_zoo.heads[t])
                r = twin.evaluate(runner, data, routing=routing, batch_size=batch)
                accs[t] = r["accuracy"]
                own.append(r["routed"][names[i]])
            row[routing] = {"accuracy": accs, "mean": float(np.mean(list(accs.values())))}
            row[routing]["routed_to_own"] = float(np.mean(own))
        oracle = {}
        for i, (t, data) in enumerate(zip(tasks, test, strict=True)):
            runner = load_runner(twin.shared, head=bench_zoo.heads[t])
            oracle[t] = _oracle(twin, runner, data, i, 512)
        row["oracle"] = {"accuracy": oracle, "mean": float(np.mean(list(oracle.values())))}
        variants.append(row)
        _log(
            f"keep {keep}: per input {row['input']['mean']:.1%}, oracle {row['oracle']['mean']:.1%}"
        )
    doc["variants"] = variants
    _log(f"wrote {_save('digits', doc)}")
    print(_variants_table(variants, len(tasks)))


def _variants_table(variants: list[dict], n: int) -> str:
    lines = [
        "| keep | per input | per batch (64) | oracle routing | routed to own task | "
        "storage (models) |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = v["storage"]
        batch = f"{100 * v['batch']['mean']:.1f}" if "batch" in v else ""
        lines.append(
            f"| {v['keep']:g} | {100 * v['input']['mean']:.1f} | {batch} | "
            f"{100 * v['oracle']['mean']:.1f} | {100 * v['input']['routed_to_own']:.1f}% | "
            f"{s['total'] * n / s['finetuned']:.2f} of {n} |"
        )
    return "\n".join(lines) + "\n"


# --- text zoo, in steps ---------------------------------------------------------------


def _text(root: Path):
    from graft.eval.zoo_bench import text_bench_zoo

    return text_bench_zoo(root)


def text_build(args) -> None:
    from graft.twin import build_twin
    from graft.twin.build import task_names

    z = _text(args.root)
    tasks = list(z.finetuned)
    val = [z.split(t, "val").subset(np.arange(250)) for t in tasks]
    t0 = time.perf_counter()
    report = build_twin(
        z.base,
        [z.finetuned[t] for t in tasks],
        val,
        args.out,
        names=task_names(tasks),
        head=z.heads[tasks[0]],
        lam=args.lam,
        keep=0.1,
        force=True,
        log=_log,
    )
    doc = {"zoo": "text", "root": str(args.root), "lambda": args.lam, "keep": 0.1,
           "storage": report.storage, "router_train": report.router_accuracy,
           "build_seconds": time.perf_counter() - t0, "tasks": {}}  # fmt: skip
    _log(f"built in {doc['build_seconds']:.0f}s; storage {report.storage}")
    _save("text", doc)


def text_eval(args) -> None:
    from graft.data import evaluate, load_runner
    from graft.twin import open_twin
    from graft.twin.build import task_names

    z = _text(args.root)
    doc = json.loads((HERE / "results" / "twin-text.json").read_text())
    twin = open_twin(args.out)
    names = dict(zip(list(z.finetuned), task_names(list(z.finetuned)), strict=True))
    for t in args.tasks:
        t0 = time.perf_counter()
        data = z.split(t, "test")
        if args.limit and len(data) > args.limit:
            data = data.subset(np.arange(args.limit))
        runner = load_runner(twin.shared, head=z.heads[t])
        r = twin.evaluate(runner, data, batch_size=64)
        shared = evaluate(runner, data, batch_size=64)["accuracy"]
        doc["tasks"][t] = {"twin": r["accuracy"], "shared": shared, "n": r["n"],
                           "routed_to_own": r["routed"][names[t]],
                           "seconds": time.perf_counter() - t0}  # fmt: skip
        _log(f"{t}: twin {r['accuracy']:.1%}, shared {shared:.1%}, routed "
             f"{r['routed'][names[t]]:.1%} ({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        _save("text", doc)


def text_report(args) -> None:
    doc = json.loads((HERE / "results" / "twin-text.json").read_text())
    rows = doc["tasks"]
    print("| task | shared (TA) | twin | routed to own | n |\n|---|---|---|---|---|")
    for t, r in rows.items():
        print(f"| {t} | {100 * r['shared']:.1f} | {100 * r['twin']:.1f} | "
              f"{100 * r['routed_to_own']:.1f}% | {r['n']} |")  # fmt: skip
    if rows:
        mean = {k: np.mean([r[k] for r in rows.values()]) for k in ("shared", "twin")}
        print(f"| mean | {100 * mean['shared']:.1f} | {100 * mean['twin']:.1f} | | |")
    s = doc["storage"]
    print(f"\nstorage: {s['total'] * 8 / s['finetuned']:.2f} models of 8 ({s})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("digits", "digits-variants"):
        p = sub.add_parser(name)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--lam", type=float, default=None, help="digits-variants: λ of TA")
    for name in ("text-build", "text-eval", "text-report"):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, default=CACHE / "text-zoo-s0")
        p.add_argument("--out", type=Path, default=CACHE / "text-twin-s0")
        p.add_argument("--lam", type=float, default=0.3)
        p.add_argument("--tasks", nargs="*", default=[])
        p.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    {"digits": digits, "digits-variants": digits_variants, "text-build": text_build, "text-eval": text_eval,
     "text-report": text_report}[args.cmd](args)  # fmt: skip


if __name__ == "__main__":
    main()
