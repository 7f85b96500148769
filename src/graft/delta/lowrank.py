"""Low-rank patches: a truncated SVD of each 2-D delta (the storage behind PortLLM-style
portable patches and LoRA extraction).

Per 2-D tensor δ (out x in): δ ≈ U_r S_r V_rᵀ, stored as ``B = U_r S_r^{1/2}`` (out x r)
and ``A = S_r^{1/2} V_rᵀ`` (r x in), the factor split PEFT's LoRA uses. Other tensors
(norms, biases: 1-D) are kept dense.

Conventions that change results:

* ``rank``: the same r for every 2-D tensor, clamped per tensor: a matrix whose smaller
  side is at most r is stored dense (exact, and no larger than factors of that rank
  would be). ``energy``: per tensor, the smallest r whose singular values keep that
  fraction of ‖δ‖²_F (so different tensors get different ranks). Give exactly one.
* NaN or Inf in a delta is an error (no SVD of it exists), checked where the delta is
  read.
* Matrices whose smaller side exceeds 256 are factorized by randomized SVD (Halko et al.
  2011, Alg. 4.4: 10 oversamples, 2 power iterations) when the rank sought is under a
  quarter of that side, else by full SVD. The Gaussian test matrix comes from the seeded
  per-tensor generator, not torch's global RNG (which `torch.svd_lowrank` uses and which
  threads share), so the patch is the same bytes on every run.
"""

from __future__ import annotations

from typing import Any

import torch

from graft.delta._spec import Compressor

_FULL_SVD_MAX = 256
_OVERSAMPLE = 10
_POWER_ITERS = 2
_ENERGY_START = 64


def truncated_svd(
    a: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r, S_r, Vh_r`` of a float32 matrix, r fixed (``rank``) or by ``energy``."""
    kmax = min(a.shape)
    q = rank + _OVERSAMPLE if rank is not None else _ENERGY_START
    total = float(a.pow(2).sum())
    while kmax > _FULL_SVD_MAX and q < kmax // 4:
        u, s, vh = _randomized_svd(a, q, generator)
        r = rank if rank is not None else _energy_rank(s, total, energy)
        if r is not None and r < q:
            return u[:, :r], s[:r], vh[:r]
        q *= 2
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = rank if rank is not None else _energy_rank(s, total, energy) or kmax
    return u[:, :r], s[:r], vh[:r]


def _energy_rank(s: torch.Tensor, total: float, energy: float | None) -> int | None:
    """Smallest r with sum(s[:r]^2) >= energy * total, or None when s does not get there."""
    if total == 0:
        return 1
    cum = torch.cumsum(s.double().pow(2), 0)
    reached = (cum >= energy * total * (1 - 1e-6)).nonzero()
    return int(reached[0]) + 1 if reached.numel() else None


def _randomized_svd(a: torch.Tensor, q: int, generator: torch.Generator | None):
    omega = torch.randn(a.shape[1], q, generator=generator).to(a.device)
    y = a @ omega
    for _ in range(_POWER_ITERS):
        y = a @ torch.linalg.qr(a.T @ torch.linalg.qr(y).Q).Q
    basis = torch.linalg.qr(y).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ ub, s, vh


def factorize(delta: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the truncated SVD of ``delta``: B = U√S, A = √S Vᵀ."""
    u, s, vh = truncated_svd(delta, **kwargs)
    root = s.sqrt()
    return u * root, root[:, None] * vh


def lowrank(
    delta: torch.Tensor,
    *,
    value_dtype: torch.dtype,
    generator: torch.Generator | None = None,
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode one float32 delta: ``("lowrank", {B, A})`` for 2-D, ``("dense", ...)`` for
    other tensors and for matrices whose smaller side is at most ``rank``."""
    if delta.ndim != 2 or (rank is not None and rank >= min(delta.shape)):
        return "dense", {"": delta.to(value_dtype).cpu()}
    b, a = factorize(delta, rank=rank, energy=energy, generator=generator)
    return "lowrank", {"B": b.to(value_dtype).cpu(), "A": a.to(value_dtype).cpu()}


def _check(p: dict[str, Any]) -> str | None:
    rank, energy = p["rank"], p["energy"]
    if (rank is None) == (energy is None):
        return "lowrank needs exactly one of --rank or --energy"
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        return f"rank must be a positive integer, got {rank!r}"
    if energy is not None and (not isinstance(energy, int | float) or not 0 < energy <= 1):
        return f"energy must be in (0, 1], got {energy!r}"
    return None


def _describe(layout: dict[str, dict], p: dict[str, Any]) -> list[str]:
    dense = [n for n, e in layout.items() if e["codec"] == "dense" and len(e["shape"]) == 2]
    if p["rank"] is None or not dense:
        return []
    return [
        f"{len(dense)} matrices have a side of at most --rank {p['rank']} and are stored "
        f"dense (exact), e.g. {dense[0]}"
    ]


SPEC = Compressor(
    name="lowrank",
    summary="truncated SVD per 2-D tensor (--rank r or --energy e), 1-D tensors dense",
    params={"rank": None, "energy": None, "seed": 0},
    encode=lowrank,
    check=_check,
    uses_seed=True,
    needs_finite=True,
    describe=_describe,
)
