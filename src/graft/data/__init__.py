"""The user's data in, and any model graft can run over it.

* `read_data` — CSV / TSV / JSONL text, ``.npz`` arrays or tokens, image folders, zoo
  tasks -> a `Dataset` (labels of any type mapped to ids in sorted order).
* `load_runner` — a Hugging Face folder (sentence-transformers included) or a digits-zoo
  backbone, with its head -> a `Runner` giving features, logits and gradients in batches.
* `open_model_data` — both at once, fitted to each other (what the CLI commands use).
* `predict`, `features`, `evaluate` — batched forward passes.
"""

from graft.data._loading import load_runner
from graft.data.dataset import DataOptions, Dataset, read_data
from graft.data.heads import HeadFile, load_head_file, save_head_file
from graft.data.labels import DataError, encode_labels
from graft.data.passes import evaluate, features, predict, scores
from graft.data.resolve import open_model_data
from graft.data.runner import POOLINGS, Runner, pool

__all__ = [
    "POOLINGS",
    "DataError",
    "DataOptions",
    "Dataset",
    "HeadFile",
    "Runner",
    "encode_labels",
    "evaluate",
    "features",
    "load_head_file",
    "load_runner",
    "open_model_data",
    "pool",
    "predict",
    "read_data",
    "save_head_file",
    "scores",
]
