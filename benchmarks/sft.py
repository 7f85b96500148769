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
import copy
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

    def load(folder):
        with open_checkpoint(folder) as ckpt:
            return {n: ckpt.get(n).float() for n in ckpt.names}

    base = load(root / "base")
    # one runner and one prepared test split per task; a row swaps in weights and a head
    runners = {t: load_runner(root / "base", head=root / "probe_heads" / f"{t}.safetensors")
               for t in tasks}  # fmt: skip
    tests = {t: runners[t].prepare(data(t, "test")) for t in tasks}
    probe = {t: copy.deepcopy(runners[t].module.head.state_dict()) for t in tasks}

    def head_state(path):
        return load_runner(root / "base", head=path).module.head.state_dict()

    def accuracy(task, deltas, head) -> float:
        """Test accuracy of base + Σ deltas with ``head`` (a state dict) on ``task``."""
        state = {n: base[n] + sum(d[n] for d in deltas) for n in base}
        runner = runners[task]
        runner.module.head.load_state_dict(head)
        z = predict(runner, tests[task], batch_size=256, params=state)
        return float((z.argmax(1) == tests[task].labels).mean())

    def composed(deltas, heads, scale=1.0) -> tuple[dict, dict, dict]:
        """Each task's accuracy with its delta alone, with all deltas added (× scale), and
        averaged over the pairs it is in."""
        scaled = {t: {n: scale * d[n] for n in d} for t, d in deltas.items()}
        alone = {t: accuracy(t, [deltas[t]], heads[t]) for t in tasks}
        every = {t: accuracy(t, list(scaled.values()), heads[t]) for t in tasks}
        pairs: dict[str, list[float]] = {t: [] for t in tasks}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1 :]:
                for t in (a, b):
                    pairs[t].append(accuracy(t, [deltas[a], deltas[b]], heads[t]))
        return alone, every, {t: float(np.mean(v)) for t, v in pairs.items()}

    taus = {t: {n: v - base[n] for n, v in load(root / "finetuned" / t).items()} for t in tasks}
    heads = {t: head_state(root / "heads" / f"{t}.safetensors") for t in tasks}
    rows: dict[str, dict[str, float]] = {}
    rows["pretrained + probe head"] = {t: accuracy(t, [], probe[t]) for t in tasks}
    alone, every, pairs = composed(taus, heads)
    rows["dense fine-tune, alone"] = alone
    rows["dense fine-tunes summed (λ=1)"] = every
    rows["dense fine-tunes summed (λ=0.3)"] = composed(taus, heads, 0.3)[1]
    rows["dense fine-tunes summed in pairs (λ=1)"] = pairs
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
            sft_heads[t] = runner.module.head.state_dict()
            free = torch.cat([m.reshape(-1) for m in rep["masks"].values()]).int()
            overlap = free if overlap is None else overlap + free
            print(f"{t} density {density:g}: {rep['changed']} of {rep['backbone_entries']} changed",
                  file=sys.stderr, flush=True)  # fmt: skip
        alone, every, pairs = composed(phis, sft_heads)
        rows[f"LT-SFT {density:.0%}, alone"] = alone
        rows[f"LT-SFT {density:.0%}, all {len(tasks)} composed"] = every
        rows[f"LT-SFT {density:.0%}, composed in pairs"] = pairs
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
