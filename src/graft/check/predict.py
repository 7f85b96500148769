"""Scores of the models `graft check` compares: graft's digits-zoo models and Hugging Face
sequence-classification models, on a zoo task or on user data.

Data (``--data``), as `graft.io.read_dataset` reads it:

- a ``.npz`` with inputs ``X`` (any shape (N, ...)) or ``input_ids`` (+ ``attention_mask``,
  ``token_type_ids``) and labels ``y`` (or ``labels`` / ``label``); the same names with a
  ``_val`` suffix give a validation split (for temperature scaling);
- a numeric ``.csv`` with a header row: a ``label`` (or ``y``) column, the rest inputs;
- a folder holding ``test.npz`` or ``test.csv`` and optionally ``val.npz`` / ``val.csv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from graft.io import open_checkpoint, read_dataset
from graft.recipe import RecipeError

_LABEL_KEYS = ("y", "labels", "label")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Split:
    """Inputs by name (``X``, or ``input_ids`` ...) and integer labels (N,)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    name: str
    test: Split
    val: Split | None = None
    notes: list[str] = field(default_factory=list)


def read_data(path: str | os.PathLike) -> Data:
    """The test (and validation) split of a data file or folder (module doc).

    Raises:
        RecipeError: the labels or inputs are missing or malformed.
    """
    splits = read_dataset(path)
    test = _split(splits["test"], f"{path}")
    val = _split(splits["val"], f"{path} (validation)") if "val" in splits else None
    return Data(str(path), test, val)


def _split(arrays: dict[str, np.ndarray], where: str) -> Split:
    label_key = next((k for k in _LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise RecipeError(
            f"{where} has no labels; name them one of {', '.join(_LABEL_KEYS)} "
            f"(found: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    labels = as_labels(arrays[label_key], where)
    if any(k in arrays for k in _TOKEN_KEYS):
        inputs = {k: np.asarray(arrays[k]) for k in _TOKEN_KEYS if k in arrays}
    elif "X" in arrays or "inputs" in arrays:
        inputs = {"X": np.asarray(arrays.get("X", arrays.get("inputs")))}
    else:  # a CSV: every other column is an input feature
        cols = [k for k in arrays if k not in _LABEL_KEYS]
        if not cols:
            raise RecipeError(f"{where} has labels but no inputs; add X (or input_ids) arrays")
        inputs = {"X": np.stack([arrays[k] for k in cols], axis=1)}
    for k, v in inputs.items():
        if len(v) != len(labels):
            raise RecipeError(
                f"{where}: {k} has {len(v)} rows but there are {len(labels)} labels; "
                "give one label per example"
            )
    return Split(inputs, labels)


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels (N,) from an array of whole numbers ≥ 0.

    Raises:
        RecipeError: not 1-D (or (N, 1)), empty, not whole numbers, or negative.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise RecipeError(f"labels in {where} must be one integer per example; got shape {y.shape}")
    if len(y) == 0:
        raise RecipeError(f"{where} holds no examples; check needs at least one labelled example")
    if (
        not np.issubdtype(y.dtype, np.number)
        or not np.all(np.isfinite(y))
        or np.any(y != np.round(y))
    ):
        raise RecipeError(f"labels in {where} must be whole numbers (class indices)")
    if y.min() < 0:
        raise RecipeError(f"labels in {where} must be class indices >= 0; found {int(y.min())}")
    return y.astype(np.int64)


# --- models -------------------------------------------------------------------------


def model_kind(path: str | os.PathLike) -> str:
    """``"zoo"`` for a GraftDigitsNet folder, ``"transformers"`` for any other model folder.

    Raises:
        GraftIOError: the path holds no readable checkpoint.
        RecipeError: the checkpoint has no config.json.
    """
    from graft.models.digits_net import ARCHITECTURE

    with open_checkpoint(path) as ckpt:
        config = ckpt.config
    if config is None:
        raise RecipeError(
            f"{path} has no config.json; pass a model folder (a graft zoo model or a "
            "Hugging Face sequence-classification model), or use --old-preds/--new-preds"
        )
    return "zoo" if ARCHITECTURE in (config.get("architectures") or []) else "transformers"


@torch.no_grad()
def zoo_logits(model: str | os.PathLike, head: torch.nn.Linear, X: np.ndarray) -> np.ndarray:
    """Logits (N, K) of a digits-zoo backbone with ``head`` on inputs ``X`` (N, ...).

    Raises:
        RecipeError: the model is not a GraftDigitsNet, or the inputs or head do not fit it.
    """
    from graft.eval.evaluate import logits
    from graft.models.digits_net import load_backbone

    try:
        backbone, config = load_backbone(model)
    except ValueError as e:
        raise RecipeError(str(e)) from e
    x = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    if x[0].numel() != config["input_size"] or config["hidden_size"] != head.in_features:
        raise RecipeError(
            f"{model} takes {config['input_size']} inputs and gives {config['hidden_size']} "
            f"features; the data has {x[0].numel()} inputs per example and the head takes "
            f"{head.in_features}: use data and a task of this model's zoo"
        )
    return logits(backbone, head, x).double().numpy()


def load_transformers_classifier(path: str | os.PathLike) -> torch.nn.Module:
    """A Hugging Face sequence-classification model built from its config.json and loaded
    with graft's reader (safetensors, or ``.bin`` with ``weights_only``).

    Raises:
        RecipeError: transformers is missing, or the weights do not fit the config.
    """
    try:
        import transformers
    except ImportError as e:
        raise RecipeError(
            f"{path} is a Hugging Face model; checking it needs transformers: "
            "pip install 'graft[hf]'"
        ) from e
    with open_checkpoint(path) as ckpt:
        config = dict(ckpt.config or {})
        state = {n: ckpt.get(n) for n in ckpt.names}
    model_type = config.pop("model_type", None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(
            f"{path} is not a sequence-classification model transformers can build "
            f"(model_type {model_type!r}): {' '.join(str(e).split())[:200]}"
        ) from e
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in dict(model.named_parameters())]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if missing:
        raise RecipeError(
            f"{path} lacks {len(missing)} weights its config needs (e.g. {missing[0]}); "
            "is it a sequence-classification checkpoint?"
        )
    return model.float().eval()


@torch.no_grad()
def transformers_logits(
    model: torch.nn.Module, inputs: dict[str, np.ndarray], *, batch_size: int = 64
) -> np.ndarray:
    """Logits (N, K) of a sequence-classification model on tokenized ``inputs``."""
    if "input_ids" not in inputs:
        raise RecipeError(
            "a Hugging Face model needs tokenized data: input_ids (and attention_mask) in the .npz"
        )
    n = len(inputs["input_ids"])
    out = []
    for i in range(0, n, batch_size):
        batch = {
            k: torch.as_tensor(np.asarray(v[i : i + batch_size]), dtype=torch.long)
            for k, v in inputs.items()
        }
        out.append(model(**batch).logits.double())
    return torch.cat(out).numpy()
