"""PLeaS on the digits zoo's tasks: two models from *different* initialisations merged by
naive averaging, permutation matching + averaging, and PLeaS (ratios 1.0 and 0.5).

Per seed s in (0, 1): a GraftDigitsNet with the zoo's sizes (hidden 16, intermediate 128,
4 blocks) initialised from torch seed s and pretrained on the upright digits (as the zoo's
base, ``--pretrain-epochs``), then fine-tuned LP-FT on each task (probe, then backbone and
head, ``--epochs``). For each task the two fine-tunes (same task, different bases) are
merged, heads included; matching and least squares use the task's train split (600
images), accuracy is on its test split (497). Single-threaded, seeded: the numbers are
reproducible.

    python benchmarks/pleas.py [--tasks rot90-digit inverted-digit] [--epochs 10]

Results go to ``benchmarks/results/pleas-digits.json``; docs/methods.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROWS = (
    ("naive average", None, False, 1.0),
    ("weight matching + average", "weight", False, 1.0),
    ("activation matching + average", "activation", False, 1.0),
    ("PLeaS, weight matching, ratio 1.0", "weight", True, 1.0),
    ("PLeaS, activation matching, ratio 1.0", "activation", True, 1.0),
    ("PLeaS, activation matching, ratio 0.5", "activation", True, 0.5),
    ("activation matching + zip, ratio 0.5 (no least squares)", "activation", False, 0.5),
)


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


def main() -> None:
    from graft.align import permutation_spec
    from graft.merge.pleas import pleas
    from graft.models.digits_net import backbone_state, build_backbone, default_config
    from graft.zoo._train import average, probe, train
    from graft.zoo.build import FULL
    from graft.zoo.tasks import pretrain_data, task_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["rot90-digit", "inverted-digit"])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = default_config(
        hidden_size=FULL.hidden_size,
        intermediate_size=FULL.intermediate_size,
        num_hidden_layers=FULL.num_hidden_layers,
    )
    d = config["hidden_size"]
    X0, y0 = pretrain_data(seed=0)
    bases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        base, _ = train(
            build_backbone(config),
            nn.Linear(d, 10),
            X0,
            y0,
            epochs=args.pretrain_epochs,
            lr=FULL.pretrain_lr,
            batch_size=FULL.batch_size,
            seed=seed,
        )
        bases.append(base)
        _log(f"pretrained seed {seed}")
    spec = permutation_spec(config, backbone_state(bases[0]))
    results = {}
    for task in args.tasks:
        X, y = task_data(task, "train")
        Xt, yt = task_data(task, "test")
        models = []
        for seed, base in enumerate(bases):
            head = probe(base, X, y, 10, steps=FULL.probe_steps, lr=FULL.probe_lr)
            models.append(
                train(
                    base,
                    head,
                    X,
                    y,
                    epochs=args.epochs,
                    lr=FULL.finetune_lr,
                    batch_size=FULL.batch_size,
                    seed=seed + 10,
                )
            )
        (a, ha), (b, hb) = models

        def acc(backbone, head, Xt=Xt, yt=yt) -> float:
            with torch.no_grad():
                return round(100 * float((head(backbone(Xt)).argmax(1) == yt).float().mean()), 1)

        row = {"model A (seed 0)": acc(a, ha), "model B (seed 1)": acc(b, hb)}
        with torch.no_grad():
            logits = (ha(a(Xt)).softmax(1) + hb(b(Xt)).softmax(1)) / 2
        row["ensemble (2 models)"] = round(100 * float((logits.argmax(1) == yt).float().mean()), 1)
        for label, match, solve, ratio in ROWS:
            start = time.time()
            if match is None:
                row[label] = acc(average([a, b]), average([ha, hb]))
                continue
            res = pleas(
                a,
                b,
                spec,
                [{"x": X[i : i + 200]} for i in range(0, len(X), 200)],
                match=match,
                ratio=ratio,
                solve=solve,
                heads=(ha, hb),
            )
            cfg = dict(
                config,
                intermediate_size=res.widths.get("blocks.0.mlp", config["intermediate_size"]),
            )
            merged = build_backbone(cfg).eval()
            merged.load_state_dict(res.state)
            head = nn.Linear(d, 10)
            head.weight.data, head.bias.data = res.head[0].float(), res.head[1].float()
            row[label] = acc(merged, head)
            _log(f"{task}: {label}: {row[label]} ({time.time() - start:.1f}s)")
        results[task] = row
    labels = list(next(iter(results.values())))
    results["average"] = {
        k: round(sum(r[k] for r in results.values()) / len(results), 1) for k in labels
    }
    doc = {"config": config, "args": vars(args), "results": results}
    out = HERE / "results" / "pleas-digits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| method | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in labels:
        print(f"| {k} | " + " | ".join(f"{r[k]:.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
