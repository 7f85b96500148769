"""PLeaS and permutation matching: permuted copies recovered exactly (digits net and a tiny
BERT), PLeaS of a model with its permuted copy returns the model, the least squares and the
partial layout against hand-worked values, two digits models from different
initialisations merged far better than by averaging, and ``graft pleas`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import _tiny_config, make_hf_model, run_cli
from graft.align import (
    UnsupportedArchitecture,
    activation_matching,
    correlations,
    permutation_spec,
    permute,
    random_permutation,
    weight_matching,
)
from graft.merge.pleas import (
    Normal,
    fit_error,
    least_squares,
    partial_layout,
    pleas,
    pleas_many,
    zip_tensor,
)
from graft.models.digits_net import (
    backbone_state,
    build_backbone,
    default_config,
    load_backbone,
    save_backbone,
)
from graft.zoo._train import average, train
from graft.zoo.tasks import task_data

DIGITS = default_config(hidden_size=16, intermediate_size=32, num_hidden_layers=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared machine: one thread is ~40x faster than many contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(DIGITS).eval()


def _digits_copy(module: nn.Module, perms, spec) -> nn.Module:
    out = build_backbone(DIGITS).eval()
    out.load_state_dict(permute(backbone_state(module), spec, perms))
    return out


def _bert(seed: int = 0):
    config, cls = _tiny_config("bert")
    torch.manual_seed(seed)
    return cls(config).eval(), config, cls


def _bert_batches(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(6, 12, dtype=torch.long)
        mask[0, 8:] = 0  # padding rows must not count
        out.append(
            {"input_ids": torch.randint(0, 128, (6, 12), generator=g), "attention_mask": mask}
        )
    return out


def _matched(spec, a, b, match, batches):
    if match == "weight":
        return weight_matching(spec, a.state_dict(), b.state_dict())[0]
    return activation_matching(spec, correlations(spec, a, b, batches))[0]


# --- (a) permuted copies ---------------------------------------------------------------


@pytest.mark.parametrize("match", ["weight", "activation"])
def test_digits_permuted_copy_is_recognised_exactly(match):
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    p0 = random_permutation(spec, seed=1)
    copy = _digits_copy(model, p0, spec)
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():  # the spec is right: the copy computes the same function
        torch.testing.assert_close(copy(x), model(x)[:, p0["residual"]], atol=1e-5, rtol=0)
        assert (copy(x) - model(x)).abs().max() > 0.1  # ... and really is permuted
    perms = _matched(spec, model, copy, match, [{"x": torch.rand(64, 1, 8, 8)} for _ in range(3)])
    for g in spec.groups:
        assert torch.equal(perms[g], torch.argsort(p0[g])), g
    aligned = permute(backbone_state(copy), spec, perms)
    for name, t in backbone_state(model).items():
        torch.testing.assert_close(aligned[name], t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("match", ["weight", "activation"])
def test_bert_permuted_copy_is_recognised_exactly(match):
    model, config, cls = _bert()
    spec = permutation_spec(config.to_dict(), model.state_dict())
    p0 = random_permutation(spec, seed=2)
    d = config.hidden_size // config.num_attention_heads
    qk = p0["encoder.layer.0.qk"]
    assert set((qk // d).tolist()) == set(range(config.num_attention_heads))  # heads whole
    assert torch.equal(qk // d, p0["encoder.layer.0.vo"] // d)  # Q/K and V/O share heads
    copy = cls(config).eval()
    copy.load_state_dict(permute(model.state_dict(), spec, p0))
    batches = _bert_batches()
    with torch.no_grad():
        out_a, out_b = model(**batches[0]), copy(**batches[0])
    res = p0["residual"]
    torch.testing.assert_close(
        out_b.last_hidden_state, out_a.last_hidden_state[..., res], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        out_b.pooler_output, out_a.pooler_output[:, p0["pooler"]], atol=1e-5, rtol=0
    )
    perms = _matched(spec, model, copy, match, batches)
    for g in spec.groups:
        assert torch.equal(perms[g], torch.argsort(p0[g])), g
    aligned = permute(copy.state_dict(), spec, perms)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(aligned[name], t, atol=1e-6, rtol=0)


def test_unsupported_architecture_is_one_line():
    config, _ = _tiny_config("llama")
    with pytest.raises(UnsupportedArchitecture, match=r"llama.*GraftDigitsNet and BERT"):
        permutation_spec(config.to_dict(), ["model.embed_tokens.weight"], where="m")


# --- (b) PLeaS of a model and its permuted copy ----------------------------------------


@pytest.mark.parametrize(("match", "ratio"), [("activation", 1.0), ("weight", 0.5)])
def test_pleas_of_digits_model_and_its_permuted_copy_is_the_model(match, ratio):
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    copy = _digits_copy(model, random_permutation(spec, seed=3), spec)
    x = torch.rand(300, 1, 8, 8)
    for solve in (False, True):
        # ridge -> 0: the least squares then has the model itself as its exact solution
        res = pleas(
            model,
            copy,
            spec,
            [{"x": x[:150]}, {"x": x[150:]}],
            match=match,
            ratio=ratio,
            solve=solve,
            ridge=1e-9,
        )
        config = dict(DIGITS, intermediate_size=res.widths.get("blocks.0.mlp", 32))
        assert config["intermediate_size"] == (32 if ratio == 1 else 16 + 2 * 16)
        merged = build_backbone(config).eval()
        merged.load_state_dict(res.state)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=0)
        if solve:
            assert max(res.errors.values()) < 1e-6


@pytest.mark.parametrize(
    ("match", "ratio"), [("activation", 1.0), ("activation", 0.5), ("weight", 1.0)]
)
def test_pleas_of_a_model_and_two_permuted_copies_recovers_both_and_is_the_model(match, ratio):
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    p1, p2 = random_permutation(spec, seed=3), random_permutation(spec, seed=7)
    copies = [_digits_copy(model, p, spec) for p in (p1, p2)]
    x = torch.rand(300, 1, 8, 8)
    res = pleas_many(
        [model, *copies], spec, [{"x": x}], match=match, ratio=ratio, weights=[0.5, 0.3, 0.2],
        ridge=1e-9,
    )  # fmt: skip
    for got, p in zip(res.all_perms, (p1, p2), strict=True):  # each copy matched back to the anchor
        for g in p:
            assert torch.equal(got[g], torch.argsort(p[g])), g
    assert res.perms is res.all_perms[0]
    width = res.widths.get("blocks.0.mlp", 32)
    assert width == (32 if ratio == 1 else 16 + 3 * 16)  # k merged + 3 models' own n − k
    merged = build_backbone(dict(DIGITS, intermediate_size=width)).eval()
    merged.load_state_dict(res.state)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=0)
    assert max(res.errors.values()) < 1e-6


def test_pleas_many_of_two_is_pleas_and_bad_weights_are_refused():
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    other = _digits(1)
    x = [{"x": torch.rand(100, 1, 8, 8)}]
    one = pleas(model, other, spec, x, weight=0.3, ratio=0.5)
    two = pleas_many([model, other], spec, x, weights=[0.3, 0.7], ratio=0.5)
    assert one.state.keys() == two.state.keys()
    for name in one.state:
        assert torch.equal(one.state[name], two.state[name]), name
    # the targets weigh each model by its share: swapping shares changes the merge
    swapped = pleas_many([model, other], spec, x, weights=[0.7, 0.3], ratio=0.5)
    assert not torch.equal(swapped.state["blocks.0.fc1.weight"], two.state["blocks.0.fc1.weight"])
    for bad in ([0.5, 0.6], [1.0]):
        with pytest.raises(ValueError, match="one weight per model summing to 1"):
            pleas_many([model, other], spec, x, weights=bad)
    with pytest.raises(ValueError, match="at least two models"):
        pleas_many([model], spec, x)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_pleas_of_bert_and_its_permuted_copy_is_the_model(ratio):
    model, config, cls = _bert()
    spec = permutation_spec(config.to_dict(), model.state_dict())
    copy = cls(config).eval()
    copy.load_state_dict(permute(model.state_dict(), spec, random_permutation(spec, seed=4)))
    batches = _bert_batches(4)
    res = pleas(model, copy, spec, batches, match="activation", ratio=ratio, ridge=1e-9)
    width = res.widths.get("encoder.layer.0.ffn", config.intermediate_size)
    assert width == (64 if ratio == 1 else 32 + 2 * 32)
    config.intermediate_size = width
    merged = cls(config).eval()
    merged.load_state_dict(res.state)
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool()
            got, want = merged(**b).last_hidden_state[m], model(**b).last_hidden_state[m]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --- (d) the least squares and the partial layout, by hand -----------------------------


def test_least_squares_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    W = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.25, -1.0], dtype=torch.float64)
    T = X @ W.T + b
    normal = Normal(3, 2)
    normal.add(X[:25], T[:25])
    normal.add(X[25:], T[25:])
    W0, b0 = least_squares(normal.gram, normal.cross, ridge=0.0)
    torch.testing.assert_close(W0, W)  # exact data: the layer itself
    torch.testing.assert_close(b0, b)
    assert fit_error(normal, W0, b0) == pytest.approx(0.0, abs=1e-12)
    # Ridge: (XaᵀXa + λD)⁻¹ XaᵀT with λ = ridge · mean diag(XᵀX), bias not penalised.
    noisy = T + 0.3 * torch.randn(T.shape, generator=g, dtype=torch.float64)
    normal = Normal(3, 2)
    normal.add(X, noisy)
    Xa = np.hstack([X.numpy(), np.ones((40, 1))])
    lam = 0.5 * np.mean(np.sum(X.numpy() ** 2, 0))
    theta = np.linalg.solve(Xa.T @ Xa + lam * np.diag([1, 1, 1, 0]), Xa.T @ noisy.numpy())
    Wr, br = least_squares(normal.gram, normal.cross, ridge=0.5)
    np.testing.assert_allclose(Wr.numpy(), theta[:3].T, atol=1e-10)
    np.testing.assert_allclose(br.numpy(), theta[3], atol=1e-10)
    resid = noisy.numpy() - Xa @ theta
    centred = noisy.numpy() - noisy.numpy().mean(0)
    assert fit_error(normal, Wr, br) == pytest.approx((resid**2).sum() / (centred**2).sum())


def test_partial_layout_and_zip_by_hand():
    merged, kept = partial_layout(torch.tensor([0.9, 0.1, 0.5, 0.7]), 0.5)
    assert merged.tolist() == [0, 3] and kept.tolist() == [1, 2]
    a = torch.arange(8.0).reshape(4, 2)
    b = 10 * torch.ones(4, 2)
    rows = zip_tensor([a, b], [0.25, 0.75], [(0, (merged, kept))])  # output units of a Linear
    want = [[7.5, 7.75], [9.0, 9.25], [2, 3], [4, 5], [10, 10], [10, 10]]
    torch.testing.assert_close(rows, torch.tensor(want))
    cols = zip_tensor([a.T, b.T], [0.25, 0.75], [(1, (merged, kept))])  # input units: weighted sums
    want = [[7.5, 9.0, 0.5, 1.0, 7.5, 7.5], [7.75, 9.25, 0.75, 1.25, 7.5, 7.5]]
    torch.testing.assert_close(cols, torch.tensor(want))
    torch.testing.assert_close(zip_tensor([a, b], [0.25, 0.75], []), 0.25 * a + 7.5)
    # three models: merged units take the 3-way weighted mean, each model keeps its own
    c = -torch.ones(4, 2)
    rows = zip_tensor([a, b, c], [0.5, 0.25, 0.25], [(0, (merged, kept))])
    want = [[2.25, 2.75], [5.25, 5.75], [2, 3], [4, 5], [10, 10], [10, 10], [-1, -1], [-1, -1]]
    torch.testing.assert_close(rows, torch.tensor(want))
    cols = zip_tensor([a.T, b.T, c.T], [0.5, 0.25, 0.25], [(1, (merged, kept))])
    want = [[2.25, 5.25, 1.0, 2.0, 2.5, 2.5, -0.25, -0.25],
            [2.75, 5.75, 1.5, 2.5, 2.5, 2.5, -0.25, -0.25]]  # fmt: skip
    torch.testing.assert_close(cols, torch.tensor(want))


# --- (c) different initialisations -----------------------------------------------------


@pytest.fixture(scope="module")
def seeds():
    """Three digits models trained on one task from different initialisations (full-batch
    AdamW, single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = task_data("rot90-digit", "train")
        out = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            net, head = build_backbone(DIGITS), nn.Linear(16, 10)
            out.append(train(net, head, X, y, epochs=30, lr=2e-2, batch_size=600, seed=seed))
    finally:
        torch.set_num_threads(threads)
    return out, X


def test_different_initialisations_merge_far_better_with_pleas(seeds):
    (a, ha), (b, hb) = seeds[0][:2]
    X = seeds[1]
    Xt, yt = task_data("rot90-digit", "test")
    spec = permutation_spec(DIGITS, backbone_state(a))

    def acc(backbone, head) -> float:
        with torch.no_grad():
            return float((head(backbone(Xt)).argmax(1) == yt).float().mean())

    def merged(res) -> float:
        m = build_backbone(DIGITS).eval()
        m.load_state_dict(res.state)
        h = nn.Linear(16, 10)
        h.weight.data, h.bias.data = res.head
        return acc(m, h)

    own = min(acc(a, ha), acc(b, hb))
    naive = acc(average([a, b]), average([ha, hb]))
    wm = merged(pleas(a, b, spec, [{"x": X}], match="weight", solve=False, heads=(ha, hb)))
    ls = merged(pleas(a, b, spec, [{"x": X}], match="weight", heads=(ha, hb)))
    assert own > 0.85
    assert ls > naive + 0.15, (ls, naive)
    assert ls > wm + 0.08, (ls, wm)  # the least squares, not the permutation alone
    assert ls > own - 0.06, (ls, own)


def test_three_initialisations_merge_far_better_with_pleas_than_averaged(seeds):
    models, X = seeds
    Xt, yt = task_data("rot90-digit", "test")
    spec = permutation_spec(DIGITS, backbone_state(models[0][0]))
    backbones, heads = [m for m, _ in models], [h for _, h in models]

    def acc(backbone, head) -> float:
        with torch.no_grad():
            return float((head(backbone(Xt)).argmax(1) == yt).float().mean())

    naive = acc(average(backbones), average(heads))
    res = pleas_many(backbones, spec, [{"x": X}], match="weight", heads=heads)
    m = build_backbone(DIGITS).eval()
    m.load_state_dict(res.state)
    h = nn.Linear(16, 10)
    h.weight.data, h.bias.data = res.head
    ls = acc(m, h)
    own = min(acc(b, hd) for b, hd in models)
    assert len(res.all_perms) == 2
    assert ls > naive + 0.15, (ls, naive)
    assert ls > own - 0.08, (ls, own)


# --- (e) the CLI -----------------------------------------------------------------------


def test_cli_digits_end_to_end_and_bad_input(tmp_path):
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    save_backbone(model, DIGITS, tmp_path / "a")
    save_backbone(
        _digits_copy(model, random_permutation(spec, seed=5), spec), DIGITS, tmp_path / "b"
    )
    x = np.random.default_rng(0).random((120, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "d.npz", x=x)
    code, out, err = run_cli(
        "pleas",
        tmp_path / "a",
        tmp_path / "b",
        "--data",
        tmp_path / "d.npz",
        "-o",
        tmp_path / "m",
        "--ratio",
        "0.5",
        "--match",
        "weight",
        "--ridge",
        "1e-9",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["widths"] == {"blocks.0.mlp": 48, "blocks.1.mlp": 48}
    merged, config = load_backbone(tmp_path / "m")
    assert config["intermediate_size"] == 48
    with torch.no_grad():
        torch.testing.assert_close(
            merged(torch.from_numpy(x)), model(torch.from_numpy(x)), atol=1e-4, rtol=0
        )
    assert "pleas" in (tmp_path / "m" / "README.md").read_text()
    bad = [
        (["--data", tmp_path / "nope.npz"], "no such data file"),
        (["--data", tmp_path / "d.npz", "--ratio", "0"], "--ratio"),
        (["--data", tmp_path / "d.npz", "--match", "cosine"], "--match"),
    ]
    for args, message in bad:
        code, _, err = run_cli(
            "pleas", tmp_path / "a", tmp_path / "b", *args, "-o", tmp_path / "bad"
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    other = default_config(hidden_size=8, intermediate_size=16, num_hidden_layers=2)
    save_backbone(build_backbone(other), other, tmp_path / "small")
    code, _, err = run_cli(
        "pleas",
        tmp_path / "a",
        tmp_path / "small",
        "--data",
        tmp_path / "d.npz",
        "-o",
        tmp_path / "bad",
    )
    assert (
        code == 2 and "differ in tensor names or shapes" in err and not (tmp_path / "bad").exists()
    )


def test_cli_merges_three_models_with_shares_and_refuses_bad_counts(tmp_path):
    model = _digits()
    spec = permutation_spec(DIGITS, backbone_state(model))
    save_backbone(model, DIGITS, tmp_path / "a")
    for name, seed in (("b", 5), ("c", 8)):
        copy = _digits_copy(model, random_permutation(spec, seed=seed), spec)
        save_backbone(copy, DIGITS, tmp_path / name)
    x = np.random.default_rng(0).random((120, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "d.npz", x=x)
    three = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    code, out, err = run_cli(
        "pleas", *three, "--data", tmp_path / "d.npz", "-o", tmp_path / "m",
        "--ratio", "0.5", "--weights", "2,1,1", "--ridge", "1e-9", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["widths"] == {"blocks.0.mlp": 64, "blocks.1.mlp": 64}  # 16 + 3·16
    merged, config = load_backbone(tmp_path / "m")
    assert config["intermediate_size"] == 64
    with torch.no_grad():
        torch.testing.assert_close(
            merged(torch.from_numpy(x)), model(torch.from_numpy(x)), atol=1e-4, rtol=0
        )
    card = (tmp_path / "m" / "README.md").read_text()
    assert "weights:\n- 0.5\n- 0.25\n- 0.25\n" in card  # the shares, normalised: 2/4, 1/4, 1/4
    bad = [
        ([*three, "--weights", "1,1"], "gives 2 shares for 3 models"),
        ([*three, "--weight", "0.5"], "--weight is the first model's share"),
        ([*three, "--weights", "1,x,1"], "numbers separated by commas"),
        ([*three, "--weights", "1,-1,1"], "must be finite, >= 0"),
        ([three[0]], "two or more models"),
    ]
    for args, message in bad:
        code, _, err = run_cli("pleas", *args, "--data", tmp_path / "d.npz", "-o", tmp_path / "bad")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert not (tmp_path / "bad").exists()


def test_cli_bert_end_to_end_and_unsupported(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, config, cls = _bert()
    model.save_pretrained(tmp_path / "a")
    spec = permutation_spec(config.to_dict(), model.state_dict())
    copy = cls(config).eval()
    copy.load_state_dict(permute(model.state_dict(), spec, random_permutation(spec, seed=6)))
    copy.save_pretrained(tmp_path / "b")
    batches = _bert_batches(2)
    ids = torch.cat([b["input_ids"] for b in batches]).numpy()
    mask = torch.cat([b["attention_mask"] for b in batches]).numpy()
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    code, out, err = run_cli(
        "pleas",
        tmp_path / "a",
        tmp_path / "b",
        "--data",
        tmp_path / "t.npz",
        "-o",
        tmp_path / "m",
        "--ridge",
        "1e-9",
        "-q",
    )
    assert code == 0, err
    merged = transformers.BertModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        b = batches[0]
        m = b["attention_mask"].bool()
        torch.testing.assert_close(
            merged(**b).last_hidden_state[m], model(**b).last_hidden_state[m], atol=1e-4, rtol=0
        )
    make_hf_model("llama", tmp_path / "llama", seed=1)
    make_hf_model("llama", tmp_path / "llama2", seed=2)
    code, _, err = run_cli(
        "pleas",
        tmp_path / "llama",
        tmp_path / "llama2",
        "--data",
        tmp_path / "t.npz",
        "-o",
        tmp_path / "bad",
    )
    assert code == 2 and "LlamaForCausalLM" in err and "supports" in err, err
    assert not (tmp_path / "bad").exists()
