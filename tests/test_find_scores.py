"""Transferability scores: LogME against a brute-force evidence maximisation (N > D, N < D,
rank-deficient), LEEP / NCE / H-score / kNN on hand-worked examples, and invariants over
every registered score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graft.find import (
    SCORES,
    get_score,
    hscore,
    knn_accuracy,
    leep,
    linear_probe_accuracy,
    log_evidence,
    logme,
    nce,
)

# --- LogME -----------------------------------------------------------------------------


def _dense_log_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The evidence written out with dense D x D matrices (no SVD, no padding trick)."""
    N, D = F.shape
    A = alpha * np.eye(D) + beta * F.T @ F
    m = beta * np.linalg.solve(A, F.T @ y)
    _, logdet = np.linalg.slogdet(A)
    return (
        D / 2 * np.log(alpha)
        + N / 2 * np.log(beta)
        - N / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((F @ m - y) ** 2)
        - alpha / 2 * (m @ m)
        - logdet / 2
    )


def _brute_force_max(F: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Maximise the dense evidence over (log alpha, log beta) with Nelder-Mead, several starts."""
    from scipy.optimize import minimize

    Fn, yn = F.double().numpy(), y.double().numpy()

    def neg(p):
        try:
            return -_dense_log_evidence(Fn, yn, *np.exp(p))
        except np.linalg.LinAlgError:  # far corners of the box
            return np.inf

    opts = {"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000}
    best = min(
        (
            minimize(neg, [a, b], method="Nelder-Mead", options=opts)
            for a in (-2, 0, 2)
            for b in (-2, 0, 2)
        ),
        key=lambda r: r.fun,
    )
    return -best.fun, *np.exp(best.x)


def _problem(n: int, d: int, noise: float, seed: int, rank: int | None = None):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, d, generator=g, dtype=torch.float64)
    if rank is not None:  # rank-deficient features (N > D but rank < D)
        F = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, d, generator=g, dtype=torch.float64
        )
    y = F @ torch.randn(d, generator=g, dtype=torch.float64) + noise * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return F, y


@pytest.mark.parametrize(
    ("n", "d", "noise", "seed", "rank"),
    [
        (30, 5, 1.0, 0, None),  # N > D
        (30, 5, 1.0, 2, None),
        (8, 20, 1.0, 2, None),  # N < D
        (10, 30, 0.5, 0, None),
        (10, 30, 0.5, 2, None),
        (30, 10, 1.0, 1, 3),  # rank-deficient, N > D
    ],
)
def test_logme_fixed_point_reaches_the_brute_force_maximum(n, d, noise, seed, rank):
    F, y = _problem(n, d, noise, seed, rank)
    evidence, alpha, beta = log_evidence(F, y)
    best, best_alpha, best_beta = _brute_force_max(F, y)
    assert evidence == pytest.approx(best, rel=1e-8, abs=1e-8)
    assert alpha == pytest.approx(best_alpha, rel=2e-3)  # the evidence is flat near its peak
    assert beta == pytest.approx(best_beta, rel=2e-3)
    # and the evidence at the returned (alpha, beta) is the dense formula's
    assert evidence == pytest.approx(
        _dense_log_evidence(F.numpy(), y.numpy(), alpha, beta), rel=1e-9
    )


def test_logme_keeps_the_log_alpha_term_of_the_zero_eigenvalues():
    """N < D: thuml's code sums log(alpha + beta sigma) over the N computed eigenvalues only;
    graft's evidence equals the dense one, which the truncated form misses by (D-N)/2 log alpha."""
    F, y = _problem(10, 30, 0.5, 0)
    evidence, alpha, beta = log_evidence(F, y)
    truncated = evidence + (30 - 10) / 2 * math.log(alpha)
    dense = _dense_log_evidence(F.numpy(), y.numpy(), alpha, beta)
    assert evidence == pytest.approx(dense, rel=1e-9)
    assert abs(truncated - dense) > 5.0  # alpha ~ 2.7 here: the omission is worth ~10 nats


def test_logme_follows_the_evidence_when_its_supremum_is_at_infinite_beta():
    """N < D with targets in the span of F: the evidence grows towards a finite limit as
    beta -> inf. The result is finite and at least the best of a wide (alpha, beta) grid."""
    F, y = _problem(8, 20, 0.5, 0)
    evidence, _, beta = log_evidence(F, y)
    grid = np.exp(np.linspace(-5, 10, 61))
    best = max(_dense_log_evidence(F.numpy(), y.numpy(), a, b) for a in grid for b in grid)
    assert beta > 1e5 and math.isfinite(evidence)
    assert evidence >= best - 1e-9


def test_logme_score_is_mean_per_sample_evidence_over_one_vs_rest_classes():
    g = torch.Generator().manual_seed(3)
    F = torch.randn(40, 6, generator=g)
    labels = torch.arange(40) % 3
    expected = sum(log_evidence(F, (labels == c).double())[0] for c in range(3)) / 3 / 40
    assert logme(F, labels) == pytest.approx(expected, rel=1e-12)


# --- LEEP and NCE ------------------------------------------------------------------------


def test_leep_hand_worked_example():
    theta = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # P(y,z) = [[.375, .125], [.125, .375]]; P(y|z) = [[.75, .25], [.25, .75]];
    # expected empirical predictions 0.7, 0.55, 0.65, 0.6
    expected = (math.log(0.7) + math.log(0.55) + math.log(0.65) + math.log(0.6)) / 4
    assert leep(theta, y) == pytest.approx(expected, abs=1e-12)


def test_leep_limits():
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    onehot = torch.nn.functional.one_hot(y, 3).float()
    assert leep(onehot, y) == pytest.approx(0.0, abs=1e-12)  # source labels decide the target
    uniform = torch.full((6, 4), 0.25)  # uninformative source: LEEP = -H(Y), empirical
    assert leep(uniform, y) == pytest.approx(
        (math.log(1 / 6) + 2 * math.log(2 / 6) + 3 * math.log(3 / 6)) / 6
    )


def test_nce_hand_worked_example():
    z = torch.tensor([0, 0, 0, 1])
    y = torch.tensor([0, 0, 1, 1])
    # P(y0,z0)=1/2, P(y1,z0)=1/4, P(y1,z1)=1/4; P(y|z0)=(2/3, 1/3), P(y1|z1)=1
    expected = 0.5 * math.log(2 / 3) + 0.25 * math.log(1 / 3)
    assert nce(z, y) == pytest.approx(expected, abs=1e-12)
    assert nce(torch.tensor([5, 5, 9, 9]), y) == pytest.approx(0.0, abs=1e-12)  # labels as given
    assert nce(torch.zeros(4, dtype=torch.long), y) == pytest.approx(math.log(0.5))  # -H(Y)


def test_nce_score_uses_the_source_argmax():
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    assert get_score("nce").fn(probs, y) == pytest.approx(nce(torch.tensor([0, 0, 0, 1]), y))


# --- H-score, kNN, linear probe ----------------------------------------------------------------


def test_hscore_one_dimension_is_the_explained_variance_fraction():
    # 1-D: Ledoit-Wolf leaves a 1x1 covariance alone (shrinkage 0); var(f) = 1.25 and the
    # class means 0.5, 0.5, 2.5, 2.5 have variance 1.0: H = 1.0 / 1.25.
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert hscore(f, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.8, abs=1e-12)


def test_hscore_matches_its_formula_with_sklearn_shrinkage():
    from sklearn.covariance import ledoit_wolf

    g = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    F = torch.randn(30, 8, generator=g, dtype=torch.float64) + y[:, None].double()
    X = F.numpy() - F.numpy().mean(0)
    shrunk, a = ledoit_wolf(X, assume_centered=True)
    means = np.stack([X[y.numpy() == c].mean(0) for c in range(3)])[y.numpy()]
    cov_g = means.T @ means / 30
    expected = np.trace(np.linalg.pinv(shrunk) @ ((1 - a) * cov_g))
    assert 0 < a < 1
    assert hscore(F, y) == pytest.approx(expected, rel=1e-9)


def test_knn_leave_one_out_by_hand():
    f = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    assert knn_accuracy(f, torch.tensor([0, 0, 1, 1]), k=1) == 1.0
    assert (
        knn_accuracy(f, torch.tensor([0, 1, 0, 1]), k=1) == 0.0
    )  # each point's neighbour disagrees


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    sep = torch.nn.functional.one_hot(y, 3).double() * 5 + 0.1 * torch.randn(
        90, 3, generator=g, dtype=torch.float64
    )
    assert linear_probe_accuracy(sep, y) == 1.0
    noise = torch.randn(90, 3, generator=g)
    assert linear_probe_accuracy(noise, y) < 0.6


# --- every registered score ----------------------------------------------------------------


def _inputs(score, informative: bool, g: torch.Generator):
    y = torch.arange(120) % 4
    signal = torch.nn.functional.one_hot(y, 4).float() * (3.0 if informative else 0.0)
    if score.needs == "source_probs":
        return torch.softmax(signal @ torch.eye(4, 6) + torch.randn(120, 6, generator=g), dim=1), y
    return torch.cat([signal, torch.zeros(120, 4)], 1) + torch.randn(120, 8, generator=g), y


@pytest.mark.parametrize("name", list(SCORES))
def test_every_score_prefers_informative_inputs(name):
    score = SCORES[name]
    g = torch.Generator().manual_seed(1)
    good = score.fn(*_inputs(score, True, g))
    bad = score.fn(*_inputs(score, False, g))
    assert math.isfinite(good) and math.isfinite(bad)
    assert good > bad


@pytest.mark.parametrize("name", [n for n in SCORES if n != "linear"])
def test_every_score_ignores_class_names(name):
    """Renaming the classes (a permutation of label ids) leaves the score unchanged."""
    score = SCORES[name]
    x, y = _inputs(score, True, torch.Generator().manual_seed(2))
    perm = torch.tensor([2, 0, 3, 1])
    assert score.fn(x, perm[y]) == pytest.approx(score.fn(x, y), rel=1e-9, abs=1e-12)


def test_get_score_lists_valid_names():
    with pytest.raises(ValueError, match="valid scores: logme, leep, nce, hscore, knn, linear"):
        get_score("logmee")
