"""Evaluation: hand-computed accuracy/loss, merged zoo models, and the eval command's errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from graft.cli.eval_cmd import eval_model
from graft.eval import evaluate, evaluate_task, logits
from graft.models.digits_net import (
    build_backbone,
    default_config,
    load_backbone,
    load_head,
    save_backbone,
)
from graft.plan import plan_merge, run_plan
from graft.recipe import RecipeError, parse_recipe
from graft.zoo import TASKS, build_zoo, soup_head, task_data

LN3 = math.log(3.0)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    # Same path as test_zoo.py's quick zoo: whichever module runs second reuses it.
    return build_zoo(
        tmp_path_factory.getbasetemp() / "quick-zoo-0", seed=0, quick=True, log=lambda m: None
    )


def _pixel_head() -> nn.Linear:
    """Logit k = pixel k of the flattened image (k = 0, 1)."""
    head = nn.Linear(64, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, 0] = head.weight[1, 1] = 1.0
    return head


def test_evaluate_matches_hand_computed_accuracy_and_loss():
    pixels = [(0.0, LN3), (LN3, 0.0), (0.0, 0.0), (LN3, 0.0)]  # logits per image
    X = torch.zeros(4, 1, 8, 8)
    for i, (a, b) in enumerate(pixels):
        X[i, 0, 0, 0], X[i, 0, 0, 1] = a, b
    y = torch.tensor([1, 0, 0, 1])
    # p(true class): 3/4, 3/4, 1/2 (tie -> argmax picks class 0: right), 1/4 (wrong)
    expected_loss = (2 * math.log(4 / 3) + math.log(2) + math.log(4)) / 4
    for batch_size in (512, 3):
        r = evaluate(nn.Flatten(), _pixel_head(), X, y, batch_size=batch_size)
        assert r["n"] == 4
        assert r["accuracy"] == 0.75
        assert r["loss"] == pytest.approx(expected_loss, abs=1e-6)
    z = logits(nn.Flatten(), _pixel_head(), X)
    assert torch.allclose(z, torch.tensor(pixels))


def test_evaluate_task_on_a_finetuned_model_matches_the_zoo_report(zoo):
    r = evaluate_task(zoo.finetuned["rot180-digit"], "rot180-digit", zoo)
    assert r == zoo.report["tasks"]["rot180-digit"]["finetuned"]
    assert r["n"] == len(task_data("rot180-digit", "test")[1])


def test_evaluate_task_on_a_linear_merge_from_graft_engine(zoo, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": 1.0}} for p in zoo.finetuned.values()
        ],
    }
    plan = plan_merge(parse_recipe(yaml.safe_dump(recipe)))
    try:
        run_plan(plan, tmp_path / "merged", threads=2)
    finally:
        plan.close()
    for task in ("inverted-digit", "mirror-detection"):
        r = evaluate_task(tmp_path / "merged", task, zoo)
        expected = zoo.report["tasks"][task]["average_merge"]  # the build's in-memory average
        assert r["n"] == expected["n"]
        assert r["loss"] == pytest.approx(expected["loss"], rel=1e-4)
        assert abs(r["accuracy"] - expected["accuracy"]) <= 1 / r["n"]  # at most one near-tie flips


def test_soup_head_is_the_mean_of_ingredient_heads(zoo):
    heads = [load_head(p) for p in zoo.soup_heads]
    mean = soup_head(zoo)
    assert torch.allclose(mean.weight, sum(h.weight for h in heads) / len(heads))
    assert torch.allclose(soup_head(zoo, [1]).bias, heads[1].bias)
    r = evaluate_task(zoo.soup[0], zoo.soup_task, zoo, split="val", head=heads[0])
    assert r["accuracy"] == zoo.report["soup"]["ingredients"][0]["val"]


def test_evaluate_task_rejects_a_task_outside_the_zoo(zoo):
    with pytest.raises(ValueError, match="unknown task 'digit'; the zoo at .* has: rot90-digit"):
        evaluate_task(zoo.base, "digit", zoo)


# --- the eval command (called directly; cli/app.py registers it) ------------------------


def _eval(model, tasks, zoo_root, capsys, split="test"):
    eval_model(model=model, task=tasks, zoo=zoo_root, split=split, as_json=True)
    return json.loads(capsys.readouterr().out)


def test_eval_command_all_tasks_as_json(zoo, capsys):
    out = _eval(zoo.finetuned["transpose-digit"], ["all"], zoo.root, capsys)
    assert list(out["results"]) == [f"task:{t}" for t in TASKS]
    got = out["results"]["task:transpose-digit"]
    ref = zoo.report["tasks"]["transpose-digit"]["finetuned"]
    assert (got["accuracy"], got["n"]) == (ref["accuracy"], ref["n"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["head"].endswith("heads/transpose-digit.safetensors")


def test_eval_command_table(zoo, capsys):
    eval_model(
        model=zoo.base,
        task=["rot90-digit", "inverted-digit"],
        zoo=zoo.root,
        split="val",
        as_json=False,
    )
    text = capsys.readouterr().out
    assert "rot90-digit" in text and "inverted-digit" in text and "mean" in text


def test_eval_command_unknown_task(zoo, capsys):
    with pytest.raises(RecipeError, match="unknown task 'rot45-digit'; valid tasks: rot90-digit"):
        _eval(zoo.base, ["rot45-digit"], zoo.root, capsys)


def test_eval_command_missing_zoo(zoo, tmp_path, capsys):
    with pytest.raises(RecipeError, match="no graft zoo at .*run `graft demo`"):
        _eval(zoo.base, ["all"], tmp_path / "nozoo", capsys)


def test_eval_command_feature_size_mismatch(zoo, tmp_path, capsys):
    config = default_config(hidden_size=8, intermediate_size=16, num_hidden_layers=2)
    save_backbone(build_backbone(config), config, tmp_path / "narrow")
    width = load_backbone(zoo.base)[1]["hidden_size"]
    with pytest.raises(
        RecipeError,
        match=rf"model .*narrow gives 8 features but head .*heads/rot90-digit\.safetensors expects {width}",
    ):
        _eval(tmp_path / "narrow", ["rot90-digit"], zoo.root, capsys)


def test_eval_command_not_a_digits_model(zoo, tmp_path, capsys):
    from graft.io import save_state_dict

    save_state_dict(
        {"w": torch.zeros(2)}, tmp_path / "llama", config={"architectures": ["LlamaForCausalLM"]}
    )
    with pytest.raises(RecipeError, match="config.json has no model_type; graft cannot build"):
        _eval(tmp_path / "llama", ["rot90-digit"], zoo.root, capsys)
