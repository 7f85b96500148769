"""Knowledge transfer (``graft distill``) and compatible updates (``graft update``),
measured on real data: scikit-learn's digits through the digits zoo's tasks.

``transfer``: four GraftDigitsNet classifiers of different widths, depths and training
lengths (``MODELS``), each trained on the task's train split; every ordered pair
(teacher, student) is run through ``graft.distill.distill`` on the train split — the data
both models were trained on, as in Roth et al. 2024 — and scored on the test split. Per
method: the transfer delta (student accuracy after − before), positive / negative flips of
the student, and the share of pairs that gain, by pair type (teacher stronger, equal
within 1 point, weaker). A control row continues training each student with plain
cross-entropy for the same steps (labels alone, no teacher).

``update``: OLD is a trained 16-wide model; NEW is a freshly initialised model of another
width (three init seeds each), trained on a larger update set (train ∪ pretrain split:
OLD saw 600 of its 1,100 examples). (A) from scratch: plain cross-entropy vs focal
distillation (KL, logit matching); (B) MUSCLE's setting: NEW already trained plainly
(the result of A's cross-entropy run) is trained on for more steps plainly, with focal
distillation, or with MUSCLE's masked distillation. Reported: accuracy and NFR against OLD
on the test split.

Each part writes benchmarks/results/knowledge-transfer-PART.json, then
docs/benchmarks/knowledge-transfer.md from the parts there (``report`` only rewrites it).

    python benchmarks/transfer_kd.py transfer [--task rot90-digit] [--steps 300]   (~3-5 min)
    python benchmarks/transfer_kd.py update                                    (~2-4 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name: (hidden size, blocks, epochs, init seed) — all trained with AdamW lr 1e-3, batch 64
MODELS = {
    "w8": (8, 1, 8, 4),
    "m16a": (16, 2, 15, 2),
    "m16b": (16, 2, 15, 3),
    "x64": (64, 3, 40, 1),
}
METHODS = {  # row label: (mode, alpha)
    "KD (α 0.5)": ("kd", 0.5),
    "KD (α 1, pure)": ("kd", 1.0),
    "DP": ("dp", None),
    "DP unsupervised": ("dp-unsupervised", None),
}
EQUAL = 0.02  # pairs within 2 points of test accuracy count as equal (m16a, m16b: one recipe, two seeds)


def _datasets(task: str, seed: int = 0):
    from graft.data import Dataset
    from graft.zoo.tasks import TASKS, task_data

    names = tuple(str(i) for i in range(TASKS[task].num_classes))
    out = {}
    for split in ("pretrain", "train", "test"):
        x, y = task_data(task, split, seed=seed)
        out[split] = Dataset(f"{task} {split}", y.numpy(), names, x=x.numpy(), task=task)
    return out, names


def _train_model(root: Path, name: str, spec, data, names, task: str) -> Path:
    from graft.data import save_head_file
    from graft.models.digits_net import build_backbone, default_config, save_backbone
    from graft.zoo._train import train

    hidden, blocks, epochs, seed = spec
    torch.manual_seed(seed)
    cfg = default_config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=blocks)
    backbone, head = build_backbone(cfg), torch.nn.Linear(hidden, len(names))
    if epochs:
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.labels)
        backbone, head = train(
            backbone, head, x, y, epochs=epochs, lr=1e-3, batch_size=64, seed=seed
        )
    path = root / name
    save_backbone(backbone, cfg, path)
    save_head_file(head, path / "head.safetensors", task=task, label_names=names)
    return path


def _accuracy(path: Path, data) -> float:
    from graft.data import evaluate, load_runner

    return evaluate(load_runner(path), data)["accuracy"]


def _ce_control(path: Path, train, test, steps: int, lr: float) -> float:
    """The student trained on for ``steps`` with cross-entropy only: what labels alone give."""
    from graft.data import evaluate, load_runner
    from graft.data.train import finetune

    runner = load_runner(path)
    before = evaluate(runner, test)["accuracy"]
    finetune(runner, train, steps=steps, lr=lr, batch_size=64, seed=0)
    return evaluate(runner, test)["accuracy"] - before


def transfer(task: str, steps: int, lr: float, root: Path, partial: Path) -> dict:
    """All ordered pairs; after each pair the runs so far go to ``partial``, and a rerun with
    the same settings resumes from it (the models retrain to the same bytes)."""
    from graft.data import load_runner
    from graft.distill import distill

    data, names = _datasets(task)
    paths = {n: _train_model(root, n, s, data["train"], names, task) for n, s in MODELS.items()}
    acc = {n: _accuracy(p, data["test"]) for n, p in paths.items()}
    key = {"task": task, "steps": steps, "lr": lr, "models": MODELS}
    old = json.loads(partial.read_text()) if partial.is_file() else {}
    if old.get("key") == json.loads(json.dumps(key)):
        control, runs = old["ce_control"], old["runs"]
    else:
        control = {
            n: _ce_control(p, data["train"], data["test"], steps, lr) for n, p in paths.items()
        }
        runs = []
    for t in MODELS:
        for s in MODELS:
            if t == s or any((r["teacher"], r["student"]) == (t, s) for r in runs):
                continue
            gap = acc[t] - acc[s]
            kind = "equal" if abs(gap) <= EQUAL else ("stronger" if gap > 0 else "weaker")
            for label, (mode, alpha) in METHODS.items():
                start = time.perf_counter()
                r = distill(
                    load_runner(paths[t]), load_runner(paths[s]), data["train"], data["test"],
                    mode=mode, alpha=alpha, steps=steps, lr=lr, batch_size=64, seed=0,
                    temperature=2.0,
                )  # fmt: skip
                runs.append({
                    "teacher": t, "student": s, "pair": kind, "method": label,
                    "delta": r["transfer_delta"], "pfr": r["flips"]["pfr"],
                    "nfr": r["flips"]["nfr"], "taught": r["taught_by_teacher"],
                    "seconds": round(time.perf_counter() - start, 2),
                })  # fmt: skip
            print(f"{t} -> {s} ({kind}): " + ", ".join(
                f"{x['method']} {x['delta']:+.3f}" for x in runs[-len(METHODS):]
            ), flush=True)  # fmt: skip
            doc = {"key": key, "accuracy": acc, "ce_control": control, "runs": runs}
            partial.write_text(json.dumps({**doc, "task": task, "steps": steps, "lr": lr}) + "\n")
    return {"accuracy": acc, "ce_control": control, "runs": runs}


def update(task: str, root: Path, steps_a: int, steps_b: int, lr: float) -> dict:
    from dataclasses import replace

    from graft.data import load_runner
    from graft.distill import save_trained
    from graft.distill import update as run

    data, names = _datasets(task)
    pool = data["train"]
    both = replace(
        pool,
        x=np.concatenate([pool.x, data["pretrain"].x]),
        labels=np.concatenate([pool.labels, data["pretrain"].labels]),
    )
    old = _train_model(root, "old", MODELS["m16a"], pool, names, task)
    rows = []
    for hidden in (16, 32):
        for seed in (11, 12, 13):
            new = _train_model(root, f"new{hidden}-{seed}", (hidden, 2, 0, seed), pool, names, task)
            for mode, kw in (("ce", {}), ("fd-kl", {}), ("fd-lm", {"weight": 0.01})):
                runner = load_runner(new)
                r = run(load_runner(old), runner, both, data["test"], mode=mode,
                        steps=steps_a, lr=lr, batch_size=64, seed=0, **kw)  # fmt: skip
                rows.append(_row("A", hidden, seed, mode, kw, r))
                if mode == "ce":
                    v2 = save_trained(runner, root / f"v2-{hidden}-{seed}", sources=[str(new)],
                                      card_yaml="benchmark\n", title="v2")  # fmt: skip
            for mode, kw in (("ce", {}), ("fd-kl", {}), ("muscle", {})):
                r = run(load_runner(old), load_runner(v2), both, data["test"], mode=mode,
                        steps=steps_b, lr=lr / 3, batch_size=64, seed=1, **kw)  # fmt: skip
                rows.append(_row("B", hidden, seed, mode, kw, r))
            print(f"update new{hidden} seed {seed}: " + ", ".join(
                f"{x['setting']}/{x['mode']} acc {x['accuracy']:.3f} nfr {x['nfr']:.4f}"
                for x in rows[-6:]
            ), flush=True)  # fmt: skip
    return {"old_accuracy": rows[0]["old_accuracy"], "rows": rows}


def _row(setting, hidden, seed, mode, kw, r) -> dict:
    a = r["after"]
    return {
        "setting": setting, "hidden": hidden, "seed": seed, "mode": mode, "options": kw,
        "old_accuracy": r["old_accuracy"], "accuracy": a["accuracy"], "nfr": a["flips"]["nfr"],
        "negative_flips": a["flips"]["negative_flips"], "pfr": a["flips"]["pfr"],
    }  # fmt: skip


# --------------------------------------------------------------------------- report


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _transfer_md(t: dict, task: str, steps: int, lr: float) -> str:
    acc = t["accuracy"]
    lines = [
        "### Transfer between any two models (`graft distill`)\n",
        f"Task `{task}` (digits zoo): every model trained on its 600-image train split; "
        f"transfer on that split, {steps} steps × 64, AdamW lr {lr}, τ = 2, data-order seed 0; "
        "scored on the 497-image test split. Models: "
        + ", ".join(f"`{n}` {acc[n]:.1%}" for n in MODELS)
        + f" (test accuracy; widths {', '.join(str(s[0]) for s in MODELS.values())}).\n",
        "| method | mean Δ, teacher stronger | mean Δ, equal | mean Δ, weaker | pairs that gain "
        "| mean PFR | mean NFR |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = ("stronger", "equal", "weaker")
    counts = {k: sum(1 for r in t["runs"] if r["pair"] == k) // len(METHODS) for k in kinds}
    for label in METHODS:
        rs = [r for r in t["runs"] if r["method"] == label]
        by = [_mean([r["delta"] for r in rs if r["pair"] == k]) for k in kinds]
        gain = sum(r["delta"] > 0 for r in rs)
        lines.append(
            f"| {label} | " + " | ".join("–" if d != d else f"{d * 100:+.2f}" for d in by)
            + f" | {gain}/{len(rs)} | {_mean([r['pfr'] for r in rs]):.2%} "
            f"| {_mean([r['nfr'] for r in rs]):.2%} |"
        )  # fmt: skip
    ctl = t["ce_control"]
    lines.append(
        f"| control: CE only, no teacher | (per student) {', '.join(f'{n} {ctl[n] * 100:+.2f}' for n in MODELS)} "
        f"| | | {sum(v > 0 for v in ctl.values())}/{len(ctl)} students | | |"
    )  # fmt: skip
    lines.append(
        f"\nΔ in accuracy points; pairs: {counts['stronger']} with a stronger teacher, "
        f"{counts['equal']} equal (within {EQUAL:.0%}), {counts['weaker']} weaker. PFR / NFR: "
        "flips of the student from before to after on the test split (gained / forgotten)."
    )
    lines += ["", "Per pair (Δ in points; share of training examples DP gave the teacher):", ""]
    lines += ["| teacher → student | " + " | ".join(METHODS) + " | DP taught |"]
    lines += ["|---" * (len(METHODS) + 2) + "|"]
    for t_name in MODELS:
        for s_name in MODELS:
            rs = {
                r["method"]: r
                for r in t["runs"]
                if (r["teacher"], r["student"]) == (t_name, s_name)
            }
            if not rs:
                continue
            lines.append(
                f"| {t_name} → {s_name} | "
                + " | ".join(f"{rs[m]['delta'] * 100:+.1f}" for m in METHODS)
                + f" | {rs['DP']['taught']:.0%} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _update_md(u: dict, steps_a: int, steps_b: int, lr: float) -> str:
    lines = [
        "### Compatible updates (`graft update`)\n",
        f"OLD: `m16a` ({u['old_accuracy']:.1%} on test). NEW: freshly initialised 16- and "
        "32-wide models, init seeds 11/12/13, trained on train ∪ pretrain split (1,100 "
        f"images). A: {steps_a} steps from scratch, lr {lr}. B: NEW = A's plain run, "
        f"{steps_b} more steps at lr {lr / 3:g}. Focal distillation α = 1, β = 5, λ = 1, "
        "τ = 1 (fd-lm: λ = 0.01, which puts ½‖z − z_old‖² at the CE's scale at the start); "
        "MUSCLE λ = 1. Test split, NFR against OLD; mean over the three seeds.\n",
        "| setting | NEW | mode | accuracy | NFR | negative flips (of 497) | NFR vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in ("A", "B"):
        for hidden in (16, 32):
            rs = [r for r in u["rows"] if (r["setting"], r["hidden"]) == (setting, hidden)]
            plain = _mean([r["nfr"] for r in rs if r["mode"] == "ce"])
            for mode in dict.fromkeys(r["mode"] for r in rs):
                m = [r for r in rs if r["mode"] == mode]
                nfr = _mean([r["nfr"] for r in m])
                rel = "" if mode == "ce" else f"{(nfr / plain - 1) * 100:+.0f}%"
                lines.append(
                    f"| {setting} | {hidden}-wide | {mode} | "
                    f"{_mean([r['accuracy'] for r in m]):.2%} | {nfr:.2%} | "
                    f"{_mean([r['negative_flips'] for r in m]):.1f} | {rel} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("transfer", "update", "report"))
    ap.add_argument("--task", default="rot90-digit")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if args.part != "report":
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if args.part == "transfer":
                partial = results / "knowledge-transfer-transfer.partial.json"
                body = transfer(args.task, args.steps, args.lr, Path(tmp), partial)
                partial.unlink(missing_ok=True)
            else:
                body = update(args.task, Path(tmp), 500, 200, args.lr)
        doc = {
            "task": args.task, "steps": args.steps, "lr": args.lr, **body,
            "seconds": round(time.perf_counter() - start, 1), "machine": platform.platform(),
            "torch": torch.__version__,
        }  # fmt: skip
        path = results / f"knowledge-transfer-{args.part}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path} in {doc['seconds']:.0f}s")
    _write_report(results)
    return 0


def _write_report(results: Path) -> None:
    parts = {}
    for part in ("transfer", "update"):
        path = results / f"knowledge-transfer-{part}.json"
        if path.is_file():
            parts[part] = json.loads(path.read_text())
    partial = results / "knowledge-transfer-transfer.partial.json"
    if "transfer" not in parts and partial.is_file():  # an interrupted run: what it finished
        parts["transfer"] = {**json.loads(partial.read_text()), "seconds": float("nan"),
                             "machine": platform.platform(), "torch": torch.__version__}  # fmt: skip
    md = (
        "# Knowledge transfer and compatible updates: measured\n\n"
        "Generated by `python benchmarks/transfer_kd.py transfer` and `... update` (raw "
        "numbers: `benchmarks/results/knowledge-transfer-*.json`). What the methods are: "
        "[transfer-compress.md](../transfer-compress.md#knowledge-transfer-and-compatible-updates).\n\n"
    )  # fmt: skip
    if "transfer" in parts:
        t = parts["transfer"]
        md += _transfer_md(t, t["task"], t["steps"], t["lr"])
        pairs = len(MODELS) * (len(MODELS) - 1)
        done = len({(r["teacher"], r["student"]) for r in t["runs"]})
        if done < pairs:
            md += f"\n**Partial run: {done} of {pairs} pairs finished** (rerun to resume).\n"
        took = "" if t["seconds"] != t["seconds"] else f"{t['seconds']:.0f} s, "
        md += f"\n({took}one thread, {t['machine']}, torch {t['torch']}.)\n\n"
    if "update" in parts:
        u = parts["update"]
        md += _update_md(u, 500, 200, u["lr"])
        md += f"\n({u['seconds']:.0f} s, one thread, {u['machine']}, torch {u['torch']}.)\n"
    out = REPO / "docs" / "benchmarks" / "knowledge-transfer.md"
    out.write_text(md, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
