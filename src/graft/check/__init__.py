"""Checks of a model you are about to reuse: calibration, flips against the model it
replaces, label issues in the data, and (`graft.check.lint`) risks in its files.

Pure functions over numpy arrays (`calibration`, `flips`, `labels`, `compare`); `run`
turns model folders or predictions files into a report; `lint` scans checkpoints.
"""

from graft.check.calibration import calibration, fit_temperature
from graft.check.compare import as_logits, compare
from graft.check.flips import flips
from graft.check.gates import check_gates, parse_gates
from graft.check.labels import confident_joint, cross_val_probs, find_label_issues

__all__ = [
    "as_logits",
    "calibration",
    "check_gates",
    "compare",
    "confident_joint",
    "cross_val_probs",
    "find_label_issues",
    "fit_temperature",
    "flips",
    "parse_gates",
]
