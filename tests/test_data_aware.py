"""Data-aware merging: Fisher, RegMean, their statistics pass and files, AdaMerging, soups,
held-out search. Expected values are closed forms worked out independently of the code."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from graft.eval import adamerging, search, soups
from graft.eval.stats import (
    fisher_diagonal,
    fisher_mean,
    gram_matrices,
    normalize_fisher,
)
from graft.io import load_state_dict, open_checkpoint, save_state_dict, save_statistics
from graft.merge.fisher import fisher
from graft.merge.regmean import regmean
from graft.models.digits_net import backbone_state, build_backbone, default_config
from graft.plan import PlanError, plan_merge, run_plan
from graft.recipe import RecipeError, evaluate_setting, parse_recipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- RegMean ------------------------------------------------------------------------------


def _ls_fit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares W (out x in) with y ≈ x Wᵀ, via lstsq (not RegMean's code path)."""
    return torch.linalg.lstsq(x, y).solution.T


def test_regmean_alpha_one_is_pooled_least_squares():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (40, 25, 60)]
    true = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in xs]
    ys = [
        x @ w.T + 0.1 * torch.randn(len(x), 3, generator=g, dtype=torch.float64)
        for x, w in zip(xs, true, strict=True)
    ]
    fits = [_ls_fit(x, y) for x, y in zip(xs, ys, strict=True)]
    pooled = _ls_fit(torch.cat(xs), torch.cat(ys))
    out = regmean(fits, None, stats=[x.T @ x for x in xs], alpha=1.0)
    torch.testing.assert_close(out, pooled, atol=1e-10, rtol=1e-10)


def test_regmean_alpha_scales_off_diagonals_and_weights_scale_grams():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(10, 3, generator=g, dtype=torch.float64)
        grams.append(x.T @ x)
    alpha, wts = 0.4, [2.0, 0.5]
    red = [alpha * gm + (1 - alpha) * torch.diag(gm.diagonal()) for gm in grams]
    lhs = wts[0] * red[0] + wts[1] * red[1]
    rhs = wts[0] * red[0] @ ws[0].T + wts[1] * red[1] @ ws[1].T
    expected = (torch.linalg.inv(lhs) @ rhs).T
    out = regmean(ws, None, stats=grams, weight=wts, alpha=alpha)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_regmean_dead_input_and_non_linear_tensors_average():
    ws = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 6.0], [5.0, 0.0]])]
    # input feature 1 is zero on every model's data: its column is the plain average
    grams = [torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
    out = regmean(ws, None, stats=grams, alpha=1.0)
    # column 0: Gram-weighted (4·1 + 1·3)/5, (4·3 + 1·5)/5; column 1: mean
    torch.testing.assert_close(out, torch.tensor([[1.4, 4.0], [3.4, 2.0]]))
    bias = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    torch.testing.assert_close(
        regmean(bias, None, stats=[None, None], weight=[1.0, 3.0]), torch.tensor([2.5, 5.0])
    )


# --- Fisher -------------------------------------------------------------------------------


def test_fisher_equal_fishers_is_weighted_average():
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(4, 3, generator=g) for _ in range(3)]
    f = torch.rand(4, 3, generator=g) + 0.1
    out = fisher(ts, None, stats=[f, f, f], weight=[1.0, 2.0, 1.0])
    torch.testing.assert_close(out, (ts[0] + 2 * ts[1] + ts[2]) / 4)


def test_fisher_one_hot_fishers_pick_the_model_per_entry():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    mask = torch.rand(5, 4, generator=g) > 0.5
    out = fisher([a, b], None, stats=[mask.float(), (~mask).float()], epsilon=1e-12)
    torch.testing.assert_close(out, torch.where(mask, a, b))


def test_fisher_floor_and_missing_entries():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 20.0])
    # both Fishers below the floor on entry 0 -> plain mean there
    out = fisher([a, b], None, stats=[torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([2.0, 12.5]))
    torch.testing.assert_close(fisher([a, b], None, stats=[None, torch.ones(2)]), (a + b) / 2)


# --- statistics pass ----------------------------------------------------------------------


def _tiny_backbone(layers: int = 2, seed: int = 0, hidden: int = 6) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    config = default_config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=8)
    return build_backbone(config), config


def test_fisher_diagonal_matches_per_example_backward():
    bb, _ = _tiny_backbone()
    head = nn.Linear(6, 3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(9, 1, 8, 8, generator=g), torch.randint(0, 3, (9,), generator=g)
    got = fisher_diagonal(bb, head, x, y, batch_size=4)
    expected = {n: torch.zeros_like(p) for n, p in bb.named_parameters()}
    exp_model = {n: torch.zeros_like(p) for n, p in bb.named_parameters()}
    for i in range(len(x)):
        logp = torch.log_softmax(head(bb(x[i : i + 1])), -1)[0]
        for c in range(3):
            grads = torch.autograd.grad(logp[c], list(bb.parameters()), retain_graph=True)
            for (n, _), gr in zip(bb.named_parameters(), grads, strict=True):
                exp_model[n] += logp[c].exp().detach() * gr**2 / len(x)
                if c == y[i]:
                    expected[n] += gr**2 / len(x)
    assert set(got) == set(backbone_state(bb))
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-9, rtol=1e-4)
    got_model = fisher_diagonal(bb, head, x, y, target="expected", batch_size=5)
    for n in expected:
        torch.testing.assert_close(got_model[n], exp_model[n], atol=1e-9, rtol=1e-4)


def test_normalized_fisher_has_mean_one_and_keeps_ratios():
    f = {"a": torch.tensor([1e-5, 3e-5]), "b": torch.tensor([[2e-5, 2e-5]])}
    n = normalize_fisher(f)
    torch.testing.assert_close(n["a"], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(n["b"], torch.tensor([[1.0, 1.0]]))
    assert fisher_mean(f) == pytest.approx(2e-5)


def test_gram_matrices_are_linear_input_grams():
    bb, _ = _tiny_backbone(layers=1)
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    grams = gram_matrices(bb, x, batch_size=3)
    flat = x.flatten(1)
    torch.testing.assert_close(grams["embed.weight"], flat.T @ flat)
    with torch.no_grad():
        h = bb.blocks[0].norm(bb.embed(flat))
    torch.testing.assert_close(grams["blocks.0.fc1.weight"], h.T @ h, atol=1e-5, rtol=1e-5)
    assert set(grams) == {"embed.weight", "blocks.0.fc1.weight", "blocks.0.fc2.weight"}


# --- through the engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two fine-tunes of a tiny backbone, their data, heads, and Fisher/Gram files."""
    root = tmp_path_factory.mktemp("data_aware")
    base, config = _tiny_backbone(seed=10)
    base_sd = backbone_state(base)
    out = {"root": root, "config": config, "models": [], "states": [], "fisher": [], "gram": []}
    for i in range(2):
        g = torch.Generator().manual_seed(20 + i)
        state = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base_sd.items()}
        path = save_state_dict(state, root / f"ft{i}", config=config)
        bb = build_backbone(config)
        bb.load_state_dict(state)
        head = nn.Linear(6, 3)
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        fp = open_checkpoint(path).fingerprint()
        stats = {"fisher": fisher_diagonal(bb, head, x, y), "gram": gram_matrices(bb, x)}
        for kind, tensors in stats.items():
            f = save_statistics(
                tensors, root / f"ft{i}.{kind}.safetensors", kind=kind, model_fingerprint=fp
            )
            out[kind].append((f, tensors))
        out["models"].append(path)
        out["states"].append(state)
    save_state_dict(base_sd, root / "base", config=config)
    return out


def _recipe(method: str, models, stats_files, extra: str = "") -> str:
    lines = [f"merge_method: {method}", "models:"]
    for m, s in zip(models, stats_files, strict=True):
        lines += [f"  - model: {m}", f"    parameters: {{statistics: {s}, weight: 1.0}}"]
    return "\n".join(lines) + "\n" + extra


def _engine(text: str, root, out_name: str) -> dict[str, torch.Tensor]:
    plan = plan_merge(parse_recipe(text, root=root))
    try:
        run_plan(plan, root / out_name, threads=1)
    finally:
        plan.close()
    return load_state_dict(root / out_name)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_engine_matches_pure_function(family, method):
    kind = "fisher" if method == "fisher" else "gram"
    files = [f for f, _ in family[kind]]
    extra = "parameters: {alpha: 0.7}\n" if method == "regmean" else ""
    got = _engine(_recipe(method, family["models"], files, extra), family["root"], method)
    params = {"weight": 1.0, **({"alpha": 0.7} if method == "regmean" else {})}
    expected = search.merge_states(
        method, None, family["states"], params, stats=[t for _, t in family[kind]]
    )
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5)
    # the statistics did something: not the plain average
    avg = (family["states"][0]["embed.weight"] + family["states"][1]["embed.weight"]) / 2
    assert not torch.allclose(got["embed.weight"], avg, atol=1e-4)


def test_statistics_of_another_model_is_refused(family):
    files = [f for f, _ in family["fisher"]][::-1]  # swapped
    with pytest.raises(PlanError, match="different model"):
        plan_merge(parse_recipe(_recipe("fisher", family["models"], files), root=family["root"]))


def test_statistics_file_shared_by_two_models_is_checked_for_each(family):
    """One file named for both models: it describes only the first, so the second fails."""
    files = [family["fisher"][0][0]] * 2
    with pytest.raises(PlanError, match="different model"):
        plan_merge(parse_recipe(_recipe("fisher", family["models"], files), root=family["root"]))


def test_missing_statistics_file_is_one_line_error(family):
    files = [family["fisher"][0][0], family["root"] / "nope.safetensors"]
    with pytest.raises(RecipeError) as info:
        plan_merge(parse_recipe(_recipe("fisher", family["models"], files), root=family["root"]))
    msg = str(info.value)
    assert "statistics file" in msg and "nope.safetensors" in msg and "graft stats fisher" in msg
    assert "\n" not in msg


def test_statistic_with_wrong_shape_is_refused(family):
    """A Gram whose size is not the layer's input size is caught at planning time."""
    fp = open_checkpoint(family["models"][1]).fingerprint()
    good, tensors = family["gram"][1]
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    bad = dict(tensors)
    bad[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[0] + 1)
    path = save_statistics(
        bad, family["root"] / "bad.gram.safetensors", kind="gram", model_fingerprint=fp, force=True
    )
    files = [family["gram"][0][0], path]
    with pytest.raises(PlanError, match=f"shape .* for {name}"):
        plan_merge(parse_recipe(_recipe("regmean", family["models"], files), root=family["root"]))


def test_wrong_statistic_kind_is_refused(family):
    files = [f for f, _ in family["gram"]]
    with pytest.raises(PlanError, match="holds gram, but fisher needs fisher"):
        plan_merge(parse_recipe(_recipe("fisher", family["models"], files), root=family["root"]))


def test_missing_statistics_parameter_is_refused(family):
    text = "merge_method: regmean\nmodels:\n" + "".join(
        f"  - model: {m}\n" for m in family["models"]
    )
    with pytest.raises(PlanError, match="missing required parameter 'statistics'"):
        plan_merge(parse_recipe(text, root=family["root"]))


def _stats_cli(*args) -> Exception | None:
    """Run the ``stats`` command through typer's parser; the exception it raised, if any."""
    import typer
    from typer.testing import CliRunner

    from graft.cli.stats_cmd import stats

    app = typer.Typer()
    app.command()(stats)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == (0 if result.exception is None else 1), result.output
    return result.exception


def test_stats_command_rejects_bad_kind_and_task(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    err = _stats_cli("hessian", model, "--task", "rot90-digit", "-o", tmp_path / "o")
    assert isinstance(err, RecipeError) and "unknown statistic 'hessian'" in str(err)
    err = _stats_cli("gram", model, "--task", "nope", "-o", tmp_path / "o")
    assert isinstance(err, RecipeError) and "unknown task 'nope'" in str(err)


# --- AdaMerging ---------------------------------------------------------------------------


def _ada_setup(layers: int):
    base, config = _tiny_backbone(layers=layers, seed=30, hidden=4)
    base_sd = backbone_state(base)
    g = torch.Generator().manual_seed(31)
    fts = {
        t: {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in base_sd.items()}
        for t in ("a", "b")
    }
    heads = {t: nn.Linear(4, 3) for t in fts}
    inputs = {t: torch.rand(24, 1, 8, 8, generator=g) for t in fts}
    return base, config, base_sd, fts, heads, inputs


@pytest.mark.parametrize("mode", ["task", "layer", "block"])
def test_adamerging_lowers_entropy(mode):
    base, _, base_sd, fts, heads, inputs = _ada_setup(layers=2)
    res = adamerging.learn_coefficients(
        base, base_sd, fts, heads, inputs, mode=mode, steps=25, lr=0.05, batch_size=8
    )
    assert res.entropy_final < res.entropy_initial - 1e-3
    if mode == "layer":  # the paper's layer-wise: one coefficient per parameter tensor
        assert res.groups == [n for n, t in base_sd.items() if t.is_floating_point()]
    else:
        assert res.groups[-1] == "*"
        assert len(res.groups) == (1 if mode == "task" else 3)
    assert all(len(c) == len(res.groups) for c in res.coefficients.values())
    assert all(0.0 <= v <= 1.0 for c in res.coefficients.values() for v in c)
    assert len(res.groups) == 1 or len(set(res.coefficients["a"])) > 1  # groups learn apart


def test_block_filter_does_not_match_a_longer_index():
    setting = ({"filter": "blocks.1.", "value": 0.1}, {"value": 0.9})
    parsed = yaml.safe_load(yaml.safe_dump({"w": list(setting)}))["w"]
    from graft.recipe._settings import parse_setting

    s = parse_setting(parsed, "w")
    at = lambda name: evaluate_setting(s, name, 0.0, kind=float, where="w")  # noqa: E731
    assert at("blocks.1.fc1.weight") == 0.1
    assert at("blocks.10.fc1.weight") == 0.9 and at("blocks.11.norm.bias") == 0.9


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_adamerging_recipe_reproduces_the_learned_merge(tmp_path, mode):
    """12 blocks, so blocks.1. / blocks.10. / blocks.11. must be kept apart by the filters
    (and per tensor, "blocks.1.fc1.weight" is a substring of "blocks.11.fc1.weight"'s
    neighbours only through the index, while "norm.weight" is a substring of
    "blocks.0.norm.weight")."""
    base, config, base_sd, fts, heads, inputs = _ada_setup(layers=12)
    res = adamerging.learn_coefficients(
        base, base_sd, fts, heads, inputs, mode=mode, steps=3, lr=0.05, batch_size=4
    )
    # distinct coefficients per group, so a filter mix-up would show
    g = len(res.groups)
    res.coefficients = {
        t: [0.9 * (i + 1) / g + 0.001 * k for i in range(g)] for k, t in enumerate(res.coefficients)
    }
    save_state_dict(base_sd, tmp_path / "base", config=config)
    for t, sd in fts.items():
        save_state_dict(sd, tmp_path / t, config=config)
    text = adamerging.recipe_yaml(res, "base", {t: t for t in fts})
    got = _engine(text, tmp_path, "merged")
    _, group_of = adamerging.tensor_groups(list(base_sd), mode)
    lam = torch.tensor([res.coefficients[t] for t in fts])
    deltas = [{n: sd[n] - base_sd[n] for n in base_sd} for sd in fts.values()]
    expected = adamerging.merged_params(base_sd, deltas, lam, group_of)
    if mode == "block":
        assert group_of["blocks.10.fc1.weight"] == 10 and group_of["norm.weight"] == 12
    else:
        assert len(set(group_of.values())) == len(base_sd) and "norm.weight" in base_sd
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5)


# --- soups and search ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_never_worse_than_best_ingredient(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(6, generator=g)
    ingredients = [
        soups.Ingredient(
            f"m{i}",
            {"w": target + s * torch.randn(6, generator=g)},
            {"b": torch.randn(2, generator=g)},
        )
        for i, s in enumerate([0.5, 0.5, 3.0, 0.6, 4.0, 0.4])
    ]

    def score(bb, head):  # an "accuracy" in [0, 1], coarse so ties happen
        return round(float(torch.exp(-(bb["w"] - target).norm())), 2)

    res = soups.greedy_soup(ingredients, score)
    assert res.soup_score >= max(res.scores.values())
    assert res.chosen[0] == max(res.scores, key=res.scores.get)
    assert score(res.backbone, res.head) == res.soup_score
    chosen = [i for i in ingredients if i.name in res.chosen]
    torch.testing.assert_close(res.head["b"], torch.stack([i.head["b"] for i in chosen]).mean(0))
    kept = [name for name, _, k in res.steps if k]
    assert res.chosen[1:] == kept
    assert "merge_method: linear" in soups.recipe_yaml(res.chosen)


def test_grid_search_finds_the_best_scale():
    g = torch.Generator().manual_seed(7)
    base = {"blocks.0.w": torch.randn(3, generator=g), "step": torch.tensor(3)}
    fts = {
        t: {"blocks.0.w": base["blocks.0.w"] + torch.randn(3, generator=g), "step": base["step"]}
        for t in "ab"
    }
    goal = base["blocks.0.w"] + 0.4 * sum(
        f["blocks.0.w"] - base["blocks.0.w"] for f in fts.values()
    )

    def score(state):
        return -float((state["blocks.0.w"] - goal).norm()), {}

    res = search.grid_search("task_arithmetic", base, fts, score)
    assert res.best_value == pytest.approx(0.4) and len(res.table) == 20
    recipe = yaml.safe_load(search.recipe_yaml(res, "base", ["a", "b"]))
    assert recipe["parameters"]["lambda"] == pytest.approx(0.4)
    merged = search.merge_states(
        "task_arithmetic", base, list(fts.values()), {"weight": 1.0, "lambda": 0.4}
    )
    torch.testing.assert_close(merged["blocks.0.w"], goal)
    assert merged["step"].dtype == torch.int64
    assert search.grid_search("lines", base, fts, score).param == "beta"


# --- end to end on the quick digits zoo ---------------------------------------------------


def test_quick_zoo_end_to_end(tmp_path):
    """Statistics pass -> fisher / regmean recipes through the engine; AdaMerging, greedy
    soup and held-out search produce recipes the engine reproduces."""
    from graft.eval.evaluate import evaluate_task
    from graft.zoo.build import build_zoo

    zoo = build_zoo(tmp_path / "zoo", quick=True, log=lambda line: None)
    tasks = list(zoo.finetuned)[:3]
    work = tmp_path / "work"
    work.mkdir()
    for t in tasks:
        for kind in ("fisher", "gram"):
            out = work / f"{t}.{kind}.safetensors"
            args = ("--task", t, "-o", out, "--zoo", zoo.root, "--samples", 64)
            assert _stats_cli(kind, zoo.finetuned[t], *args) is None
            assert open_checkpoint(out).metadata["n_samples"] == "64"

    def mean_val(model) -> float:
        return sum(evaluate_task(model, t, zoo, split="val")["accuracy"] for t in tasks) / 3

    def recipe(method: str, kind: str | None) -> str:
        text = f"merge_method: {method}\nmodels:\n"
        for t in tasks:
            p = f"statistics: {t}.{kind}.safetensors" if kind else "weight: 1.0"
            text += f"  - model: {zoo.finetuned[t]}\n    parameters: {{{p}}}\n"
        return text

    _engine(recipe("linear", None), work, "avg")
    _engine(recipe("fisher", "fisher"), work, "fisher")
    _engine(recipe("regmean", "gram"), work, "regmean")
    avg = mean_val(work / "avg")
    assert mean_val(work / "fisher") >= avg - 0.02 and mean_val(work / "regmean") >= avg - 0.02

    ada, text = adamerging.adamerging_zoo(zoo, tasks, mode="layer", steps=10, lr=0.01)
    assert ada.entropy_final < ada.entropy_initial
    _engine(text, work, "ada")
    assert mean_val(work / "ada") > 0.2

    found = search.search_zoo(zoo, "task_arithmetic", tasks, grid=[0.2, 0.4])
    _engine(found.recipe, work, "search")
    assert mean_val(work / "search") == pytest.approx(found.best_score, abs=1e-9)

    soup, text = soups.soup_zoo(zoo)
    assert soup.soup_score >= max(soup.scores.values())
    assert yaml.safe_load(text)["merge_method"] == "linear"


def test_greedy_order_adds_only_ingredients_that_raise_held_out_accuracy():
    # Held-out accuracy of each soup, as a table: the algorithm only sees these numbers.
    table = {
        ("a",): 0.5,
        ("b",): 0.7,
        ("c",): 0.6,
        ("d",): 0.2,
        ("b", "c"): 0.8,  # kept: 0.8 > 0.7
        ("b", "c", "a"): 0.75,  # left out: 0.75 < 0.8
        ("b", "c", "d"): 0.9,  # kept: 0.9 > 0.8
    }
    chosen, alone, best, steps = soups.greedy_order(["a", "b", "c", "d"], lambda m: table[tuple(m)])
    assert chosen == ["b", "c", "d"] and best == 0.9
    assert alone == {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.2}
    assert steps == [("c", 0.8, True), ("a", 0.75, False), ("d", 0.9, True)]
    # A tie is left out by default and kept with keep_ties (the paper's >=).
    tie = {("x",): 0.6, ("y",): 0.4, ("x", "y"): 0.6}
    assert soups.greedy_order(["x", "y"], lambda m: tie[tuple(m)])[0] == ["x"]
    assert soups.greedy_order(["x", "y"], lambda m: tie[tuple(m)], keep_ties=True)[0] == ["x", "y"]


def test_greedy_soup_averages_the_ingredients_it_keeps():
    def ingredient(name, w, b):
        return soups.Ingredient(name, {"w": torch.tensor([w])}, {"b": torch.tensor([b])})

    # Score: minus the distance of the backbone to 1. Alone: A -0.5, B -0.75, C -2.
    ingredients = [ingredient("B", 0.25, 4.0), ingredient("C", 3.0, 0.0), ingredient("A", 1.5, 2.0)]

    def score(backbone, head):
        return -abs(float(backbone["w"]) - 1.0)

    res = soups.greedy_soup(ingredients, score)
    # A first; A+B averages to 0.875 (-0.125 > -0.5: kept); A+B+C to 4.75/3 (-0.583: not).
    assert res.chosen == ["A", "B"]
    assert res.scores == {"A": -0.5, "B": -0.75, "C": -2.0}
    assert res.soup_score == -0.125
    assert float(res.backbone["w"]) == 0.875 and float(res.head["b"]) == 3.0
    assert res.uniform_score == pytest.approx(-(4.75 / 3 - 1))
    assert [(n, k) for n, _, k in res.steps] == [("B", True), ("C", False)]
