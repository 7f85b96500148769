"""Linear-probe accuracy: a baseline transferability score (cross-validated accuracy of a
logistic regression on frozen features).

Conventions: features standardised per dimension with the training fold's statistics;
scikit-learn's multinomial `LogisticRegression` (L2, C = 1, lbfgs); 3-fold stratified
cross-validation with a fixed shuffle (seed 0), or as many folds as the rarest class
allows (at least 2; plain k-fold when a class has a single sample).
"""

from __future__ import annotations

import warnings

import torch

FOLDS = 3


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, *, folds: int = FOLDS
) -> float:
    """Mean held-out accuracy of a logistic regression over cross-validation folds.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer classes ``0..C-1``.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import KFold, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install 'graft[zoo]'") from e
    X, y = features.double().numpy(), labels.numpy()
    rarest = int(torch.bincount(labels).min()) if len(labels) else 0
    if rarest >= 2:
        splitter = StratifiedKFold(min(folds, rarest), shuffle=True, random_state=0)
    else:
        splitter = KFold(min(folds, len(y)), shuffle=True, random_state=0)
    accs = []
    for train, test in splitter.split(X, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if len(set(y[train])) < 2:
                accs.append(float((y[test] == y[train][0]).mean()))
                continue
            model.fit(X[train], y[train])
        accs.append(float((model.predict(X[test]) == y[test]).mean()))
    return sum(accs) / len(accs)
