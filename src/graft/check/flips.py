"""Flips between an old and a new classifier's predictions on the same labelled examples.

- NFR, negative flip rate (Yan et al. 2021): mean[old right ∧ new wrong].
- NFI, negative flip impact: NFR / error rate of the new model (0 when the new model
  makes no error, since then nothing can flip negatively).
- PFR, positive flip rate: mean[old wrong ∧ new right].
- Multi-class NFR (MUSCLE, Echterhoff et al. 2024): mean[new wrong ∧ new ≠ old], which
  adds to the NFR the examples both models get wrong but differently.

Per-class rates are over the examples of each true class.
"""

from __future__ import annotations

import numpy as np


def flips(y: np.ndarray, old: np.ndarray, new: np.ndarray, num_classes: int) -> dict:
    """Flip rates between predictions ``old`` and ``new`` (N,) against labels ``y`` (N,).

    Returns:
        ``nfr``, ``nfi``, ``pfr``, ``multiclass_nfr``, ``n``, ``matrix`` (2x2 counts,
        rows old right/wrong, columns new right/wrong), ``changed`` (predictions that
        differ) and ``per_class`` (one dict per class).
    """
    old_ok, new_ok = old == y, new == y
    n = len(y)
    neg, pos = old_ok & ~new_ok, ~old_ok & new_ok
    multi = ~new_ok & (new != old)
    new_errors = int((~new_ok).sum())
    matrix = [
        [int((old_ok & new_ok).sum()), int(neg.sum())],
        [int(pos.sum()), int((~old_ok & ~new_ok).sum())],
    ]
    per_class = []
    for c in range(num_classes):
        m = y == c
        k = int(m.sum())
        per_class.append(
            {
                "class": c,
                "n": k,
                "old_accuracy": _rate(old_ok[m], k),
                "new_accuracy": _rate(new_ok[m], k),
                "nfr": _rate(neg[m], k),
                "pfr": _rate(pos[m], k),
                "negative_flips": int(neg[m].sum()),
                "positive_flips": int(pos[m].sum()),
            }
        )
    return {
        "n": int(n),
        "nfr": float(neg.mean()),
        "nfi": float(neg.sum() / new_errors) if new_errors else 0.0,
        "pfr": float(pos.mean()),
        "multiclass_nfr": float(multi.mean()),
        "negative_flips": int(neg.sum()),
        "positive_flips": int(pos.sum()),
        "changed": int((old != new).sum()),
        "matrix": matrix,
        "per_class": per_class,
    }


def _rate(mask: np.ndarray, n: int) -> float:
    return float(mask.sum() / n) if n else float("nan")
