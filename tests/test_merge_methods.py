"""Merge methods against small tensors whose expected values were worked out by hand.

Each expected value is derived in the comment beside it, never by calling graft.
"""

from __future__ import annotations

import math

import pytest
import torch

from graft.merge import breadcrumbs as bc
from graft.merge import dare, della, lines, model_stock, multislerp, nuslerp, slerp, ties
from graft.merge.linear import linear
from graft.merge.passthrough import passthrough
from graft.merge.task_arithmetic import task_arithmetic

R = math.sqrt(0.5)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --- linear / task arithmetic ---------------------------------------------------------


def test_linear_normalized_and_not():
    a, b = t(1, 2), t(3, 6)
    # 1*[1,2] + 3*[3,6] = [10, 20]; / (1+3) = [2.5, 5]
    close(linear([a, b], None, weight=[1, 3], normalize=True), [2.5, 5.0])
    close(linear([a, b], None, weight=[1, 3], normalize=False), [10.0, 20.0])


def test_task_arithmetic_lambda_and_normalize():
    base = t(1, 1)
    m1, m2 = t(2, 0), t(1, 3)  # deltas [1,-1] and [0,2]
    # sum w*delta = 1*[1,-1] + 0.5*[0,2] = [1, 0]; * 0.5 = [0.5, 0]; + base
    close(task_arithmetic([m1, m2], base, weight=[1, 0.5], scale=0.5), [1.5, 1.0])
    # normalize: [1,0] / 1.5 = [2/3, 0]; * 0.5 = [1/3, 0]; + base
    out = task_arithmetic([m1, m2], base, weight=[1, 0.5], scale=0.5, normalize=True)
    close(out, [1 + 1 / 3, 1.0])


# --- TIES -------------------------------------------------------------------------------

# density 0.5 on 6 entries -> k = 3 per model.
# d1 = [3, -1, 0.5, -2, 1.5, 0.1]: top-3 |.| = 3, 2, 1.5 -> trim1 = [3, 0, 0, -2, 1.5, 0]
# d2 = [-1.5, 1, 4, 0.2, 2, -0.3]: top-3 |.| = 4, 2, 1.5 -> trim2 = [-1.5, 0, 4, 0, 2, 0]
# weights [1, 2]: w1*trim1 = [3, 0, 0, -2, 1.5, 0]; w2*trim2 = [-3, 0, 8, 0, 4, 0]
# sum = [0, 0, 8, -2, 5.5, 0] -> elected sign [+, +, +, -, +, +] (0 counts as +)
# entry 0: tie -> +: only model 1 (3) agrees: sum 3, divisor 1 -> mean 3
#          (had the tie gone to -, model 2 would win: -1.5)
# entry 1: nobody -> 0; entry 2: model 2: sum 8, divisor 2 -> mean 4
# entry 3: model 1 (-2): sum -2, divisor 1 -> mean -2
# entry 4: both: sum 1.5 + 4 = 5.5, divisor 3 -> mean 11/6; entry 5: 0
TIES_D1 = [3, -1, 0.5, -2, 1.5, 0.1]
TIES_D2 = [-1.5, 1, 4, 0.2, 2, -0.3]


def test_ties_mean_form_with_tie_going_positive():
    base = torch.ones(6)
    models = [base + t(*TIES_D1), base + t(*TIES_D2)]
    out = ties.ties(models, base, weight=[1, 2], density=[0.5, 0.5])
    close(out, [1 + 3, 1, 1 + 4, 1 - 2, 1 + 11 / 6, 1])


def test_ties_sum_form_and_lambda():
    base = torch.ones(6)
    models = [base + t(*TIES_D1), base + t(*TIES_D2)]
    out = ties.ties(models, base, weight=[1, 2], density=[0.5, 0.5], normalize=False, scale=0.5)
    # sum form [3, 0, 8, -2, 5.5, 0] * 0.5 + 1
    close(out, [2.5, 1, 5, 0, 3.75, 1])


def test_ties_density_below_one_entry_keeps_nothing():
    base = torch.zeros(6)
    # int(0.1 * 6) = 0 -> the trimmed delta is all zero -> the base
    out = ties.ties([t(*TIES_D1)], base, weight=[1], density=[0.1])
    close(out, torch.zeros(6))


def test_ties_rescale_matches_dense_l1():
    # d = [4, -1, 0, 3], density 0.5 -> k = 2 -> [4, 0, 0, 3] (L1 7); dense L1 8 -> * 8/7
    out = ties.ties([t(4, -1, 0, 3)], torch.zeros(4), weight=[1], density=[0.5], rescale=True)
    close(out, [32 / 7, 0, 0, 24 / 7])


# --- DARE -------------------------------------------------------------------------------


def test_dare_drop_with_explicit_mask():
    delta = t(2, -4, 6, 8)
    keep = torch.tensor([True, False, True, False])
    # paper: kept / 0.5 = [4, 0, 12, 0]
    close(dare.dare_drop(delta, keep, 0.5), [4, 0, 12, 0])
    # l1: dense L1 20, kept L1 8 -> * 2.5 = [5, 0, 15, 0]
    close(dare.dare_drop(delta, keep, 0.5, rescale_mode="l1"), [5, 0, 15, 0])
    close(dare.dare_drop(delta, keep, 0.5, rescale=False), [2, 0, 6, 0])


def test_dare_linear_masks_are_uniform_draws_in_model_order():
    base = torch.zeros(5)
    m1, m2 = t(1, 2, 3, 4, 5), t(-1, -1, -1, -1, -1)
    # Contract: model i's mask is rand(numel) < p, drawn from the generator in model order.
    g = torch.Generator().manual_seed(7)
    k1 = torch.rand(5, generator=g) < 0.4
    k2 = torch.rand(5, generator=g) < 0.6
    expected = 2 * torch.where(k1, m1, 0) / 0.4 + 1 * torch.where(k2, m2, 0) / 0.6
    out = dare.dare_linear(
        [m1, m2],
        base,
        weight=[2, 1],
        density=[0.4, 0.6],
        generator=torch.Generator().manual_seed(7),
    )
    close(out, expected, atol=1e-5)


def test_dare_expectation_is_dense_delta():
    base = torch.zeros(8)
    delta = t(1, -2, 3, -4, 0.5, 0, 2, -1)
    g = torch.Generator().manual_seed(0)
    n = 4000
    acc = torch.zeros(8, dtype=torch.float64)
    for _ in range(n):
        acc += dare.dare_linear([delta], base, weight=[1], density=[0.5], generator=g).double()
    # one draw at p = 0.5 is 2d or 0: std |d|; the mean's std is |d|/sqrt(n). Allow 5 sigma.
    bound = 5 * delta.double().abs() / math.sqrt(n) + 1e-9
    assert ((acc / n - delta.double()).abs() <= bound).all()


def test_dare_seeds_reproduce_and_differ():
    base = torch.zeros(64)
    models = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return dare.dare_ties(models, base, weight=[1, 1], density=[0.5, 0.5], generator=g)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_dare_density_one_is_exact_identity_on_delta():
    delta = torch.randn(32, generator=torch.Generator().manual_seed(1))
    out = dare.dare_sparsify(delta, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, delta)


# --- Breadcrumbs ------------------------------------------------------------------------

# |d| are 5, 1, 9, 3, 10, 2, 7, 4, 8, 6 (all distinct), N = 10
BC_DELTA = [5, -1, 9, 3, -10, 2, 7, -4, 8, 6]


def test_breadcrumbs_drops_top_and_bottom():
    # density 0.5 -> keep 5; gamma 0.1 -> drop top 1 (10); bottom 10-5-1 = 4 (1..4)
    # kept magnitudes 5..9
    mask = bc.outlier_mask(t(*BC_DELTA), 0.5, 0.1)
    expected = [True, False, True, False, False, False, True, False, True, True]
    assert mask.tolist() == expected
    base = torch.ones(10)
    out = bc.breadcrumbs([base + t(*BC_DELTA)], base, weight=[1], density=[0.5], gamma=[0.1])
    close(out, [6, 1, 10, 1, 1, 1, 8, 1, 9, 7])


def test_breadcrumbs_gamma_rounding_to_zero_keeps_the_top():
    # gamma 0.05 -> int(0.5) = 0 outliers; keep the 5 largest: 6..10 (no empty-slice wrap)
    mask = bc.outlier_mask(t(*BC_DELTA), 0.5, 0.05)
    assert mask.tolist() == [False, False, True, False, True, False, True, False, True, True]


def test_breadcrumbs_density_wins_over_gamma():
    # density 0.9 -> keep 9; gamma 0.2 -> top 2; 9 + 2 > 10 -> bottom 0: keep smallest 9
    mask = bc.outlier_mask(t(*BC_DELTA), 0.9, 0.2)
    assert mask.tolist() == [True] * 4 + [False] + [True] * 5


def test_breadcrumbs_ties_elects_sign():
    base = torch.zeros(4)
    # density 1: no masking. d1 = [1, -2, 3, 0], d2 = [-3, 1, 1, 0], weights 1
    # sum [-2, -1, 4, 0] -> sign [-, -, +, +]; sum form: [-3, -2, 4, 0]
    out = bc.breadcrumbs_ties([t(1, -2, 3, 0), t(-3, 1, 1, 0)], base, weight=[1, 1])
    close(out, [-3, -2, 4, 0])


# --- DELLA ------------------------------------------------------------------------------


def test_della_probabilities_linear_in_rank():
    row = t(0.1, -0.4, 0.3, 0.2, -0.5)
    # ranks by |.| ascending: 0.1->0, 0.4->3, 0.3->2, 0.2->1, 0.5->4; p = 0.3 + 0.4*r/4
    probs = della.della_keep_probs(row, 0.5, 0.2)
    close(probs, [0.3, 0.6, 0.5, 0.4, 0.7])
    # rows of a 2-D tensor are ranked separately
    probs2 = della.della_keep_probs(torch.stack([row, -row.flip(0)]), 0.5, 0.2)
    close(probs2[1], [0.7, 0.4, 0.5, 0.6, 0.3])


def test_della_keep_frequency_per_rank():
    row = t(0.1, -0.4, 0.3, 0.2, -0.5)
    g = torch.Generator().manual_seed(0)
    n = 4000
    kept = torch.zeros(5)
    for _ in range(n):
        out = della.della_sparsify(row, 0.5, 0.2, g, rescale=False)
        kept += (out != 0).float()
    # binomial std <= 0.5/sqrt(4000) ~ 0.008
    close(kept / n, [0.3, 0.6, 0.5, 0.4, 0.7], atol=0.04)


def test_della_rescales_each_kept_entry_by_its_probability():
    row = t(0.1, -0.4, 0.3, 0.2, -0.5)
    out = della.della_sparsify(row, 0.5, 0.2, torch.Generator().manual_seed(3))
    probs = [0.3, 0.6, 0.5, 0.4, 0.7]
    for value, original, p in zip(out.tolist(), row.tolist(), probs, strict=True):
        assert value == 0 or math.isclose(value, original / p, rel_tol=1e-6)


def test_della_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match="epsilon"):
        della.della_sparsify(torch.ones(4), 0.1, 0.15, None)


# --- Model Stock ------------------------------------------------------------------------


def test_model_stock_orthogonal_deltas_give_base():
    base = t(1, 1)
    # deltas [1,0] and [0,1]: cos 0 -> t = 0 -> base
    close(model_stock.model_stock([t(2, 1), t(1, 2)], base), [1, 1])


def test_model_stock_identical_deltas_give_the_models():
    # cos 1 -> t = 2*1/(1+1) = 1 -> mean of models
    close(model_stock.model_stock([t(2, 3), t(2, 3)], t(1, 1)), [2, 3])


def test_model_stock_45_degrees():
    # deltas [1,0], [1,1]: cos = 1/sqrt2; t = 2c/(1+c) = 2/(sqrt2+1) = 2(sqrt2-1)
    # mean delta [1, 0.5] -> result t*[1, 0.5] (base 0)
    tt = 2 * (math.sqrt(2) - 1)
    close(model_stock.model_stock([t(1, 0), t(1, 1)], torch.zeros(2)), [tt, tt / 2])


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # row 0 orthogonal -> t 0 -> 0; row 1 identical -> t 1 -> [1, 1]
    close(model_stock.model_stock([a, b], base, filter_wise=True), [[0, 0], [1, 1]])


# --- SLERP / NuSLERP / Multi-SLERP --------------------------------------------------------


def test_slerp_orthogonal_midpoint():
    # theta = pi/2: sin(pi/4)/1 each
    close(slerp.slerp([t(0, 1)], t(1, 0), t=0.5), [R, R])
    # t = 1/3: sin(pi/3), sin(pi/6)
    close(slerp.slerp([t(0, 1)], t(1, 0), t=1 / 3), [math.sqrt(3) / 2, 0.5])


def test_slerp_applies_coefficients_to_unnormalised_tensors():
    # directions orthogonal; coefficients sqrt(1/2) each: [2R, 3R]
    close(slerp.slerp([t(0, 3)], t(2, 0), t=0.5), [2 * R, 3 * R])


def test_slerp_near_parallel_is_lerp():
    # cos([1,0],[1,0.01]) = 1/sqrt(1.0001) ~ 0.99995 > 0.9995 -> lerp: [1, 0.005]
    close(slerp.slerp([t(1, 0.01)], t(1, 0), t=0.5), [1, 0.005])


def test_slerp_endpoints_exact():
    base, other = t(1, 2, -3), t(0.5, -1, 4)
    assert torch.equal(slerp.slerp([other], base, t=0.0), base)
    assert torch.equal(slerp.slerp([other], base, t=1.0), other)


def test_nuslerp_weights_set_t():
    # weights [1, 3] -> t = 0.75; orthogonal units -> [sin(pi/8), sin(3pi/8)]
    out = nuslerp.nuslerp([t(1, 0), t(0, 1)], None, weight=[1, 3])
    close(out, [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    # with a base: deltas [1,0], [0,1], equal weights -> base + [R, R]
    out = nuslerp.nuslerp([t(2, 1), t(1, 2)], t(1, 1), weight=[1, 1])
    close(out, [1 + R, 1 + R])


def test_nuslerp_vector_layouts():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # flatten: a=[1,0,1,0], b=[0,1,1,0], cos 1/2, theta pi/3; coef sin(pi/6)/sin(pi/3)
    c = 0.5 / (math.sqrt(3) / 2)
    out = nuslerp.nuslerp([a, b], None, weight=[1, 1])
    close(out, [[c, c], [2 * c, 0]])
    # last-dim vectors (rows): row 0 orthogonal -> [R, R]; row 1 identical -> [1, 0]
    out = nuslerp.nuslerp([a, b], None, weight=[1, 1], nuslerp_flatten=False)
    close(out, [[R, R], [1, 0]])
    # dim-0 vectors (columns): col 0 [1,1] vs [0,1]: theta pi/4, coef sin(pi/8)/sin(pi/4)
    #   -> coef*[1,2]; col 1 [0,0] vs [1,0]: zero vector has cos 0 -> sin(pi/4)*[1,0]
    c0 = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    out = nuslerp.nuslerp([a, b], None, weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    close(out, [[c0, R], [2 * c0, 0]])


def test_multislerp_orthogonal_pair():
    # units [1,0], [0,1]; weighted mean direction [R, R]; mean norm 0.5*2 + 0.5*4 = 3
    out = multislerp.multislerp([t(2, 0), t(0, 4)], None, weight=[1, 1])
    close(out, [3 * R, 3 * R], atol=1e-5)


def test_multislerp_unequal_weights_and_base():
    # weights [3,1] -> [0.75, 0.25]; direction [0.75, 0.25]/sqrt(0.625); norms 1 -> scale 1
    n = math.sqrt(0.625)
    out = multislerp.multislerp([t(2, 1), t(1, 2)], t(1, 1), weight=[3, 1])
    close(out, [1 + 0.75 / n, 1 + 0.25 / n], atol=1e-5)


def test_multislerp_antipodal_falls_back_to_weighted_sum():
    # directions cancel -> 0.5*[1,0] + 0.5*[-1,0] = 0
    out = multislerp.multislerp([t(1, 0), t(-1, 0), t(1, 0), t(-1, 0)], None, weight=[1] * 4)
    close(out, [0, 0])


def test_passthrough_scale():
    close(passthrough([t(1, -2)], None, scale=[0.5]), [0.5, -1])


# --- LiNeS ------------------------------------------------------------------------------


def test_lines_scale_values():
    # alpha 0.2, beta 0.6, L 4: layer 0 -> 0.2; layer 1 -> 0.2 + 0.6/3 = 0.4; layer 3 -> 0.8
    assert lines.lines_scale(0, 4, 0.2, 0.6) == pytest.approx(0.2)
    assert lines.lines_scale(1, 4, 0.2, 0.6) == pytest.approx(0.4)
    assert lines.lines_scale(3, 4, 0.2, 0.6) == pytest.approx(0.8)
    assert lines.lines_scale(None, 4, 0.2, 0.6) == pytest.approx(0.2)
    assert lines.lines_scale(0, 1, 0.2, 0.6) == pytest.approx(0.8)


def test_lines_single_model_first_last_and_outside():
    base, model = t(1, 1), t(2, -1)  # delta [1, -2]
    kw = {"weight": [1], "alpha": "0.3", "beta": 0.7, "num_layers": 4}
    close(lines.lines([model], base, layer=0, **kw), [1.3, 0.4])  # 0.3 * delta
    close(lines.lines([model], base, layer=3, **kw), [2, -1])  # 1.0 * delta
    close(lines.lines([model], base, layer=None, **kw), [1.3, 0.4])  # alpha


def test_lines_auto_alpha_with_inner_ties():
    base = torch.zeros(3)
    m1, m2 = t(1, 2, -1), t(3, -2, -1)
    # TIES, density 1, mean form: sum [4, 0, -2] -> signs [+, + (tie), -]
    # entry 0: both agree, mean 2; entry 1: model 1 (2); entry 2: both -1 -> merged [2, 2, -1]
    # auto alpha = |sum d|_1 / (T |merged|_1) = (4 + 0 + 2) / (2 * 5) = 0.6
    kw = {"method": "ties", "beta": 0.4, "num_layers": 3}
    close(lines.lines([m1, m2], base, layer=None, **kw), [1.2, 1.2, -0.6])
    # last block: 0.6 + 0.4 = 1 -> the merged delta itself
    close(lines.lines([m1, m2], base, layer=2, **kw), [2, 2, -1])
    assert lines.auto_alpha(m1 + m2, t(2, 2, -1), 2) == pytest.approx(0.6)


def test_lines_task_arithmetic_scales_the_summed_task_vector():
    # The paper's multi-task convention (wang-kee/LiNeS: merged_tv = Σ δᵢ, α = ‖Σδ‖₁/(T‖τ‖₁)):
    # deltas [1, 0], [2, -1], [0, 4] -> τ = Σδ = [3, 3]; T = 3 -> α = 6 / (3 * 6) = 1/3.
    base = t(0, 1)
    models = [t(1, 1), t(2, 0), t(0, 5)]
    kw = {"beta": 0.3, "num_layers": 3}
    # first block and non-block tensors: (1/3)·[3, 3] = [1, 1] -> the plain average
    close(lines.lines(models, base, layer=0, **kw), [1, 2], atol=1e-5)
    close(lines.lines(models, base, layer=None, **kw), [1, 2], atol=1e-5)
    # middle block: 1/3 + 0.3·1/2 = 0.48333 -> 1.45 on each entry
    close(lines.lines(models, base, layer=1, **kw), [1.45, 2.45], atol=1e-5)
    # last block: (1/3 + 0.3)·3 = 1.9. β on the mean (the old convention) would give
    # (1 + 0.3)·[1, 1] = [1.3, 1.3] here instead.
    close(lines.lines(models, base, layer=2, **kw), [1.9, 2.9], atol=1e-5)


def test_lines_task_arithmetic_weights_enter_the_sum_and_normalize_is_ignored():
    base = t(1, 1)
    models = [t(2, 1), t(1, 3)]  # deltas [1, 0], [0, 2]
    # weights [2, 1]: τ = 2·[1, 0] + 1·[0, 2] = [2, 2] (never divided by Σw = 3)
    # explicit α 0.5, β 0.25, last of L = 2 blocks -> 0.75·[2, 2] = [1.5, 1.5]
    for normalize in (True, False):
        out = lines.lines(
            models,
            base,
            weight=[2, 1],
            alpha="0.5",
            beta=0.25,
            normalize=normalize,
            layer=1,
            num_layers=2,
        )
        close(out, [2.5, 2.5])
    # α auto = ‖Σδ‖₁ / (T·‖τ‖₁) = 3 / (2·4) = 0.375; first block: 0.375·[2, 2] = [0.75, 0.75]
    auto = lines.lines(models, base, weight=[2, 1], beta=0.25, layer=0, num_layers=2)
    close(auto, [1.75, 1.75])


def test_lines_old_mean_recipe_maps_to_beta_over_weight_sum():
    # Old graft: β applied to the weighted mean m = Σwδ/Σw with α = ‖Σδ‖₁/(T‖m‖₁) = 1 here,
    # i.e. θ₀ + (1 + β_old·l/(L−1))·m. Same model now with β = β_old / Σw.
    base = t(0, 0, 0)
    models = [t(1, -2, 0), t(3, 2, 4), t(2, 0, -1)]  # Σδ = [6, 0, 3], mean [2, 0, 1]
    beta_old, r = 0.9, 1 / 2  # layer 1 of L = 3
    old = [(1 + beta_old * r) * m for m in (2.0, 0.0, 1.0)]  # [2.9, 0, 1.45]
    new = lines.lines(models, base, beta=beta_old / 3, layer=1, num_layers=3)
    close(new, old, atol=1e-5)
    # the same β as before is now T times steeper: (1/3 + 0.9·0.5)·Σδ = 0.78333·[6, 0, 3]
    close(
        lines.lines(models, base, beta=beta_old, layer=1, num_layers=3), [4.7, 0, 2.35], atol=1e-5
    )


def test_lines_inner_ties_disjoint_sum_when_not_normalized():
    base = torch.zeros(3)
    m1, m2 = t(1, 2, -1), t(3, -2, -1)
    # TIES sum form (the reference's dis-sum): signs [+, + (tie), -] -> τ = [4, 2, -2]
    # auto α = (4 + 0 + 2) / (2 · 8) = 0.375
    kw = {"method": "ties", "beta": 0.4, "num_layers": 3, "normalize": False}
    close(lines.lines([m1, m2], base, layer=None, **kw), [1.5, 0.75, -0.75])
    # last block: (0.375 + 0.4)·τ = 0.775·[4, 2, -2]
    close(lines.lines([m1, m2], base, layer=2, **kw), [3.1, 1.55, -1.55], atol=1e-6)


def test_lines_task_arithmetic_per_tensor_alpha_equals_the_reference_global_alpha():
    # The reference flattens the whole model and computes one α = ‖Σδ‖₁/(T‖τ‖₁) for it;
    # for task arithmetic τ = Σδ in every tensor, so graft's per-tensor α is the same 1/T.
    g = torch.Generator().manual_seed(0)
    names = {"blocks.0.w": 0, "blocks.1.w": 1, "head.w": None}
    base = {k: torch.randn(4, 3, generator=g) for k in names}
    fts = [{k: v + torch.randn(4, 3, generator=g) for k, v in base.items()} for _ in range(3)]
    flat_delta = torch.stack([torch.cat([ft[k] - base[k] for k in names]).flatten() for ft in fts])
    summed = flat_delta.sum(0)
    alpha = float(summed.abs().sum()) / (3 * float(summed.abs().sum()))
    beta = 0.6
    for k, layer in names.items():
        scale = alpha if layer is None else alpha + beta * layer / (2 - 1)
        expected = base[k] + scale * sum(ft[k] - base[k] for ft in fts)
        out = lines.lines([ft[k] for ft in fts], base[k], beta=beta, layer=layer, num_layers=2)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --- sign election in the DARE and DELLA families (values worked out by hand) ------------


def test_dare_ties_elects_a_sign_per_entry_before_summing():
    # density 1 keeps every entry (nothing is drawn): dare_ties is TIES without a trim.
    base = t(1, 1, 1)
    a, b = t(2, -1, 1.5), t(4, 2, 0.5)  # deltas (1, -2, 0.5) and (3, 1, -0.5)
    # entry 0: 1 + 3 > 0, both agree: 4.  entry 1: -2 + 1 < 0, only -2 agrees.
    # entry 2: 0.5 - 0.5 = 0 counts as +, only 0.5 agrees.  (A plain sum: 4, -1, 0.)
    close(dare.dare_ties([a, b], base, weight=[1, 1]), [5, -1, 1.5])
    # disjoint mean: 4 / 2, -2 / 1, 0.5 / 1
    close(dare.dare_ties([a, b], base, weight=[1, 1], normalize=True), [3, -1, 1.5])
    # weights enter the election: 2·(1, -2, 0.5) + (3, 1, -0.5) = (5, -3, 0.5)
    close(dare.dare_ties([a, b], base, weight=[2, 1]), [1 + 5, 1 - 4, 1 + 1])


def test_dare_ties_elects_on_the_dropped_and_rescaled_deltas():
    base = torch.zeros(6)
    d1, d2 = t(1, -2, 3, -1, 2, 1), t(-3, 1, 1, 2, -1, -2)
    # The masks, as the contract says they are drawn (rand < p, model order).
    g = torch.Generator().manual_seed(0)
    k1, k2 = (
        (torch.rand(6, generator=g) < 0.5).tolist(),
        (torch.rand(6, generator=g) < 0.5).tolist(),
    )
    s1 = [x / 0.5 if k else 0.0 for x, k in zip(d1.tolist(), k1, strict=True)]
    s2 = [x / 0.5 if k else 0.0 for x, k in zip(d2.tolist(), k2, strict=True)]
    expected = []
    for x, y in zip(s1, s2, strict=True):
        sign = 1 if x + y >= 0 else -1
        expected.append(sum(v for v in (x, y) if v * sign > 0))
    # masks (T,F,T,T,T,F), (T,F,T,F,T,T): entry 0 elects - (2 vs -6), entry 4 + (4 vs -2)
    assert expected == [-6, 0, 8, -2, 4, -4]
    out = dare.dare_ties(
        [d1, d2],
        base,
        weight=[1, 1],
        density=[0.5, 0.5],
        generator=torch.Generator().manual_seed(0),
    )
    close(out, expected)


def test_della_elects_a_sign_per_entry_and_takes_the_disjoint_mean():
    base = torch.zeros(3)
    a, b = t(1, -2, 0.5), t(3, 1, -0.5)
    # density 1 keeps every entry; della's default is the disjoint mean (normalize true).
    # entry 0: both +: (1 + 3) / 2.  entry 1: -2 + 1 < 0: -2 alone.  entry 2: 0 -> +: 0.5.
    # (A linear mean would give 2, -0.5, 0.)
    close(della.della([a, b], base, weight=[1, 1]), [2, -2, 0.5])
    # weighted: 2a + b = (5, -3, 0.5); divisors are the agreeing weights: 3, 2, 2
    close(della.della([a, b], base, weight=[2, 1]), [5 / 3, -4 / 2, 1 / 2])
    close(della.della([a, b], base, weight=[1, 1], normalize=False), [4, -2, 0.5])


def test_della_elects_on_the_magpruned_deltas():
    base = torch.zeros(5)
    d1, d2 = t(0.1, -0.4, 0.3, 0.2, -0.5), t(-0.3, 0.2, 0.1, -0.4, 0.5)
    # keep probabilities by magnitude rank (density 0.5, epsilon 0.2): 0.3 + 0.4·rank/4
    p1, p2 = [0.3, 0.6, 0.5, 0.4, 0.7], [0.5, 0.4, 0.3, 0.6, 0.7]
    g = torch.Generator().manual_seed(11)
    u1, u2 = torch.rand(5, generator=g).tolist(), torch.rand(5, generator=g).tolist()
    s1 = [x / p if u < p else 0.0 for x, p, u in zip(d1.tolist(), p1, u1, strict=True)]
    s2 = [x / p if u < p else 0.0 for x, p, u in zip(d2.tolist(), p2, u2, strict=True)]
    expected = []
    for x, y in zip(s1, s2, strict=True):
        sign = 1 if x + y >= 0 else -1
        agree = [v for v in (x, y) if v * sign > 0]
        expected.append(sum(agree) / max(len(agree), 1))
    assert expected != [(x + y) / 2 for x, y in zip(s1, s2, strict=True)]
    out = della.della(
        [d1, d2],
        base,
        weight=[1, 1],
        density=[0.5, 0.5],
        epsilon=[0.2, 0.2],
        generator=torch.Generator().manual_seed(11),
    )
    close(out, expected, atol=1e-5)


# --- edges mutation testing found untested ------------------------------------------------


def test_equal_weights_other_than_one_and_a_lambda_of_two_still_scale():
    a, b = t(1, 2), t(3, -4)
    # 2·(1, 2) + 2·(3, -4) = (8, -4): equal weights must not be mistaken for "no weights"
    close(dare.dare_linear([a, b], torch.zeros(2), weight=[2, 2]), [8, -4])
    # λ = 2 on the merged delta (4, -2), then the base (1, 1)
    close(dare.dare_linear([a + 1, b + 1], t(1, 1), weight=[1, 1], scale=2), [9, -3])


def test_della_bounds_on_density_and_epsilon():
    d = t(0.1, -0.4, 0.3, 0.2, -0.5)
    # density + epsilon = 1 is allowed: the largest |entry| has p = 1, kept as is
    out = della.della_sparsify(d, 0.85, 0.15, torch.Generator().manual_seed(0))
    close(out[4:], [-0.5])
    for density, epsilon in ((0.9, 0.15), (0.15, 0.15)):  # above 1; density - epsilon = 0
        with pytest.raises(ValueError, match="epsilon"):
            della.della_sparsify(d, density, epsilon, None)


def test_della_drops_a_one_entry_tensor_with_probability_density():
    # A row of one entry gets p = density; it is kept (and divided by p) iff u < p.
    for seed in range(6):
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        out = della.della_sparsify(t(2.0), 0.5, 0.2, torch.Generator().manual_seed(seed))
        close(out, [4.0 if u < 0.5 else 0.0])
