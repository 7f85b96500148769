"""Every bad input gets one line on stderr naming the problem, exit != 0, nothing at OUT."""

from __future__ import annotations

import errno
import os

import pytest
import torch
import yaml

from conftest import run_cli
from graft.io import save_state_dict


@pytest.fixture
def trio(tmp_path):
    """base, a, b: tiny models with a block structure and an embedding."""
    g = torch.Generator().manual_seed(0)

    def model(shift):
        return {
            "model.embed_tokens.weight": torch.randn(10, 4, generator=g) + shift,
            "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g) + shift,
            "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g) + shift,
            "model.norm.weight": torch.ones(4) + shift,
        }

    paths = []
    for i, name in enumerate(["base", "a", "b"]):
        save_state_dict(model(i), tmp_path / name, config={"num_hidden_layers": 2})
        paths.append(tmp_path / name)
    return paths


def _recipe(tmp_path, base, models, method="ties", params=None, per_model=None, **extra):
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": per_model or {"weight": 1.0, "density": 0.5}}
            for m in models
        ],
    }
    if params:
        doc["parameters"] = params
    doc.update(extra)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _fails(tmp_path, *args, contains: str):
    out = tmp_path / "out"
    code, _, err = run_cli("merge", *args, out, "-q")
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert contains in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "graft-tmp" in p.name]
    return lines[0]


def test_missing_model_path(tmp_path, trio):
    base, a, _ = trio
    r = _recipe(tmp_path, base, [a, tmp_path / "nope"])
    _fails(tmp_path, r, contains="nope")


def test_missing_recipe(tmp_path):
    _fails(tmp_path, tmp_path / "missing.yaml", contains="missing.yaml")


def test_truncated_safetensors(tmp_path, trio):
    base, a, b = trio
    f = b / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    line = _fails(tmp_path, _recipe(tmp_path, base, [a, b]), contains="model.safetensors")
    assert "b" in line


def test_garbage_header(tmp_path, trio):
    base, a, b = trio
    (b / "model.safetensors").write_bytes(b"\xff" * 64)
    _fails(tmp_path, _recipe(tmp_path, base, [a, b]), contains="model.safetensors")


def test_tensor_missing_from_one_model(tmp_path, trio):
    base, a, _ = trio
    save_state_dict({"model.embed_tokens.weight": torch.zeros(10, 4)}, tmp_path / "partial")
    line = _fails(
        tmp_path,
        _recipe(tmp_path, base, [a, tmp_path / "partial"]),
        contains="model.layers.0.mlp.weight",
    )
    assert "partial" in line


def test_shape_mismatch_names_tensor_and_models(tmp_path, trio):
    base, a, _ = trio
    from graft.io import load_state_dict

    sd = load_state_dict(a)
    sd["model.layers.1.mlp.weight"] = torch.zeros(4, 5)
    save_state_dict(sd, tmp_path / "wide")
    line = _fails(
        tmp_path,
        _recipe(tmp_path, base, [a, tmp_path / "wide"]),
        contains="model.layers.1.mlp.weight",
    )
    assert "wide" in line and "shape" in line


def test_vocab_size_difference_called_out(tmp_path, trio):
    base, a, _ = trio
    from graft.io import load_state_dict

    sd = load_state_dict(a)
    sd["model.embed_tokens.weight"] = torch.zeros(12, 4)
    save_state_dict(sd, tmp_path / "bigvocab")
    line = _fails(
        tmp_path, _recipe(tmp_path, base, [a, tmp_path / "bigvocab"]), contains="vocabulary size"
    )
    assert "10" in line and "12" in line


def test_unknown_method_lists_valid(tmp_path, trio):
    base, a, b = trio
    line = _fails(tmp_path, _recipe(tmp_path, base, [a, b], method="tiess"), contains="tiess")
    assert "ties" in line and "linear" in line


def test_unknown_parameter_lists_valid(tmp_path, trio):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b], per_model={"weight": 1.0, "densty": 0.5})
    line = _fails(tmp_path, r, contains="densty")
    assert "density" in line


def test_unknown_top_level_key(tmp_path, trio):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b], merge_methd="x")
    _fails(tmp_path, r, contains="merge_methd")


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_out_of_range(tmp_path, trio, density):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b], per_model={"weight": 1.0, "density": density})
    _fails(tmp_path, r, contains="density")


def test_missing_required_weight(tmp_path, trio):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b], method="task_arithmetic", per_model={"density": 1.0})
    line = _fails(tmp_path, r, contains="missing required parameter 'weight'")
    assert "/a" in line


def test_existing_output_refused_then_forced(tmp_path, trio):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli("merge", r, out, "-q")
    assert code != 0 and "--force" in err
    assert (out / "keep.txt").exists()
    code, _, err = run_cli("merge", r, out, "-q", "--force")  # not a folder graft wrote
    assert code != 0 and "--force-overwrite-anything" in err and (out / "keep.txt").exists()
    code, _, err = run_cli("merge", r, out, "-q", "--force-overwrite-anything")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    code, _, err = run_cli("merge", r, out, "-q", "--force")  # now graft's own: replaceable
    assert code == 0, err


def test_nan_input_warns_and_strict_fails(tmp_path, trio):
    base, a, _ = trio
    from graft.io import load_state_dict

    sd = load_state_dict(a)
    sd["model.layers.0.mlp.weight"][0, 0] = float("nan")
    save_state_dict(sd, tmp_path / "nan")
    r = _recipe(tmp_path, base, [tmp_path / "nan"])
    code, _, err = run_cli("merge", r, tmp_path / "warn", "-q")
    assert code == 0 and "NaN" in err and "model.layers.0.mlp.weight" in err
    _fails(tmp_path, r, "--strict", contains="NaN")


def test_no_space_left(tmp_path, trio, monkeypatch):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    _fails(tmp_path, r, contains="no space left")


def test_slerp_needs_exactly_one_other_model(tmp_path, trio):
    base, a, b = trio
    r = _recipe(tmp_path, base, [a, b], method="slerp", per_model={}, params={"t": 0.5})
    _fails(tmp_path, r, contains="slerp")


def test_base_required(tmp_path, trio):
    _, a, b = trio
    p = tmp_path / "recipe.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b)}],
            }
        )
    )
    _fails(tmp_path, p, contains="base_model")
