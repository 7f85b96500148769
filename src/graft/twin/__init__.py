"""Twin-Merging (Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise
in Model Merging", NeurIPS): a shared expert merged from the fine-tunes, each task's
exclusive knowledge (fine-tune − shared) compressed by truncated SVD, and a router
trained on validation data that mixes the exclusive parts per input at inference.

* `graft.twin.exclusive` — the exclusive parts and their mix (pure tensor functions);
* `graft.twin.router` — the router MLP and its training;
* `graft.twin.dynamic` — the dynamic model, per input (hooks) or per batch;
* `graft.twin.build` — `build_twin`, what ``graft twin`` runs;
* `graft.twin.files` — the folder it writes (`open_twin`, `is_twin_dir`).
"""

from graft.twin.build import TwinReport, build_twin
from graft.twin.dynamic import ROUTINGS, evaluate_twin, predict_twin
from graft.twin.files import TwinModel, is_twin_dir, open_twin

__all__ = [
    "ROUTINGS",
    "TwinModel",
    "TwinReport",
    "build_twin",
    "evaluate_twin",
    "is_twin_dir",
    "open_twin",
    "predict_twin",
]
