"""Batched forward passes over a data set: logits, features, accuracy and loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from graft.data.dataset import Dataset
from graft.data.runner import Runner

Progress = Callable[[int], None]


@torch.no_grad()
def predict(
    runner: Runner,
    data: Dataset,
    *,
    batch_size: int = 32,
    params: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Logits (N, C) as float64, in data order; ``params`` replaces weights by checkpoint
    name (an in-memory merge)."""
    runner.module.eval()
    out = []
    for inputs, _ in runner.batches(data, batch_size):
        z = runner.logits(inputs, params).double()
        out.append(z.numpy())
        if progress is not None:
            progress(len(z))
    return np.concatenate(out) if out else np.zeros((0, runner.num_classes or 0))


@torch.no_grad()
def features(
    runner: Runner,
    data: Dataset,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Pooled features (N, D) as float32, in data order."""
    runner.module.eval()
    out = []
    for inputs, _ in runner.batches(data, batch_size):
        f = runner.features(inputs).float()
        out.append(f)
        if progress is not None:
            progress(len(f))
    return torch.cat(out) if out else torch.zeros(0, runner.num_features)


def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy (nats) of logits against label ids.

    Ties in the logits go to the lowest class index (``argmax``).
    """
    n = len(labels)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    z = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    loss = torch.nn.functional.cross_entropy(z, y, reduction="sum").item() / n
    return {"accuracy": float((z.argmax(1) == y).double().mean()), "loss": loss, "n": n}


def evaluate(
    runner: Runner,
    data: Dataset,
    *,
    batch_size: int = 32,
    params: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> dict:
    """``{"accuracy", "loss", "n"}`` of the runner's head on labelled ``data`` (mapped to
    the head's label ids first)."""
    data = runner.prepare(data)
    z = predict(runner, data, batch_size=batch_size, params=params, progress=progress)
    return scores(z, data.labels)
