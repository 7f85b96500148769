"""RAM: Reinforced Agent Merging, and its tensor-local RAM+ (arXiv:2601.13572, as
mergekit 0.1.5's ``ram`` and ``ramplus_tl`` compute them).

Per tensor, with deltas ``δᵢ = θᵢ − θ₀``: an entry of model i is *active* when
``|δᵢ| > epsilon``; ``c`` = the number of models active at that entry.

* ``ram``: ``θ₀ + Σᵢ aᵢδᵢ / max(c, 1)``: inactive entries keep the base, an entry only one
  model changed (*unique*) takes that change whole, an entry several changed (*shared*)
  takes the mean of their changes. Changes of at most ``epsilon`` are dropped even where
  another model is active.
* ``ramplus_tl`` (RAM+, tensor-local): unique changes are scaled by
  ``λᵢ = 1 + r·clip(ρᵢ, 0, alpha)`` with ``ρᵢ = Sᵢ / max(Uᵢ, epsilon)``, where ``Sᵢ`` and
  ``Uᵢ`` count model i's shared and unique entries *in this tensor* (the paper counts
  over the whole model; mergekit computes it per tensor, hence "tl"). Shared entries are
  averaged as in ``ram``. The defaults (``r = 0.1``, ``alpha = 0.2``) bound ``λ`` to
  ``[1, 1.02]``.

Conventions that change results:

* ``epsilon`` is absolute (weight units), default 1e-5. For bf16 checkpoints, whose
  spacing near 1e-3 is about 4e-6, one-ulp changes count as inactive.
* Averaging shared entries is unweighted; there is no ``weight`` (as mergekit).
* With ``epsilon: 0`` mergekit's ``ramplus_tl`` returns NaN for a whole tensor in which
  some model has neither unique nor shared entries (``ρ = 0/0``, and ``0·NaN`` spreads in
  the sum); a model without unique entries has no ``λ`` to apply, and graft takes
  ``ρ = 0`` there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import task_vectors


def _active(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(which entries each model changes by more than epsilon, how many models do)."""
    active = deltas.abs() > epsilon
    return active, active.sum(dim=0)


def ram(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5
) -> torch.Tensor:
    """Keep unique changes whole, average shared ones.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        epsilon: a change of at most this magnitude counts as none.

    Returns:
        The merged tensor.
    """
    deltas = task_vectors(tensors, base)
    active, count = _active(deltas, epsilon)
    merged = (deltas * active).sum(dim=0) / count.clamp(min=1)
    return merged.add_(base)


def unique_scale(
    active: torch.Tensor, count: torch.Tensor, *, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """RAM+'s ``λᵢ = 1 + r·clip(Sᵢ/max(Uᵢ, ε), 0, alpha)`` per model, from one tensor."""
    flat = active.reshape(active.shape[0], -1)
    shared = (flat & (count.reshape(-1) > 1)).sum(dim=1).to(torch.float64)
    unique = (flat & (count.reshape(-1) == 1)).sum(dim=1).to(torch.float64)
    rho = torch.where(unique > 0, shared / unique.clamp(min=epsilon), 0.0)
    return 1 + r * rho.clamp(min=0, max=alpha)


def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM with unique changes amplified by each model's shared/unique ratio.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        r: rescaling strength.
        alpha: upper clip of the shared/unique ratio.
        epsilon: a change of at most this magnitude counts as none.

    Returns:
        The merged tensor.
    """
    deltas = task_vectors(tensors, base)
    active, count = _active(deltas, epsilon)
    lam = unique_scale(active, count, r=r, alpha=alpha, epsilon=epsilon).to(deltas.dtype)
    lam = lam.view(-1, *([1] * (deltas.dim() - 1)))
    unique = count == 1
    scale = torch.where(unique, lam, 1 / count.clamp(min=1).to(deltas.dtype))
    merged = (deltas * active * scale).sum(dim=0)
    return merged.add_(base)


def _non_negative(name: str):
    def check(value: float) -> str | None:
        return None if value >= 0 else f"{name} must be >= 0, got {value}"

    return check


_EPSILON = Param(
    "epsilon",
    float,
    1e-5,
    doc="changes of at most this magnitude count as none",
    check=_non_negative("epsilon"),
)

RAM_SPEC = MethodSpec(
    name="ram",
    fn=ram,
    summary="keep changes only one model made, average those several made",
    params=(_EPSILON,),
    base="required",
    paper="Reinforced Agent Merging (RAM, arXiv:2601.13572)",
)

RAMPLUS_TL_SPEC = MethodSpec(
    name="ramplus_tl",
    fn=ramplus_tl,
    summary="RAM with unique changes scaled up by the tensor's shared/unique ratio",
    params=(
        Param("r", float, 0.1, doc="rescaling strength of unique changes"),
        Param(
            "alpha",
            float,
            0.2,
            doc="upper clip of the shared/unique ratio",
            check=_non_negative("alpha"),
        ),
        _EPSILON,
    ),
    base="required",
    paper="Reinforced Agent Merging (RAM+, arXiv:2601.13572), tensor-local as mergekit",
)
