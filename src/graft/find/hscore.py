"""Shrinkage H-score (Bao et al., "An Information-Theoretic Approach to Transferability in
Task Transfer Learning", ICIP 2019; shrinkage form from Ibrahim, Ponomareva & Mazumder,
"Newer is not always better: Rethinking transferability metrics, their peculiarities,
stability and performance", ECML-PKDD 2022).

H-score is ``tr(cov(F)⁻¹ cov(E[F | y]))``: how much of the feature covariance the class
means explain. With few samples per dimension cov(F) is badly conditioned and the plain
score is unstable, so cov(F) is replaced by its Ledoit–Wolf shrinkage estimate
``(1 − a) cov(F) + a μ I`` and the between-class covariance is scaled by ``(1 − a)``:

    H_a = tr(((1 − a) cov(F) + a μ I)⁻¹ (1 − a) cov(E[F | y])).

Conventions: features are centred; both covariances are the biased (1/N) estimates;
``a`` and ``μ`` are scikit-learn's `ledoit_wolf`; the inverse is a pseudo-inverse.
"""

from __future__ import annotations

import torch


def hscore(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Shrinkage H-score (higher means better transfer).

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer classes ``0..C-1``.
    """
    try:
        from sklearn.covariance import ledoit_wolf
    except ImportError as e:
        raise ImportError("the H-score needs scikit-learn: pip install 'graft[zoo]'") from e
    F = features.double()
    F = F - F.mean(0, keepdim=True)
    shrunk, a = ledoit_wolf(F.numpy(), assume_centered=True)
    classes = int(labels.max()) + 1
    means = torch.zeros(classes, F.shape[1], dtype=torch.float64).index_add_(0, labels, F)
    means /= torch.bincount(labels, minlength=classes).clamp_min(1).double()[:, None]
    G = means[labels]
    G = G - G.mean(0, keepdim=True)
    cov_g = G.T @ G / F.shape[0]
    pinv = torch.linalg.pinv(torch.from_numpy(shrunk), hermitian=True)
    return float(torch.trace(pinv @ ((1 - a) * cov_g)))
