"""graft.check's numbers against values worked out by hand, torchmetrics, and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graft.check import (
    as_logits,
    calibration,
    check_gates,
    compare,
    confident_joint,
    cross_val_probs,
    find_label_issues,
    fit_temperature,
    flips,
    parse_gates,
)
from graft.check.calibration import nll
from graft.recipe import RecipeError

# Four two-class predictions, away from the 15 bin edges:
# confidences 0.9 (right), 0.9 (wrong), 0.75 (right), 0.62 (right).
PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.25, 0.75], [0.62, 0.38]])
LABELS = np.array([0, 1, 1, 0])


def test_calibration_matches_hand_computed_values():
    z, kind = as_logits(PROBS, "hand")
    assert kind == "probabilities"
    r = calibration(z, LABELS)
    assert r["accuracy"] == 0.75
    # bins 13 (two at 0.9, accuracy 1/2), 11 (0.75, right), 9 (0.62, right)
    assert r["ece"] == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.25 + 1 / 4 * 0.38)
    assert r["mce"] == pytest.approx(0.4)
    # equal-mass: four bins of one example each
    assert r["ece_mass"] == pytest.approx((0.1 + 0.9 + 0.25 + 0.38) / 4)
    brier = (0.02 + 1.62 + 0.125 + 2 * 0.38**2) / 4
    assert r["brier"] == pytest.approx(brier)
    assert r["nll"] == pytest.approx(
        -(math.log(0.9) + math.log(0.1) + math.log(0.75) + math.log(0.62)) / 4
    )
    assert [b["n"] for b in r["bins"] if b["n"]] == [1, 1, 2]
    assert len(r["bins"]) == 15


def test_flips_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    old = np.array([0, 0, 1, 1, 2, 0, 1, 1, 2, 2])
    new = np.array([0, 1, 1, 2, 2, 2, 1, 0, 2, 1])
    f = flips(y, old, new, 3)
    assert f["nfr"] == pytest.approx(0.3)  # examples 1, 3, 7
    assert f["nfi"] == pytest.approx(3 / 5)  # new is wrong on 1, 3, 6, 7, 9
    assert f["pfr"] == pytest.approx(0.1)  # example 5
    assert f["multiclass_nfr"] == pytest.approx(0.4)  # 1, 3, 7, 9 (6: same wrong answer)
    assert f["matrix"] == [[4, 3], [1, 2]]
    c0 = f["per_class"][0]
    assert (c0["n"], c0["old_accuracy"], c0["new_accuracy"], c0["nfr"]) == (4, 0.5, 0.25, 0.25)
    assert f["per_class"][2]["pfr"] == pytest.approx(1 / 3)


def test_nfi_is_zero_when_the_new_model_makes_no_error():
    y = np.array([0, 1, 1])
    assert flips(y, np.array([1, 1, 1]), y, 2)["nfi"] == 0.0


def test_ece_agrees_with_torchmetrics_on_random_data():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.classification")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 5)) * 3
    y = rng.integers(0, 5, 2000)
    r = calibration(z, y)
    p = torch.softmax(torch.tensor(z), dim=1)
    for norm, ours in (("l1", r["ece"]), ("max", r["mce"])):
        ref = tm.MulticlassCalibrationError(num_classes=5, n_bins=15, norm=norm)
        assert ours == pytest.approx(float(ref(p, torch.tensor(y))), abs=1e-6)


def test_temperature_scaling_keeps_accuracy_and_never_raises_validation_nll():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    z = rng.normal(size=(400, 4))
    z[np.arange(400), y] += 1.0
    for scale in (5.0, 1.0, 0.2):  # over-confident, as is, under-confident
        t = fit_temperature(z * scale, y)
        assert nll(z * scale / t, y) <= nll(z * scale, y) + 1e-12
        assert ((z * scale / t).argmax(1) == (z * scale).argmax(1)).all()
        if scale != 1.0:
            assert (t > 1) == (scale > 1)
    r = compare(z * 5, z, y, val=(z * 5, z, y))
    for name in ("old", "new"):
        assert r["models"][name]["scaled"]["accuracy"] == r["models"][name]["accuracy"]
        assert r["models"][name]["scaled"]["nll"] <= r["models"][name]["nll"] + 1e-12


def test_cross_fitted_temperature_scales_every_example_out_of_sample():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    z = rng.normal(size=(300, 3)) + 2 * np.eye(3)[y]
    r = compare(z * 4, z * 4, y)
    old = r["models"]["old"]
    assert len(old["temperatures"]) == 2 and all(t > 1 for t in old["temperatures"])
    assert old["scaled"]["nll"] < old["nll"]
    assert "cross-fitting" in r["temperature_fit"]


def test_scores_are_read_as_logits_or_probabilities_and_bad_ones_refused():
    z, kind = as_logits(np.array([[2.0, -1.0], [0.5, 0.7]]), "x")
    assert kind == "logits" and z[0, 0] == 2.0
    with pytest.raises(RecipeError, match="row 1 sums to 0.5.*pass logits"):
        as_logits(np.array([[0.5, 0.5], [0.2, 0.3]]), "x")
    z, kind = as_logits(np.array([[0.5, 0.5], [0.2, 0.3]]), "x", kind="logits")
    assert kind == "logits"
    with pytest.raises(RecipeError, match="single class"):
        as_logits(np.ones((3, 1)), "x")
    with pytest.raises(RecipeError, match="no examples"):
        as_logits(np.zeros((0, 3)), "x")
    with pytest.raises(RecipeError, match="NaN"):
        as_logits(np.array([[np.nan, 1.0]]), "x")


def test_gates_parse_without_eval_and_fail_on_any_reported_metric():
    gates = parse_gates("nfr>0.02, new.ece >= 5%,old.accuracy<1e-1")
    assert [str(g) for g in gates] == ["nfr>0.02", "new.ece>=0.05", "old.accuracy<0.1"]
    metrics = {"nfr": 0.03, "new.ece": 0.05, "old.accuracy": 0.9}
    assert check_gates(gates, metrics) == ["nfr=0.03 > 0.02", "new.ece=0.05 >= 0.05"]
    assert check_gates(parse_gates("nfr<=0.02"), metrics) == []
    for bad in ("__import__('os')>1", "nfr>", "nfr>0.1 or 1", "nfr=>1"):
        with pytest.raises(RecipeError, match="cannot parse"):
            parse_gates(bad)
    with pytest.raises(RecipeError, match="did you mean new.ece"):
        check_gates(parse_gates("ece>0.1"), metrics)


def test_confident_joint_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.1, 0.9],  # example 2: labelled 0, looks 1
            [0.2, 0.8],
            [0.3, 0.7],
            [0.4, 0.6],
        ]
    )
    # thresholds: t0 = (0.9 + 0.8 + 0.1) / 3 = 0.6, t1 = 0.7
    assert confident_joint(labels, probs).tolist() == [[2, 1], [0, 2]]
    assert find_label_issues(labels, probs).tolist() == [2]


def test_confident_learning_finds_injected_label_flips_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), int(0.05 * len(y)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    found = find_label_issues(noisy, cross_val_probs(x, noisy))
    recall = np.isin(flipped, found).mean()
    precision = np.isin(found, flipped).mean()
    assert recall >= 0.8, recall
    assert precision >= 0.8, precision
    clean = find_label_issues(y, cross_val_probs(x, y))
    assert len(clean) < 0.01 * len(y)
