"""PLeaS on the real MiniLM: two fine-tunes of one text-zoo task, one of them moved into
another basis of its hidden units, merged by averaging, by matching + averaging and by
PLeaS.

Model A is the text zoo's seed-0 fine-tune of ``--task``, model B its seed-1 fine-tune
(another split of the data, another data order; both from the one pretrained MiniLM, so
in one basis). B is then permuted by a random permutation that respects the encoder's
structure (`graft.align.random_permutation`: the residual stream, attention heads as
wholes with their Q/K and V/O within-head orders, each FFN's units): a model that
computes exactly what B computes (checked) but whose units no longer line up with A's,
which is what models from *different initialisations* look like to a merge. Rows:

* A, B, B permuted (= B), and their ensemble (mean probabilities, 2× the compute);
* average of A and B in their shared basis (what merging from one init gets) and average
  of A and permuted B (what naive merging of different inits gets);
* activation matching + average, PLeaS with activation matching and with weight matching
  (ratio 1), all on permuted B: matching must undo the permutation, and the least squares
  must bring the merge close to A and B.

Matching and least squares read ``--examples`` training inputs of seed 0 (A's training
data; no labels are used); accuracy is on seed 0's test split, less any text that seed
1 trained or validated on. Needs both zoos cached (``benchmarks/text_zoo.py`` builds
them). Results go to ``benchmarks/results/pleas-text.json``; docs/methods.md quotes them.

    python benchmarks/pleas_text.py [--task language-id] [--examples 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "graft" / "bench"


def main() -> None:
    from graft.align import permutation_spec, permute, random_permutation
    from graft.data import evaluate, load_runner
    from graft.data.runner import pool
    from graft.eval.zoo_bench import text_bench_zoo
    from graft.io import open_checkpoint
    from graft.merge.pleas import pleas

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="language-id")
    ap.add_argument("--examples", type=int, default=512, help="training inputs for matching")
    ap.add_argument("--test-limit", type=int, default=0, help="test examples (0: all; smoke)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pleas-text.json")
    args = ap.parse_args()
    t0 = time.time()
    zoos = [text_bench_zoo(args.cache / f"text-zoo-s{s}") for s in (0, 1)]
    task = args.task
    ra = load_runner(zoos[0].finetuned[task], head=zoos[0].heads[task])
    rb = load_runner(zoos[1].finetuned[task], head=zoos[1].heads[task])
    seen_by_b = set(zoos[1].split(task, "train").texts) | set(zoos[1].split(task, "val").texts)
    test = zoos[0].split(task, "test")
    test = test.subset([i for i, t in enumerate(test.texts) if t not in seen_by_b])
    if args.test_limit:
        test = test.subset(range(min(args.test_limit, len(test))))
    train = zoos[0].split(task, "train")
    train = train.subset(range(min(args.examples, len(train))))
    batches = [ra.inputs(train, i, min(i + 64, len(train))) for i in range(0, len(train), 64)]

    enc_a, enc_b = ra.module.encoder, rb.module.encoder
    with open_checkpoint(ra.path) as ckpt:
        spec = permutation_spec(ckpt.config, enc_a.state_dict())
    perm = random_permutation(spec, seed=7)
    state_b = enc_b.state_dict()
    state_bp = permute(state_b, spec, perm)
    head_b = {k: v.clone() for k, v in rb.module.head.state_dict().items()}
    head_bp = {"weight": head_b["weight"].index_select(1, perm["residual"]), "bias": head_b["bias"]}

    def accuracy(encoder_state, head_state) -> float:
        ra.module.encoder.load_state_dict(encoder_state)
        ra.module.head.load_state_dict(head_state)
        return round(100 * evaluate(ra, test, batch_size=64)["accuracy"], 1)

    state_a = {k: v.clone() for k, v in enc_a.state_dict().items()}
    head_a = {k: v.clone() for k, v in ra.module.head.state_dict().items()}
    rows: dict[str, float] = {}
    rows["model A (seed 0)"] = accuracy(state_a, head_a)
    rows["model B (seed 1)"] = accuracy(state_b, head_b)
    rows["model B permuted (same function)"] = accuracy(state_bp, head_bp)
    ra.module.encoder.load_state_dict(state_a)
    ra.module.head.load_state_dict(head_a)
    rows["ensemble of A and B"] = _ensemble(ra, rb, test)
    avg = lambda x, y: {k: (x[k] + y[k]) / 2 if x[k].is_floating_point() else x[k] for k in x}  # noqa: E731
    rows["average of A and B (one basis)"] = accuracy(avg(state_a, state_b), avg(head_a, head_b))
    rows["average of A and B permuted"] = accuracy(avg(state_a, state_bp), avg(head_a, head_bp))

    # B permuted as a module: PLeaS reads modules.
    enc_b.load_state_dict(state_bp)
    rb.module.head.load_state_dict(head_bp)
    enc_a.load_state_dict(state_a)
    ra.module.head.load_state_dict(head_a)
    heads = (_linear(head_a), _linear(head_bp))

    def features(m, inputs):
        return pool(m(**inputs).last_hidden_state, inputs.get("attention_mask"), ra.pooling)

    recovered = {}
    for label, match, solve in (
        ("activation matching + average", "activation", False),
        ("PLeaS, activation matching", "activation", True),
        ("PLeaS, weight matching", "weight", True),
    ):
        res = pleas(
            enc_a, enc_b, spec, batches, match=match, solve=solve, heads=heads, features=features
        )
        # B[p[j]] -> unit j: the found permutation undoes ours when p[perm[j]]... = j.
        inverse = {g: torch.argsort(p) for g, p in perm.items()}
        recovered[label] = {
            g: round(float((res.perms[g] == inverse[g]).float().mean()), 3) for g in res.perms
        }
        w, b = res.head
        rows[label] = accuracy(res.state, {"weight": w, "bias": b})
        enc_a.load_state_dict(state_a)  # accuracy() loaded the merge into A's module
        ra.module.head.load_state_dict(head_a)
        print(f"{label}: {rows[label]}", flush=True)
    out = {
        "task": task,
        "examples": len(train),
        "test_examples": len(test),
        "accuracy": rows,
        "permutation_recovered": {
            k: {"mean": round(sum(v.values()) / len(v), 3), "residual": v.get("residual")}
            for k, v in recovered.items()
        },
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    print(json.dumps(out["permutation_recovered"]))


def _linear(state):
    lin = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(state["weight"])
        lin.bias.copy_(state["bias"])
    return lin.eval()


def _ensemble(ra, rb, data) -> float:
    from graft.data import predict

    data = ra.prepare(data)
    za = torch.from_numpy(predict(ra, data, batch_size=64)).softmax(1)
    zb = torch.from_numpy(predict(rb, data, batch_size=64)).softmax(1)
    hits = (za + zb).argmax(1) == torch.as_tensor(data.labels)
    return round(100 * float(hits.double().mean()), 1)


if __name__ == "__main__":
    main()
