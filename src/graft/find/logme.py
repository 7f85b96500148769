"""LogME: the log marginal evidence of a Bayesian linear model on frozen features
(You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021).

Per class c (one-vs-rest target ``y = [label == c]``, also for two classes), the model
``y = F m + ε`` with prior ``m ~ N(0, α⁻¹ I_D)`` and noise ``ε ~ N(0, β⁻¹ I_N)`` has

    log p(y | α, β) = D/2 log α + N/2 log β − N/2 log 2π − β/2 ‖F m − y‖² − α/2 ‖m‖²
                      − 1/2 log |α I_D + β FᵀF|,        m = β A⁻¹ Fᵀ y.

α and β maximise it by MacKay's fixed point (γ = Σ βσᵢ/(α+βσᵢ); α ← γ/‖m‖²;
β ← (N−γ)/‖Fm−y‖²), with σᵢ the eigenvalues of FᵀF from one SVD of F. The score is the
mean over classes of the maximised evidence divided by N.

Conventions that change results:

* ``log |A|`` sums over all **D** eigenvalues of FᵀF: when N < D, or F is rank-deficient,
  the eigenvalues past the SVD's min(N, D) are zero and contribute ``(D − k) log α``.
  thuml's reference code sums only the k computed ones, which inflates the evidence by
  ``−(D − k)/2 · log α``, so its scores for N < D are not comparable across D.
* Iteration stops when the evidence changes by less than 1e-13 (relative) or after 1,000
  steps; the reference stops at a 1% change of α/β after at most 11 steps. When the
  targets lie in the span of F (N < D) the evidence only approaches its supremum as
  β -> ∞; the iteration follows it until it stops changing.
* Features are used as given (no centring or scaling), in float64; no bias term.
"""

from __future__ import annotations

import math

import torch


def logme(features: torch.Tensor, labels: torch.Tensor) -> float:
    """LogME score: mean over classes of the maximised log evidence per sample.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer classes ``0..C-1``.

    Returns:
        The score (higher means better transfer).
    """
    F = features.double()
    U, s, _ = torch.linalg.svd(F, full_matrices=False)
    classes = int(labels.max()) + 1
    total = 0.0
    for c in range(classes):
        y = (labels == c).double()
        total += _evidence_svd(U, s, y, F.shape[1])[0]
    return total / classes / F.shape[0]


def log_evidence(features: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """Maximised log evidence of one real target column, with the α and β that reach it.

    Args:
        features: ``(N, D)``.
        target: ``(N,)`` real targets.

    Returns:
        ``(log evidence, α, β)``; the evidence is the total, not per sample.
    """
    F = features.double()
    U, s, _ = torch.linalg.svd(F, full_matrices=False)
    return _evidence_svd(U, s, target.double(), F.shape[1])


def _evidence_svd(
    U: torch.Tensor, s: torch.Tensor, y: torch.Tensor, D: int, *, max_iter: int = 1000
) -> tuple[float, float, float]:
    N = y.shape[0]
    sigma = s * s  # the k = min(N, D) leading eigenvalues of FᵀF; the other D - k are 0
    x = U.T @ y  # y in the left singular basis
    outside = max(float(y @ y - x @ x), 0.0)  # ‖y‖² outside the span of F

    def parts(alpha: float, beta: float) -> tuple[float, float, float]:
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        mm = float(((beta * s * x / denom) ** 2).sum())  # ‖m‖²
        res = float(((alpha * x / denom) ** 2).sum()) + outside  # ‖F m − y‖²
        logdet = float(torch.log(denom).sum()) + (D - len(sigma)) * math.log(alpha)
        evidence = (
            D / 2 * math.log(alpha)
            + N / 2 * math.log(beta)
            - N / 2 * math.log(2 * math.pi)
            - beta / 2 * res
            - alpha / 2 * mm
            - logdet / 2
        )
        return evidence, gamma, mm, res

    alpha, beta = 1.0, 1.0
    evidence, gamma, mm, res = parts(alpha, beta)
    for _ in range(max_iter):
        # The evidence can approach its supremum only as α or β -> ∞ (targets exactly in
        # or orthogonal to the span of F); stop when it no longer changes.
        if mm <= 0 or res <= 0 or not 0 < gamma < N:
            break
        new_alpha, new_beta = gamma / mm, (N - gamma) / res
        if not (math.isfinite(new_alpha) and math.isfinite(new_beta)):
            break
        new = parts(new_alpha, new_beta)
        change = abs(new[0] - evidence)
        alpha, beta, (evidence, gamma, mm, res) = new_alpha, new_beta, new
        if change <= 1e-13 * max(1.0, abs(evidence)):
            break
    return evidence, alpha, beta
