"""The methods graft took over from mergekit 0.1.5 (karcher, sce, nearswap, arcee_fusion,
ram, ramplus_tl), the ``weight`` that slerp and model_stock accept and ignore, and layer
gradients per stack of blocks (T5, CLIP).

Expected values are worked out here with plain torch or by hand, never with graft's own
helpers; each case is built so that dropping a step of the method changes the answer
(the comment on each case says which step it pins). tests/test_mergekit_crosscheck.py
compares the same methods with mergekit itself.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from graft.merge import METHODS
from graft.plan.arch import stack_depths
from graft.recipe import parse_recipe


def _fn(name):
    return METHODS[name].fn


# --- karcher ----------------------------------------------------------------------------


def _polar(angle: float, norm: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)]) * norm


def test_karcher_is_the_mean_angle_on_a_circle_at_the_mean_norm():
    # On a circle the Karcher mean of angles 0, 0, π/2 is their arithmetic mean π/6; the
    # normalised Euclidean mean (the starting point) is atan2(1, 2) instead. One
    # Riemannian step reaches π/6 exactly; the norm is the mean norm (1 + 2 + 3)/3.
    xs = [_polar(0, 1.0), _polar(0, 2.0), _polar(math.pi / 2, 3.0)]
    out = _fn("karcher")(xs, None, max_iter=10, tol=1e-5)
    torch.testing.assert_close(out, _polar(math.pi / 6, 2.0), atol=1e-6, rtol=0)


def test_karcher_without_steps_is_the_normalised_mean():
    xs = [_polar(0, 1.0), _polar(0, 2.0), _polar(math.pi / 2, 3.0)]
    out = _fn("karcher")(xs, None, max_iter=0, tol=1e-5)
    torch.testing.assert_close(out, _polar(math.atan2(1, 2), 2.0), atol=1e-6, rtol=0)


def test_karcher_zero_model_counts_in_the_norm_not_the_direction():
    # A zero tensor has no direction: the other three share the weights (one step still
    # lands on π/6, not 3/4 of the way), but its norm 0 is in the mean norm: 6/4.
    xs = [_polar(0, 1.0), _polar(0, 2.0), _polar(math.pi / 2, 3.0), torch.zeros(2)]
    out = _fn("karcher")(xs, None, max_iter=1, tol=1e-5)
    torch.testing.assert_close(out, _polar(math.pi / 6, 1.5), atol=1e-6, rtol=0)


def test_karcher_keeps_shape_and_returns_tiny_equal_inputs():
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    out = _fn("karcher")([x, 2 * x], None)
    torch.testing.assert_close(out, 1.5 * x)  # same direction, mean norm 1.5·‖x‖
    tiny = torch.full((2, 2), 1e-7)  # norm below tol: the plain mean (mergekit: zeros)
    torch.testing.assert_close(_fn("karcher")([tiny, tiny], None), tiny, atol=0, rtol=1e-6)


# --- sce ------------------------------------------------------------------------------------

SCE_DELTAS = torch.tensor(
    [
        [1.0, -2.0, 0.5, 3.0],
        [2.0, 1.0, 0.5, -1.0],
        [-1.0, 1.0, 0.5, 2.0],
    ]
)


def _sce_reference(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE written out entry by entry."""
    t, n = deltas.shape
    d = deltas.clone()
    if select_topk < 1:
        mean = d.mean(dim=0)
        var = [sum((float(d[i, j]) - float(mean[j])) ** 2 for i in range(t)) / t for j in range(n)]
        k = int(sum(v != 0 for v in var) * select_topk)
        keep = sorted(range(n), key=lambda j: -var[j])[:k]
        for j in range(n):
            if j not in keep:
                d[:, j] = 0
    energy = [float((d[i] ** 2).mean()) for i in range(t)]
    w = [e / sum(energy) for e in energy]
    out = torch.zeros(n)
    for j in range(n):
        sign = 1.0 if float(d[:, j].sum()) >= 0 else -1.0
        agree = [i for i in range(t) if float(d[i, j]) != 0 and math.copysign(1, d[i, j]) == sign]
        total = sum(w[i] for i in agree)
        out[j] = sum(w[i] * float(d[i, j]) for i in agree) / total if total else 0.0
    return out


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.5])
def test_sce_matches_the_steps_written_out(select_topk):
    base = torch.tensor([0.5, -0.5, 1.0, 0.0])
    models = [base + d for d in SCE_DELTAS]
    out = _fn("sce")(models, base, select_topk=select_topk)
    torch.testing.assert_close(out, base + _sce_reference(SCE_DELTAS, select_topk))


def test_sce_by_hand_at_select_topk_0_7():
    # Variances 14/9, 2, 0, 26/9: three are non-zero, k = int(3·0.7) = 2 keeps entries 1
    # and 3 (entry 2, where all models agree, is never kept). Energies of the selected
    # deltas 13/4, 2/4, 5/4 give weights 0.65, 0.1, 0.25. Entry 1 sums to 0, which elects
    # +: models 2 and 3 agree, both at 1. Entry 3 elects +: (0.65·3 + 0.25·2)/0.9.
    out = _fn("sce")(list(SCE_DELTAS), torch.zeros(4), select_topk=0.7)
    expected = torch.tensor([0.0, 1.0, 0.0, (0.65 * 3 + 0.25 * 2) / 0.9])
    torch.testing.assert_close(out, expected)


def test_sce_select_counts_only_entries_where_models_differ():
    # k = int(3 non-zero variances · 0.5) = 1: only entry 3 survives (int(4·0.5) = 2 would
    # keep entry 1 too). Weights 9/4, 1/4, 4/4 over 14/4; models 1 and 3 agree.
    out = _fn("sce")(list(SCE_DELTAS), torch.zeros(4), select_topk=0.5)
    w = torch.tensor([9.0, 1.0, 4.0]) / 14
    expected = torch.tensor([0.0, 0.0, 0.0, float((w[0] * 3 + w[2] * 2) / (w[0] + w[2]))])
    torch.testing.assert_close(out, expected)


def test_sce_is_scale_equivariant_for_small_deltas():
    # mergekit falls back to equal weights when Σ mean(δ²) < 1e-6; graft does not, so
    # deltas of RMS ~1e-4 are merged exactly like the same deltas at any other scale.
    base = torch.zeros(4)
    out = _fn("sce")(list(SCE_DELTAS * 1e-4), base, select_topk=1.0)
    torch.testing.assert_close(out, _sce_reference(SCE_DELTAS, 1.0) * 1e-4)


def test_sce_one_model_with_selection_gives_the_base():
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(_fn("sce")([base + 1], base, select_topk=0.5), base)


# --- nearswap ----------------------------------------------------------------------------------


def test_nearswap_takes_near_values_and_moves_far_ones_by_t():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0])
    model = torch.tensor([5e-5, -3e-4, 1e-4, 1.0, 1.9])
    t = 1e-4
    out = _fn("nearswap")([model], base, t=t)
    # near (|Δ| ≤ t): the model's value; far: the base moved by exactly t toward the model
    expected = base + (model - base).clamp(-t, t)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-6)
    assert out[1] == pytest.approx(-1e-4) and out[4] == pytest.approx(2.0 - 1e-4)


def test_nearswap_with_t_zero_is_the_base():
    base = torch.tensor([0.0, 1.0])
    assert torch.equal(_fn("nearswap")([base + 0.5], base, t=0.0), base)


# --- arcee_fusion ---------------------------------------------------------------------------

FUSION_BASE = torch.tensor(
    [[0.5, -0.5, -1.0, 0.5], [0.25, 0.0, -0.5, 0.25], [0.0, 1.0, -0.75, -1.0],
     [0.5, 1.0, 0.25, 0.75], [-0.25, 0.75, 0.0, 0.5]]
)  # fmt: skip
FUSION_MODEL = torch.tensor(
    [[1.0, -1.5, -0.5, -0.25], [1.25, -0.25, -1.0, 1.25], [0.5, 0.5, -1.75, -1.25],
     [0.25, 1.25, 1.0, 1.5], [-1.25, 1.5, 1.0, 1.0]]
)  # fmt: skip


def _fusion_reference(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)  # one KL per row
    importance = (model - base).abs() * kl
    ranked = sorted(importance.reshape(-1).tolist())
    n = len(ranked)
    q1, q2, q3 = (
        ranked[math.floor(0.25 * (n - 1))],
        ranked[math.floor(0.5 * (n - 1))],
        ranked[math.floor(0.75 * (n - 1))],
    )
    keep = importance >= q2 + 1.5 * (q3 - q1)
    return torch.where(keep, model, base)


def test_arcee_fusion_keeps_the_important_entries():
    # Chosen so that each variant differs here: importance without the KL factor, KL
    # along dim 0, interpolated quantiles (torch.quantile), > instead of >=, or 1 or 2
    # interquartile ranges instead of 1.5.
    out = _fn("arcee_fusion")([FUSION_MODEL], FUSION_BASE)
    torch.testing.assert_close(out, _fusion_reference(FUSION_BASE, FUSION_MODEL))
    changed = (out != FUSION_BASE).int().tolist()
    assert changed == [[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_arcee_fusion_importance_floors_probabilities_at_1e_8():
    # The base's second probability, e^-40, is far below the 1e-8 added to both
    # softmaxes, which sets the log ratio there: log((e^-10 + 1e-8) / (e^-40 + 1e-8)).
    from graft.merge.arcee_fusion import fusion_importance

    base, model = torch.tensor([[0.0, -40.0]]), torch.tensor([[0.0, -10.0]])

    def probs(gap: float) -> torch.Tensor:
        z = 1 + math.exp(-gap)
        return torch.tensor([1 / z, math.exp(-gap) / z], dtype=torch.float64) + 1e-8

    p, q = probs(10), probs(40)
    kl = float((p * (p / q).log()).sum())  # about 3.4e-4
    out = fusion_importance(model, base).double()
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 30 * kl]], dtype=torch.float64), rtol=1e-4, atol=0
    )


def test_arcee_fusion_one_element_keeps_the_model():
    # A one-element softmax has zero KL: importance 0, threshold 0, and 0 >= 0 keeps it.
    out = _fn("arcee_fusion")([torch.tensor([2.5])], torch.tensor([1.0]))
    assert torch.equal(out, torch.tensor([2.5]))


def test_arcee_fusion_large_tensor_is_reproducible():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g) * 0.02
    model = base + torch.randn(1100, 1000, generator=g) * 1e-3
    a = _fn("arcee_fusion")([model], base)
    assert torch.equal(a, _fn("arcee_fusion")([model], base))
    assert 0 < int((a != base).sum()) < a.numel() // 4


# --- ram, ramplus_tl ----------------------------------------------------------------------

# Columns: shared by 1 and 2; unique to 2; shared by 1 and 3; 1's change is below epsilon
# so it is unique to 2; nobody; unique to 3.
RAM_DELTAS = torch.tensor(
    [
        [0.3, 0.0, 0.2, 1e-6, 0.0, 0.0],
        [0.1, 0.4, 0.0, 0.5, 0.0, 0.0],
        [0.0, 0.0, -0.4, 0.0, 0.0, 0.3],
    ]
)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.linspace(-1, 1, 6)
    out = _fn("ram")(list(base + RAM_DELTAS), base, epsilon=1e-5)
    expected = base + torch.tensor([0.2, 0.4, -0.1, 0.5, 0.0, 0.3])
    torch.testing.assert_close(out, expected)


def test_ramplus_tl_scales_unique_changes_per_model():
    # model 1: 2 shared, 0 unique (no λ to apply); model 2: 1 shared, 2 unique, ρ = 0.5;
    # model 3: 1 shared, 1 unique, ρ = 1. λ = 1 + r·clip(ρ, 0, alpha).
    base = torch.zeros(6)
    models = list(RAM_DELTAS)
    out = _fn("ramplus_tl")(models, base, r=0.5, alpha=1.0, epsilon=1e-5)
    lam2, lam3 = 1 + 0.5 * 0.5, 1 + 0.5 * 1.0
    expected = torch.tensor([0.2, 0.4 * lam2, -0.1, 0.5 * lam2, 0.0, 0.3 * lam3])
    torch.testing.assert_close(out, expected)
    clipped = _fn("ramplus_tl")(models, base, r=0.5, alpha=0.2, epsilon=1e-5)
    lam = 1 + 0.5 * 0.2  # both ratios clip to alpha
    expected = torch.tensor([0.2, 0.4 * lam, -0.1, 0.5 * lam, 0.0, 0.3 * lam])
    torch.testing.assert_close(clipped, expected)


def test_ramplus_tl_epsilon_zero_with_an_unchanged_model_is_finite():
    # mergekit: ρ = 0/0 for the unchanged model, NaN everywhere.
    base = torch.zeros(6)
    models = [RAM_DELTAS[1], torch.zeros(6), RAM_DELTAS[2]]
    out = _fn("ramplus_tl")(models, base, r=0.1, alpha=0.2, epsilon=0.0)
    assert torch.isfinite(out).all()
    # model 2: 3 unique changes, 0 shared: λ = 1; model 3 likewise
    torch.testing.assert_close(out, RAM_DELTAS[1] + RAM_DELTAS[2])


# --- weight on slerp and model_stock: accepted, ignored ------------------------------------


def test_slerp_and_model_stock_accept_and_ignore_weight():
    g = torch.Generator().manual_seed(1)
    base, a, b = (torch.randn(3, 4, generator=g) for _ in range(3))
    slerp = _fn("slerp")
    assert torch.equal(slerp([a], base, t=0.3, weight=[0.9]), slerp([a], base, t=0.3))
    stock = _fn("model_stock")
    assert torch.equal(stock([a, b], base, weight=[0.9, 0.1]), stock([a, b], base))
    recipe = parse_recipe(
        "merge_method: slerp\nbase_model: x\nmodels:\n  - model: x\n    parameters: {weight: 0.5}\n"
        "  - model: y\n    parameters: {weight: 0.5}\nparameters: {t: 0.5}\n"
    )
    assert recipe.models[1].parameters["weight"] == 0.5


# --- layer gradients per stack of blocks ----------------------------------------------------


def test_stack_depths_per_stack_from_config_or_names():
    t5 = [f"encoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(2)] + [
        f"decoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(3)
    ]
    assert stack_depths(t5, {"num_layers": 2, "num_decoder_layers": 3}) == {
        "encoder.block.": 2,
        "decoder.block.": 3,
    }
    llava = [f"model.language_model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + [
        f"model.vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)
    ]
    cfg = {"text_config": {"num_hidden_layers": 4}, "vision_config": {}}  # vision: from names
    assert stack_depths(llava, cfg) == {
        "model.language_model.layers.": 4,
        "model.vision_tower.vision_model.encoder.layers.": 2,
    }
    assert stack_depths(["model.layers.0.x", "model.layers.1.x"], {"num_hidden_layers": 2}) == {
        "model.layers.": 2
    }
    clip = ["text_model.encoder.layers.0.x", "vision_model.encoder.layers.0.x"]
    cfg = {"text_config": {"num_hidden_layers": 3}, "encoder_layers": 7}  # longest match wins
    assert stack_depths(clip, cfg) == {
        "text_model.encoder.layers.": 3,
        "vision_model.encoder.layers.": 1,
    }
    # a stack's config key wins over its names when it says (as the single-stack count)
    assert stack_depths(t5, {"num_layers": 2, "num_decoder_layers": 4})["decoder.block."] == 4
    assert stack_depths(t5, {"num_layers": 2})["decoder.block."] == 3


def _save_family(tmp_path, model_cls, config, name):
    torch.manual_seed(0)
    base = model_cls(config).eval()
    base.save_pretrained(tmp_path / f"{name}-base")
    ft = model_cls(config).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ft.save_pretrained(tmp_path / f"{name}-ft")
    return tmp_path / f"{name}-base", tmp_path / f"{name}-ft"


def _merge_with_gradient(tmp_path, base, ft, gradient=(0, 1)) -> dict[str, float]:
    """task_arithmetic with ``weight: gradient`` (linear from 0 to 1): each tensor's
    effective weight."""
    recipe = tmp_path / "recipe.yaml"
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": list(gradient)}}],
        "dtype": "float32",
    }
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", recipe, out)
    assert code == 0, err
    merged, b, f = (load_file(str(p / "model.safetensors")) for p in (out, base, ft))
    weights = {}
    for name, tensor in merged.items():
        delta = f[name] - b[name]
        if delta.abs().max() > 0:
            weights[name] = float(((tensor - b[name]) * delta).sum() / (delta * delta).sum())
    return weights


def _block_weights(weights: dict[str, float], stack: str) -> dict[int, float]:
    out: dict[int, set[float]] = {}
    for name, w in weights.items():
        if name.startswith(stack):
            out.setdefault(int(name[len(stack) :].split(".")[0]), set()).add(round(w, 5))
    assert all(len(v) == 1 for v in out.values()), out  # one weight per block
    return {i: next(iter(v)) for i, v in sorted(out.items())}


def _t5_family(tmp_path):
    """A tiny T5 base and fine-tune with two stacks of different depths (encoder 2 blocks,
    decoder 3)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
        num_heads=2, decoder_start_token_id=0,
    )  # fmt: skip
    return _save_family(tmp_path, transformers.T5ForConditionalGeneration, config, "t5")


def test_t5_gradient_runs_over_encoder_and_decoder_separately(tmp_path):
    base, ft = _t5_family(tmp_path)
    weights = _merge_with_gradient(tmp_path, base, ft)
    assert _block_weights(weights, "encoder.block.") == {0: 0.0, 1: 1.0}
    assert _block_weights(weights, "decoder.block.") == {0: 0.0, 1: 0.5, 2: 1.0}
    outside = [n for n in weights if ".block." not in n]
    assert outside and all(abs(weights[n]) < 1e-6 for n in outside)  # t = 0 outside


def test_clip_gradient_uses_each_towers_depth(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                       "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
        projection_dim=8,
    )  # fmt: skip
    base, ft = _save_family(tmp_path, transformers.CLIPModel, config, "clip")
    weights = _merge_with_gradient(tmp_path, base, ft)
    assert _block_weights(weights, "text_model.encoder.layers.") == {0: 0.0, 1: 1.0}
    assert _block_weights(weights, "vision_model.encoder.layers.") == {0: 0.0, 1: 0.5, 2: 1.0}


def test_lines_scales_each_stack_by_its_own_depth(tmp_path):
    """LiNeS's last block gets α + β in every stack: T5's 2-block encoder as well as its
    3-block decoder (the deepest stack's depth would give the encoder α + β/2), in a
    merge and in the in-memory merge the search runs."""
    from graft.eval.search import merge_states

    base, ft = _t5_family(tmp_path)
    recipe = tmp_path / "lines.yaml"
    doc = {
        "merge_method": "lines",
        "base_model": str(base),
        "models": [{"model": str(ft)}],
        "parameters": {"alpha": 0.2, "beta": 0.6},
        "dtype": "float32",
    }
    recipe.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli("merge", recipe, tmp_path / "merged")
    assert code == 0, err
    b, f = (load_file(str(p / "model.safetensors")) for p in (base, ft))
    in_memory = merge_states("lines", b, [f], {"alpha": 0.2, "beta": 0.6})
    for merged in (load_file(str(tmp_path / "merged" / "model.safetensors")), in_memory):
        weights = {}
        for name, tensor in merged.items():
            delta = f[name] - b[name]
            if delta.abs().max() > 0:
                weights[name] = float(((tensor - b[name]) * delta).sum() / (delta * delta).sum())
        assert _block_weights(weights, "encoder.block.") == {0: 0.2, 1: 0.8}
        assert _block_weights(weights, "decoder.block.") == {0: 0.2, 1: 0.5, 2: 0.8}
        outside = [n for n in weights if ".block." not in n]
        assert outside and all(abs(weights[n] - 0.2) < 1e-5 for n in outside)


def test_slices_on_a_model_with_two_stacks_fail_with_the_fix(tmp_path):
    base, ft = _t5_family(tmp_path)
    recipe = tmp_path / "slices.yaml"
    doc = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(ft), "layer_range": [0, 2]}]}],
    }
    recipe.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "--dry-run", "--json")
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1, err
    assert "2 stacks of blocks" in lines[0] and "models: form" in lines[0]


def test_block_past_the_configured_depth_gets_t_one_with_a_note(tmp_path):
    # A checkpoint that stores one block more than config.json counts (as models with a
    # multi-token-prediction layer do): gradients give it t = 1, and the plan says so.
    from safetensors.torch import save_file

    for name, seed in (("base", 0), ("ft", 1)):
        d = tmp_path / name
        d.mkdir()
        g = torch.Generator().manual_seed(seed)
        save_file({f"model.layers.{i}.w": torch.randn(2, generator=g) for i in range(4)},
                  str(d / "model.safetensors"))  # fmt: skip
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    # three points: at t = 1.5 the gradient would index past its end
    weights = _merge_with_gradient(tmp_path, tmp_path / "base", tmp_path / "ft", (0, 0.5, 1))
    assert _block_weights(weights, "model.layers.") == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    recipe = tmp_path / "recipe.yaml"
    code, out, err = run_cli("merge", recipe, tmp_path / "o", "--dry-run", "--json")
    assert code == 0, err
    assert any("past the 3 blocks" in n for n in json.loads(out)["notes"])
