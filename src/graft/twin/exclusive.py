"""Twin-Merging's exclusive knowledge: per task ``τₜ = θₜ − θ*`` (θ* the shared expert),
compressed per 2-D tensor by truncated SVD, and the routed mix ``Σₜ wₜ τₜ``.

Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging" (NeurIPS), §3.2 "knowledge modularization". The reference code keeps, per
matrix, the top ``int(density · len(S))`` singular triplets (``sparsify.svd``) with
density = 1 − mask_rate (its GLUE runs: mask_rate 0.9, i.e. 10% of the spectrum).

Conventions that change results:

* ``keep`` is that keep ratio: ``r = ⌊keep · min(out, in)⌋``, at least 1 (the reference
  would keep none below 1/min side); ``rank`` fixes r for every matrix instead. A matrix
  whose smaller side is at most r is stored dense (exact, and no larger than its factors
  would be) — so ``keep: 1`` stores every exclusive part exactly.
* Factors are stored as graft's low-rank patches store them (`graft.delta.lowrank`):
  ``B = U_r S_r^{1/2}`` (out × r) and ``A = S_r^{1/2} V_rᵀ`` (r × in), so τ ≈ B A.
* 1-D tensors (biases, norms) are kept dense; the reference drops biases and the
  classifier from the exclusive parts (and runs each task's own fine-tuned biases), which
  graft does not copy: a bias is as much task knowledge as a matrix and costs little.
* A tensor whose exclusive part is exactly zero is not stored (it reads as zero).
"""

from __future__ import annotations

import torch

from graft.delta.lowrank import lowrank


def exclusive_rank(shape: tuple[int, ...], *, keep: float | None, rank: int | None) -> int:
    """The truncation rank of a matrix of ``shape`` (module docstring)."""
    side = min(shape)
    if rank is not None:
        return min(rank, side)
    return max(1, min(side, int(keep * side)))


def compress_exclusive(
    delta: torch.Tensor,
    *,
    keep: float | None = None,
    rank: int | None = None,
    value_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """One task's float32 exclusive part of one tensor as a patch codec and its parts:
    ``("lowrank", {"B", "A"})`` for a matrix truncated to `exclusive_rank`, else
    ``("dense", {"": delta})``. Give exactly one of ``keep`` and ``rank``."""
    if delta.ndim != 2:
        return "dense", {"": delta.to(value_dtype).cpu()}
    r = exclusive_rank(tuple(delta.shape), keep=keep, rank=rank)
    return lowrank(delta, value_dtype=value_dtype, generator=generator, rank=r)


def as_factors(codec: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the stored matrix, for a 2-D ``lowrank`` or ``dense`` part:
    a dense matrix D becomes ``(I, D)`` or ``(D, I)``, whichever has the smaller inner size
    (exact: multiplying by the identity rounds nothing)."""
    if codec == "lowrank":
        return parts["B"].float(), parts["A"].float()
    d = parts[""].float()
    out, inp = d.shape
    if out <= inp:
        return torch.eye(out, dtype=d.dtype, device=d.device), d
    return d, torch.eye(inp, dtype=d.dtype, device=d.device)


def mix(
    shared: torch.Tensor, exclusives: list[torch.Tensor | None], weights: torch.Tensor
) -> torch.Tensor:
    """``θ* + Σₜ wₜ τₜ`` for one tensor: the paper's dynamic merge, eq. (4), with the
    routing weights ``weights`` (T,) already normalised (a softmax); None is a zero part."""
    out = shared.float().clone()
    for w, tau in zip(weights.tolist(), exclusives, strict=True):
        if tau is not None:
            out.add_(tau.float(), alpha=w)
    return out
