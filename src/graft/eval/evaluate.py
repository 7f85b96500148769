"""Accuracy and loss of a backbone + classification head on a zoo task.

Merged models are judged as FusionBench judges merged CLIP encoders: the merged backbone
is run with each task's own head (here the zoo's fine-tuned head for that task).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from graft.models.digits_net import load_backbone, load_head
from graft.zoo.tasks import task_data

if TYPE_CHECKING:
    from graft.zoo.build import Zoo


@torch.no_grad()
def logits(
    backbone: nn.Module, head: nn.Linear, X: torch.Tensor, *, batch_size: int = 512
) -> torch.Tensor:
    """``head(backbone(X))`` in eval mode, batched; returns float32 (N, num_classes)."""
    backbone.eval()
    head.eval()
    out = [head(backbone(X[i : i + batch_size])) for i in range(0, len(X), batch_size)]
    return torch.cat(out) if out else torch.empty(0, head.out_features)


def evaluate(
    backbone: nn.Module, head: nn.Linear, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``head(backbone(X))`` against ``y``.

    Returns:
        ``{"accuracy": fraction correct, "loss": mean cross-entropy (nats), "n": len(y)}``;
        ties in the logits go to the lowest class index (``argmax``).
    """
    z = logits(backbone, head, X, batch_size=batch_size)
    n = len(y)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    loss = nn.functional.cross_entropy(z, y, reduction="sum").item() / n
    accuracy = (z.argmax(1) == y).sum().item() / n
    return {"accuracy": accuracy, "loss": loss, "n": n}


def evaluate_task(
    model_path: str | os.PathLike,
    task: str,
    zoo: Zoo,
    *,
    split: str = "test",
    head: nn.Linear | None = None,
) -> dict:
    """Evaluate the backbone in ``model_path`` (any merged model dir) on one zoo task.

    Args:
        model_path: a GraftDigitsNet model dir (config.json + safetensors).
        task: a task the zoo was built with.
        zoo: the zoo (`graft.zoo.load_zoo`), for the task's head and the data seed.
        split: "test" (default), "val" or "train".
        head: use this head instead of the zoo's fine-tuned head for ``task`` (e.g. the
            averaged head of a soup, `graft.zoo.soup_head`).

    Raises:
        ValueError: the task is not in the zoo, the model is not a GraftDigitsNet, or its
            feature size does not fit the head.
    """
    if task not in zoo.heads:
        raise ValueError(
            f"unknown task {task!r}; the zoo at {zoo.root} has: {', '.join(zoo.heads)}"
        )
    backbone, config = load_backbone(model_path)
    head_name = "the given head"
    if head is None:
        head, head_name = load_head(zoo.heads[task]), str(zoo.heads[task])
    if config["hidden_size"] != head.in_features:
        raise ValueError(
            f"model {model_path} gives {config['hidden_size']} features but head {head_name} "
            f"expects {head.in_features}; evaluate models merged from this zoo's checkpoints"
        )
    X, y = task_data(task, split, seed=zoo.seed)
    return evaluate(backbone, head, X, y)
