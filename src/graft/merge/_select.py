"""Exact top-k selection by magnitude in linear time, for the trim steps.

Sorting a 32M-entry tensor to keep its top half takes seconds; the merge only needs the
k-th largest value. We bracket it with quantiles of a fixed random sample, count what
lies above the bracket, and select exactly inside the (small) bracket; when the bracket
misses, an exact ``kthvalue`` over everything is the fallback. The result is identical
to a stable sort's, including which of several equal magnitudes are kept.
"""

from __future__ import annotations

from typing import Literal

import torch

_SMALL = 1 << 16  # below this, kthvalue over everything is fast enough
_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= numel), as a 0-d tensor."""
    n = values.numel()
    if n <= _SMALL:
        return values.kthvalue(n - k + 1).values
    # The sample is fixed (seeded, on the values' device) so results never depend on it:
    # it only decides how much work the exact step does.
    gen = torch.Generator(device=values.device).manual_seed(0)
    idx = torch.randint(n, (_SAMPLE,), generator=gen, device=values.device)
    sample = values[idx]
    q = 1 - k / n  # the target's quantile
    slack = 5 * (q * (1 - q) / _SAMPLE) ** 0.5 + 2 / _SAMPLE
    lo_rank, hi_rank = int((q - slack) * _SAMPLE), int((q + slack) * _SAMPLE) + 1
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else None
    hi = sample.kthvalue(hi_rank).values if hi_rank <= _SAMPLE else None
    above = 0 if hi is None else int(torch.count_nonzero(values > hi))
    if above < k:
        inside = torch.ones_like(values, dtype=torch.bool) if lo is None else values >= lo
        if hi is not None:
            inside &= values <= hi
        cand = values[inside]
        need = k - above
        if need <= cand.numel():
            return cand.kthvalue(cand.numel() - need + 1).values
    return values.kthvalue(n - k + 1).values


def top_k_mask(
    values: torch.Tensor, k: int, *, ties: Literal["low", "high"] = "low"
) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``values`` (any shape).

    Args:
        values: the scores (e.g. magnitudes).
        k: how many to keep; ``k <= 0`` keeps none, ``k >= numel`` keeps all.
        ties: among entries equal to the k-th largest, keep those with the lowest flat
            index (``"low"``, as a stable descending sort) or the highest (``"high"``, as
            the top of a stable ascending sort).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    thr = kth_largest(flat, k)
    keep = flat > thr
    short = k - int(torch.count_nonzero(keep))
    if short > 0:
        equal = (flat == thr).nonzero().squeeze(1)
        keep[equal[:short] if ties == "low" else equal[equal.numel() - short :]] = True
    return keep.view_as(values)
