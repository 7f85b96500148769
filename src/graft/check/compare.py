"""`compare`: everything `graft check` reports about two classifiers' scores on the same
labelled examples: calibration of each (before and after temperature scaling), flips
between them, and accuracy with likely label errors set aside.

Temperature scaling is fitted on a validation split when one is given. Without one, it
is cross-fitted on the checked examples: they are split in two halves (fixed seed), the
temperature fitted on one half scales the other, so every scaled score is out-of-sample.
"""

from __future__ import annotations

import math

import numpy as np

from graft.check.calibration import N_BINS, calibration, fit_temperature
from graft.check.flips import flips
from graft.check.labels import find_label_issues
from graft.recipe import RecipeError

# Per-model numbers that --fail-on and the tables use, in table order.
MODEL_METRICS = ("accuracy", "nll", "brier", "ece", "ece_mass", "mce")
SUM_TOLERANCE = 1e-3


def as_logits(scores: np.ndarray, where: str, *, kind: str = "auto") -> tuple[np.ndarray, str]:
    """Scores (N, K) as float64 logits, and what they were (``logits``/``probabilities``).

    ``kind="auto"`` reads rows in [0, 1] summing to one as probabilities (their logs are
    logits with the same softmax) and rows with any value outside [0, 1] as logits.

    Raises:
        RecipeError: not (N, K ≥ 2), empty, not finite, or values in [0, 1] whose rows do
            not sum to one (ambiguous: pass ``kind="logits"`` to read them as logits).
    """
    s = np.asarray(scores)
    if s.ndim != 2 or s.dtype.kind not in "iuf":
        raise RecipeError(
            f"scores in {where} must be a numeric (examples, classes) array; got shape {s.shape}"
        )
    if s.shape[0] == 0:
        raise RecipeError(f"{where} holds no examples; check needs at least one")
    if s.shape[1] < 2:
        raise RecipeError(
            f"{where} scores a single class; a classifier needs at least two classes "
            "(for a binary model pass both columns, e.g. [1 - p, p])"
        )
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise RecipeError(f"{where} holds NaN or infinite scores; fix the model or the export")
    unit = s.min() >= 0 and s.max() <= 1
    if kind == "logits" or (kind == "auto" and not unit):
        return s, "logits"
    sums = s.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if not unit or abs(sums[worst] - 1) > SUM_TOLERANCE:
        raise RecipeError(
            f"{where} looks like probabilities (values in [0, 1]) but row {worst} sums to "
            f"{sums[worst]:.4g}, not 1; normalise them, or pass logits (--scores logits "
            "reads these values as logits)"
        )
    return np.log(np.clip(s, 1e-300, None)), "probabilities"


def compare(
    old: np.ndarray,
    new: np.ndarray,
    y: np.ndarray,
    *,
    val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    label_probs: np.ndarray | None = None,
    n_bins: int = N_BINS,
    seed: int = 0,
) -> dict:
    """The check of ``new`` against ``old``: logits (N, K) of each and labels ``y`` (N,).

    Args:
        val: ``(old_val_logits, new_val_logits, val_labels)`` to fit temperatures on;
            None cross-fits them on the checked examples (module doc).
        label_probs: out-of-sample probabilities (N, K) of a third model for confident
            learning; None skips label issues.
        n_bins: bins of ECE, MCE and the reliability diagrams.
        seed: fixes the cross-fitting halves.

    Raises:
        RecipeError: shapes disagree or a label is outside the scores' classes.
    """
    k = old.shape[1]
    _check_shapes(old, new, y, "the checked data")
    if val is not None:
        _check_shapes(*val, "the validation data")
        if val[0].shape[1] != k:
            raise RecipeError(f"validation scores have {val[0].shape[1]} classes, test scores {k}")
    out: dict = {"n": len(y), "num_classes": k, "n_bins": n_bins, "models": {}}
    out["temperature_fit"] = (
        f"validation split (n={len(val[2])})"
        if val is not None
        else f"2-fold cross-fitting on the checked examples (n={len(y)}, seed {seed})"
    )
    for i, (name, z) in enumerate((("old", old), ("new", new))):
        report = calibration(z, y, n_bins=n_bins)
        scaled, temps = _temperature_scale(z, y, None if val is None else (val[i], val[2]), seed)
        report["temperature"] = float(np.exp(np.mean(np.log(temps))))
        report["temperatures"] = temps
        report["scaled"] = calibration(scaled, y, n_bins=n_bins)
        out["models"][name] = report
    out["flips"] = flips(y, old.argmax(1), new.argmax(1), k)
    out["label_issues"] = None if label_probs is None else label_issues(old, new, y, label_probs)
    out["metrics"] = flat_metrics(out)
    return out


def _check_shapes(old: np.ndarray, new: np.ndarray, y: np.ndarray, where: str) -> None:
    if not (len(old) == len(new) == len(y)):
        raise RecipeError(
            f"{where}: old scores have {len(old)} rows, new scores {len(new)}, labels {len(y)}; "
            "all three must cover the same examples in the same order"
        )
    if old.shape[1] != new.shape[1]:
        raise RecipeError(
            f"{where}: old scores have {old.shape[1]} classes, new scores {new.shape[1]}; "
            "compare models with the same label set"
        )
    if len(y) and y.max() >= old.shape[1]:
        raise RecipeError(
            f"{where}: label {int(y.max())} is outside the {old.shape[1]} classes the models score"
        )


def _temperature_scale(z, y, val, seed) -> tuple[np.ndarray, list[float]]:
    if val is not None:
        t = fit_temperature(*val)
        return z / t, [t]
    if len(y) < 4:
        return z, [1.0]
    half = np.random.default_rng(seed).permutation(len(y)) < len(y) // 2
    scaled, temps = z.copy(), []
    for fold in (half, ~half):
        t = fit_temperature(z[~fold], y[~fold])
        scaled[fold] = z[fold] / t
        temps.append(t)
    return scaled, temps


def label_issues(old: np.ndarray, new: np.ndarray, y: np.ndarray, probs: np.ndarray) -> dict:
    """Confident-learning flags from ``probs`` and both models' accuracy with and without
    the flagged examples."""
    if probs.shape != old.shape:
        raise RecipeError(
            f"label-issue probabilities have shape {probs.shape}, scores {old.shape}; "
            "give one row per example and one column per class"
        )
    flagged = find_label_issues(y, probs)
    keep = np.ones(len(y), dtype=bool)
    keep[flagged] = False
    report = {
        "flagged": [int(i) for i in flagged],
        "n_flagged": int(len(flagged)),
        "rate": float(len(flagged) / len(y)),
    }
    for name, z in (("old", old), ("new", new)):
        right = z.argmax(1) == y
        report[name] = {
            "accuracy_all": float(right.mean()),
            "accuracy_unflagged": float(right[keep].mean()) if keep.any() else float("nan"),
        }
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """Every number ``--fail-on`` can gate on, by name (``nfr``, ``new.ece``, ...)."""
    f = report["flips"]
    out = {k: f[k] for k in ("nfr", "nfi", "pfr", "multiclass_nfr")}
    out["changed_rate"] = f["changed"] / f["n"]
    for name, m in report["models"].items():
        for key in MODEL_METRICS:
            out[f"{name}.{key}"] = m[key]
            out[f"{name}.ts.{key}"] = m["scaled"][key]
        out[f"{name}.temperature"] = m["temperature"]
    for key in MODEL_METRICS:
        out[f"delta.{key}"] = out[f"new.{key}"] - out[f"old.{key}"]
    issues = report.get("label_issues")
    if issues:
        out["label_issues.rate"] = issues["rate"]
        for name in ("old", "new"):
            out[f"{name}.accuracy_unflagged"] = issues[name]["accuracy_unflagged"]
    return out


def jsonable(obj):
    """``obj`` with NaN/inf floats as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
