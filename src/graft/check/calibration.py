"""Accuracy and calibration of one classifier's scores: NLL, Brier, ECE, MCE, temperature.

Scores are logits of shape (N, K) as float64 numpy arrays; probabilities are turned into
log-probabilities first (`graft.check.scores.as_logits`), which softmax maps back to them.

Conventions (they change the numbers; METHODS.md "Checking"):

- The confidence of a prediction is its top softmax probability; ties in ``argmax`` go to
  the lowest class index.
- ECE = Σ_b (n_b / N) |acc_b − conf_b| (Guo et al. 2017). Equal-width bins split (0, 1]
  into ``n_bins`` right-closed intervals ((m−1)/M, m/M], as Guo et al. write them;
  torchmetrics' ``CalibrationError`` uses [lo, hi) and gives a confidence of exactly 1
  its own bin, which only matters for confidences on a bin edge. Equal-mass bins sort
  the predictions by confidence and cut them into ``n_bins`` groups of sizes differing
  by at most one (``numpy.array_split``), the less biased variant (Kumar et al. 2019).
- MCE = max over non-empty equal-width bins of |acc_b − conf_b|.
- Brier = mean over examples of Σ_k (p_k − [y = k])², in [0, 2].
- NLL = mean −log p_y in nats.
- Temperature scaling (Guo et al. 2017): one T > 0 minimising validation NLL of
  softmax(z / T). NLL is convex in 1/T, so a golden-section search on log(1/T) over
  [1/100, 100] finds it; T = 1 is kept when it is at least as good, so validation NLL
  never rises. Dividing by T > 0 keeps every argmax, so accuracy never changes.
"""

from __future__ import annotations

import math

import numpy as np

N_BINS = 15  # torchmetrics' default


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of labels ``y`` under softmax(z)."""
    return float(-log_softmax(z)[np.arange(len(y)), y].mean())


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean Σ_k (p_k − onehot(y)_k)²."""
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = N_BINS, mass: bool = False
) -> list[dict]:
    """Per bin: ``lo``, ``hi`` (confidence range), ``n``, ``accuracy``, ``confidence``.

    Equal-width bins are all returned (empty ones with n = 0 and NaN means); equal-mass
    bins are the non-empty groups of the sorted confidences.
    """
    if mass:
        order = np.argsort(confidence, kind="stable")
        groups = [g for g in np.array_split(order, n_bins) if len(g)]
        return [
            _bin(confidence[g], correct[g], confidence[g].min(), confidence[g].max())
            for g in groups
        ]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins ((m-1)/M, m/M]: index = ceil(conf * M) - 1, clamped to [0, M-1]
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return [
        _bin(confidence[index == b], correct[index == b], edges[b], edges[b + 1])
        for b in range(n_bins)
    ]


def _bin(conf: np.ndarray, correct: np.ndarray, lo: float, hi: float) -> dict:
    n = len(conf)
    return {
        "lo": float(lo),
        "hi": float(hi),
        "n": int(n),
        "accuracy": float(correct.mean()) if n else float("nan"),
        "confidence": float(conf.mean()) if n else float("nan"),
    }


def ece(bins: list[dict]) -> float:
    """Expected calibration error of `reliability_bins` output."""
    total = sum(b["n"] for b in bins)
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))


def mce(bins: list[dict]) -> float:
    """Maximum calibration error: the largest |accuracy − confidence| of a non-empty bin."""
    return float(max(abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))


def calibration(z: np.ndarray, y: np.ndarray, *, n_bins: int = N_BINS) -> dict:
    """Accuracy, NLL, Brier, ECE (equal-width and equal-mass), MCE and the bins of
    logits ``z`` (N, K) against labels ``y`` (N,)."""
    p = softmax(z)
    pred = p.argmax(axis=1)
    confidence = p.max(axis=1)
    correct = (pred == y).astype(np.float64)
    width = reliability_bins(confidence, correct, n_bins=n_bins)
    mass = reliability_bins(confidence, correct, n_bins=n_bins, mass=True)
    return {
        "accuracy": float(correct.mean()),
        "nll": nll(z, y),
        "brier": brier(p, y),
        "ece": ece(width),
        "ece_mass": ece(mass),
        "mce": mce(width),
        "mean_confidence": float(confidence.mean()),
        "bins": width,
        "bins_mass": mass,
    }


def fit_temperature(z: np.ndarray, y: np.ndarray, *, iterations: int = 100) -> float:
    """The temperature T minimising NLL of softmax(z / T) on ``(z, y)`` (see module doc)."""

    def loss(log_s: float) -> float:
        return nll(z * math.exp(log_s), y)

    lo, hi = math.log(1e-2), math.log(1e2)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    log_s = (lo + hi) / 2
    return 1.0 if loss(0.0) <= loss(log_s) else math.exp(-log_s)
