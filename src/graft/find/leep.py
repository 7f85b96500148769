"""LEEP: log expected empirical prediction (Nguyen, Hassner, Seeger & Archambeau, "LEEP: A
New Measure to Evaluate Transferability of Learned Representations", ICML 2020).

From the source model's label probabilities θ(x) over its Z source classes and the target
labels y: the empirical joint ``P̂(y, z) = 1/N Σᵢ θ(xᵢ)_z [yᵢ = y]``, the conditional
``P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)``, and

    LEEP = 1/N Σᵢ log Σ_z P̂(yᵢ | z) θ(xᵢ)_z.

It is ≤ 0; higher means better transfer. A source class that gets no probability mass
at all (``Σ_y P̂(y, z) = 0``) contributes nothing.
"""

from __future__ import annotations

import torch


def leep(source_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """LEEP score.

    Args:
        source_probs: ``(N, Z)`` source-label probabilities (rows sum to 1).
        labels: ``(N,)`` integer target classes ``0..C-1``.
    """
    theta = source_probs.double()
    classes = int(labels.max()) + 1
    joint = torch.zeros(classes, theta.shape[1], dtype=torch.float64).index_add_(0, labels, theta)
    joint /= theta.shape[0]
    marginal = joint.sum(0, keepdim=True)
    cond = torch.where(marginal > 0, joint / marginal.clamp_min(1e-300), torch.zeros_like(joint))
    eep = (theta @ cond.T).gather(1, labels.view(-1, 1)).squeeze(1)
    return float(torch.log(eep).mean())
