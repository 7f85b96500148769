"""The fused TIES-family kernel (graft.merge._fused) against the pure-torch path, bit for bit.

Every case runs a method twice on the same inputs, once with the compiled kernel and once
with ``GRAFT_FUSED=0`` (the torch path), and compares the float32 results' bit patterns.
The inputs are built to hit what a careless kernel gets wrong: many equal |δ| (so the
trim threshold has ties to break by flat index), zeros and negative zeros, deltas that
overflow to ±inf in float32, odd sizes, mixed weights and densities, and bf16/fp16/fp32.
"""

from __future__ import annotations

import pytest
import torch

from graft.merge import _fused
from graft.merge.breadcrumbs import breadcrumbs_ties
from graft.merge.dare import dare_mask, dare_ties
from graft.merge.della import della, della_keep_probs
from graft.merge.ties import ties

pytestmark = pytest.mark.skipif(
    _fused.library() is None, reason="no C compiler: the fused kernel is not built"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _family(shape, dtype, models, seed, *, extreme=False):
    """A base and fine-tunes whose deltas are small multiples of one step: heavy ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    base[..., ::7] = 0.0
    base[..., 1::11] = -0.0
    fts = []
    for _ in range(models):
        steps = torch.randint(-3, 4, shape, generator=g).float()
        ft = base + steps * 0.0625
        ft[..., 2::13] = -0.0  # negative zero against zero / nonzero bases
        if extreme:  # opposite huge values: ft - base overflows to ±inf in float32
            big = torch.finfo(dtype).max
            ft[..., 3::17] = big
            base_copy = base.clone()
            base_copy[..., 3::17] = -big
            base = base_copy
        fts.append(ft.to(dtype))
    return fts, base.to(dtype)


def _both(fn, *args, monkeypatch, **kwargs):
    gen = kwargs.pop("seed", None)
    if gen is not None:
        kwargs["generator"] = torch.Generator().manual_seed(gen)
    fused = fn(*args, **kwargs)
    monkeypatch.setenv("GRAFT_FUSED", "0")
    if gen is not None:
        kwargs["generator"] = torch.Generator().manual_seed(gen)
    plain = fn(*args, **kwargs)
    monkeypatch.delenv("GRAFT_FUSED")
    return fused, plain


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (
        f"{int((a.view(torch.int32) != b.view(torch.int32)).sum())} of {a.numel()} differ"
    )


CASES = [
    # shape, models, weights, densities, normalize, lambda
    ((257, 33), 3, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True, 1.0),
    ((1001,), 3, [1.0, 0.6, 0.3], [0.5, 0.7, 0.3], True, 1.0),
    ((64, 129), 2, [0.5, 0.5], [0.2, 1.0], False, 0.7),
    ((97, 101), 5, [0.3, 0.5, 1.0, -0.2, 0.7], [0.9, 0.1, 0.5, 0.5, 0.4], True, 1.3),
    ((7,), 4, [1.0, 1.0, 1.0, 1.0], [0.1, 0.3, 0.5, 1.0], True, 1.0),  # k = 0 for one model
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("extreme", [False, True], ids=["plain", "overflow"])
def test_ties_fused_is_the_torch_path(case, dtype, extreme, monkeypatch):
    shape, models, weights, densities, normalize, scale = case
    fts, base = _family(shape, dtype, models, seed=len(shape) + models, extreme=extreme)
    fused, plain = _both(
        ties, fts, base, weight=weights, density=densities, normalize=normalize, scale=scale,
        monkeypatch=monkeypatch,
    )  # fmt: skip
    _same_bits(fused, plain)
    if not extreme:
        assert torch.isfinite(fused).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_dare_ties_fused_is_the_torch_path(case, dtype, monkeypatch):
    shape, models, weights, densities, normalize, scale = case
    fts, base = _family(shape, dtype, models, seed=3)
    for rescale in (True, False):
        fused, plain = _both(
            dare_ties, fts, base, weight=weights, density=densities, normalize=normalize,
            scale=scale, rescale=rescale, seed=11, monkeypatch=monkeypatch,
        )  # fmt: skip
        _same_bits(fused, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_breadcrumbs_ties_fused_is_the_torch_path(case, dtype, monkeypatch):
    shape, models, weights, densities, normalize, scale = case
    fts, base = _family(shape, dtype, models, seed=5)
    for gamma in (0.0, 0.01, 0.3, 0.9):  # 0.9: fewer outliers so density still remains
        fused, plain = _both(
            breadcrumbs_ties, fts, base, weight=weights, density=densities,
            gamma=[gamma] * models, normalize=normalize, scale=scale, monkeypatch=monkeypatch,
        )  # fmt: skip
        _same_bits(fused, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(257, 33), (1001,), (5, 1), (3, 4, 5)], ids=str)
def test_della_fused_is_the_torch_path(shape, dtype, monkeypatch):
    fts, base = _family(shape, dtype, 3, seed=9)
    for rescale in (True, False):
        fused, plain = _both(
            della, fts, base, weight=[1.0, 0.5, 0.8], density=[0.5, 0.4, 1.0],
            epsilon=[0.1, 0.3, 0.2], rescale=rescale, seed=4, monkeypatch=monkeypatch,
        )  # fmt: skip
        _same_bits(fused, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_della_probs_are_the_argsort_ranks(dtype):
    fts, base = _family((33, 257), dtype, 1, seed=2)
    want = della_keep_probs(fts[0].float() - base.float(), 0.4, 0.15)
    got = _fused.della_probs(fts[0], base, 0.4, 0.15)
    _same_bits(got, want)


def test_dare_mask_slices_are_one_draw():
    """dare_mask draws in slices; the result is one torch.rand of the whole shape."""
    n = (1 << 20) + 12345  # more than one slice, and a ragged last one
    want = torch.rand(n, generator=torch.Generator().manual_seed(7)) < 0.3
    got = dare_mask(torch.Size([n]), 0.3, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert torch.equal(got, want)


def test_trim_keeps_exactly_k_with_ties_to_the_lower_index():
    """Hand-checked: |δ| = 3,1,2,2,2,0 at density 0.5 keeps 3 and the first two 2s."""
    base = torch.zeros(6)
    ft = torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 0.0])
    out = ties([ft], base, weight=[1.0], density=[0.5])
    assert out.tolist() == [3.0, 0.0, 2.0, -2.0, 0.0, 0.0]


def test_non_finite_input_falls_back(monkeypatch):
    base = torch.zeros(100)
    ft = torch.linspace(-1, 1, 100)
    ft[5] = float("nan")
    out = ties([ft, -ft], base, weight=[1.0, 1.0], density=[0.5, 0.5])
    monkeypatch.setenv("GRAFT_FUSED", "0")
    ref = ties([ft, -ft], base, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
