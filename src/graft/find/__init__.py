"""Finding a model to start from: transferability scores over frozen features (one module
per score, listed in `SCORES`), and ranking the models graft can run for a labelled data
set (`rank_models`)."""

from graft.find._registry import DEFAULT_SCORE, SCORES, Score, get_score
from graft.find.features import extract_features
from graft.find.hscore import hscore
from graft.find.knn import knn_accuracy
from graft.find.leep import leep
from graft.find.linear import linear_probe_accuracy
from graft.find.logme import log_evidence, logme
from graft.find.nce import nce
from graft.find.rank import RankError, RankModel, check_dataset, load_data, load_model, rank_models

__all__ = [
    "DEFAULT_SCORE",
    "SCORES",
    "RankError",
    "RankModel",
    "Score",
    "check_dataset",
    "extract_features",
    "get_score",
    "hscore",
    "knn_accuracy",
    "leep",
    "linear_probe_accuracy",
    "load_data",
    "load_model",
    "log_evidence",
    "logme",
    "nce",
    "rank_models",
]
