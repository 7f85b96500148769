"""Composable sparse fine-tuning (LT-SFT, `graft sft`) on the digits zoo: each task's
sparse fine-tune alone, all of them composed by addition, against the dense fine-tunes.

Every task is sparse-fine-tuned from the zoo's pretrained backbone with its linear-probe
head (`graft.distill.sft.lt_sft`: full fine-tune, keep the ``--density`` share of backbone
entries that moved most, reset, re-train only those; the head trains densely). Composed:
``θ₀ + Σₜ φₜ`` (what ``graft apply BASE φ₁ … φ_T`` writes), each task read with its own
head. The dense references are the zoo's full fine-tunes, alone and summed (task
arithmetic at λ = 1 and at λ = 0.3). Also in pairs: every two tasks composed (the paper's
setting is two patches, a task's and a language's), each task's accuracy averaged over the
6 pairs it is in. Test accuracy, mean over the tasks.

    python benchmarks/sft.py [--root ~/.cache/graft/bench/digits-zoo-s0] [--density 0.05 0.01]
    python benchmarks/sft.py --root ~/.cache/graft/bench/text-zoo-s0 --tasks A B C \
        --density 0.05 --steps 150 --batch-size 16 --lr 3e-4 --threads 2

Results go to benchmarks/results/sft-<digits|text>.json; docs/transfer-compress.md
quotes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache/graft/bench/digits-zoo-s0")
    ap.add_argument("--density", type=float, nargs="+", default=[0.05, 0.01])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tasks", nargs="+", default=None, help="a subset of the zoo's tasks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: results/sft-<zoo>.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    torch.set_num_threads(args.threads)
    from graft.data import DataOptions, load_runner, predict, read_data
    from graft.data.train import trained_state
    from graft.distill.sft import lt_sft
    from graft.io import open_checkpoint

    start = time.time()
    root = args.root
    manifest = json.loads((root / "manifest.json").read_text())
    tasks = args.tasks or manifest["build_config"]["tasks"]
    kind = "digits" if manifest["format"] == "graft-digits-zoo" else "text"
    out_path = args.out or HERE / "results" / f"sft-{kind}.json"

    def data(task, split):
        return read_data(f"task:{task}", DataOptions(), zoo=root, split=split)

    with open_checkpoint(root / "base") as ckpt:
        base = {n: ckpt.get(n).float() for n in ckpt.names}

    def accuracy(task, state, head) -> float:
        runner = load_runner(root / "base", head=head)
        test = runner.prepare(data(task, "test"))
        z = predict(runner, test, batch_size=256, params=state)
        return float((z.argmax(1) == test.labels).mean())

    def load(folder):
        with open_checkpoint(folder) as ckpt:
            return {n: ckpt.get(n).float() for n in ckpt.names}

    dense = {t: load(root / "finetuned" / t) for t in tasks}
    rows: dict[str, dict[str, float]] = {}
    rows["pretrained + probe head"] = {
        t: accuracy(t, base, root / "probe_heads" / f"{t}.safetensors") for t in tasks
    }
    heads = {t: root / "heads" / f"{t}.safetensors" for t in tasks}
    rows["dense fine-tune, alone"] = {t: accuracy(t, dense[t], heads[t]) for t in tasks}
    for lam in (1.0, 0.3):
        summed = {n: base[n] + lam * sum(dense[t][n] - base[n] for t in tasks) for n in base}
        rows[f"dense fine-tunes summed (λ={lam:g})"] = {
            t: accuracy(t, summed, heads[t]) for t in tasks
        }
    dense_pairs: dict[str, list[float]] = {t: [] for t in tasks}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            pair = {n: base[n] + (dense[a][n] - base[n]) + (dense[b][n] - base[n]) for n in base}
            dense_pairs[a].append(accuracy(a, pair, heads[a]))
            dense_pairs[b].append(accuracy(b, pair, heads[b]))
    rows["dense fine-tunes summed in pairs (λ=1)"] = {
        t: float(np.mean(v)) for t, v in dense_pairs.items()
    }
    details = {}
    for density in args.density:
        phis, sft_heads, overlap = {}, {}, None
        for t in tasks:
            runner = load_runner(root / "base", head=root / "probe_heads" / f"{t}.safetensors")
            train = runner.prepare(data(t, "train"))
            rep = lt_sft(runner, train, density=density, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=0)  # fmt: skip
            state = trained_state(runner, base)
            phis[t] = {n: state[n].float() - base[n] for n in base}
            sft_heads[t] = runner.module.head
            free = torch.cat([m.reshape(-1) for m in rep["masks"].values()]).int()
            overlap = free if overlap is None else overlap + free
            print(f"{t} density {density:g}: {rep['changed']} of {rep['backbone_entries']} changed",
                  file=sys.stderr, flush=True)  # fmt: skip
        composed = {n: base[n] + sum(phis[t][n] for t in tasks) for n in base}

        def acc_with(task, state, head_module):
            runner = load_runner(root / "base", head=root / "probe_heads" / f"{task}.safetensors")
            runner.module.head.load_state_dict(head_module.state_dict())
            test = runner.prepare(data(task, "test"))
            z = predict(runner, test, batch_size=256, params=state)
            return float((z.argmax(1) == test.labels).mean())

        rows[f"LT-SFT {density:.0%}, alone"] = {
            t: acc_with(t, {n: base[n] + phis[t][n] for n in base}, sft_heads[t]) for t in tasks
        }
        rows[f"LT-SFT {density:.0%}, all {len(tasks)} composed"] = {
            t: acc_with(t, composed, sft_heads[t]) for t in tasks
        }
        pair_rows: dict[str, list[float]] = {t: [] for t in tasks}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1 :]:
                pair = {n: base[n] + phis[a][n] + phis[b][n] for n in base}
                pair_rows[a].append(acc_with(a, pair, sft_heads[a]))
                pair_rows[b].append(acc_with(b, pair, sft_heads[b]))
        rows[f"LT-SFT {density:.0%}, composed in pairs"] = {
            t: float(np.mean(v)) for t, v in pair_rows.items()
        }
        assert overlap is not None
        details[f"{density:g}"] = {
            "entries_free_in_2_or_more_tasks": int((overlap >= 2).sum()),
            "entries_free_in_any_task": int((overlap >= 1).sum()),
        }
    doc = {
        "zoo": str(root),
        "tasks": tasks,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "rows": {k: {**v, "mean": float(np.mean(list(v.values())))} for k, v in rows.items()},
        "overlap": details,
        "seconds": time.time() - start,
        "machine": f"{platform.node()} ({platform.machine()}), torch {torch.__version__}, 1 thread",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print("| method | " + " | ".join(tasks) + " | mean |\n|---|" + "---|" * (len(tasks) + 1))
    for name, r in doc["rows"].items():
        print(f"| {name} | " + " | ".join(f"{100 * r[t]:.1f}" for t in tasks)
              + f" | {100 * r['mean']:.1f} |")  # fmt: skip
    print(json.dumps(details), f"\nwrote {out_path} in {doc['seconds']:.0f}s")


if __name__ == "__main__":
    main()
