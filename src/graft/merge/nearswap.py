"""NearSwap: take the model's value where it is near the base, move toward it by at most
``t`` elsewhere (mergekit's ``nearswap``; alchemonaut, QuartetAnemoi-70B-t0.0001 model
card, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Per entry, with base ``a`` and model ``b``:
``w = clamp(t / max(|a − b|, 1e-6), 0, 1)`` and the result ``w·b + (1 − w)·a``.

So where ``|b − a| ≤ t`` the result is the model's value ``b``; where ``|b − a| > t`` it
is *not* the base but the base moved by exactly ``t`` toward the model,
``a + t·sign(b − a)``. In closed form, ``a + clamp(b − a, −t, t)``.

Conventions that change results (as mergekit 0.1.5, ``nearswap_merge``):

* ``t`` is an absolute distance in weight units (mergekit's example uses 1e-4); ``t ≤ 0``
  returns the base.
* The 1e-6 floor on ``|a − b|`` is mergekit's: for ``t < 1e-6`` entries closer than 1e-6
  move only ``t/1e-6`` of the way instead of all of it.
* Exactly one model besides the base; not symmetric in the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param

_DISTANCE_FLOOR = 1e-6


def nearswap(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Swap in the model's entries that lie within ``t`` of the base.

    Args:
        tensors: exactly one tensor (the non-base model).
        base: the base model's tensor.
        t: distance threshold.

    Returns:
        The merged tensor.
    """
    model = tensors[0]
    weight = (float(t) / (base - model).abs().clamp(min=_DISTANCE_FLOOR)).clamp(0, 1)
    return weight * model + (1 - weight) * base


SPEC = MethodSpec(
    name="nearswap",
    fn=nearswap,
    summary="take the model's entries within t of the base; move the others t toward it",
    params=(Param("t", float, REQUIRED, doc="distance threshold, in weight units (e.g. 1e-4)"),),
    base="required",
    min_models=1,
    max_models=1,
    order_independent=False,
    paper="mergekit NearSwap (alchemonaut, QuartetAnemoi-70B-t0.0001 model card)",
)
