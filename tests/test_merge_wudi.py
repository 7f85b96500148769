"""WUDI-Merging: the objective, its closed-form minimiser, and the paper's Adam steps.

Expected values are worked out in the comments beside them, or computed here with plain
torch ops that restate the reference code; never by calling graft's helpers.
"""

from __future__ import annotations

import pytest
import torch

from graft.merge.wudi import wudi


def objective(tau: torch.Tensor, deltas: list[torch.Tensor]) -> float:
    """L(τ) = Σᵢ ‖(τ − δᵢ)δᵢᵀ‖²_F / ‖δᵢ‖²_F, as the reference writes it."""
    return float(sum(((tau - d) @ d.T).square().sum() / d.square().sum() for d in deltas))


def reference_adam(deltas: list[torch.Tensor], steps: int = 300, lr: float = 1e-5):
    """get_redundant_task_vector: autograd on L from the sum, torch's Adam."""
    vectors = torch.stack(deltas)
    merging = torch.nn.Parameter(vectors.sum(0))
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    norms = vectors.reshape(len(deltas), -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = (inner.square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.detach()


def close(actual, expected, atol=1e-9):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- hand-computed solutions ----------------------------------------------------------------


def test_each_task_reproduced_on_its_own_input_direction():
    # δ1 = e0 f0ᵀ (input f0 -> e0), δ2 = e1 (f0 + f1)ᵀ (input f0 + f1 -> 2 e1). Zero
    # interference needs τ f0 = e0 and τ (f0 + f1) = 2 e1, so τ f1 = 2 e1 − e0:
    # τ = [[1, −1], [0, 2]] (L = 0), where task arithmetic gives [[1, 0], [1, 1]].
    base = torch.full((2, 2), 0.5, dtype=torch.float64)
    d1, d2 = t64([[1, 0], [0, 0]]), t64([[0, 0], [1, 1]])
    out = wudi([base + d1, base + d2], base, solver="closed_form")
    close(out, base + t64([[1, -1], [0, 2]]))
    close(wudi([base + d1, base + d2], base, solver="closed_form", scale=0.5),
          base + 0.5 * t64([[1, -1], [0, 2]]))  # fmt: skip


def test_conflicting_tasks_on_one_input_are_averaged_whatever_their_scale():
    # Both tasks read input f0: δ1 = 1·e0 f0ᵀ, δ2 = 3·e1 f0ᵀ. Term i is
    # ‖(τf0 − δᵢf0) (δᵢf0)ᵀ‖² / nᵢ = ‖τf0 − δᵢf0‖² (the normalisation cancels the scale), so
    # τ f0 = (e0 + 3 e1)/2. Nothing reads f1: G = 2 f0f0ᵀ is singular there and the
    # minimum-norm minimiser sets τ f1 = 0. τ = [[0.5, 0], [1.5, 0]].
    base = torch.zeros(2, 2, dtype=torch.float64)
    d1, d2 = t64([[1, 0], [0, 0]]), t64([[0, 0], [3, 0]])
    close(wudi([d1, d2], base, solver="closed_form"), [[0.5, 0], [1.5, 0]])


def test_column_vectors_give_the_mean():
    # in = 1: (τ − δᵢ)δᵢᵀ has norm² ‖τ − δᵢ‖²·nᵢ, so L = Σ ‖τ − δᵢ‖² and τ = mean(δᵢ).
    base = torch.zeros(3, 1, dtype=torch.float64)
    ds = [t64([[1], [2], [0]]), t64([[3], [0], [0]]), t64([[2], [-2], [6]])]
    close(wudi(ds, base, solver="closed_form"), [[2], [0], [2]])


def test_orthogonal_inputs_keep_the_task_arithmetic_sum():
    # Rows of δ1 span f0, of δ2 span f1: τ = δ1 + δ2 has zero loss and is also Adam's
    # start, where the gradient is zero, so Adam stays there.
    base = torch.ones(3, 3, dtype=torch.float64)
    d1 = t64([[2, 0, 0], [-1, 0, 0], [0, 0, 0]])
    d2 = t64([[0, 0, 0], [0, 4, 0], [0, 1, 0]])
    for solver in ("closed_form", "adam"):
        close(wudi([base + d1, base + d2], base, solver=solver), base + d1 + d2)


def test_one_dim_tensors_and_opted_out_tensors_take_the_mean_delta():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    m1, m2 = base + t64([1, 2]), base + t64([3, -2])
    close(wudi([m1, m2], base, scale=2.0), [5.0, 1.0])  # mean [2, 0], λ 2
    base2 = torch.zeros(2, 2, dtype=torch.float64)
    d1, d2 = t64([[1, 0], [0, 0]]), t64([[0, 0], [1, 1]])
    close(wudi([d1, d2], base2, optimize=False), [[0.5, 0], [0.5, 0.5]])


def test_zero_task_vectors_are_left_out_of_the_objective():
    # A model that left the tensor alone has nᵢ = 0: it adds nothing to L, so the result
    # is the one-task minimiser δ1 (the reference would divide by zero).
    base = torch.zeros(2, 2, dtype=torch.float64)
    d1 = t64([[1, 2], [3, 4]])
    for solver in ("closed_form", "adam"):
        out = wudi([d1, base.clone()], base, solver=solver)
        assert torch.isfinite(out).all()
        close(out, d1, atol=1e-8)
    close(wudi([base.clone(), base.clone()], base), base)


# --- the closed form is the minimum; Adam heads for it --------------------------------------


def _random(seed: int, shape=(8, 6), count=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    deltas = [scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]
    return base, deltas


def test_closed_form_is_a_minimum_of_the_objective():
    base, deltas = _random(0)
    tau = wudi([base + d for d in deltas], base, solver="closed_form") - base
    best = objective(tau, deltas)
    assert best < objective(sum(deltas), deltas)  # better than task arithmetic
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # and than any nearby point (L is convex)
        assert objective(tau + 1e-3 * torch.randn(tau.shape, generator=g, dtype=tau.dtype),
                         deltas) > best  # fmt: skip
    # the stationarity condition, restated: Σ (τ − δᵢ)δᵢᵀδᵢ/nᵢ = 0
    grad = sum((tau - d) @ d.T @ d / d.square().sum() for d in deltas)
    close(grad, torch.zeros_like(grad), atol=1e-10)


def test_adam_decreases_the_objective_and_converges_to_the_closed_form():
    base, deltas = _random(2)
    models = [base + d for d in deltas]
    exact = wudi(models, base, solver="closed_form") - base
    losses = [
        objective(wudi(models, base, steps=s, lr=1e-2) - base, deltas) for s in (0, 10, 100, 1000)
    ]
    assert losses[0] == pytest.approx(objective(sum(deltas), deltas))  # 0 steps: the sum
    assert losses == sorted(losses, reverse=True)
    # three random tasks conflict: the minimum is far from 0 (16.49 here), and Adam gets there
    assert losses[-1] == pytest.approx(objective(exact, deltas), rel=1e-6)
    close(wudi(models, base, steps=3000, lr=1e-2) - base, exact, atol=1e-6)


def test_adam_at_the_paper_defaults_matches_the_reference_code():
    # Realistic scale: entries ~1e-3, so 300 steps of ~1e-5 move the result well off the
    # sum (up to 3e-3 per entry) without reaching the minimum.
    base, deltas = _random(3, shape=(12, 10), count=4, scale=1e-3)
    models = [base + d for d in deltas]
    expected = reference_adam(deltas)
    out = wudi(models, base) - base
    close(out, expected, atol=1e-12)
    moved = (out - sum(deltas)).abs().max()
    assert 1e-4 < moved <= 300 * 1e-5 * 1.01
    # and it lowered the objective on the way
    assert objective(out, deltas) < objective(sum(deltas), deltas)


def test_float32_large_tensors_and_the_tensors_device():
    # Above 65,536 entries the math runs in float32 (as the reference), on the device.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 250, generator=g)
    models = [base + 1e-3 * torch.randn(300, 250, generator=g) for _ in range(2)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for dev in devices:
        on = [m.to(dev) for m in models]
        out = wudi(on, base.to(dev), steps=20)
        assert out.dtype == torch.float32 and out.device.type == dev
        results[dev] = out.cpu()
    expected = base + reference_adam([(m - base).double() for m in models], steps=20).float()
    for out in results.values():
        close(out, expected, atol=2e-6)
