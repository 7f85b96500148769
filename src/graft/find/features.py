"""Forward passes for ranking: a model's pooled features and, when it has a source head,
its source-label probabilities, in batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from graft.data import Dataset, features, predict

if TYPE_CHECKING:
    from graft.find.rank import RankModel


def model_features(
    model: RankModel,
    data: Dataset,
    *,
    source: bool,
    batch_size: int = 256,
    hook: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of ``model`` on ``data`` and (``source`` and a source head) the softmax of
    its head's logits.

    Args:
        model: from `graft.find.load_model`.
        data: inputs the model takes (labels are not used).
        source: compute source-label probabilities too (LEEP, NCE).
        batch_size: examples per forward pass.
        hook: called with the number of examples done after each batch, per pass.

    Returns:
        ``(features (N, D) float32, source probabilities (N, Z) float32 or None)``; the
        head's label space is the model's own, whatever the data's labels are.
    """
    feats = features(model.runner, data, batch_size=batch_size, progress=hook)
    if not (source and model.runner.has_head):
        return feats, None
    logits = predict(model.runner, data, batch_size=batch_size, progress=hook)
    return feats, torch.softmax(torch.from_numpy(logits), dim=1).float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    inputs: torch.Tensor,
    *,
    head: nn.Module | None = None,
    batch_size: int = 256,
    hook: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``backbone(inputs)`` in eval mode, batch by batch, and ``softmax(head(features))``:
    the same passes for a backbone and head already in memory as modules.

    Args:
        backbone: maps a batch of inputs to ``(B, D)`` features.
        inputs: ``(N, ...)``.
        head: the model's source-task classifier, or None.
        batch_size: inputs per forward pass.
        hook: called with the number of inputs done after each batch (progress).

    Returns:
        ``(features (N, D) float32, source probabilities (N, Z) float32 or None)``.
    """
    backbone.eval()
    if head is not None:
        head.eval()
    feats, probs = [], []
    for i in range(0, len(inputs), batch_size):
        f = backbone(inputs[i : i + batch_size]).float()
        feats.append(f)
        if head is not None:
            probs.append(torch.softmax(head(f).float(), dim=1))
        if hook:
            hook(len(f))
    features = torch.cat(feats)
    return features, (torch.cat(probs) if head is not None else None)
