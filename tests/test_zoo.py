"""The digits zoo: model files, task transforms and splits, determinism, and (slow) the
accuracy bars of the full build."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from graft.io import save_state_dict
from graft.models.digits_net import (
    backbone_state,
    build_backbone,
    default_config,
    load_backbone,
    load_head,
    save_backbone,
    save_head,
)
from graft.plan.arch import count_blocks, is_pre_block, split_block_name
from graft.zoo import TASKS, ZooError, build_zoo, load_zoo, task_data
from graft.zoo.tasks import SPLITS, _digits, split_indices


def quick_zoo(tmp_path_factory, seed: int = 0):
    """The quick zoo, built once per session under a shared path (later calls reuse it)."""
    return build_zoo(
        tmp_path_factory.getbasetemp() / f"quick-zoo-{seed}",
        seed=seed,
        quick=True,
        log=lambda m: None,
    )


# --- model files -----------------------------------------------------------------------


def test_backbone_names_are_what_graft_expects(tmp_path):
    config = default_config(hidden_size=8, intermediate_size=16, num_hidden_layers=3)
    names = list(backbone_state(build_backbone(config)))
    assert [n for n in names if split_block_name(n) is None] == [
        "embed.weight",
        "embed.bias",
        "norm.weight",
        "norm.bias",
    ]
    assert is_pre_block("embed.weight") and not is_pre_block("norm.weight")
    assert {split_block_name(n).index for n in names if split_block_name(n)} == {0, 1, 2}
    assert count_blocks(names) == 3
    assert "blocks.2.fc1.weight" in names


def test_backbone_round_trip(tmp_path):
    config = default_config(hidden_size=8, intermediate_size=16, num_hidden_layers=2)
    torch.manual_seed(0)
    module = build_backbone(config)
    save_backbone(module, config, tmp_path / "m")
    loaded, cfg = load_backbone(tmp_path / "m")
    assert cfg == config
    x = torch.rand(5, 1, 8, 8)
    assert loaded(x).shape == (5, 8)
    assert torch.equal(loaded(x), module.eval()(x))


def test_load_backbone_rejects_other_architectures(tmp_path):
    save_state_dict(
        {"w": torch.zeros(2)}, tmp_path / "llama", config={"architectures": ["LlamaForCausalLM"]}
    )
    with pytest.raises(ValueError, match="not a GraftDigitsNet"):
        load_backbone(tmp_path / "llama")
    config = default_config(hidden_size=8)
    save_state_dict({"embed.weight": torch.zeros(8, 64)}, tmp_path / "partial", config=config)
    with pytest.raises(ValueError, match="missing tensors"):
        load_backbone(tmp_path / "partial")


def test_head_round_trip_keeps_task(tmp_path):
    head = nn.Linear(4, 3)
    save_head(head, tmp_path / "h.safetensors", task="rot90-digit")
    loaded = load_head(tmp_path / "h.safetensors")
    assert loaded.task == "rot90-digit"
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    save_state_dict({"weight": torch.zeros(3, 4)}, tmp_path / "notahead")
    with pytest.raises(ValueError, match="not a graft classification head"):
        load_head(tmp_path / "notahead" / "model.safetensors")


# --- tasks -----------------------------------------------------------------------------


def _one_pixel(row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, row, col] = 1.0
    return x


@pytest.mark.parametrize(
    ("task", "moved_to"),
    [
        ("rot90-digit", (6, 0)),  # counter-clockwise: the top row becomes the left column
        ("rot180-digit", (7, 6)),
        ("rot270-digit", (1, 7)),
        ("transpose-digit", (1, 0)),
        ("quadrant-swap-digit", (4, 5)),  # top-left quadrant -> bottom-right
    ],
)
def test_geometric_transforms_move_a_pixel_where_they_say(task, moved_to):
    no_coin = torch.zeros(1, dtype=torch.bool)
    out = TASKS[task].transform(_one_pixel(0, 1), no_coin)
    assert torch.equal(out, _one_pixel(*moved_to))


def test_quadrant_swap_sends_bottom_left_to_top_right():
    out = TASKS["quadrant-swap-digit"].transform(_one_pixel(6, 2), torch.zeros(1, dtype=torch.bool))
    assert torch.equal(out, _one_pixel(2, 6))


def test_inversion_and_mirror():
    x = torch.tensor([[0.0, 0.25, 1.0] + [0.5] * 61]).view(1, 1, 8, 8)
    coin = torch.zeros(1, dtype=torch.bool)
    assert torch.equal(
        TASKS["inverted-digit"].transform(x, coin)[0, 0, 0, :3], torch.tensor([1.0, 0.75, 0.0])
    )
    pair = torch.cat([_one_pixel(0, 1), _one_pixel(0, 1)])
    mirrored = TASKS["mirror-detection"].transform(pair, torch.tensor([True, False]))
    assert torch.equal(mirrored, torch.cat([_one_pixel(0, 6), _one_pixel(0, 1)]))
    labels = TASKS["mirror-detection"].label(torch.tensor([3, 3]), torch.tensor([True, False]))
    assert labels.tolist() == [1, 0]


def test_task_data_applies_the_transform_to_the_split_images():
    images, digits = _digits()
    idx = split_indices(0)["test"]
    X, y = task_data("rot90-digit", "test")
    assert X.dtype == torch.float32 and y.dtype == torch.int64 and X.shape == (len(idx), 1, 8, 8)
    assert torch.equal(X, images[idx].rot90(1, dims=(-2, -1)))
    assert torch.equal(y, digits[idx])
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0


def test_mirror_labels_are_balanced_and_match_the_images():
    images, _ = _digits()
    for split in SPLITS:
        X, y = task_data("mirror-detection", split)
        assert int(y.sum()) == len(y) // 2
        upright = images[split_indices(0)[split]]
        assert torch.equal(X[y == 1], upright[y == 1].flip(-1))
        assert torch.equal(X[y == 0], upright[y == 0])


def test_splits_are_disjoint_cover_everything_and_are_fixed_by_seed():
    a, again, b = split_indices(0), split_indices(0), split_indices(1)
    all_idx = torch.cat([a[s] for s in SPLITS])
    assert len(all_idx) == 1797 and len(set(all_idx.tolist())) == 1797
    assert len(a["test"]) == 497
    assert all(torch.equal(a[s], again[s]) for s in SPLITS)
    assert not torch.equal(a["test"], b["test"])
    X0, _ = task_data("inverted-digit", "train", seed=0)
    X1, _ = task_data("inverted-digit", "train", seed=1)
    assert not torch.equal(X0, X1)


def test_unknown_task_or_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'digit'.*rot90-digit.*mirror-detection"):
        task_data("digit", "test")
    with pytest.raises(ValueError, match="valid splits: pretrain, train, val, test"):
        task_data("rot90-digit", "holdout")


def test_at_least_six_tasks():
    assert len(TASKS) >= 6
    assert {t.num_classes for t in TASKS.values()} == {2, 10}


# --- building --------------------------------------------------------------------------


def _hashes(zoo) -> dict[str, str]:
    doc = json.loads((zoo.root / "manifest.json").read_text())
    out = {"base": doc["base"]["sha256"]}
    out |= {f"ft/{t}": e["sha256"] for t, e in doc["finetuned"].items()}
    out |= {f"soup/{i}": e["sha256"] for i, e in enumerate(doc["soup"])}
    return out


def test_quick_zoo_is_deterministic_and_seed_dependent(tmp_path_factory, tmp_path):
    zoo = quick_zoo(tmp_path_factory)
    again = build_zoo(tmp_path / "again", seed=0, quick=True, log=lambda m: None)
    other = build_zoo(tmp_path / "other", seed=1, quick=True, log=lambda m: None)
    assert _hashes(zoo) == _hashes(again)
    assert (zoo.heads["rot90-digit"]).read_bytes() == (again.heads["rot90-digit"]).read_bytes()
    assert all(_hashes(zoo)[k] != _hashes(other)[k] for k in _hashes(zoo))
    # the manifest's hashes are the files' hashes
    data = (zoo.finetuned["inverted-digit"] / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == _hashes(zoo)["ft/inverted-digit"]


def test_quick_zoo_layout_and_report(tmp_path_factory):
    zoo = quick_zoo(tmp_path_factory)
    assert set(zoo.finetuned) == set(TASKS) == set(zoo.heads) == set(zoo.probe_heads)
    assert zoo.soup_task in TASKS and len(zoo.soup) == len(zoo.soup_heads) >= 2
    assert load_head(zoo.heads["mirror-detection"]).out_features == 2
    rows = zoo.report["tasks"]
    assert set(rows) == set(TASKS)
    assert all(
        0 <= rows[t][k]["accuracy"] <= 1
        for t in rows
        for k in ("probe", "finetuned", "average_merge")
    )
    assert zoo.report["bars"]["enforced"] == {"gain": False, "loss": False}
    assert load_zoo(zoo.root).report == zoo.report


def test_complete_zoo_is_reused(tmp_path_factory):
    zoo = quick_zoo(tmp_path_factory)
    logs = []
    build_zoo(zoo.root, seed=0, quick=True, log=logs.append)
    assert logs == [
        f"reusing the zoo in {zoo.root} (config {json.loads((zoo.root / 'manifest.json').read_text())['config_hash']})"
    ]


def test_missing_or_foreign_zoo_dirs(tmp_path):
    with pytest.raises(ZooError, match="run `graft demo`"):
        load_zoo(tmp_path / "nowhere")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(ZooError, match="not a graft zoo"):
        build_zoo(tmp_path / "stuff", quick=True, log=lambda m: None)
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_zoo_meets_its_bars(tmp_path):
    zoo = build_zoo(tmp_path / "zoo", seed=0, log=lambda m: None)
    report = zoo.report
    assert report["bars"] == {
        "min_gain_over_probe_points": 10.0,
        "min_average_loss_points": 5.0,
        "gain_passed": True,
        "loss_passed": True,
        "passed": True,
        "enforced": {"gain": True, "loss": True},
    }
    assert report["finetuned_minus_probe_points"] >= 10.0
    assert report["finetuned_minus_average_points"] >= 5.0
    for task, row in report["tasks"].items():  # every task's fine-tune beats its probe
        assert row["finetuned"]["accuracy"] > row["probe"]["accuracy"], task
    assert len(zoo.soup) >= 6
