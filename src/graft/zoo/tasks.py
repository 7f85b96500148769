"""The zoo's tasks: scikit-learn's 1,797 real 8x8 digit scans seen through different
geometric and photometric domains, so that fine-tunes move the backbone in different,
interfering directions.

The images are split once by seed into four disjoint index sets (pretrain / train / val /
test); every task applies its transform to the same index sets, so no task's test image
is ever seen in pretraining or in any task's training. The base model is pretrained on
the *upright* pretraining images (10-class digit identity), which none of the tasks is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

SPLITS = ("pretrain", "train", "val", "test")
# Sizes of the pretrain / train / val splits; test gets the rest (497 of 1,797).
SPLIT_SIZES = {"pretrain": 500, "train": 600, "val": 200}


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    Attributes:
        name: the task's name.
        num_classes: number of labels.
        description: one line for people.
        transform: ``(images (N,1,8,8), coin (N,) bool) -> images``.
        label: ``(digits (N,) int64, coin (N,) bool) -> labels (N,) int64``.

    ``coin`` is a per-image bit, balanced within each split and fixed by seed; only tasks
    that need a random choice per image (mirror detection) use it.
    """

    name: str
    num_classes: int
    description: str
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    label: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _digit(digits: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    return digits


def quadrant_swap(x: torch.Tensor) -> torch.Tensor:
    """Swap the 4x4 quadrants diagonally: top-left <-> bottom-right, top-right <-> bottom-left."""
    return x.roll(shifts=(4, 4), dims=(-2, -1))


def mirror(x: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    """Flip left-right the images whose coin is set."""
    return torch.where(coin.view(-1, 1, 1, 1), x.flip(-1), x)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "rot90-digit",
            10,
            "digit identity, image rotated 90 degrees counter-clockwise",
            lambda x, c: x.rot90(1, dims=(-2, -1)),
            _digit,
        ),
        TaskSpec(
            "rot180-digit",
            10,
            "digit identity, image rotated 180 degrees",
            lambda x, c: x.rot90(2, dims=(-2, -1)),
            _digit,
        ),
        TaskSpec(
            "rot270-digit",
            10,
            "digit identity, image rotated 270 degrees counter-clockwise",
            lambda x, c: x.rot90(3, dims=(-2, -1)),
            _digit,
        ),
        TaskSpec(
            "transpose-digit",
            10,
            "digit identity, image transposed (rows <-> columns)",
            lambda x, c: x.transpose(-2, -1),
            _digit,
        ),
        TaskSpec(
            "quadrant-swap-digit",
            10,
            "digit identity, 4x4 quadrants swapped diagonally",
            lambda x, c: quadrant_swap(x),
            _digit,
        ),
        TaskSpec(
            "inverted-digit",
            10,
            "digit identity, intensities inverted (1 - x)",
            lambda x, c: 1.0 - x,
            _digit,
        ),
        TaskSpec(
            "mirror-detection",
            2,
            "is the upright digit mirrored left-right? (balanced)",
            mirror,
            lambda d, c: c.long(),
        ),
    )
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(task: str) -> TaskSpec:
    """The spec of ``task``; raises ValueError listing the valid names."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}") from None


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits zoo needs scikit-learn: pip install 'graft[zoo]'") from e
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(data.target.astype(np.int64))


@cache
def split_indices(seed: int = 0) -> dict[str, torch.Tensor]:
    """The four disjoint index sets into the 1,797 images, fixed by ``seed``."""
    n = len(_digits()[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for split in SPLITS:
        size = SPLIT_SIZES.get(split, n - start)
        out[split] = perm[start : start + size].sort().values
        start += size
    return out


def _coin(n: int, seed: int, split: str) -> torch.Tensor:
    """A balanced bit per image of a split (exactly floor(n/2) set), fixed by seed."""
    gen = torch.Generator().manual_seed(seed * 1000 + SPLITS.index(split) + 7919)
    return torch.randperm(n, generator=gen) < n // 2


def task_data(task: str, split: str, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of ``task`` on ``split``.

    Args:
        task: a name in `TASKS`.
        split: "pretrain", "train", "val" or "test".
        seed: the seed fixing the split (and mirror choices).

    Returns:
        ``X`` float32 (N, 1, 8, 8) in [0, 1] and ``y`` int64 (N,).

    Raises:
        ValueError: unknown task or split.
    """
    spec = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    images, digits = _digits()
    idx = split_indices(seed)[split]
    coin = _coin(len(idx), seed, split)
    x = spec.transform(images[idx], coin).contiguous()
    return x, spec.label(digits[idx], coin)


def pretrain_data(*, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's pretraining data: upright digits of the pretrain split, 10 classes."""
    images, digits = _digits()
    idx = split_indices(seed)["pretrain"]
    return images[idx].clone(), digits[idx].clone()
