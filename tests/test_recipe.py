"""Recipe parsing and parameter resolution, with values worked out by hand."""

from __future__ import annotations

import pytest

from graft.recipe import RecipeError, parse_recipe
from graft.recipe._settings import evaluate_setting, parse_setting


def ev(raw, name="model.layers.0.mlp.up_proj.weight", t=0.0, kind=float):
    return evaluate_setting(parse_setting(raw, "p"), name, t, kind=kind, where="p")


def test_scalar_and_numeric_string():
    assert ev(0.5) == 0.5
    assert ev("1e-3") == pytest.approx(0.001)  # YAML 1.1 reads 1e-3 as a string
    assert ev(True, kind=bool) is True


@pytest.mark.parametrize(
    "t,expected",
    [
        (0.0, 0.0),  # first anchor
        (1.0, 1.0),  # last anchor
        (0.5, 0.5),  # between anchors 0.5 and ... : scaled = 0.5*2 = 1 -> values[1]
        (0.25, 0.25),  # scaled 0.5 -> halfway between 0 and 0.5
        (0.75, 0.75),  # scaled 1.5 -> halfway between 0.5 and 1
    ],
)
def test_gradient_interpolates_linearly(t, expected):
    assert ev([0.0, 0.5, 1.0], t=t) == pytest.approx(expected)


def test_gradient_uneven_anchors():
    # anchors [0, 1, 0.2]: at t=0.75 scaled=1.5 -> (1 + 0.2)/2 = 0.6
    assert ev([0.0, 1.0, 0.2], t=0.75) == pytest.approx(0.6)


def test_non_numeric_gradient_picks_without_interpolating():
    assert ev(["a", "b", "c"], t=0.6, kind=str) == "b"  # int(0.6 * 2) = 1


def test_conditionals_first_match_wins_and_fall_through():
    raw = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]
    assert ev(raw, name="model.layers.3.self_attn.q_proj.weight") == 0.1
    assert ev(raw, name="model.layers.3.mlp.up_proj.weight", t=0.25) == pytest.approx(0.25)
    assert ev(raw, name="model.norm.weight") is None  # falls through to the next scope
    assert ev([{"value": 0.7}], name="anything") == 0.7


def test_recipe_minimal_and_models_order():
    r = parse_recipe("""
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1, density: 0.5}
  - model: b
parameters: {normalize: false}
dtype: bf16
""")
    assert r.method.name == "ties"
    assert [str(m) for m in r.referenced_models()] == ["base", "a", "b"]
    assert r.dtype == "bfloat16"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("merge_method: ties\nbase_model: b\n", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: nope\nmodels: [{model: a}]\n", "linear"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "weight"),
        ("merge_method: linear\nmodels: [{model: a}]\nbogus: 1\n", "bogus"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: int3\n", "int3"),
        ("merge_method: ties\nmodels: [{model: a}]\n", "base_model"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: [union]\n", "union"),
        ("merge_method: linear\nmodels: [{model: a@x@y}]\n", "more than one '@'"),
        ("merge_method: linear\nmodels: [{model: a+b+c}]\n", "more than one '+'"),
        ("merge_method: linear\nmodels: [{model: a}]\nchat_template: chatlm\n", "chatml"),
        ("- just a list\n", "mapping"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]\n",
            "layer_range",
        ),
    ],
)
def test_recipe_errors_name_the_fix(text, needle):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_model_plus_adapter_is_parsed():
    r = parse_recipe(
        "merge_method: linear\nmodels: [{model: base+lora, parameters: {weight: 1}}]\n"
    )
    ref = r.models[0].model
    assert ref.path == "base" and ref.adapter == "lora"
