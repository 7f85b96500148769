"""SVD-based data-free merges (TSV-M, Iso-C, Iso-CTS) and consensus (TALL-mask) merging.

Expected values are worked out in the comments beside them, or computed in this file with
plain torch ops that restate the reference code; never by calling graft's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from graft.merge import iso, tsv
from graft.merge.task_arithmetic import task_arithmetic
from graft.merge.ties import ties

C8, S8 = math.cos(math.pi / 8), math.sin(math.pi / 8)
R = math.sqrt(0.5)


def e(i: int, n: int) -> torch.Tensor:
    """Unit vector ``e_i`` of length ``n`` (float64)."""
    v = torch.zeros(n, dtype=torch.float64)
    v[i] = 1.0
    return v


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.outer(a, b)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --- TSV-M: hand-computed -----------------------------------------------------------------


def test_tsv_orthogonal_rank_one_tasks_give_their_weighted_sum():
    # 4x3 -> r = 3, T = 2 -> k = 1. The stacked U = [e0, e1] and V = [f0, f1] are already
    # orthonormal, so the polar factors change nothing: merged = sum of w_i * delta_i.
    base = torch.ones(4, 3, dtype=torch.float64)
    d1 = 2 * outer(e(0, 4), e(0, 3))
    d2 = -3 * outer(e(1, 4), e(1, 3))
    out = tsv.tsv_m([base + d1, base + d2], base, weight=[1.0, 0.5], scale=0.5)
    close(out, base + 0.5 * (d1 + 0.5 * d2))


def test_tsv_keeps_each_tasks_top_component_only():
    # k = 1: task 1's second component (1 * e1 f1^T) is dropped, its top one (3 e0 f0^T) kept.
    base = torch.zeros(4, 3, dtype=torch.float64)
    d1 = 3 * outer(e(0, 4), e(0, 3)) + 1 * outer(e(1, 4), e(1, 3))
    d2 = 2 * outer(e(2, 4), e(2, 3))
    out = tsv.tsv_m([d1, d2], base)
    close(out, 3 * outer(e(0, 4), e(0, 3)) + d2)


def test_tsv_overlapping_singular_vectors_are_rotated_apart():
    # Task 1: 2 * e0 f0^T. Task 2: 3 * u v^T with u = (e0 + e1)/sqrt2, v = (f0 + f1)/sqrt2.
    # Stacked U = [e0, u]: two unit vectors 45 deg apart. Its polar factor is the nearest
    # orthonormal pair, the two rotated apart symmetrically by 22.5 deg each:
    #   e0 -> (cos pi/8, -sin pi/8),  u -> (sin pi/8, cos pi/8)   (in the e0, e1 plane);
    # check: U (U^T U)^{-1/2} with U^T U = [[1, c], [c, 1]], c = 1/sqrt2, gives exactly these.
    # The same for V: f0 -> (C8, -S8), v -> (S8, C8). Merged = 2 a1 b1^T + 3 a2 b2^T.
    base = torch.zeros(4, 3, dtype=torch.float64)
    u = (e(0, 4) + e(1, 4)) * R
    v = (e(0, 3) + e(1, 3)) * R
    d1, d2 = 2 * outer(e(0, 4), e(0, 3)), 3 * outer(u, v)
    a1 = torch.tensor([C8, -S8, 0, 0], dtype=torch.float64)
    a2 = torch.tensor([S8, C8, 0, 0], dtype=torch.float64)
    b1 = torch.tensor([C8, -S8, 0], dtype=torch.float64)
    b2 = torch.tensor([S8, C8, 0], dtype=torch.float64)
    out = tsv.tsv_m([d1, d2], base)
    close(out, 2 * outer(a1, b1) + 3 * outer(a2, b2))


def test_tsv_lossless_on_identical_tasks_returns_the_delta():
    # sv_reduction 1 keeps every component: U stack [U, U, U] = U [I, I, I], whose polar
    # factor is U [I, I, I]/sqrt3 on its row space (plus a term that the S-weighted V stack
    # annihilates); V stack [Vh; Vh; Vh] -> [I; I; I] Vh/sqrt3. Product:
    # U [I I I] diag(S, S, S) [I; I; I] Vh / 3 = U S Vh = delta (not 3 delta).
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 4, generator=g, dtype=torch.float64)
    out = tsv.tsv_m([base + delta] * 3, base, sv_reduction=1.0)
    close(out, base + delta)


def test_tsv_fewer_components_than_tasks_leaves_the_base():
    # 2x5 -> r = 2 < T = 3 -> k = 0: nothing kept, as in the reference.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 5, generator=g, dtype=torch.float64)
    models = [base + torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    close(tsv.tsv_m(models, base), base)


def test_tsv_and_iso_one_dim_tensors_take_the_mean_delta():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    m1, m2 = base + torch.tensor([1.0, 2.0]), base + torch.tensor([3.0, -2.0])
    # weights [1, 0.5]: (1*[1, 2] + 0.5*[3, -2]) / 2 = [1.25, 0.5]; lambda 2 -> [2.5, 1]
    expected = [3.5, 2.0]
    close(tsv.tsv_m([m1, m2], base, weight=[1, 0.5], scale=2.0), expected)
    close(iso.iso_c([m1, m2], base, weight=[1, 0.5], scale=2.0), expected)
    close(iso.iso_cts([m1, m2], base, weight=[1, 0.5], scale=2.0), expected)


# --- Iso-C / Iso-CTS: hand-computed --------------------------------------------------------


def test_iso_c_replaces_the_spectrum_by_its_mean():
    # delta sum = diag(3, 1): singular values 3, 1 -> mean 2 -> merged 2 I; lambda 0.5 -> I
    base = torch.ones(2, 2, dtype=torch.float64)
    d1 = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    d2 = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    close(iso.iso_c([base + d1, base + d2], base), base + 2 * torch.eye(2))
    close(iso.iso_c([base + d1, base + d2], base, scale=0.5), base + torch.eye(2))
    # weights [1, 3] scale the deltas first: sum = diag(3, 3) -> mean 3 -> 3 I
    close(iso.iso_c([base + d1, base + d2], base, weight=[1, 3]), base + 3 * torch.eye(2))


def test_iso_c_keeps_the_sums_singular_vectors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    deltas = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = iso.iso_c([base + d for d in deltas], base) - base
    total = deltas[0] + deltas[1] + deltas[2]
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    got = torch.linalg.svdvals(merged)
    close(got, s.mean().expand(4), atol=1e-12)
    close(merged @ vh.T, u * s.mean(), atol=1e-12)  # merged v_i = mean(s) u_i


def _cts_example():
    # 4x4, T = 2, common_space_fraction 0.5: c0 = 2, n = round(2/2) = 1, c = 4 - 2 = 2.
    # delta1 = diag(5, 1, 0, 0) + 0.5 e2 y^T,  y = (e2 + e3)/sqrt2
    # delta2 = diag(1, 3, 0, 0) + 0.3 w e3^T,  w = (e2 + e3)/sqrt2
    # Sum = diag(6, 4) (+) B with ||B|| < 1: common subspace = e0 (6), e1 (4).
    # Projecting e0, e1 out of the left side leaves 0.5 e2 y^T and 0.3 w e3^T, each rank 1:
    # task directions (0.5, e2, y) and (0.3, w, e3).
    # U stack [e2, w, e0, e1]: e2, w are 45 deg apart -> polar: e2 -> (C8, -S8), w -> (S8, C8)
    # in the (e2, e3) plane; e0, e1 unchanged. V stack [y, e3, e0, e1]: y at 45 deg, e3 at
    # 90 deg -> y -> 22.5 deg (C8, S8), e3 -> 112.5 deg (-S8, C8).
    # Block a1 b1^T + a2 b2^T = [[C8^2 - S8^2, 2 C8 S8], [-2 C8 S8, C8^2 - S8^2]]
    #                         = [[r, r], [-r, r]], r = cos(pi/4).
    # Stacked singular values [0.5, 0.3, 6, 4] -> mean 2.7 (not the mean of the sum's);
    # this returns the directions, U_perp V_perp^T.
    y = (e(2, 4) + e(3, 4)) * R
    d1 = torch.diag(torch.tensor([5.0, 1.0, 0.0, 0.0], dtype=torch.float64)) + 0.5 * outer(
        e(2, 4), y
    )
    d2 = torch.diag(torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64)) + 0.3 * outer(
        y, e(3, 4)
    )
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2:, 2:] = torch.tensor([[R, R], [-R, R]], dtype=torch.float64)
    return d1, d2, expected


def test_iso_cts_common_plus_task_specific_hand_computed():
    d1, d2, directions = _cts_example()
    base = torch.full((4, 4), 0.5, dtype=torch.float64)
    models = [base + d1, base + d2]
    out = iso.iso_cts(models, base, common_space_fraction=0.5, scale=2.0)
    close(out, base + 2.0 * 2.7 * directions)
    # weights [1, 0.5] scale delta2 before everything: sum diag(5.5, 2.5) (+) B', same
    # directions, stacked singular values [0.5, 0.15, 5.5, 2.5] -> mean 2.1625
    out = iso.iso_cts(models, base, weight=[1, 0.5], common_space_fraction=0.5)
    close(out, base + 2.1625 * directions)


def test_iso_cts_with_full_common_space_is_iso_c():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(7, 5, generator=g, dtype=torch.float64)
    models = [base + torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    a = iso.iso_cts(models, base, common_space_fraction=1.0, scale=0.7)
    close(a, iso.iso_c(models, base, scale=0.7), atol=1e-12)


@pytest.mark.parametrize(
    ("rank", "count", "fraction", "expected"),
    [
        (10, 3, 0.8, (7, 1)),  # c0 = 8; round(2/3) = 1 per task; c = 10 - 3
        (5, 3, 0.8, (5, 0)),  # c0 = 4; round(1/3) = 0: all common (iso_c)
        (9, 2, 0.5, (5, 2)),  # c0 = 4; round(5/2) = 2 (halves to even); c = 9 - 4
        (5, 3, 0.0, (2, 1)),  # c0 = 0; round(5/3) = 2 would need 6 > 5: capped at 5 // 3
        (768, 8, 0.8, (616, 19)),  # c0 = 614; round(154/8) = 19; c = 768 - 152
    ],
)
def test_iso_cts_subspace_sizes(rank, count, fraction, expected):
    assert iso.subspace_sizes(rank, count, fraction) == expected


# --- consensus (TALL masks): hand-computed -------------------------------------------------

# Three tasks, 2x3 deltas; base 1, weights 1.
TALL_D = [
    [[1.0, 0.0, 2.0], [-1.0, 0.5, 0.0]],
    [[1.0, 0.0, -2.0], [0.0, 0.5, 3.0]],
    [[0.0, 1.0, 0.1], [1.0, 0.4, 0.0]],
]
# Task arithmetic: tau = sum = [[2, 1, 0.1], [0, 1.4, 3]]. lambda_tall 0.6:
#   t1: 0.6|tau - d1| = [[.6, .6, 1.14], [.6, .54, 1.8]] vs |d1| -> [[T, F, T], [T, F, F]]
#   t2: 0.6|tau - d2| = [[.6, .6, 1.26], [0, .54, 0]]    vs |d2| -> [[T, F, T], [F, F, T]]
#       (entry (1,0): 0 > 0 is false: the inequality is strict)
#   t3: 0.6|tau - d3| = [[1.2, 0, 0], [.6, .6, 1.8]]     vs |d3| -> [[F, T, T], [T, F, F]]
# counts [[2, 1, 3], [2, 0, 1]]
TA_K2 = [[2.0, 0.0, 0.1], [0.0, 0.0, 0.0]]  # count >= 2
TA_K1 = [[2.0, 1.0, 0.1], [0.0, 0.0, 3.0]]  # count >= 1


def _tall_models():
    base = torch.ones(2, 3)
    return [base + torch.tensor(d) for d in TALL_D], base


def test_consensus_task_arithmetic_hand_computed():
    models, base = _tall_models()
    kw = {"weight": [1, 1, 1], "scale": 0.5}
    close(task_arithmetic(models, base, consensus_k=2, **kw), 1 + 0.5 * torch.tensor(TA_K2), 1e-6)
    close(task_arithmetic(models, base, consensus_k=1, **kw), 1 + 0.5 * torch.tensor(TA_K1), 1e-6)
    # k above T: nothing survives -> the base
    close(task_arithmetic(models, base, consensus_k=4, **kw), base)


def test_consensus_ties_uses_its_own_merge_as_the_multi_task_vector():
    # TIES, density 1, sum form: elected sign + everywhere (the sum is >= 0), disjoint sum of
    # the positive entries: tau = [[2, 1, 2.1], [1, 1.4, 3]]. lambda_tall 0.6:
    #   t1: 0.6|tau - d1| = [[.6, .6, .06], [1.2, .54, 1.8]] -> [[T, F, T], [F, F, F]]
    #   t2: 0.6|tau - d2| = [[.6, .6, 2.46], [.6, .54, 0]]  -> [[T, F, F], [F, F, T]]
    #   t3: 0.6|tau - d3| = [[1.2, 0, 1.2], [0, .6, 1.8]]   -> [[F, T, F], [T, F, F]]
    # counts [[2, 1, 1], [1, 0, 1]]: only (0, 0) survives k = 2.
    models, base = _tall_models()
    out = ties(models, base, weight=[1, 1, 1], normalize=False, consensus_k=2)
    close(out, 1 + torch.tensor([[2.0, 0, 0], [0, 0, 0]]), 1e-6)


def test_tall_mask_lambda_and_strict_inequality():
    # One entry, deltas [1, 2, 0], tau = 3, lambda_tall 0.5:
    #   t1: |1| > 0.5*|3 - 1| = 1 is false (a tie); t2: 2 > 0.5 true; t3: 0 > 1.5 false.
    # count 1 < 2 -> dropped. (A >= rule would count 2 and keep 3.)
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0])]
    kw = {"weight": [1, 1, 1], "consensus_k": 2}
    close(task_arithmetic(models, base, tall_mask_lambda=0.5, **kw), [0.0])
    # lambda_tall 0.4: t1: 1 > 0.8 true -> count 2 -> kept
    close(task_arithmetic(models, base, tall_mask_lambda=0.4, **kw), [3.0])


def test_consensus_off_is_the_plain_merge_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g)
    models = [base + torch.randn(8, 6, generator=g) for _ in range(3)]
    kw = {"weight": [0.2, 0.5, 0.3], "scale": 0.7}
    off = {"consensus_k": 0, "tall_mask_lambda": 0.1}
    assert torch.equal(
        task_arithmetic(models, base, **kw, **off), task_arithmetic(models, base, **kw)
    )
    dens = {"density": [0.5, 0.7, 0.9]}
    assert torch.equal(ties(models, base, **kw, **dens, **off), ties(models, base, **kw, **dens))
    # and the plain merge is still task arithmetic
    expected = base + 0.7 * sum(w * (m - base) for w, m in zip(kw["weight"], models, strict=True))
    close(task_arithmetic(models, base, **kw), expected, 1e-6)


# --- against a direct restatement of the reference code -----------------------------------


def ref_polar(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def ref_tsv_m(deltas, alpha):
    """compute_and_sum_svd_mem_reduction: top int(r/T) components placed in r-wide zero
    matrices (padding included), polar factors by SVD; the caller adds alpha * this."""
    count = len(deltas)
    out = None
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = int(s.shape[0] * (1 / count))
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    out = torch.linalg.multi_dot((ref_polar(sum_u), torch.diag(sum_s), ref_polar(sum_vh)))
    return alpha * out


def ref_iso_c(deltas, alpha):
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return alpha * torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


def ref_iso_cts(deltas, alpha, fraction):
    count, shape = len(deltas), deltas[0].shape
    c = int(min(shape) * fraction)
    c = min(shape) - round((min(shape) - c) / count) * count
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    cu, cs, cvh = u[:, :c], s[:c], vh[:c, :]
    n = int((min(shape) - c) / count)
    for i, w in enumerate(deltas):
        ut, st, vht = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            all_u, all_s, all_vh = torch.zeros_like(ut), torch.zeros_like(st), torch.zeros_like(vht)
        all_u[:, i * n : (i + 1) * n] = ut[:, :n]
        all_s[i * n : (i + 1) * n] = st[:n]
        all_vh[i * n : (i + 1) * n, :] = vht[:n, :]
    all_u[:, count * n : count * n + c] = cu
    all_s[count * n : count * n + c] = cs
    all_vh[count * n : count * n + c, :] = cvh
    flat = torch.ones_like(all_s) * all_s.mean()
    return alpha * torch.linalg.multi_dot((ref_polar(all_u), torch.diag(flat), ref_polar(all_vh)))


def ref_consensus_ta(models, base, tall_lambda, k, alpha):
    """generate_task_masks + construct_consensus_mask on a task-arithmetic sum."""
    tau = sum(m - base for m in models)
    multi = base + tau
    count = sum(((base - m).abs() > (multi - m).abs() * tall_lambda).float() for m in models)
    return base + alpha * tau * (count >= k)


def _inputs(device, shape=(9, 7), n=3, seed=6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return [m.to(device) for m in models], base.to(device)


def _check_against_reference(device):
    models, base = _inputs(device)
    deltas = [m - base for m in models]
    # 9x7, T = 3: TSV-M k = 2, Tk = 6 < r = 7 (one zero column in the reference's layout);
    # Iso-CTS at 0.5: c0 = 3, n = round(4/3) = 1, c = 4.
    cases = [
        (tsv.tsv_m(models, base, scale=0.8), base + ref_tsv_m(deltas, 0.8)),
        (iso.iso_c(models, base, scale=1.3), base + ref_iso_c(deltas, 1.3)),
        (iso.iso_cts(models, base, scale=1.3), base + ref_iso_cts(deltas, 1.3, 0.8)),
        (
            iso.iso_cts(models, base, common_space_fraction=0.5, scale=1.3),
            base + ref_iso_cts(deltas, 1.3, 0.5),
        ),
        (
            task_arithmetic(models, base, weight=[1, 1, 1], scale=0.4, consensus_k=2),
            ref_consensus_ta(models, base, 0.6, 2, 0.4),
        ),
    ]
    for got, want in cases:
        assert got.device == base.device and got.dtype == torch.float64
        close(got, want, atol=1e-6)


def test_float64_cpu_matches_direct_computation():
    _check_against_reference("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_direct_computation_and_cpu():
    _check_against_reference("cuda")
    models, base = _inputs("cuda")
    cpu_models, cpu_base = [m.cpu() for m in models], base.cpu()
    for fn in (tsv.tsv_m, iso.iso_c, iso.iso_cts):
        close(fn(models, base).cpu(), fn(cpu_models, cpu_base), atol=1e-6)


def test_float32_inputs_stay_float32_and_small_ones_use_float64():
    assert tsv.svd_dtype(torch.zeros(256, 256)) == torch.float64  # 65,536 entries
    assert tsv.svd_dtype(torch.zeros(257, 256)) == torch.float32
    assert tsv.svd_dtype(torch.zeros(512, 512, dtype=torch.float64)) == torch.float64
    models, base = _inputs("cpu")
    m32, b32 = [m.float() for m in models], base.float()
    for fn in (tsv.tsv_m, iso.iso_c, iso.iso_cts):
        out = fn(m32, b32)
        assert out.dtype == torch.float32
        close(out, fn(models, base).float(), atol=1e-6)


def test_float32_svd_that_fails_to_converge_is_redone_in_float64(monkeypatch):
    # LAPACK's float32 SVD can fail on many repeated tiny singular values (Iso-CTS's
    # projected task matrices at 4096x4096). Simulate the failure for every float32 call:
    # the methods must still give the float64 result.
    original = torch.linalg.svd

    def float32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return original(a, *args, **kwargs)

    models, base = _inputs("cpu")
    expected = {fn: fn(models, base).float() for fn in (tsv.tsv_m, iso.iso_c, iso.iso_cts)}
    models, base = [m.float() for m in models], base.float()
    monkeypatch.setattr(tsv, "_FLOAT64_MAX_NUMEL", 0)  # send these tiny tensors to float32
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    for fn, want in expected.items():
        out = fn(models, base)
        assert out.dtype == torch.float32
        close(out, want, atol=1e-5)
