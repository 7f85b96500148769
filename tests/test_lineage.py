"""Lineage from weights: Chu-Liu/Edmonds against brute force, and a real trained family
(base -> fine-tune -> fine-tune of the fine-tune, plus an unrelated model) recovered
exactly from the index, with the card that lies flagged."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from torch import nn

from conftest import run_cli
from graft.io import write_text
from graft.models.digits_net import backbone_state, build_backbone, default_config, save_backbone
from graft.zoo._train import probe, train
from graft.zoo.index import ZooIndex
from graft.zoo.lineage import index_lineage, infer_lineage, kurtosis, min_arborescence
from graft.zoo.tasks import pretrain_data, task_data


@pytest.fixture(scope="module", autouse=True)
def _cli():
    """Register the zoo commands on the CLI if app.py does not yet (no-op once it does)."""
    from graft.cli import app as cli
    from graft.cli.rank_cmd import rank
    from graft.cli.zoo_cmds import zoo_app

    if "zoo" not in {g.name for g in cli.app.registered_groups}:
        cli.app.add_typer(zoo_app, name="zoo")
    if "rank" not in {c.name for c in cli.app.registered_commands}:
        cli.app.command("rank")(rank)


# --- Chu-Liu/Edmonds -------------------------------------------------------------------------


def _brute_arborescence(cost, root) -> float:
    n, best = len(cost), math.inf
    others = [v for v in range(n) if v != root]
    for choice in itertools.product(range(n), repeat=len(others)):
        parent = dict(zip(others, choice, strict=True))
        if any(p == v for v, p in parent.items()):
            continue
        ok = True
        for v in others:  # every node must reach the root without a cycle
            seen, u = set(), v
            while u != root:
                if u in seen:
                    ok = False
                    break
                seen.add(u)
                u = parent[u]
            if not ok:
                break
        if ok:
            best = min(best, sum(cost[p][v] for v, p in parent.items()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_min_arborescence_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    cost = [[rng.choice([1, 2, 3, 5, 8]) + rng.random() for _ in range(n)] for _ in range(n)]
    root = rng.randrange(n)
    parent = min_arborescence(cost, root)
    assert parent[root] is None
    total = sum(cost[p][v] for v, p in enumerate(parent) if p is not None)
    assert total == pytest.approx(_brute_arborescence(cost, root))


def test_min_arborescence_breaks_a_cycle_the_cheap_way():
    # 1 <-> 2 are each other's cheapest parents; the root reaches 1 cheaper than 2.
    inf = math.inf
    cost = [[inf, 5, 9], [inf, inf, 1], [inf, 1, inf]]
    assert min_arborescence(cost, 0) == [None, 0, 1]


# --- a trained family ------------------------------------------------------------------------


def _config():
    return default_config(hidden_size=16, intermediate_size=32, num_hidden_layers=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base (upright digits) -> ft (rot90) -> ftft (inverted), and an unrelated model;
    trained for real (a few hundred steps in all), single-threaded for the same bytes."""
    root = tmp_path_factory.mktemp("lineage")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = pretrain_data(seed=0)
        torch.manual_seed(0)
        base, _ = train(
            build_backbone(_config()),
            nn.Linear(16, 10),
            X,
            y,
            epochs=15,
            lr=1e-3,
            batch_size=64,
            seed=0,
        )
        models = {"base": base}
        parent = base
        for name, task, seed in (("ft", "rot90-digit", 1), ("ftft", "inverted-digit", 2)):
            Xt, yt = task_data(task, "train")
            head = probe(parent, Xt, yt, 10, steps=50, lr=1e-2)
            models[name], _ = train(
                parent, head, Xt, yt, epochs=8, lr=1e-3, batch_size=64, seed=seed
            )
            parent = models[name]
        torch.manual_seed(7)
        models["unrelated"], _ = train(
            build_backbone(_config()),
            nn.Linear(16, 10),
            X,
            y,
            epochs=15,
            lr=1e-3,
            batch_size=64,
            seed=7,
        )
    finally:
        torch.set_num_threads(threads)
    for name, module in models.items():
        save_backbone(module, _config(), root / name)
    _card(root / "ft", "../base")  # true
    _card(root / "ftft", "../unrelated")  # false: ftft was fine-tuned from ft
    return root, models


def _card(model_dir, base):
    write_text(
        model_dir / "README.md",
        f"---\nbase_model: {base}\nbase_model_relation: finetune\n---\n# card\n",
    )


def _mats(module):
    return [t.reshape(t.shape[0], -1) for t in backbone_state(module).values() if t.ndim >= 2]


def test_kurtosis_rises_from_parent_to_child(family):
    _, models = family
    k = kurtosis([_mats(models[n]) for n in ("base", "ft", "ftft")])
    assert k[0] < k[1] < k[2]


def test_infer_lineage_on_weights_in_any_order(family):
    _, models = family
    order = ["ftft", "unrelated", "base", "ft"]
    lin = infer_lineage([_mats(models[n]) for n in order])
    named = {order[i]: (order[p] if p is not None else None) for i, p in enumerate(lin.parents)}
    assert named == {"base": None, "ft": "base", "ftft": "ft", "unrelated": None}
    assert lin.family[order.index("unrelated")] != lin.family[order.index("base")]
    assert lin.ratio(order.index("base"), order.index("ft")) < 0.5
    assert lin.ratio(order.index("base"), order.index("unrelated")) > 0.9


def test_index_recovers_the_family_and_flags_the_card(family, tmp_path):
    root, _ = family
    db = tmp_path / "zoo.sqlite"
    with ZooIndex(db) as index:
        index.scan([root])
        lin = index_lineage(index)
        name = {r.id: r.path.rsplit("/", 1)[-1] for r in index.models()}
    assert len(lin.families) == 1
    parents = {
        name[c]: (name[p] if p is not None else None) for c, p in lin.families[0].parents.items()
    }
    assert parents == {"base": None, "ft": "base", "ftft": "ft"}
    assert [name[i] for i in lin.singletons] == ["unrelated"]
    checks = {name[i]: c[0] for i, c in lin.card_checks.items()}
    assert checks["ft"]["verdict"] == "agrees"
    assert checks["ftft"]["verdict"] == "disagrees"
    assert "the weights are unrelated" in checks["ftft"]["message"]
    assert lin.orientation == {"declared_related_pairs": 1, "kurtosis_rises": 1}


def test_tree_show_and_find_by_base_from_the_cli(family, tmp_path):
    root, _ = family
    db = str(tmp_path / "zoo.sqlite")
    assert run_cli("zoo", "scan", root, "--db", db, "-q")[0] == 0
    code, out, err = run_cli("zoo", "tree", "--db", db)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("base ") for line in lines)
    assert any("ft " in line and "ratio" in line for line in lines)
    assert "card says base_model ../unrelated, but the weights are unrelated" in out.replace(
        "\n", " "
    )
    assert "1 model(s) with no relative in the index" in out
    code, out, _ = run_cli("zoo", "tree", "--db", db, "--json")
    doc = json.loads(out)
    edges = {
        (e["parent"].rsplit("/", 1)[-1], e["child"].rsplit("/", 1)[-1])
        for e in doc["families"][0]["edges"]
    }
    assert edges == {("base", "ft"), ("ft", "ftft")}
    code, out, _ = run_cli("zoo", "show", "ft", "--db", db, "--json")
    shown = json.loads(out)
    assert shown["lineage"]["parent"].endswith("/base")
    assert [c.rsplit("/", 1)[-1] for c in shown["lineage"]["children"]] == ["ftft"]
    code, out, _ = run_cli("zoo", "find", "--base", "base", "--db", db, "--json")
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in json.loads(out)) == ["ft", "ftft"]
    code, _, err = run_cli("zoo", "tree", "--db", db, "--related-ratio", "1.5")
    assert code == 2 and "--related-ratio" in err


def test_untrained_star_is_rooted_at_its_centre():
    """Noise-made "fine-tunes" carry no kurtosis signal: edges are then free both ways and
    the model nearest to all others (the base) becomes the root."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(32, 64, generator=g) for _ in range(6)]
    fts = [[w + 0.1 * torch.randn(w.shape, generator=g) for w in base] for _ in range(3)]
    lin = infer_lineage([fts[0], base, fts[1], fts[2]])
    assert lin.parents == [1, None, 1, 1]


def test_direction_is_a_t_statistic_over_matrices():
    from graft.zoo.lineage import direction

    parent = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert direction(parent, torch.tensor([0.1, 0.12, 0.09, 0.11])) > 10
    assert direction(torch.tensor([0.1, 0.12, 0.09, 0.11]), parent) < -10
    assert abs(direction(parent, torch.tensor([0.1, -0.1, 0.05, -0.06]))) < 2
    assert direction(torch.tensor([0.0]), torch.tensor([0.5])) == math.inf


# --- permuted copies -------------------------------------------------------------------------


def test_index_links_a_permuted_copy_to_its_original(family, tmp_path):
    """A fine-tune saved with its hidden units reordered is unrelated by raw distance
    (ratio ~1) but its original's child once aligned; the unrelated model stays alone
    (weight matching does not make independently trained models look related)."""
    from graft.align import permutation_spec, permute, random_permutation

    _, models = family
    spec = permutation_spec(_config(), backbone_state(models["ft"]))
    perms = random_permutation(spec, seed=3)
    permuted = build_backbone(_config())
    permuted.load_state_dict(permute(backbone_state(models["ftft"]), spec, perms))
    root = tmp_path / "models"
    for name in ("base", "ft", "unrelated"):
        save_backbone(models[name], _config(), root / name)
    save_backbone(permuted.eval(), _config(), root / "ftft-permuted")
    raw = infer_lineage([_mats(models["ft"]), _mats(permuted)])
    assert raw.ratio(0, 1) > 0.9  # raw distances see no relation
    with ZooIndex(tmp_path / "zoo.sqlite") as index:
        index.scan([root])
        lin = index_lineage(index)
        name = {r.id: r.path.rsplit("/", 1)[-1] for r in index.models()}
        off = index_lineage(index, permutations=False)
    assert len(lin.families) == 1
    fam = lin.families[0]
    parents = {name[c]: (name[p] if p is not None else None) for c, p in fam.parents.items()}
    assert parents == {"base": None, "ft": "base", "ftft-permuted": "ft"}
    flags = {name[c]: v for c, v in fam.permuted.items()}
    assert flags == {"ft": False, "ftft-permuted": True}
    child = next(c for c in fam.parents if name[c] == "ftft-permuted")
    assert fam.ratio[child] < 0.3
    assert [name[i] for i in lin.singletons] == ["unrelated"]
    assert sorted(name[i] for i in off.singletons) == ["ftft-permuted", "unrelated"]
