"""What every zoo build reports: per-task accuracies, their means, the accuracy bars, and
the file digests of its manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from graft.io import open_checkpoint

KINDS = ("probe", "finetuned", "average_merge")


class ZooQualityError(RuntimeError):
    """A built zoo misses an enforced accuracy bar."""


def summary(tasks: dict) -> dict:
    """Means over tasks of the probe, fine-tuned and uniform-average test accuracies, and
    the two gaps the bars are about (in points)."""
    mean = {k: sum(r[k]["accuracy"] for r in tasks.values()) / len(tasks) for k in KINDS}
    return {
        "split": "test",
        "tasks": tasks,
        "mean_accuracy": mean,
        "finetuned_minus_probe_points": 100 * (mean["finetuned"] - mean["probe"]),
        "finetuned_minus_average_points": 100 * (mean["finetuned"] - mean["average_merge"]),
    }


def check_bars(
    report: dict,
    *,
    what: str,
    min_gain: float,
    min_loss: float,
    enforce_gain: bool,
    enforce_loss: bool,
    log: Callable[[str], None],
) -> None:
    """Record in ``report["bars"]`` whether the fine-tunes beat the probes by ``min_gain``
    points and the uniform average loses ``min_loss`` points against them; log it; raise
    `ZooQualityError` for a missed bar that is enforced.
    """
    gain, loss = report["finetuned_minus_probe_points"], report["finetuned_minus_average_points"]
    gain_ok, loss_ok = gain >= min_gain, loss >= min_loss
    report["bars"] = {
        "min_gain_over_probe_points": min_gain,
        "min_average_loss_points": min_loss,
        "gain_passed": gain_ok,
        "loss_passed": loss_ok,
        "passed": gain_ok and loss_ok,
        "enforced": {"gain": enforce_gain, "loss": enforce_loss},
    }
    m = report["mean_accuracy"]
    log(
        f"mean test accuracy: probe {m['probe']:.1%}, fine-tuned {m['finetuned']:.1%}, "
        f"average merge {m['average_merge']:.1%}; fine-tuned - probe = {gain:.1f} points "
        f"(bar {min_gain:g}{'' if gain_ok else ': MISSED'}), fine-tuned - average = "
        f"{loss:.1f} points (bar {min_loss:g}{'' if loss_ok else ': MISSED'})"
    )
    missed = []
    if enforce_gain and not gain_ok:
        missed.append(f"fine-tuned beats probe by {gain:.1f} points (need {min_gain:g})")
    if enforce_loss and not loss_ok:
        missed.append(f"average merge loses {loss:.1f} points (need {min_loss:g})")
    if missed:
        raise ZooQualityError(f"{what} misses its bars: {'; '.join(missed)}")


def fingerprint(model_dir: Path) -> str:
    with open_checkpoint(model_dir) as ckpt:
        return ckpt.fingerprint()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
