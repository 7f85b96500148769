"""The registry of transferability scores: one line per score, nothing registered by import
side effect."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from graft.find.hscore import hscore
from graft.find.knn import knn_accuracy
from graft.find.leep import leep
from graft.find.linear import linear_probe_accuracy
from graft.find.logme import logme
from graft.find.nce import nce_from_probs


@dataclass(frozen=True)
class Score:
    """A transferability score.

    Attributes:
        name: registry name (``--scores``).
        fn: ``fn(inputs, labels) -> float``, higher is better; ``inputs`` are features
            ``(N, D)`` or source-label probabilities ``(N, Z)`` as ``needs`` says.
        needs: "features", or "source_probs" (needs the model's source head).
        summary: one line for tables and help.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    needs: str
    summary: str


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("logme", logme, "features", "LogME: Bayesian linear evidence per sample (You 2021)"),
        Score(
            "leep", leep, "source_probs", "LEEP: log expected empirical prediction (Nguyen 2020)"
        ),
        Score("nce", nce_from_probs, "source_probs", "NCE: -H(target | source argmax) (Tran 2019)"),
        Score(
            "hscore",
            hscore,
            "features",
            "H-score with Ledoit-Wolf shrinkage (Bao 2019; Ibrahim 2022)",
        ),
        Score("knn", knn_accuracy, "features", "leave-one-out 5-NN accuracy (baseline)"),
        Score(
            "linear",
            linear_probe_accuracy,
            "features",
            "3-fold logistic-regression accuracy (baseline)",
        ),
    )
}
# The score `graft rank` sorts by unless told otherwise; why: docs/find.md.
DEFAULT_SCORE = "logme"


def get_score(name: str) -> Score:
    """The score called ``name``; raises ValueError listing the valid names."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; valid scores: {', '.join(SCORES)}") from None
