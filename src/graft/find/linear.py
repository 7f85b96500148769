"""Linear-probe accuracy: a baseline transferability score (cross-validated accuracy of a
multinomial logistic regression on frozen features).

Conventions: features standardised per dimension with the training fold's statistics;
L2 penalty as scikit-learn's ``LogisticRegression(C=1)`` (mean cross-entropy +
``‖W‖² / (2 C n_train)``, bias not penalised), fitted by L-BFGS in float64 (at most 100
iterations, gradient tolerance 1e-5: held-out accuracy settles long before the loss does);
3-fold cross-validation, stratified (each class's samples are shuffled with seed 0 and
dealt to the folds in turn), or as many folds as the rarest class has samples (at least 2).
"""

from __future__ import annotations

import torch

FOLDS = 3


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, *, folds: int = FOLDS, C: float = 1.0
) -> float:
    """Mean held-out accuracy of a logistic regression over cross-validation folds.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer classes ``0..C-1``.
        folds: cross-validation folds (fewer when the rarest class is smaller).
        C: inverse L2 strength, as in scikit-learn.
    """
    X, y = features.double(), labels
    classes = int(y.max()) + 1
    k = max(2, min(folds, int(torch.bincount(y).min())))
    fold = _stratified_folds(y, k)
    accs = []
    for f in range(k):
        train, test = fold != f, fold == f
        mu, sd = X[train].mean(0), X[train].std(0, unbiased=False).clamp_min(1e-12)
        W, b = _fit((X[train] - mu) / sd, y[train], classes, C)
        pred = (((X[test] - mu) / sd) @ W + b).argmax(1)
        accs.append(float((pred == y[test]).double().mean()))
    return sum(accs) / len(accs)


def _stratified_folds(y: torch.Tensor, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    fold = torch.empty_like(y)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold[idx] = torch.arange(len(idx)) % k
    return fold


def _fit(
    X: torch.Tensor, y: torch.Tensor, classes: int, C: float
) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.zeros(X.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    lam = 1.0 / (C * len(y))
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=100,
        tolerance_grad=1e-5,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + lam / 2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()
