"""OPCM, continual merging by orthogonal projection: the math by hand, then the continual
state (`graft continual add`) against the one-shot recipe (`graft merge`).

Expected values are worked out in the comments beside them, never by calling graft's
helpers on the same inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_hf_model, run_cli
from graft.io import load_state_dict
from graft.merge import opcm


def e(i: int, n: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.float64)
    v[i] = 1.0
    return v


def close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


D321 = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
ONES = torch.ones(3, 3, dtype=torch.float64)
EYE = torch.eye(3, dtype=torch.float64)


# --- step 2: the split rank and the projection ----------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "k"),
    # σ = (3, 2, 1): cumulative shares 0.5, 0.833, 1. k counts the shares <= α, which is
    # the reference's argmax(share > α): 0.5 is not > 0.5, so α = 0.5 protects one.
    [(0.0, 0), (0.49, 0), (0.5, 1), (0.8, 1), (0.9, 2), (0.999, 2)],
)
def test_protected_rank(alpha, k):
    assert opcm.protected_rank(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), alpha) == k


def test_projection_zeroes_the_block_and_the_diagonal():
    # merged = diag(3, 2, 1): U = V = I (up to signs, which cancel), so the coordinates of
    # a new delta are its own entries. α = 0.5 -> k = 1: the 1x1 block (0, 0) plus the
    # diagonal go; α = 0.9 -> k = 2: the 2x2 block plus (2, 2).
    close(opcm.project_out(D321, ONES.clone(), 0.5), ONES - EYE)
    expected = ONES.clone()
    expected[:2, :2] = 0
    expected[2, 2] = 0
    close(opcm.project_out(D321, ONES.clone(), 0.9), expected)


def test_a_delta_inside_the_old_subspace_contributes_nothing():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)  # shares .53 .84 .95 1
    merged = u @ torch.diag(s) @ v.T
    # α = 0.9 protects k = 2: any mix of u0, u1 with v0, v1 is removed ...
    inside = u[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ v[:, :2].T
    close(opcm.project_out(merged, inside, 0.9), torch.zeros(6, 5), atol=1e-12)
    # ... and so is any combination of the singular directions u_i v_i^T, protected or not
    diagonal = sum(c * torch.outer(u[:, i], v[:, i]) for i, c in enumerate([2.0, -1.0, 4.0, 3.0]))
    close(opcm.project_out(merged, diagonal, 0.9), torch.zeros(6, 5), atol=1e-12)
    # a cross term u2 v3^T outside the protected block is kept whole
    cross = torch.outer(u[:, 2], v[:, 3])
    close(opcm.project_out(merged, cross, 0.9), cross, atol=1e-12)


def test_a_delta_orthogonal_to_the_merged_one_is_added_whole():
    # merged = 3 e0 f0^T has rank 1: the subspace is span(e0) x span(f0) only; the
    # remaining SVD columns (arbitrary, backend-chosen) are not used.
    merged = 3 * torch.outer(e(0, 4), e(0, 3))
    delta = 2 * torch.outer(e(1, 4), e(1, 3)) + torch.outer(e(2, 4), e(2, 3))
    close(opcm.project_out(merged, delta, 0.5), delta)
    # of a dense delta, only the coordinate along e0 f0^T (= 1) goes
    close(
        opcm.project_out(merged, torch.ones(4, 3, dtype=torch.float64), 0.5),
        torch.ones(4, 3) - torch.outer(e(0, 4), e(0, 3)),
    )


def test_a_zero_merged_delta_projects_nothing_out():
    delta = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    close(opcm.project_out(torch.zeros(3, 2, dtype=torch.float64), delta, 0.5), delta)


# --- steps 3-4: the running sum and the adaptive λ --------------------------------------------


def test_lambda_scales_to_the_mean_task_vector_norm():
    # 1-D: tau1 = (3, 0), tau2 = (0, 4), added unprojected: S = (3, 4), |S| = 5, mean task
    # norm (3 + 4)/2 = 3.5 -> merged delta = S * 3.5/5 = (2.1, 2.8) (task arithmetic: (3, 4)).
    base = torch.ones(2, dtype=torch.float64)
    out = opcm.opcm([base + torch.tensor([3.0, 0.0]), base + torch.tensor([0.0, 4.0])], base)
    close(out, [3.1, 3.8])
    # 2-D, orthogonal ranks one: the same numbers on e0 f0^T and e1 f1^T
    base2 = torch.zeros(4, 3, dtype=torch.float64)
    t1, t2 = 3 * torch.outer(e(0, 4), e(0, 3)), 4 * torch.outer(e(1, 4), e(1, 3))
    close(
        opcm.opcm([t1, t2], base2),
        2.1 * torch.outer(e(0, 4), e(0, 3)) + 2.8 * torch.outer(e(1, 4), e(1, 3)),
    )


def test_two_tasks_by_hand_and_order_dependence():
    # diag(3,2,1) then ones, α = 0.5: tau2 loses its diagonal (above), S = D + ones - I =
    # [[3,1,1],[1,2,1],[1,1,1]], |S|^2 = 9+4+1+6 = 20; norms |D| = sqrt14, |ones| = 3.
    base = torch.zeros(3, 3, dtype=torch.float64)
    s = D321 + ONES - EYE
    close(opcm.opcm([D321, ONES], base), s * ((math.sqrt(14) + 3) / 2) / math.sqrt(20))
    # ones then diag(3,2,1): ones = 3 u u^T (u = 1/sqrt3), rank 1, k = 0; only the
    # coordinate u^T D u = (3+2+1)/3 = 2 along u u^T = ones/3 goes: S = ones + D - 2 ones/3.
    s_rev = ONES / 3 + D321
    close(opcm.opcm([ONES, D321], base), s_rev * ((math.sqrt(14) + 3) / 2) / s_rev.norm())
    assert not torch.allclose(opcm.opcm([D321, ONES], base), opcm.opcm([ONES, D321], base))


def test_project_false_adds_two_d_tensors_whole():
    # S = D + ones (no projection): |S|^2 = 16+9+4+6 = 35
    base = torch.zeros(3, 3, dtype=torch.float64)
    out = opcm.opcm([D321, ONES], base, project=False)
    close(out, (D321 + ONES) * ((math.sqrt(14) + 3) / 2) / math.sqrt(35))


def test_same_task_twice_is_projected_away_entirely():
    # D in the basis of D is diagonal: all of it goes; S stays D, mean norm |D| -> D.
    base = torch.ones(3, 3, dtype=torch.float64)
    close(opcm.opcm([base + D321, base + D321, base + D321], base), base + D321)


def test_small_tensors_are_kept_in_float64_and_returned_in_float32():
    base = torch.zeros(3, 3)
    assert opcm.task_vector(base + 1, base).dtype == torch.float64
    assert opcm.opcm([base + D321.float(), base + ONES.float()], base).dtype == torch.float32


# --- the continual state against the one-shot recipe ----------------------------------------


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("opcm-family")
    base = make_hf_model("bert", root / "base", seed=1)
    fts = [make_hf_model("bert", root / f"ft{i}", seed=20 + i, like=base) for i in range(3)]
    return base, fts, root


def _add(state: Path, model: Path, *extra: str) -> dict:
    code, out, err = run_cli("continual", "add", state, model, "-q", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_sequential_state_equals_the_one_shot_recipe_byte_for_byte(bert_family, tmp_path):
    base, fts, _ = bert_family
    state = tmp_path / "state"
    sizes = []
    for i, ft in enumerate(fts):
        summary = _add(state, ft, *(["--base", str(base)] if i == 0 else []))
        assert summary["step"] == i + 1
        sizes.append((state / "opcm-state.safetensors").stat().st_size)
    assert summary["models"] == [str(f.resolve()) for f in fts]
    assert sizes[0] == sizes[1] == sizes[2]  # the state does not grow with the models
    # the recorded recipe run in one go by the engine gives the same file, byte for byte
    code, _, err = run_cli("merge", state / "recipe.yaml", tmp_path / "one", "-q")
    assert code == 0, err
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert (state / "model" / "model.safetensors").read_bytes() == one
    # and that is opcm over the three fine-tunes in arrival order, tensor by tensor
    merged = load_state_dict(state / "model")
    b, models = load_state_dict(base), [load_state_dict(f) for f in fts]
    name = "encoder.layer.1.attention.self.query.weight"
    expected = opcm.opcm([m[name].float() for m in models], b[name].float())
    assert torch.equal(merged[name], expected)
    # another arrival order gives another model
    reordered = opcm.opcm([models[i][name].float() for i in (2, 0, 1)], b[name].float())
    assert not torch.allclose(merged[name], reordered, atol=1e-6)


def test_no_project_is_recorded_and_adds_embeddings_whole(bert_family, tmp_path):
    base, fts, _ = bert_family
    state = tmp_path / "state"
    _add(state, fts[0], "--base", str(base), "--no-project", "embeddings", "--alpha", "0.7")
    _add(state, fts[1])
    code, out, _ = run_cli("continual", "show", state, "--json")
    info = json.loads(out)
    assert info["parameters"] == {
        "alpha": 0.7,
        "project": [{"filter": "embeddings", "value": False}],
    }
    b, m0, m1 = (load_state_dict(p) for p in (base, fts[0], fts[1]))
    name = "embeddings.word_embeddings.weight"
    t0, t1 = (m[name].double() - b[name].double() for m in (m0, m1))
    s = t0 + t1
    expected = b[name].double() + s * ((t0.norm() + t1.norm()) / 2 / s.norm())
    close(load_state_dict(state / "model")[name].double(), expected, atol=1e-6)


def test_bad_steps_fail_and_leave_the_state_alone(bert_family, tmp_path):
    base, fts, root = bert_family
    state = tmp_path / "state"
    code, _, err = run_cli("continual", "add", state, fts[0], "-q")
    assert code == 2 and "--base" in err and not state.exists()
    _add(state, fts[0], "--base", str(base))
    before = (state / "model" / "model.safetensors").read_bytes()
    gpt2 = make_hf_model("gpt2", root / "gpt2", seed=5)
    for args, says in [
        ((fts[0],), "already merged"),
        ((fts[1], "--alpha", "0.3"), "alpha 0.5"),
        ((fts[1], "--base", str(fts[2])), "drop --base"),
        ((gpt2,), "is missing from model"),  # the planner's check against the base
        ((fts[1], "--alpha", "1.0"), "[0, 1)"),
    ]:
        code, _, err = run_cli("continual", "add", state, *args, "-q")
        assert code == 2 and says in err, (args, err)
    assert (state / "model" / "model.safetensors").read_bytes() == before
    code, _, err = run_cli("continual", "add", fts[2], fts[1], "-q")  # a model, not a state
    assert code == 2 and "not a continual-merge state" in err


def test_a_model_and_base_that_changed_since_the_state_fail(bert_family, tmp_path):
    # Base and model agree with each other (so the planner is content) but lack a tensor
    # the state has: the base folder was replaced since the first step.
    from graft.io import save_state_dict

    base, fts, _ = bert_family
    state = tmp_path / "state"
    b = load_state_dict(base)
    save_state_dict(b, tmp_path / "base")
    _add(state, fts[0], "--base", str(tmp_path / "base"))
    del b["pooler.dense.bias"]
    save_state_dict(b, tmp_path / "base", force=True)
    m = load_state_dict(fts[1])
    del m["pooler.dense.bias"]
    save_state_dict(m, tmp_path / "ft1")
    code, _, err = run_cli("continual", "add", state, tmp_path / "ft1", "-q")
    assert code == 2 and "lacks pooler.dense.bias" in err and "models must match" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 260, generator=g)  # > 65,536 entries: float32 SVDs
    models = [base + 0.01 * torch.randn(300, 260, generator=g) for _ in range(3)]
    cpu = opcm.opcm(models, base)
    gpu = opcm.opcm([m.cuda() for m in models], base.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
