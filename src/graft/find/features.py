"""Forward passes for ranking: features from a backbone and, when the model has one, its
source head's label probabilities, in batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    inputs: torch.Tensor,
    *,
    head: nn.Module | None = None,
    batch_size: int = 256,
    hook: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``backbone(inputs)`` in eval mode, batch by batch, and ``softmax(head(features))``.

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
