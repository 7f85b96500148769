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


def _rows(kind, rows, cols, g):
    """Deltas that take each of the kernel's rank paths (value buckets, the radix sort)."""
    x = torch.randn(rows, cols, generator=g)
    if kind == "cubed":  # heavy tails crowd the low buckets: the radix sort's rows
        return x**3
    if kind == "mixed":  # heavy rows, then ordinary ones: buckets are tried again
        x[: rows // 2] = x[: rows // 2] ** 5
        return x
    if kind == "steps":  # few distinct values, long runs of equal |d| in one bucket
        return torch.randint(-4, 5, (rows, cols), generator=g).float() * 0.125
    if kind == "outlier":  # one huge entry per row squeezes the rest into a few buckets
        x[:, cols // 2] = 1e30
        return x
    if kind == "special":  # an all-zero row, subnormals (the test adds an inf delta)
        x[0] = 0.0
        x[2] = x[2] * 1e-40
        return x
    return x  # gaussian: distinct values, a few per bucket out of order


@pytest.mark.parametrize("kind", ["gaussian", "cubed", "mixed", "steps", "outlier", "special"])
@pytest.mark.parametrize("cols", [1, 2, 7, 1024, 1031])
def test_della_probs_ranks_on_every_path(kind, cols):
    """The kernel's ranks are torch's stable argsort ranks whichever way it sorts a row."""
    g = torch.Generator().manual_seed(cols)
    rows = 80  # more than 32: rows after four give-ups, and the 32nd row's retry
    delta = _rows(kind, rows, cols, g)
    base = torch.randn(rows, cols, generator=g).mul(0.01)
    ft = base + delta
    if kind == "special":  # finite inputs whose float32 difference overflows to inf
        ft[1, -1], base[1, -1] = torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max
    d = ft - base  # what the kernel ranks: the float32 difference of the stored inputs
    want = della_keep_probs(d, 0.5, 0.2)
    got = _fused.della_probs(ft, base, 0.5, 0.2)
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


def _all_float32_edges() -> torch.Tensor:
    """Random float32 bit patterns plus every pattern near the bfloat16 / float16 rounding
    edges: float16's subnormal range and its 2^-25 cut, the smallest normal, the overflow
    cut at 65520, the float32 maximum, tiny float32 subnormals; both signs, all finite."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g).to(torch.int32)
    spans = [
        (0x33000000 - 3000, 0x33000000 + 3000),
        (0x38800000 - 40000, 0x38800000 + 40000),
        (0x477FE000, 0x47800010),
        (0, 100000),
        (0x7F7F0000, 0x7F7FFFFF),
    ]
    parts = [bits.view(torch.float32)]
    for lo, hi in spans:
        r = torch.arange(lo, hi, dtype=torch.int64).to(torch.int32).view(torch.float32)
        parts += [r, -r]
    x = torch.cat(parts)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_narrowed_output_rounds_as_torch_casts(dtype):
    """With out_dtype the kernel rounds each float32 result itself: bit for bit torch's
    cast, over random patterns and every pattern near the rounding edges (a zero base and
    one dense model make the float32 result the input itself)."""
    x = _all_float32_edges()
    base = torch.zeros_like(x)
    dense = [_fused.Sparsifier(_fused.DENSE)]
    wide = _fused.merge([x], base, dense, weight=[1.0], normalize=False, scale=1.0)
    assert torch.equal(wide.view(torch.int32), (x + 0.0).view(torch.int32))
    narrow = _fused.merge(
        [x], base, dense, weight=[1.0], normalize=False, scale=1.0, out_dtype=dtype
    )
    assert narrow.dtype == dtype
    want = wide.to(dtype).view(torch.int16)
    bad = narrow.view(torch.int16) != want
    assert not bad.any(), f"{int(bad.sum())} of {x.numel()} rounded differently"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}x{c[1]}")
def test_methods_narrow_as_the_torch_path_casts(case, dtype, monkeypatch):
    """The TIES family with out_dtype (the engine passes the dtype it writes): the fused
    result is the torch path's float32 result cast, bit for bit, even where deltas
    overflow."""
    shape, models, weights, densities, normalize, scale = case
    fts, base = _family(shape, dtype, models, seed=21, extreme=True)
    for out_dtype in (torch.bfloat16, torch.float16):
        fused, plain = _both(
            ties, fts, base, weight=weights, density=densities, normalize=normalize,
            scale=scale, out_dtype=out_dtype, monkeypatch=monkeypatch,
        )  # fmt: skip
        assert fused.dtype == plain.dtype == out_dtype
        assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))
        fused, plain = _both(
            della, fts, base, weight=weights, density=densities, normalize=normalize,
            scale=scale, out_dtype=out_dtype, seed=3, monkeypatch=monkeypatch,
        )  # fmt: skip
        assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))


def test_nan_result_is_cast_by_torch(monkeypatch):
    """Finite inputs can still give NaN (δ = +inf times λ = 0). NaN has no single bfloat16
    encoding across torch's casts, so the kernel hands such a tensor to torch's cast."""
    big = torch.finfo(torch.float32).max
    base = torch.tensor([-big, 0.0, 1.0, -big])
    ft = torch.tensor([big, 1.0, -1.0, big])
    fused, plain = _both(
        ties, [ft], base, weight=[1.0], density=[1.0], normalize=False, scale=0.0,
        out_dtype=torch.bfloat16, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert fused.float().isnan().tolist() == [True, False, False, True]
    assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_finite_reads_the_stored_bits(dtype):
    t = torch.randn(4099).to(dtype)
    t[17] = torch.finfo(dtype).max
    assert _fused.all_finite(t) is True
    for bad in (float("inf"), -float("inf"), float("nan")):
        u = t.clone()
        u[4098] = bad  # the last entry: no tail is skipped
        assert _fused.all_finite(u) is False
    assert _fused.all_finite(t[::2]) is None  # not contiguous: the caller's torch check
    assert _fused.all_finite(t.double()) is None


@pytest.mark.parametrize(
    "seed, skip, n",
    [(0, 0, 0), (0, 0, 1), (3, 0, 623), (3, 0, 624), (3, 0, 625), (5, 1, 5000), (9, 700, 1249)],
)
def test_keep_mask_is_torch_rand_from_the_same_state(seed, skip, n):
    """keep_mask draws torch.rand's uniforms from the generator's own MT19937 state: the
    same mask, the generator left where torch.rand leaves it (the next draws agree), for
    fresh and advanced generators and lengths around the 624-word refill."""
    ref, mine = _fused.twin_generators(seed, skip)
    probs = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100))
    for p, pr in ((0.3, None), (0.0, None), (1.0, None), (0.0, probs)):
        want = torch.rand(n, generator=ref) < (p if pr is None else pr)
        got = _fused.keep_mask(n, mine, p, pr)
        assert got is not None and got.dtype == torch.bool
        assert torch.equal(got, want)
        assert torch.equal(mine.get_state(), ref.get_state())
    assert torch.equal(torch.rand(7, generator=mine), torch.rand(7, generator=ref))


def test_keep_mask_falls_back_when_the_state_is_not_recognised(monkeypatch):
    """If the once-per-process check against torch.rand fails (a torch build with another
    generator), keep_mask declines and DARE draws with torch: the same mask either way."""
    monkeypatch.setitem(_fused._state, "mt", False)
    assert _fused.keep_mask(10, torch.Generator().manual_seed(1), 0.5) is None
    got = dare_mask(
        torch.Size([3, 500]), 0.4, torch.Generator().manual_seed(2), torch.device("cpu")
    )
    want = torch.rand(3, 500, generator=torch.Generator().manual_seed(2)) < 0.4
    assert torch.equal(got, want)
    probs = torch.rand(3, 500, generator=torch.Generator().manual_seed(3))  # DELLA's form
    got = dare_mask(probs.shape, probs, torch.Generator().manual_seed(2), torch.device("cpu"))
    want = torch.rand(3, 500, generator=torch.Generator().manual_seed(2)) < probs
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape, skip", [((7, 100), 0), ((3, 700), 5), ((2000,), 620), ((1, 1), 3)])
def test_della_draw_in_the_rank_pass_is_torch_rand(shape, skip):
    """della_probs with a generator draws MagPrune's mask row by row as one
    torch.rand(shape) < probs: probabilities where kept, +0 where dropped, the generator
    left where torch.rand leaves it (rows crossing the 624-word refills)."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g).bfloat16()
    ft = (base.float() + torch.randn(shape, generator=g) * 0.05).bfloat16()
    ref, mine = _fused.twin_generators(4, skip)
    probs = _fused.della_probs(ft, base, 0.5, 0.2)
    keep = torch.rand(shape, generator=ref) < probs
    got = _fused.della_probs(ft, base, 0.5, 0.2, mine)
    _same_bits(got, torch.where(keep, probs, 0.0))
    assert torch.equal(mine.get_state(), ref.get_state())
    assert 0 < int(keep.sum()) < keep.numel() or keep.numel() == 1


def test_della_with_torch_draws_is_the_fused_draw(monkeypatch):
    """When the C draw is declined (the generator check fails), DELLA draws its masks with
    torch and hands the kernel mask and probabilities: the same merge, bit for bit."""
    fts, base = _family((257, 33), torch.bfloat16, 3, seed=9)
    kwargs = dict(weight=[1.0, 0.5, 0.8], density=[0.5, 0.4, 1.0], epsilon=[0.1, 0.3, 0.2])
    fused = della(fts, base, **kwargs, generator=torch.Generator().manual_seed(4))
    monkeypatch.setitem(_fused._state, "mt", False)
    assert _fused.della_probs(fts[0], base, 0.5, 0.1, torch.Generator()) is None
    torch_drawn = della(fts, base, **kwargs, generator=torch.Generator().manual_seed(4))
    _same_bits(fused, torch_drawn)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_engine_output_is_the_torch_paths_for_every_out_dtype(method, tmp_path, monkeypatch):
    """Through the engine (which hands the fused kernel the dtype it writes): the written
    file is byte for byte the torch path's, for bf16 inputs written as bf16, f16, f32,
    f64 and FP8 with block scales, and for a float16 compute dtype."""
    import yaml

    from graft.io import save_state_dict
    from graft.plan import plan_merge, run_plan
    from graft.recipe import parse_recipe

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(256, 160, generator=g) for i in range(2)}
    for name, sd in [("base", base)] + [
        (f"ft{k}", {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()})
        for k in range(3)
    ]:
        save_state_dict({n: t.bfloat16() for n, t in sd.items()}, tmp_path / name)
    for extra in ({}, {"out_dtype": "float16"}, {"out_dtype": "float32"},
                  {"out_dtype": "float64"}, {"out_dtype": "float8_e4m3fn"}, {"dtype": "float16"}):  # fmt: skip
        doc = {
            "merge_method": method,
            "base_model": str(tmp_path / "base"),
            "models": [
                {"model": str(tmp_path / f"ft{k}"), "parameters": {"weight": 1.0, "density": 0.5}}
                for k in range(3)
            ],
            "parameters": {"normalize": True},
            **extra,
        }
        outs = []
        for fused in ("1", "0"):
            monkeypatch.setenv("GRAFT_FUSED", fused)
            plan = plan_merge(parse_recipe(yaml.safe_dump(doc)))
            out = tmp_path / f"out-{fused}"
            run_plan(plan, out, threads=2, force=True)
            plan.close()
            outs.append((out / "model.safetensors").read_bytes())
        assert outs[0] == outs[1], extra
