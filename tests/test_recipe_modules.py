"""``modules:`` recipes (mergekit's multi-module syntax) on a tiny vision-language model.

The model is a transformers ``Mistral3ForConditionalGeneration`` (LLaVA's layout:
``language_model.``, ``vision_tower.``, ``multi_modal_projector.``) with random weights,
built here; the fine-tunes are the base plus seeded noise. Expected tensors are written
out per module from the input tensors (weighted sums, copies, renumbered blocks), not
from graft's code. The cross-check against mergekit runs when GRAFT_MERGEKIT_PYTHON
names a python that imports mergekit (see tests/test_mergekit_crosscheck.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from graft.plan.modules import module_layout

TEXT_LAYERS, VISION_LAYERS = 3, 2


def _vlm(out, seed=0):
    transformers = pytest.importorskip("transformers")
    text = transformers.MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    vision = transformers.PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2, image_size=32, patch_size=8, head_dim=8,
    )  # fmt: skip
    cfg = transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=63, spatial_merge_size=2
    )
    torch.manual_seed(seed)
    transformers.Mistral3ForConditionalGeneration(cfg).save_pretrained(out)
    return out


def _finetune(base, out, seed):
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    t = load_file(str(base / "model.safetensors"))
    t = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in t.items()}
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    base = _vlm(root / "base")
    return {"base": base, "a": _finetune(base, root / "a", 1), "b": _finetune(base, root / "b", 2)}


def _tensors(d):
    return load_file(str(d / "model.safetensors"))


def _merge(tmp_path, vlm, text, *args):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(**{k: str(v) for k, v in vlm.items()}))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("merge", recipe, out, *args)
    return code, stdout + stderr, out


PER_MODULE_METHODS = """
merge_method: task_arithmetic
base_model: {base}
dtype: float32
modules:
  text_decoder:
    models:
      - model: {a}
        parameters: {{weight: 0.5}}
      - model: {b}
        parameters: {{weight: 0.3}}
  vision_tower:
    merge_method: linear
    models:
      - model: {a}
        parameters: {{weight: 3.0}}
      - model: {b}
        parameters: {{weight: 1.0}}
      - model: {base}
        parameters: {{weight: 0.0}}
  multi_modal_projector:
    merge_method: slerp
    parameters: {{t: 0.3}}
    models:
      - model: {base}
      - model: {b}
"""


def _slerp(v0, v1, t):
    """SLERP of the flattened tensors, lerp when they are nearly parallel (mergekit's)."""
    x0, x1 = v0.double().flatten(), v1.double().flatten()
    cos = float((x0 / x0.norm()) @ (x1 / x1.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    w0, w1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (w0 * v0.double() + w1 * v1.double()).float()


def test_each_module_is_merged_with_its_own_method(tmp_path, vlm):
    code, log, out = _merge(tmp_path, vlm, PER_MODULE_METHODS)
    assert code == 0, log
    o, base, a, b = (_tensors(d) for d in (out, vlm["base"], vlm["a"], vlm["b"]))
    assert sorted(o) == sorted(base)
    for name in base:
        if name.startswith("language_model."):  # task arithmetic: base + 0.5 da + 0.3 db
            want = base[name] + 0.5 * (a[name] - base[name]) + 0.3 * (b[name] - base[name])
        elif name.startswith("vision_tower."):  # linear, normalised: (3a + b) / 4
            want = (3 * a[name] + b[name]) / 4
        else:  # the projector: SLERP from base towards b, t = 0.3
            assert name.startswith("multi_modal_projector."), name
            want = _slerp(base[name], b[name], 0.3)
        torch.testing.assert_close(o[name], want, rtol=0, atol=1e-6, msg=name)
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    transformers = pytest.importorskip("transformers")
    transformers.Mistral3ForConditionalGeneration.from_pretrained(out)


def test_dry_run_names_each_modules_method_and_writes_nothing(tmp_path, vlm):
    code, log, out = _merge(tmp_path, vlm, PER_MODULE_METHODS, "--dry-run", "--json")
    assert code == 0, log
    plan = json.loads(log[log.index("{") :])
    assert plan["modules"] == {
        "text_decoder": "task_arithmetic", "vision_tower": "linear", "multi_modal_projector": "slerp"
    }  # fmt: skip
    # a is no input of the projector module: its 4 projector tensors are left out, said why
    dropped = plan["completeness"]["dropped_tensors"]
    assert {(d["model"], d["reason"]) for d in dropped} == {
        (str(vlm["a"]), "module multi_modal_projector does not take this model")
    }
    assert sorted(d["tensor"].split(".")[1] for d in dropped) == [
        "linear_1", "linear_2", "norm", "patch_merger"
    ]  # fmt: skip
    assert not out.exists()


GRADIENTS = """
merge_method: linear
dtype: float32
parameters:
  weight: 0.5
modules:
  text_decoder:
    parameters:
      weight: [0.0, 1.0]
    models:
      - model: {a}
      - model: {b}
        parameters: {{weight: 1.0}}
  vision_tower:
    models:
      - model: {a}
      - model: {b}
  multi_modal_projector:
    parameters:
      weight: 0.25
    models:
      - model: {a}
      - model: {b}
        parameters: {{weight: 0.75}}
"""


def _weight_of_a(o, a, b, name):
    """w with o = w a + (1 - w) b, fitted by least squares."""
    d = a[name] - b[name]
    return float(((o[name] - b[name]) * d).sum() / (d * d).sum())


def test_module_parameters_sit_between_the_models_and_the_global_ones(tmp_path, vlm):
    code, log, out = _merge(tmp_path, vlm, GRADIENTS)
    assert code == 0, log
    o, a, b = _tensors(out), _tensors(vlm["a"]), _tensors(vlm["b"])
    q = "self_attn.q_proj.weight"
    # text: a gets the module's gradient over the 3 text blocks, b its own weight 1
    for layer, t in enumerate((0.0, 0.5, 1.0)):
        got = _weight_of_a(o, a, b, f"language_model.model.layers.{layer}.{q}")
        assert got == pytest.approx(t / (t + 1.0), abs=1e-5)
    assert _weight_of_a(o, a, b, "language_model.model.embed_tokens.weight") == pytest.approx(0)
    # vision: the global 0.5 for both, whatever the block
    for layer in range(VISION_LAYERS):
        name = f"vision_tower.transformer.layers.{layer}.attention.q_proj.weight"
        assert _weight_of_a(o, a, b, name) == pytest.approx(0.5, abs=1e-5)
    # projector: the module's 0.25 for a, b's own 0.75
    name = "multi_modal_projector.linear_1.weight"
    assert _weight_of_a(o, a, b, name) == pytest.approx(0.25, abs=1e-5)


SLICED_TEXT = """
merge_method: passthrough
dtype: float32
modules:
  text_decoder:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 2]
      - sources:
          - model: {b}
            layer_range: [1, 3]
  vision_tower:
    models:
      - model: {a}
  multi_modal_projector:
    models:
      - model: {b}
"""


def test_a_sliced_module_renumbers_its_own_stack_and_config_key(tmp_path, vlm):
    code, log, out = _merge(tmp_path, vlm, SLICED_TEXT)
    assert code == 0, log
    o, a, b = _tensors(out), _tensors(vlm["a"]), _tensors(vlm["b"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4
    assert cfg["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    p = "language_model.model.layers.{}.mlp.down_proj.weight"
    for out_layer, (src, layer) in enumerate(((a, 0), (a, 1), (b, 1), (b, 2))):
        assert torch.equal(o[p.format(out_layer)], src[p.format(layer)])
    assert torch.equal(o["language_model.model.embed_tokens.weight"], a["language_model.model.embed_tokens.weight"])  # fmt: skip
    assert torch.equal(o["language_model.model.norm.weight"], b["language_model.model.norm.weight"])
    name = "vision_tower.transformer.layers.1.ffn_norm.weight"
    assert torch.equal(o[name], a[name])
    transformers = pytest.importorskip("transformers")
    model = transformers.Mistral3ForConditionalGeneration.from_pretrained(out)
    assert len(model.model.language_model.layers) == 4


def test_module_layouts_follow_mergekit_names():
    vlm_names = ["language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight",
                 "vision_tower.transformer.layers.0.ffn_norm.weight", "multi_modal_projector.norm.weight",
                 "model.language_model.norm.weight", "lm_head.weight", "model.vision_tower.ln_pre.weight"]  # fmt: skip
    layout = module_layout({"architectures": ["LlavaForConditionalGeneration"]}, vlm_names)
    assert [layout.of(n) for n in vlm_names] == ["text_decoder"] * 2 + [
        "vision_tower", "multi_modal_projector", "text_decoder", "text_decoder", "vision_tower"
    ]  # fmt: skip
    qwen = module_layout({"architectures": ["Qwen2VLForConditionalGeneration"]}, [])
    assert qwen.of("visual.merger.mlp.0.weight") == "multi_modal_projector"
    assert qwen.of("visual.blocks.3.attn.qkv.weight") == "vision_tower"
    assert qwen.of("model.layers.0.mlp.up_proj.weight") == "text_decoder"
    t5 = module_layout({"architectures": ["T5ForConditionalGeneration"]}, [])
    assert [t5.of(n) for n in ("encoder.block.0.x", "decoder.final_layer_norm.weight", "shared.weight")] == [
        "encoder", "decoder", "shared"
    ]  # fmt: skip
    # no template: mergekit's inferred modules, one per stack plus "default"
    clip = module_layout({"architectures": ["CLIPModel"]},
                         ["text_model.encoder.layers.0.mlp.fc1.weight",
                          "vision_model.encoder.layers.0.mlp.fc1.weight", "logit_scale"])  # fmt: skip
    assert clip.names == ("text_model.encoder.layers", "vision_model.encoder.layers", "default")
    assert clip.of("logit_scale") == "default"
    llama = module_layout(
        {"architectures": ["LlamaForCausalLM"]}, ["model.layers.0.mlp.up_proj.weight"]
    )
    assert (
        llama.names == ("default",) and llama.of("model.layers.0.mlp.up_proj.weight") == "default"
    )


def _edit(text, old, new):
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: _edit(t, "  vision_tower:\n", "  vision_towr:\n"), "has no module 'vision_towr'"),
        (lambda t: _edit(t, "    merge_method: linear\n", "    merge_method: linaer\n"),
         "modules.vision_tower.merge_method: unknown method"),
        (lambda t: _edit(t, "    merge_method: linear\n", "    merge_method: linear\n    layer_range: [0, 1]\n"),
         "modules.vision_tower: unknown key"),
        (lambda t: t.split("  multi_modal_projector:")[0],
         "module multi_modal_projector, which modules: does not list"),
        (lambda t: _edit(t, "    models:\n      - model: {a}\n        parameters: {{weight: 0.5}}",
                         "    models: []\n    slices: []\n    x:\n      - model: {a}\n        parameters: {{weight: 0.5}}"),
         "modules.text_decoder: unknown key"),
        (lambda t: _edit(t, "      - model: {b}\n        parameters: {{weight: 0.3}}",
                         "      - model: {b}\n        parameters: {{weight: 0.3, densty: 1}}"),
         "modules.text_decoder.models[1].parameters: unknown parameter"),
        (lambda t: t + "models:\n  - model: {a}\n", "exactly one of 'models', 'slices' or 'modules'"),
        (lambda t: _edit(t, "modules:\n", "modules: 3\nx:\n"), "unknown recipe key"),
        (lambda t: _edit(t, "base_model: {base}\n", ""), "modules.text_decoder: task_arithmetic needs base_model"),
    ],
)  # fmt: skip
def test_bad_modules_fail_with_one_line_and_write_nothing(tmp_path, vlm, edit, needle):
    code, log, out = _merge(tmp_path, vlm, edit(PER_MODULE_METHODS))
    assert code != 0
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], log
    assert "Traceback" not in log
    assert not out.exists()


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        ("modules: []", "'modules' must be a mapping"),
        ("modules: {{}}", "'modules' must be a mapping"),
        ("modules: {{text_decoder: 3}}", "modules.text_decoder: must be a mapping"),
        ("modules: {{text_decoder: {{}}}}", "exactly one of 'models' or 'slices'"),
        ("modules: {{1: {{models: [{a}]}}}}", "module names are letters, digits"),
        ('modules: {{"a\\x1b[31m": {{models: [{a}]}}}}', "module names are letters, digits"),
        ("modules: {{" + ", ".join(f"m{i}: {{{{models: [{{a}}]}}}}" for i in range(65)) + "}}", "at most 64"),
    ],
)  # fmt: skip
def test_malformed_modules_mappings(tmp_path, vlm, modules, needle):
    code, log, out = _merge(tmp_path, vlm, "merge_method: linear\n" + modules + "\n")
    assert code != 0 and needle in log and len(log.strip().splitlines()) == 1, log
    assert not out.exists()


def test_an_unlisted_module_may_be_dropped_knowingly(tmp_path, vlm):
    text = PER_MODULE_METHODS.split("  multi_modal_projector:")[0]
    code, log, out = _merge(tmp_path, vlm, text, "--allow-drop", "multi_modal_projector.*")
    assert code == 0, log
    assert not any(n.startswith("multi_modal_projector.") for n in _tensors(out))


# ------------------------------------------------------------------ mergekit cross-check

# mergekit has no module-level merge_method: one method, per-module parameters.
CROSS = """
merge_method: task_arithmetic
base_model: {base}
dtype: float32
parameters:
  weight: 0.5
modules:
  text_decoder:
    parameters:
      weight: [0.2, 1.0]
    models:
      - model: {a}
      - model: {b}
        parameters: {{weight: 0.3}}
  vision_tower:
    models:
      - model: {a}
        parameters: {{weight: 0.7}}
      - model: {b}
  multi_modal_projector:
    parameters:
      weight: 0.1
    models:
      - model: {a}
      - model: {b}
"""


@pytest.mark.mergekit
def test_modules_match_mergekit(tmp_path, vlm):
    from test_mergekit_crosscheck import MK_DRIVER, mergekit_python

    py, reason = mergekit_python()
    if py is None:
        pytest.skip(reason)
    recipe = tmp_path / "cross.yaml"
    recipe.write_text(CROSS.format(**{k: str(v) for k, v in vlm.items()}))
    mk_out, g_out = tmp_path / "mergekit", tmp_path / "graft"
    code, stdout, stderr = run_cli("merge", recipe, g_out)
    assert code == 0, stdout + stderr
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [py, "-c", MK_DRIVER, json.dumps([(str(recipe), str(mk_out))])],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1]) == {}, (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )
    g, m = _tensors(g_out), _tensors(mk_out)
    assert sorted(g) == sorted(m)
    for name in m:
        limit = 1e-6 * float(m[name].abs().max())
        assert float((g[name] - m[name]).abs().max()) <= limit, name
    gc, mc = (json.loads((d / "config.json").read_text()) for d in (g_out, mk_out))
    for key in ("text_config", "vision_config"):
        assert gc[key]["num_hidden_layers"] == mc[key]["num_hidden_layers"]
