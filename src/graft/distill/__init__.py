"""Knowledge transfer between any two models, and compatible model updates.

* `distill` — teach a student from a teacher of any architecture: plain KD, or
  data-partitioned transfer (Roth et al. 2024), supervised or not.
* `update` — fine-tune a new model so it keeps the old model's right answers: focal
  distillation (Yan et al. 2021) or MUSCLE's masked distillation (Echterhoff et al. 2024).
* `save_trained` — write the trained model (and its head) as a model folder.

The losses are pure functions in `graft.distill.losses`; both jobs train with the one loop
in `graft.data.train`.
"""

from graft.distill._save import save_trained
from graft.distill.losses import DISTILL_MODES, UPDATE_MODES
from graft.distill.run import distill, holdout_split, transfer_report, update

__all__ = [
    "DISTILL_MODES",
    "UPDATE_MODES",
    "distill",
    "holdout_split",
    "save_trained",
    "transfer_report",
    "update",
]
