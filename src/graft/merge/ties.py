"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS).

Per tensor, with ``δᵢ = θᵢ − θ₀``:

1. **Trim**: keep the ``k = int(density·numel)`` entries of ``δᵢ`` with the largest
   ``|δᵢ|`` (top-k per tensor, not over the whole model); ``k = 0`` keeps nothing.
   Ties in magnitude go to the lower flat index.
2. **Elect**: ``γ = sign(Σᵢ wᵢ trim(δᵢ))``; a zero sum counts as ``+``.
3. **Disjoint merge** over the entries whose sign of ``wᵢ trim(δᵢ)`` equals ``γ``:
   mean form ``Σ wᵢmᵢ trim(δᵢ) / Σ wᵢmᵢ`` (a zero divisor becomes 1) when ``normalize``
   (the default: the paper's mean, as in mergekit); sum form ``Σ wᵢmᵢ trim(δᵢ)`` when not
   (FusionBench's default). The right ``lambda`` differs between the forms by roughly the
   number of agreeing models.
4. ``θ₀ + λ·merged``.

Conventions that change results:

* mergekit keeps at least one entry (``k = max(1, ...)``); graft keeps ``int(density·numel)``
  exactly, so a tiny tensor at low density is left at the base.
* ``rescale: true`` (default false) scales each trimmed delta to the L1 norm of the
  untrimmed one, as mergekit does.
* ``int8_mask`` is mergekit's memory option for the sign mask; it is accepted and does not
  change the result.
* Computed in float32: bfloat16 / float16 inputs are widened first (the engine passes them
  as stored, and the fused kernel of :mod:`graft.merge._fused` widens chunk by chunk).
  Without ``rescale`` or consensus the fused kernel runs where it applies; the torch path
  below gives the same bytes.

Consensus TIES (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
and Compression", ICML), off unless ``consensus_k`` is set: after step 3, zero the entries
of the merged delta ``τ`` on which fewer than ``consensus_k`` tasks' TALL masks
``|δₜ| > tall_mask_lambda·|τ − δₜ|`` are on, then step 4. ``δₜ`` is the raw delta (untrimmed,
unweighted) and ``τ`` this method's own merge before ``lambda``, as the reference code
builds its TIES masks from its TIES merge (which is the sum form, ``normalize: false``,
at density 0.2). Defaults and details as in :mod:`graft.merge.task_arithmetic`;
``consensus_k: 0`` (the default) is plain TIES, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge import _fused
from graft.merge._select import top_k_mask
from graft.merge._spec import MethodSpec
from graft.merge._task_vectors import (
    combine,
    family_params,
    finish,
    l1_rescale,
    per_model,
    task_vectors,
    widen,
)
from graft.merge.task_arithmetic import consensus_mask, consensus_params


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ``int(density·numel)`` largest-magnitude entries.

    Args:
        delta: one model's delta.
        density: fraction to keep; ``>= 1`` returns ``delta`` itself.

    Returns:
        ``delta`` with all other entries set to zero.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    return delta * top_k_mask(delta.abs(), k, ties="low")


def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
    consensus_k: int = 0,
    tall_mask_lambda: float = 0.6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Trim, elect sign, disjoint merge.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, fraction of entries kept by the trim (default 1.0).
        normalize: disjoint mean (true) or disjoint sum (false).
        rescale: scale each trimmed delta back to its untrimmed L1 norm.
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        consensus_k: consensus merging's minimum TALL-mask count; 0 turns it off.
        tall_mask_lambda: the TALL masks' threshold.
        out_dtype: the result's dtype (default float32), rounded as a cast rounds.

    Returns:
        The merged tensor.
    """
    densities = per_model(density, len(tensors), 1.0)
    if not rescale and consensus_k <= 0:
        n = base.numel()
        sparse = [_trim(p, n) for p in densities]
        out = _fused.merge(
            tensors, base, sparse, weight=weight, normalize=normalize, scale=scale,
            out_dtype=out_dtype,
        )  # fmt: skip
        if out is not None:
            return out
    tensors, base = widen(tensors, base)
    deltas = task_vectors(tensors, base)
    for i, p in enumerate(densities):
        if rescale and p < 1:
            deltas[i] = l1_rescale(magnitude_trim(deltas[i], p), deltas[i])
        elif p < 1:
            k = int(p * deltas[i].numel())
            deltas[i].mul_(top_k_mask(deltas[i].abs(), k, ties="low"))  # trim in place
    merged = combine(deltas, weight, elect=True, normalize=normalize)
    del deltas  # free the stack before the consensus masks' temporaries
    if consensus_k > 0:
        keep = consensus_mask(
            tensors, base, merged, consensus_k=consensus_k, tall_mask_lambda=tall_mask_lambda
        )
        merged.masked_fill_(~keep, 0.0)
    return finish(base, merged, scale, out_dtype)


def _trim(density: float, n: int) -> _fused.Sparsifier:
    """The fused kernel's form of `magnitude_trim` (``delta * mask``, as the torch path)."""
    if density >= 1:
        return _fused.Sparsifier(_fused.DENSE)
    k = int(density * n)
    return _fused.Sparsifier(_fused.TOPK_MUL if k > 0 else _fused.ZERO_MUL, k=k)


SPEC = MethodSpec(
    name="ties",
    fn=ties,
    summary="trim small deltas, elect a sign per entry, average the agreeing ones",
    params=family_params(
        normalize=True,
        rescale=False,
        rescale_doc="scale each trimmed delta to its untrimmed L1 norm (mergekit)",
    )
    + consensus_params(),
    base="required",
    native_inputs=True,
    native_output=True,
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
)
