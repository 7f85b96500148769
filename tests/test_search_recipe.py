"""`graft search`'s pieces: parameter grids, candidate recipes, and the search loop over
the engine (in memory, spilled to disk when a candidate does not fit)."""

from __future__ import annotations

import pytest
import torch
import yaml

from graft.eval import candidates
from graft.eval.candidates import CandidateMerger
from graft.eval.search import candidate_recipe, parse_param_spec, search_recipe
from graft.io import save_state_dict
from graft.recipe import RecipeError


def test_param_specs():
    assert parse_param_spec("lambda=0.1:0.5:0.1") == ("lambda", [0.1, 0.2, 0.3, 0.4, 0.5])
    assert parse_param_spec("density=0.2, 0.5,1") == ("density", [0.2, 0.5, 1])
    assert parse_param_spec("method=ties,task_arithmetic")[1] == ["ties", "task_arithmetic"]
    assert parse_param_spec("x=1:1:0.5") == ("x", [1.0])
    for bad in ("lambda", "=1", "l=1:0:1", "l=0:1:0", "l=a:b:c", "l=0:1", "l=0:1e9:1e-3"):
        with pytest.raises(RecipeError):
            parse_param_spec(bad)


def test_candidate_sets_globally_and_removes_per_model_values():
    text = yaml.safe_dump(
        {
            "merge_method": "ties",
            "base_model": "b",
            "parameters": {"lambda": 1.0, "normalize": True},
            "models": [
                {"model": "m1", "parameters": {"density": 0.9, "weight": 1.0}},
                {"model": "m2", "parameters": {"density": 0.1}},
            ],
        }
    )
    doc = yaml.safe_load(candidate_recipe(text, {"density": 0.5, "lambda": 0.3}))
    assert doc["parameters"] == {"lambda": 0.3, "normalize": True, "density": 0.5}
    assert doc["models"][0]["parameters"] == {"weight": 1.0}
    assert doc["models"][1]["parameters"] == {}


@pytest.fixture()
def family(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"blocks.0.w": torch.randn(4, 3, generator=g), "ids": torch.arange(3)}
    paths = {"base": save_state_dict(base, tmp_path / "base")}
    deltas = []
    for i in range(2):
        d = torch.randn(4, 3, generator=g)
        deltas.append(d)
        paths[f"m{i}"] = save_state_dict(
            {"blocks.0.w": base["blocks.0.w"] + d, "ids": base["ids"]}, tmp_path / f"m{i}"
        )
    return base, deltas, paths


def _recipe(paths) -> str:
    return yaml.safe_dump(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "parameters": {"normalize": False},
            "models": [
                {"model": str(paths[f"m{i}"]), "parameters": {"weight": 1.0}} for i in (0, 1)
            ],
        }
    )


def test_search_scores_each_candidate_merge_and_keeps_the_first_best(family):
    base, deltas, paths = family
    goal = base["blocks.0.w"] + 0.4 * (deltas[0] + deltas[1])
    seen = []

    def score(state):
        seen.append(state["blocks.0.w"].clone())
        err = float((state["blocks.0.w"] - goal).norm())
        return -round(err, 3), {"t": -err}

    found = search_recipe(_recipe(paths), {"lambda": [0.2, 0.4, 0.6]}, score)
    assert [r["params"]["lambda"] for r in found.rows] == [0.2, 0.4, 0.6]
    for lam, state in zip([0.2, 0.4, 0.6], seen, strict=True):  # each candidate really merged
        torch.testing.assert_close(state, base["blocks.0.w"] + lam * (deltas[0] + deltas[1]))
    assert found.best["params"] == {"lambda": 0.4}
    assert yaml.safe_load(found.recipe.split("\n", 1)[1])["parameters"]["lambda"] == 0.4
    flat = search_recipe(_recipe(paths), {"lambda": [0.1, 0.2]}, lambda s: (1.0, {}))
    assert flat.best["params"] == {"lambda": 0.1}  # equal scores: the first in grid order


def test_candidates_too_big_for_memory_are_streamed_and_mapped(family, tmp_path, monkeypatch):
    base, deltas, paths = family
    monkeypatch.setattr(candidates, "available_memory", lambda: 10)  # nothing fits
    merger = CandidateMerger(scratch=tmp_path)
    try:
        found = search_recipe(
            _recipe(paths),
            {"lambda": [0.5]},
            lambda s: (float(s["blocks.0.w"].sum()), {}),
            merge=merger,
        )
        assert merger.spilled == 1
        expected = base["blocks.0.w"] + 0.5 * (deltas[0] + deltas[1])
        assert found.best["score"] == pytest.approx(float(expected.sum()), rel=1e-6)
    finally:
        merger.close()
    assert not list(tmp_path.glob(".graft-candidate-*"))  # scratch removed
