"""Linear-time top-k equals a stable sort's choice, ties included, on both code paths."""

import pytest
import torch

from graft.merge._select import kth_largest, top_k_mask


def _sorted_mask(values, k, ties):
    flat = values.reshape(-1)
    if ties == "low":
        order = torch.argsort(flat, descending=True, stable=True)[:k]
    else:
        order = torch.argsort(flat, stable=True)[flat.numel() - k :]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(values)


@pytest.mark.parametrize("n", [1000, (1 << 20) + 12345])  # small path and bracketed path
@pytest.mark.parametrize("kind", ["ties", "continuous"])
@pytest.mark.parametrize("frac", [0.0001, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("ties", ["low", "high"])
def test_top_k_mask_matches_stable_sort(n, kind, frac, ties):
    g = torch.Generator().manual_seed(n + int(frac * 1e4))
    if kind == "ties":
        values = torch.randint(0, 7, (n,), generator=g).float()
    else:
        values = torch.randn(n, generator=g).abs()
    k = max(1, int(frac * n))
    mask = top_k_mask(values, k, ties=ties)
    assert int(mask.sum()) == k
    assert torch.equal(mask, _sorted_mask(values, k, ties))


def test_kth_largest_extremes():
    v = torch.arange(2_000_000, dtype=torch.float32)
    assert kth_largest(v, 1) == 1_999_999
    assert kth_largest(v, 2_000_000) == 0
    assert kth_largest(v, 1_000_000) == 1_000_000
