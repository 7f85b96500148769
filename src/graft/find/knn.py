"""kNN accuracy: a baseline transferability score (leave-one-out k-nearest-neighbour
accuracy on frozen features), which the transferability literature finds often matches
the specialised scores.

Conventions: features are standardised per dimension (zero mean, unit variance over the
data); Euclidean distance; ``k = 5``; each sample's own point is left out; a vote tie goes
to the class of the nearer neighbour.
"""

from __future__ import annotations

import torch

K = 5


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, *, k: int = K) -> float:
    """Leave-one-out kNN accuracy in [0, 1].

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer classes ``0..C-1``.
        k: neighbours (capped at N − 1).
    """
    F = features.double()
    F = (F - F.mean(0)) / F.std(0, unbiased=False).clamp_min(1e-12)
    n = F.shape[0]
    k = min(k, n - 1)
    dist = torch.cdist(F, F)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.topk(k, largest=False).indices  # sorted nearest first
    classes = int(labels.max()) + 1
    weight = 1.0 + 1e-6 * torch.arange(k, 0, -1, dtype=torch.float64)  # nearer breaks ties
    votes = torch.zeros(n, classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[nearest], weight.expand(n, k).contiguous())
    return float((votes.argmax(1) == labels).double().mean())
