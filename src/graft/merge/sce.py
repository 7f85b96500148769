"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat
Models", arXiv:2408.07990), as mergekit 0.1.5's ``sce`` computes it.

Per tensor, with deltas ``δᵢ = θᵢ − θ₀`` of ``T`` models:

1. **Select** (only when ``select_topk < 1``): the per-entry variance across the models,
   ``var = (1/T) Σᵢ (δᵢ − δ̄)²`` (population variance); keep the
   ``k = int(select_topk · #{var ≠ 0})`` entries with the largest variance in *every*
   delta and zero the rest. Entries where all models moved alike (``var = 0``) are never
   kept, so one model alone (``T = 1``) gives the base.
2. **Calculate**: one weight per model and tensor, ``wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)`` from
   the selected deltas.
3. **Erase**: TIES's sign election on the unweighted selected deltas,
   ``γ = sign(Σᵢ δᵢ)`` (a zero sum counts as +); ``mᵢ = [sign(δᵢ) = γ]`` (zeros never
   agree).
4. ``θ₀ + Σᵢ wᵢmᵢδᵢ / Σᵢ wᵢmᵢ`` per entry (0 where no model agrees).

Conventions that change results:

* mergekit falls back to equal weights ``1/T`` when ``|Σⱼ mean(δⱼ²)| < 1e-6``. That guard
  is absolute on a quantity that scales with the square of the deltas: a fine-tune whose
  deltas have RMS ``5e-4`` (typical of LLM SFT) has ``mean(δ²) ≈ 2.5e-7``, so with two or
  three such models mergekit silently skips step 2. graft uses equal weights only when
  the sum is exactly 0 (every selected delta is zero, and the result is the base anyway).
* mergekit divides step 4 by ``max(Σ wᵢmᵢ, 1e-6)``, which shrinks entries where only a
  model with a weight below 1e-6 agrees; graft divides by the sum itself.
  Both differences vanish for deltas of ordinary size.
* Ties in variance at the selection threshold go to the lower flat index (mergekit:
  ``torch.topk``, unspecified).
* ``int8_mask`` is mergekit's memory option; accepted, no effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._select import top_k_mask
from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import task_vectors


def variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE step 1: the entries with the largest variance across the models.

    Args:
        deltas: ``(T, *shape)`` stack.
        select_topk: fraction of the entries with non-zero variance to keep.

    Returns:
        Boolean mask of shape ``shape``.
    """
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return top_k_mask(var, k, ties="low")


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """SCE step 2: ``mean(δᵢ²)`` per model, normalised to sum to 1 (equal if all zero)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = energy.sum()
    if total == 0:
        return torch.full_like(energy, 1.0 / deltas.shape[0])
    return energy / total


def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Select by variance, weight by delta energy, erase minority signs.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        select_topk: fraction of (non-zero-variance) entries kept; 1 keeps all.
        int8_mask: accepted for mergekit recipes; no effect.

    Returns:
        The merged tensor.
    """
    deltas = task_vectors(tensors, base)
    if select_topk < 1:
        deltas.mul_(variance_mask(deltas, select_topk))
    gamma = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = deltas.sign() == gamma
    weights = sce_weights(deltas).view(-1, *([1] * (deltas.dim() - 1))) * agree
    divisor = weights.sum(dim=0)
    merged = (deltas * weights).sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)
    return merged.add_(base)


def _fraction(value: float) -> str | None:
    if not (0.0 <= value <= 1.0):
        return f"select_topk must be in [0, 1], got {value}; use e.g. select_topk: 0.5"
    return None


SPEC = MethodSpec(
    name="sce",
    fn=sce,
    summary="select high-variance entries, weight models by delta energy, TIES sign erase",
    params=(
        Param(
            "select_topk",
            float,
            1.0,
            doc="fraction of entries kept by variance across models (1 = no selection)",
            check=_fraction,
        ),
        Param(
            "int8_mask",
            bool,
            False,
            doc="mergekit memory option; accepted, no effect on the result",
        ),
    ),
    base="required",
    paper="Wan et al. 2024, FuseChat (SCE, arXiv:2408.07990)",
)
