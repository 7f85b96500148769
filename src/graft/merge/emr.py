"""EMR-Merging (Huang et al. 2024, "EMR-Merging: Tuning-Free High-Performance Model
Merging", NeurIPS): one unified task vector plus a light modulator per task.

Per tensor, with ``δᵢ = θᵢ − θ₀`` and ``T`` models:

1. **Elect**: the sign ``γ = sign(Σᵢ δᵢ)``, a zero sum counting as ``−`` (the reference's
   ``(sum > 0)·2 − 1``); the magnitude ``ε = maxᵢ |δᵢ|`` over the models whose ``δᵢ`` has
   sign ``γ`` (0 where none has); ``τ_uni = γ·ε``.
2. **Mask**: per task ``Mᵢ = (δᵢ ⊙ τ_uni > 0)``, the entries where task ``i`` agrees with
   the elected sign.
3. **Rescale**: per task one scalar over the whole model,
   ``λᵢ = Σₙ mean|δᵢ,ₙ| / Σₙ mean|Mᵢ,ₙ ⊙ τ_uni,ₙ|``, summing over the merged tensors ``n``
   a per-tensor *mean* (each tensor counts alike, whatever its size), as the reference
   code does.

Task ``i``'s model is ``θ₀ + λᵢ·Mᵢ ⊙ τ_uni``. There is no single merged model: EMR judges
each task with its own modulated model, and so does graft's benchmark.

What graft does with it:

* The method function (what `graft merge`'s engine, searches and soups call per tensor)
  returns the **unified model** ``θ₀ + τ_uni``, a shared model that is not one of EMR's
  task models.
* ``graft merge`` with ``merge_method: emr`` also writes the modulators (masks as bits,
  one λ per task) next to the unified model, as patches `graft apply` reads; see
  :mod:`graft.delta.emr` and docs/methods.md for the folder's format. λ needs every
  tensor, so it is computed after the pass, from per-tensor sums kept in output order.

Conventions that change results (reference: ``emr_merge`` in harveyhuang18/EMR_Merging,
``merge_vit/src/main_emr_merging.py``, and FusionBench's ``emr_merging/utils.py``):

* A zero entry of ``Σᵢ δᵢ`` elects ``−``: negative deltas there agree, positive ones not.
* Every float tensor is merged and counts in λ (1-D ones included); non-float tensors are
  copied from the base, as everywhere in graft. A task whose masked unified vector is
  zero everywhere gets λ = 1 (its modulated delta is zero whatever λ).
* No weights and no scale: EMR is tuning-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec
from graft.merge._task_vectors import finish


def elect(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Step 1: ``τ_uni``, the elected sign times the largest agreeing magnitude."""
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d)
    sign = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    magnitude = total.zero_()  # reuse the buffer: |δᵢ| where δᵢ agrees with the sign, else 0
    for d in deltas:
        torch.maximum(magnitude, (d * sign).clamp_(min=0), out=magnitude)
    return magnitude.mul_(sign)


def masks(deltas: Sequence[torch.Tensor], unified: torch.Tensor) -> list[torch.Tensor]:
    """Step 2: ``Mᵢ = (δᵢ ⊙ τ_uni > 0)`` per task (boolean tensors)."""
    return [(d * unified) > 0 for d in deltas]


def rescale_terms(
    deltas: Sequence[torch.Tensor], unified: torch.Tensor, task_masks: Sequence[torch.Tensor]
) -> tuple[list[float], list[float]]:
    """Step 3's per-tensor terms: ``mean|δᵢ|`` and ``mean|Mᵢ ⊙ τ_uni|`` per task (float64
    sums; empty tensors give 0)."""
    n = max(unified.numel(), 1)
    magnitude = unified.abs()
    kept = [float(magnitude[m].sum(dtype=torch.float64)) / n for m in task_masks]
    return [float(d.abs().sum(dtype=torch.float64)) / n for d in deltas], kept


def rescalers(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> list[float]:
    """Step 3: ``λᵢ = Σₙ beforeₙ[i] / Σₙ afterₙ[i]`` over tensors ``n`` (1 where the
    denominator is 0); sums run in the order given, so the result does not depend on
    which thread finished first."""
    count = len(before[0]) if before else 0
    out = []
    for i in range(count):
        num = sum(b[i] for b in before)
        den = sum(a[i] for a in after)
        out.append(num / den if den > 0 else 1.0)
    return out


def task_delta(unified: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Task ``i``'s delta ``λᵢ·Mᵢ ⊙ τ_uni`` (float32 math, as `graft apply` decodes it)."""
    return unified.float() * mask * torch.tensor(scale, dtype=torch.float32)


def emr(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The unified model ``θ₀ + τ_uni`` (step 1); the per-task masks and rescalers are
    written by `graft merge` (`graft.delta.emr`).

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.

    Returns:
        ``θ₀ + τ_uni``.
    """
    return finish(base, elect([t - base for t in tensors]), 1.0)


SPEC = MethodSpec(
    name="emr",
    fn=emr,
    summary="elect a unified delta; graft merge also writes per-task masks and rescalers",
    params=(),
    base="required",
    paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging "
    "(NeurIPS 2024, arXiv:2405.17461)",
)
