"""NCE: negative conditional entropy (Tran, Nguyen & Hassner, "Transferability and Hardness
of Supervised Classification Tasks", ICCV 2019).

With Z the source model's hard label for each input (the argmax of its source-label
probabilities) and Y the target label, from the empirical joint P̂(y, z):

    NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z).

It is ≤ 0 (0: the source labels determine the target labels); higher means better
transfer. Ties in the argmax go to the lowest source class.
"""

from __future__ import annotations

import torch


def nce(source_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """NCE score.

    Args:
        source_labels: ``(N,)`` integer source labels.
        labels: ``(N,)`` integer target classes ``0..C-1``.
    """
    n = labels.shape[0]
    z = torch.unique(source_labels, return_inverse=True)[1]
    classes = int(labels.max()) + 1
    joint = torch.zeros(classes, int(z.max()) + 1, dtype=torch.float64)
    joint.index_put_((labels, z), torch.ones(n, dtype=torch.float64), accumulate=True)
    joint /= n
    cond = joint / joint.sum(0, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * torch.log(cond[mask])).sum())


def nce_from_probs(source_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """NCE with the source labels taken as the argmax of ``source_probs`` ``(N, Z)``."""
    return nce(source_probs.argmax(1), labels)
