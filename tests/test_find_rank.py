"""`graft rank` end to end on tiny digits backbones generated in the test: ranking, source
heads for LEEP / NCE, --db, and bad input (one class, mismatched lengths, models graft
cannot run, wrong input sizes) as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import run_cli
from graft.data import Dataset
from graft.find import load_model
from graft.find.features import model_features
from graft.io import save_state_dict
from graft.models.digits_net import build_backbone, default_config, save_backbone, save_head


@pytest.fixture(scope="module", autouse=True)
def _cli():
    """Register the zoo commands on the CLI if app.py does not yet (no-op once it does)."""
    from graft.cli import app as cli
    from graft.cli.rank_cmd import rank
    from graft.cli.zoo_cmds import zoo_app

    if "zoo" not in {g.name for g in cli.app.registered_groups}:
        cli.app.add_typer(zoo_app, name="zoo")
    if "rank" not in {c.name for c in cli.app.registered_commands}:
        cli.app.command("rank")(rank)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    out = {}
    for name, hidden, seed in (("with-head", 8, 0), ("no-head", 12, 1)):
        config = default_config(hidden_size=hidden, intermediate_size=16, num_hidden_layers=1)
        torch.manual_seed(seed)
        save_backbone(build_backbone(config), config, root / name)
        out[name] = root / name
    save_head(nn.Linear(8, 10), out["with-head"] / "head.safetensors", task="pretrain")
    save_state_dict(
        {"w": torch.ones(2, 2)}, root / "other", config={"architectures": ["LlamaForCausalLM"]}
    )
    out["other"] = root / "other"
    return out


def test_rank_two_models_json(models):
    code, out, err = run_cli(
        "rank",
        "--data",
        "task:rot90-digit",
        "--models",
        f"{models['with-head']},{models['no-head']}",
        "--json",
        "-q",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["num_samples"], doc["num_classes"], doc["sort_by"]) == (600, 10, "logme")
    rows = {r["model"].rsplit("/", 1)[-1]: r for r in doc["ranking"]}
    assert set(rows["with-head"]["scores"]) == {"logme", "leep", "nce", "hscore", "knn", "linear"}
    assert rows["with-head"]["num_features"] == 8 and rows["no-head"]["num_features"] == 12
    assert rows["no-head"]["scores"]["leep"] is None and rows["no-head"]["scores"]["nce"] is None
    assert "leep and nce skipped" in rows["no-head"]["notes"][0]
    assert all(v is not None for v in rows["with-head"]["scores"].values())
    logme = [r["scores"]["logme"] for r in doc["ranking"]]
    assert logme == sorted(logme, reverse=True) and [r["rank"] for r in doc["ranking"]] == [1, 2]


def test_rank_table_sort_and_npz_data(models, tmp_path):
    threads_before = torch.get_num_threads()
    X = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", inputs=X, labels=np.repeat([3, 7], 20))
    code, out, err = run_cli(
        "rank", "--data", tmp_path / "d.npz", "--models", models["with-head"], "--models", models["no-head"],
        "--scores", "knn,logme", "--sort", "knn", "--threads", "1", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert torch.get_num_threads() == threads_before  # --threads is scoped to the command
    text = " ".join(out.split())
    assert "40 samples, 2 classes; sorted by knn" in text
    assert "no-head" in text and "leep" not in text  # no LEEP asked: no note about heads


def test_rank_from_an_index(models, tmp_path):
    db = tmp_path / "z.sqlite"
    for name in ("with-head", "no-head", "other"):
        assert run_cli("zoo", "scan", models[name], "--db", db, "-q")[0] == 0
    code, out, err = run_cli(
        "rank", "--data", "rot90-digit", "--db", db, "--scores", "logme", "--json", "-q"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["ranking"]) == 2
    assert len(doc["skipped"]) == 1 and "LlamaForCausalLM" in doc["skipped"][0]


def test_zoo_layout_gives_the_source_head(tmp_path):
    root = tmp_path / "zoo"
    config = default_config(hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    save_backbone(build_backbone(config), config, root / "base")
    save_backbone(build_backbone(config), config, root / "finetuned" / "rot90-digit")
    (root / "manifest.json").write_text("{}")
    save_head(nn.Linear(8, 10), root / "base_head.safetensors", task="pretrain")
    (root / "heads").mkdir()
    save_head(nn.Linear(8, 10), root / "heads" / "rot90-digit.safetensors", task="rot90-digit")
    base, ft = load_model(root / "base"), load_model(root / "finetuned" / "rot90-digit")
    assert base.source_head == str(root / "base_head.safetensors") and not base.notes
    assert ft.source_head == str(root / "heads" / "rot90-digit.safetensors")
    inputs = Dataset("x", None, x=np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32))
    feats, probs = model_features(base, inputs, source=True, batch_size=2)
    assert feats.shape == (5, 8) and probs.shape == (5, 10)
    assert torch.allclose(probs.sum(1), torch.ones(5))


def _data(tmp_path, inputs, labels, name="d.safetensors"):
    save_file({"inputs": inputs, "labels": labels}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("inputs", "labels", "message"),
    [
        (
            torch.rand(10, 64),
            torch.zeros(10, dtype=torch.long),
            "labels hold 1 class (all 0); ranking needs at least two",
        ),
        (torch.rand(10, 64), torch.arange(9) % 2, "10 inputs but 9 labels"),
        (torch.rand(10, 64), torch.ones(10, 2, dtype=torch.long), "labels must be 1-D"),
        (torch.rand(10, 64), torch.rand(10), "labels must be integer classes"),
        (torch.rand(10, 10), torch.arange(10) % 2, "takes inputs of 64 values, the data has 10"),
    ],
)
def test_bad_data_is_one_line(models, tmp_path, inputs, labels, message):
    path = _data(tmp_path, inputs, labels)
    code, out, err = run_cli("rank", "--data", path, "--models", models["no-head"], "-q")
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_bad_models_and_options_are_one_line(models, tmp_path):
    cases = [
        (["--models", models["other"]], "graft cannot run"),
        (["--models", tmp_path / "missing"], "no such file or directory"),
        ([], "no models: pass --models"),
        (
            ["--models", models["no-head"], "--scores", "logme,magic"],
            "unknown score 'magic'; valid scores: logme, leep",
        ),
        (
            ["--models", models["no-head"], "--scores", "knn", "--sort", "logme"],
            "cannot sort by 'logme'",
        ),
        (
            ["--models", models["no-head"], "--db", tmp_path / "z.sqlite"],
            "--models or --db, not both",
        ),
    ]
    for args, message in cases:
        code, _, err = run_cli("rank", "--data", "task:rot90-digit", *args, "-q")
        assert code == 2 and message in err, (args, err)
    for data, message in (
        ("task:nosuch", "unknown task 'nosuch'"),
        (str(tmp_path / "x.csv"), "cannot read data"),
    ):
        code, _, err = run_cli("rank", "--data", data, "--models", models["no-head"], "-q")
        assert code == 2 and message in err, err
