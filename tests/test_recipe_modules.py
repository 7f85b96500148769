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

from conftest import make_llava, run_cli
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


# ------------------------------------------------------- LiNeS in a sliced module

SLICED_LINES = """
merge_method: lines
base_model: {base}
dtype: float32
parameters: {{alpha: 0.5, beta: 0.5}}
modules:
  text_decoder:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 2]
          - model: {base}
            layer_range: [0, 2]
  vision_tower:
    models:
      - model: {a}
  multi_modal_projector:
    models:
      - model: {a}
"""


def test_lines_in_a_sliced_module_scales_by_depth_within_that_module(tmp_path, vlm):
    # The text module keeps 2 of its 3 blocks; the vision tower has 2. LiNeS gives block l
    # of a stack of L blocks alpha + beta·l/(L − 1): 0.5 then 1.0 in both modules. Scaling
    # by the whole model's deepest stack (3 text blocks) would give the last kept text
    # block 0.75.
    code, log, out = _merge(tmp_path, vlm, SLICED_LINES)
    assert code == 0, log
    o, base, a = _tensors(out), _tensors(vlm["base"]), _tensors(vlm["a"])
    names = (
        "language_model.model.layers.{}.mlp.down_proj.weight",
        "vision_tower.transformer.layers.{}.feed_forward.down_proj.weight",
    )
    for pattern in names:
        for layer, scale in ((0, 0.5), (1, 1.0)):
            name = pattern.format(layer)
            want = base[name] + scale * (a[name] - base[name])
            torch.testing.assert_close(o[name], want, rtol=0, atol=1e-6, msg=name)
    assert "language_model.model.layers.2.mlp.down_proj.weight" not in o


# ------------------------------------- LLaVA: mergekit's inferred module names


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {"a": make_llava(root / "a", 1), "b": make_llava(root / "b", 2)}


# mergekit has no LLaVA template: it names the modules after the block stacks of the model
# transformers 5 builds (model.language_model.layers), plus "default" for the rest.
LLAVA_INFERRED = """
merge_method: linear
dtype: float32
modules:
  {text}:
    models:
      - model: {a}
        parameters: {{weight: 3.0}}
      - model: {b}
        parameters: {{weight: 1.0}}
  {vision}:
    models:
      - model: {a}
        parameters: {{weight: [1.0, 0.0]}}
      - model: {b}
        parameters: {{weight: [0.0, 1.0]}}
  default:
    models:
      - model: {a}
      - model: {b}
    parameters: {{weight: 1.0}}
"""
SPELLINGS = {  # the stacks as transformers 5 names them (mergekit's) and as the checkpoint does
    "transformers 5": ("model.language_model.layers", "model.vision_tower.encoder.layers"),
    "checkpoint": ("language_model.model.layers", "vision_tower.encoder.layers"),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_llava_runs_a_recipe_with_mergekits_inferred_module_names(tmp_path, llava, spelling):
    text, vision = SPELLINGS[spelling]
    recipe = LLAVA_INFERRED.format(
        text=text, vision=vision, **{k: str(v) for k, v in llava.items()}
    )
    (tmp_path / "r.yaml").write_text(recipe)
    code, stdout, stderr = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out")
    assert code == 0, stdout + stderr
    o, a, b = _tensors(tmp_path / "out"), _tensors(llava["a"]), _tensors(llava["b"])
    assert sorted(o) == sorted(a)
    for name in a:
        if name.startswith("language_model.model.layers."):  # (3a + b) / 4
            want = (3 * a[name] + b[name]) / 4
        elif name.startswith("vision_tower.encoder.layers."):  # block 0 is a, block 1 is b
            want = a[name] if ".layers.0." in name else b[name]
        else:  # default: embeddings, norms, lm_head, projector, vision embeddings
            want = (a[name] + b[name]) / 2
        torch.testing.assert_close(o[name], want, rtol=0, atol=1e-6, msg=name)
    transformers = pytest.importorskip("transformers")
    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")


def test_llava_template_names_still_run_and_unknown_names_list_both(tmp_path, llava):
    recipe = LLAVA_INFERRED.format(
        text="text_decoder", vision="vision_tower", **{k: str(v) for k, v in llava.items()}
    ).replace("  default:", "  multi_modal_projector:")
    (tmp_path / "r.yaml").write_text(recipe)
    code, stdout, stderr = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out")
    assert code == 0, stdout + stderr
    o, a, b = _tensors(tmp_path / "out"), _tensors(llava["a"]), _tensors(llava["b"])
    name = "language_model.model.embed_tokens.weight"  # text_decoder: (3a + b) / 4
    torch.testing.assert_close(o[name], (3 * a[name] + b[name]) / 4, rtol=0, atol=1e-6)
    bad = LLAVA_INFERRED.format(
        text="model.language_model.layers", vision="vision_towr", **{k: str(v) for k, v in llava.items()}
    )  # fmt: skip
    (tmp_path / "bad.yaml").write_text(bad)
    code, stdout, stderr = run_cli("merge", tmp_path / "bad.yaml", tmp_path / "bad")
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "has no module 'vision_towr'" in lines[0], lines
    # the names it has under both schemes: mergekit's inferred ones and graft's template
    for name in ("model.language_model.layers", "default", "text_decoder", "multi_modal_projector"):
        assert name in lines[0], lines
    assert not (tmp_path / "bad").exists()


@pytest.mark.mergekit
def test_llava_inferred_modules_match_mergekit(tmp_path, llava):
    from test_mergekit_crosscheck import MK_DRIVER, mergekit_python

    py, reason = mergekit_python()
    if py is None:
        pytest.skip(reason)
    text, vision = SPELLINGS["transformers 5"]
    recipe = tmp_path / "cross.yaml"
    recipe.write_text(
        LLAVA_INFERRED.format(text=text, vision=vision, **{k: str(v) for k, v in llava.items()})
    )
    mk_out, g_out = tmp_path / "mergekit", tmp_path / "graft"
    code, stdout, stderr = run_cli("merge", recipe, g_out)
    assert code == 0, stdout + stderr
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [py, "-c", MK_DRIVER, json.dumps([(str(recipe), str(mk_out))])],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    g, m = _tensors(g_out), _tensors(mk_out)
    # mergekit 0.1.5 writes the transformers-5 names and leaves the language model out
    # (docs/methods.md); every tensor it writes matches graft's under the checkpoint's name.
    assert m and all(n.startswith("model.") for n in m)
    for name in m:
        mine = g[name.removeprefix("model.")]
        assert float((mine - m[name]).abs().max()) <= 1e-6 * float(m[name].abs().max()), name


# --------------------------------------------- Qwen2-VL: the projector's "layers"


def _qwen2_vl(out, seed):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=1, in_channels=3,
        ),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(out)
    return out


def test_qwen2_vl_projector_takes_the_first_point_of_a_gradient(tmp_path):
    # mergekit's Qwen2-VL template lists the projector's four tensors under both of its
    # two "layers", so each is merged at t = 0 and at t = 1 and the last write wins
    # (docs/methods.md). graft merges them once, as tensors outside the blocks: t = 0.
    a, b = _qwen2_vl(tmp_path / "a", 1), _qwen2_vl(tmp_path / "b", 2)
    both = "    models:\n      - model: {a}\n      - model: {b}\n"
    recipe = (
        "merge_method: linear\ndtype: float32\nparameters: {{weight: 1.0}}\nmodules:\n"
        "  text_decoder:\n" + both + "  vision_tower:\n" + both + "  multi_modal_projector:\n"
        "    models:\n      - model: {a}\n        parameters: {{weight: [1.0, 0.0]}}\n"
        "      - model: {b}\n        parameters: {{weight: [0.0, 1.0]}}\n"
    ).format(a=a, b=b)
    (tmp_path / "r.yaml").write_text(recipe)
    code, stdout, stderr = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out")
    assert code == 0, stdout + stderr
    o, ta, tb = _tensors(tmp_path / "out"), _tensors(a), _tensors(b)
    merger = [n for n in ta if n.startswith("visual.merger.")]
    assert len(merger) == 6
    for name in merger:
        assert torch.equal(o[name], ta[name]), name
    name = "visual.blocks.1.attn.qkv.weight"
    torch.testing.assert_close(o[name], (ta[name] + tb[name]) / 2, rtol=0, atol=1e-6)
