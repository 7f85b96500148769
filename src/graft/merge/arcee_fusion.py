"""Arcee Fusion: keep the fine-tune's changes where they matter most (mergekit's
``arcee_fusion``; Arcee AI, "Meet MergeKit v0.1: Arcee Fusion", arcee.ai blog, 2025).

Per tensor, with base ``θ₀`` and fine-tune ``θ₁``:

1. **Importance** ``s = |θ₁ − θ₀| · KL(p ‖ q)`` with ``p = softmax(θ₁) + 1e-8`` and
   ``q = softmax(θ₀) + 1e-8`` taken along the *last* dim, and the KL summed along it:
   one KL per row of a ``(out, in)`` weight (per token of an embedding), one for the
   whole of a 1-D tensor, broadcast over the row's entries.
2. **Threshold** ``τ = Q₂ + 1.5·(Q₃ − Q₁)`` of the importance, where ``Q_q`` is the
   order statistic at sorted index ``floor(q·(n − 1))`` (no interpolation, unlike
   ``torch.quantile``).
3. ``θ₀ + (θ₁ − θ₀)·[s ≥ τ]``.

Conventions that change results:

* The rule is ``≥``: when at least three quarters of the importances are 0 (a
  one-element tensor, whose softmax has zero KL, or a sparse delta), ``τ = 0`` and the
  whole fine-tune is kept — as mergekit (its own test expects it).
* Quantiles are exact. mergekit 0.1.5 estimates them from a random sample of 10⁶
  entries (with replacement, from the unseeded global generator) for larger tensors, so
  its masks of embeddings and MLP weights change from run to run; graft's do not.
* Computed in float32. mergekit computes in the recipe's ``dtype``: with ``bfloat16``
  (its example recipe) softmax, KL, importance and threshold are all bf16, with 8
  significant bits (a 256×1024 weight gets about 1,600 distinct importances), and the
  mask moves: on such a tensor with delta RMS 1e-3 mergekit kept 7.9% of the entries
  where the float32 computation keeps 5.9%. Its mask is float32 (``.float()``), which
  promotes the result: under ``dtype: bfloat16`` mergekit writes every merged tensor in
  float32 (twice the size the recipe asks for); graft writes the recipe's dtype.
* Exactly one model besides the base; not symmetric in the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._select import kth_largest
from graft.merge._spec import MethodSpec

_PROB_EPS = 1e-8


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Step 1: ``|θ₁ − θ₀|`` times the row-wise KL of the two softmaxes."""
    p = torch.softmax(model, dim=-1) + _PROB_EPS
    q = torch.softmax(base, dim=-1) + _PROB_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Step 2: median + 1.5 × interquartile range, from lower order statistics."""
    flat = importance.reshape(-1)
    n = flat.numel()

    def order_statistic(index: int) -> torch.Tensor:  # 0-based, ascending
        return kth_largest(flat, n - index)

    q1, q2, q3 = (order_statistic((n - 1) * k // 4) for k in (1, 2, 3))
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Keep the fine-tune's entries whose importance reaches the dynamic threshold.

    Args:
        tensors: exactly one tensor (the fine-tune).
        base: the base model's tensor.

    Returns:
        The merged tensor.
    """
    model = tensors[0]
    if model.numel() == 0:
        return model.clone()
    importance = fusion_importance(model, base)
    keep = importance >= fusion_threshold(importance)
    return base + (model - base) * keep


SPEC = MethodSpec(
    name="arcee_fusion",
    fn=arcee_fusion,
    summary="keep the fine-tune's changes whose |delta| x row KL passes median + 1.5 IQR",
    params=(),
    base="required",
    min_models=1,
    max_models=1,
    order_independent=False,
    paper="Arcee AI 2025, Meet MergeKit v0.1: Arcee Fusion (arcee.ai blog)",
)
