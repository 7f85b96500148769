"""Checkpoints as users have them: buffers older transformers saved, tied heads stored or
not, tensors only some models have (completeness, --allow-drop), low ranks larger than
small tensors, merge-lora's options, and a linear recipe whose base is not listed."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from graft.delta import open_delta
from graft.delta.lora import merge_adapters
from graft.io import load_state_dict, save_state_dict


def _recipe(tmp_path, doc, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _ok(*args) -> tuple[str, str]:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out, err


def _fails(*args) -> str:
    code, _, err = run_cli(*args)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _dry_run(recipe, *extra) -> dict:
    out, _ = _ok("merge", recipe, "unused-out", "--dry-run", "--json", *extra)
    return json.loads(out)


# --- BERT's position_ids: stored by older transformers, not by newer ones -------------------


@pytest.fixture
def bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    sd = base.state_dict()
    assert "embeddings.position_ids" not in sd  # this transformers does not save the buffer
    old = {**sd, "embeddings.position_ids": torch.arange(16).unsqueeze(0)}
    save_state_dict(old, tmp_path / "base-old", config=config.to_dict())
    fts = []
    for seed in (1, 2):
        ft = transformers.BertModel(config).eval()
        ft.load_state_dict(sd)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ft.save_pretrained(tmp_path / f"ft{seed}")
        fts.append(tmp_path / f"ft{seed}")
    return transformers, tmp_path / "base-old", fts


def test_buffer_only_the_old_base_stores_is_copied_with_a_note(bert, tmp_path):
    transformers, base, (ft1, ft2) = bert
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "parameters": {"weight": 0.5},
            "models": [{"model": str(ft1)}, {"model": str(ft2)}],
        },
    )
    plan = _dry_run(recipe)
    assert (
        f"embeddings.position_ids (int64) copied from {base}; not stored by {ft1}, {ft2} "
        "(a buffer older transformers saved)" in plan["notes"]
    )
    assert plan["completeness"] == {
        "input_tensors": plan["completeness"]["input_tensors"],
        "dropped": 0,
        "dropped_tensors": [],
    }
    _ok("merge", recipe, tmp_path / "out", "-q")
    out, b = load_file(tmp_path / "out" / "model.safetensors"), load_state_dict(base)
    f1, f2 = load_state_dict(ft1), load_state_dict(ft2)
    assert torch.equal(out["embeddings.position_ids"], torch.arange(16).unsqueeze(0))
    name = "encoder.layer.1.attention.self.query.weight"
    want = b[name] + 0.5 * (f1[name] - b[name]) + 0.5 * (f2[name] - b[name])
    assert torch.allclose(out[name], want, atol=1e-6)
    transformers.BertModel.from_pretrained(tmp_path / "out")  # loads


def test_buffer_only_a_later_model_stores_is_copied_from_it(bert, tmp_path):
    _, base, (ft1, _) = bert
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5}},
                {"model": str(base), "parameters": {"weight": 0.5}},
            ],
        },
    )
    _ok("merge", recipe, tmp_path / "out", "-q")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["embeddings.position_ids"], torch.arange(16).unsqueeze(0))


# --- tied embeddings: lm_head.weight stored by one model, not by the other ---------------------


@pytest.fixture
def gpt2_pair(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    stores = transformers.GPT2LMHeadModel(config).eval()
    sd = {k: v.clone() for k, v in stores.state_dict().items()}
    # Distinct from its wte, so the test sees which tensor the merge read.
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1.0
    save_state_dict(sd, tmp_path / "stores", config=config.to_dict())
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_state_dict(tmp_path / "tied")
    return transformers, tmp_path / "stores", tmp_path / "tied"


@pytest.mark.parametrize("storing_first", [True, False])
def test_tied_head_is_read_from_the_embedding_of_the_model_lacking_it(
    gpt2_pair, tmp_path, storing_first
):
    transformers, stores, tied = gpt2_pair
    order = [stores, tied] if storing_first else [tied, stores]
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(m), "parameters": {"weight": w}}
                for m, w in zip(order, [0.25, 0.75], strict=True)
            ],
        },
    )
    plan = _dry_run(recipe)
    assert (
        f"lm_head.weight: not stored by {tied} (tied word embeddings); read from "
        f"{tied}:transformer.wte.weight, as mergekit does"
    ) in plan["notes"]
    assert plan["completeness"]["dropped"] == 0
    _ok("merge", recipe, tmp_path / "out", "-q")
    out, s, t = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_state_dict(stores),
        load_state_dict(tied),
    )
    ws, wt = (0.25, 0.75) if storing_first else (0.75, 0.25)
    assert torch.allclose(
        out["lm_head.weight"],
        ws * s["lm_head.weight"] + wt * t["transformer.wte.weight"],
        atol=1e-6,
    )
    assert torch.allclose(
        out["transformer.wte.weight"],
        ws * s["transformer.wte.weight"] + wt * t["transformer.wte.weight"],
        atol=1e-6,
    )
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")


def test_untied_model_lacking_its_head_is_an_error(gpt2_pair, tmp_path):
    _, stores, tied = gpt2_pair
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (stores, tied)],
        },
    )
    assert _fails("merge", recipe, tmp_path / "out", "-q") == (
        f"error: tensor lm_head.weight is missing from model {tied} ({stores} has it); the "
        "models must share an architecture (check the model paths), or pass --allow-drop "
        "'lm_head.weight' to leave it out of the output"
    )
    assert not (tmp_path / "out").exists()


# --- completeness ---------------------------------------------------------------------------------


def _tiny(i: int, **extra) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    sd = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g),
        "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g),
        "model.norm.weight": torch.ones(4) * (i + 1),
    }
    return {**sd, **extra}


def test_a_tensor_only_the_fine_tunes_have_is_not_dropped_silently(tmp_path):
    head = {"classifier.weight": torch.ones(3, 4), "classifier.bias": torch.zeros(3)}
    save_state_dict(_tiny(0), tmp_path / "base", config={"num_hidden_layers": 2})
    save_state_dict(_tiny(1, **head), tmp_path / "ft1", config={"num_hidden_layers": 2})
    save_state_dict(_tiny(2, **head), tmp_path / "ft2", config={"num_hidden_layers": 2})
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(tmp_path / "base"),
            "parameters": {"weight": 1.0, "density": 0.5},
            "models": [{"model": str(tmp_path / "ft1")}, {"model": str(tmp_path / "ft2")}],
        },
    )
    assert _fails("merge", recipe, tmp_path / "out", "-q") == (
        f"error: tensor classifier.weight is missing from model {tmp_path / 'base'} "
        f"({tmp_path / 'ft1'} has it); the models must share an architecture (check the model "
        "paths), or pass --allow-drop 'classifier.weight' to leave it out of the output"
    )
    assert not (tmp_path / "out").exists()
    plan = _dry_run(recipe, "--allow-drop", "classifier.*")
    assert plan["completeness"]["input_tensors"] == 4 + 6 + 6
    assert plan["completeness"]["dropped_tensors"] == [
        {
            "model": str(tmp_path / m),
            "tensor": t,
            "reason": f"not in {tmp_path / 'base'}; --allow-drop classifier.*",
        }
        for t in ("classifier.weight", "classifier.bias")
        for m in ("ft1", "ft2")
    ]
    out, _ = _ok("merge", recipe, "unused", "--dry-run", "--allow-drop", "classifier.*")
    assert "input tensors: 16, 4 left out of the output (--json lists them and why)" in out
    _ok("merge", recipe, tmp_path / "out", "--allow-drop", "classifier.*", "-q")
    assert sorted(load_file(tmp_path / "out" / "model.safetensors")) == sorted(_tiny(0))


def test_blocks_no_slice_selects_are_listed_as_dropped(tmp_path):
    save_state_dict(_tiny(0), tmp_path / "m", config={"num_hidden_layers": 2})
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(tmp_path / "m"), "layer_range": [0, 1]}]}],
        },
    )
    plan = _dry_run(recipe)
    assert plan["completeness"] == {
        "input_tensors": 4,
        "dropped": 1,
        "dropped_tensors": [
            {
                "model": str(tmp_path / "m"),
                "tensor": "model.layers.1.mlp.weight",
                "reason": "block 1 is in no slice's layer_range",
            }
        ],
    }
    out, _ = _ok("merge", recipe, "unused", "--dry-run")
    assert "input tensors: 4, 1 left out of the output" in out
    out, _ = _ok(
        "merge",
        _recipe(
            tmp_path,
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(tmp_path / "m"), "layer_range": [0, 2]}]}],
            },
            "all.yaml",
        ),
        "unused",
        "--dry-run",
    )
    assert "input tensors: 4, every one used for the output" in out


# --- compress -m lowrank --rank larger than some tensors --------------------------------------------


def test_lowrank_rank_is_clamped_per_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "wide.weight": torch.randn(32, 24, generator=g),
        "thin.weight": torch.randn(16, 6, generator=g),
        "norm.weight": torch.ones(6),
    }
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_state_dict(base, tmp_path / "base")
    save_state_dict(ft, tmp_path / "ft")
    _ok("diff", tmp_path / "ft", tmp_path / "base", "-o", tmp_path / "d.safetensors", "-q")
    out, _ = _ok(
        "compress",
        tmp_path / "d.safetensors",
        "-m",
        "lowrank",
        "--rank",
        "8",
        "-o",
        tmp_path / "p.safetensors",
        "-q",
    )
    assert (
        "note: 1 matrices have a side of at most --rank 8 and are stored dense (exact), "
        "e.g. thin.weight" in out
    )
    patch = open_delta(tmp_path / "p.safetensors")
    assert {n: e.codec for n, e in patch.layout.items()} == {
        "wide.weight": "lowrank",
        "thin.weight": "dense",
        "norm.weight": "dense",
    }
    assert tuple(patch.file.info(patch.layout["wide.weight"].parts["B"]).shape) == (32, 8)
    patch.close()
    _ok("apply", tmp_path / "base", tmp_path / "p.safetensors", "-o", tmp_path / "out", "-q")
    got = load_state_dict(tmp_path / "out")
    assert torch.allclose(got["thin.weight"], ft["thin.weight"], atol=1e-6)  # dense: exact
    assert not torch.allclose(got["wide.weight"], ft["wide.weight"], atol=1e-3)  # rank 8 of 24


# --- merge-lora --threads --device --json -q --------------------------------------------------------


def test_merge_lora_takes_threads_device_json_and_quiet(tmp_path):
    save_state_dict(_tiny(0), tmp_path / "base", config={"num_hidden_layers": 2})
    for i in (1, 2):
        save_state_dict(_tiny(i), tmp_path / f"ft{i}", config={"num_hidden_layers": 2})
        _ok(
            "extract-lora",
            tmp_path / f"ft{i}",
            tmp_path / "base",
            "-r",
            "2",
            "-o",
            tmp_path / f"a{i}",
            "-q",
        )
    out, err = _ok(
        "merge-lora",
        tmp_path / "a1",
        tmp_path / "a2",
        "--weight",
        "1",
        "--weight",
        "0.5",
        "--rank",
        "3",
        "-o",
        tmp_path / "m",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--json",
        "-q",
    )
    doc = json.loads(out)
    assert err == ""  # -q: no progress bar
    assert doc["output"] == str(tmp_path / "m") and doc["tensors"] == 2
    assert doc["bytes_on_disk"] == (tmp_path / "m" / "adapter_model.safetensors").stat().st_size
    merge_adapters(
        [tmp_path / "a1", tmp_path / "a2"], tmp_path / "ref", weights=[1, 0.5], rank=3, threads=1
    )
    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("m", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {tuple(t.shape) for k, t in got.items() if "lora_A" in k} == {(3, 4)}


# --- linear with a base_model not listed under models: -------------------------------------------


def test_linear_merges_an_unlisted_base_as_mergekit_does(tmp_path):
    for i, name in enumerate(["base", "a", "b"]):
        save_state_dict(_tiny(i), tmp_path / name, config={"num_hidden_layers": 2})
    doc = {
        "merge_method": "linear",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / "a"), "parameters": {"weight": 0.25}},
            {"model": str(tmp_path / "b"), "parameters": {"weight": 0.25}},
        ],
    }
    assert _fails("merge", _recipe(tmp_path, doc), tmp_path / "out", "-q") == (
        f"error: linear: base_model {tmp_path / 'base'} is not listed under models:, so it is "
        "merged as one more input (as mergekit does) and needs a 'weight'; list it under "
        "models: with its weight, set weight under parameters:, or remove base_model"
    )
    recipe = _recipe(tmp_path, {**doc, "parameters": {"weight": 0.5}})
    assert any(
        "is not listed under models:; linear merges it as one more input" in n
        for n in _dry_run(recipe)["notes"]
    )
    _ok("merge", recipe, tmp_path / "out", "-q")
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b, base = _tiny(1), _tiny(2), _tiny(0)
    for name in base:
        assert torch.allclose(
            out[name], 0.25 * a[name] + 0.25 * b[name] + 0.5 * base[name], atol=1e-6
        ), name
