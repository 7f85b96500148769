"""`graft moe`: mergekit-moe recipes -> Mixtral / Qwen2-MoE, on tiny models made here.

Expected values are worked out in the test, independently of graft's code: router rows
from the embedding matrix indexed by hand-looked-up token ids, or from the inputs of each
decoder layer caught with forward pre-hooks on ``LlamaForCausalLM``; MoE block outputs
from the source MLP weights with the routing formula written out.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_hf_model, run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "def",
    "add",
    "return",
    "sum",
    "of",
    "two",
    "numbers",
    "once",
    "upon",
    "time",
    "there",
    "was",
    "king",
    "python",
    "code",
    "story",
    "write",
    "poem",
    "about",
    "sea",
]
VOCAB = {w: i for i, w in enumerate(WORDS)}
LAYERS = 4


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def _ids(prompt: str) -> list[int]:
    """mergekit's tokenization, by hand: BOS, then each word's id."""
    return [VOCAB["<s>"]] + [VOCAB[w] for w in prompt.split()]


def _mistral(path, seed):
    cfg = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    transformers.MistralForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = make_hf_model("llama", root / "base", seed=11)
    e1 = make_hf_model("llama", root / "e1", seed=12, like=base, noise=0.5)
    e2 = make_hf_model("llama", root / "e2", seed=13, like=base, noise=0.5)
    m_base, m_e1 = _mistral(root / "m-base", 21), _mistral(root / "m-e1", 22)
    for folder in (base, e1, e2, m_base, m_e1):
        _save_tokenizer(folder)
    return {"base": base, "e1": e1, "e2": e2, "m-base": m_base, "m-e1": m_e1, "root": root}


PROMPTS = {
    "e1": {
        "positive_prompts": ["def add return sum", "python code"],
        "negative_prompts": ["write a poem"],
    },
    "e2": {"positive_prompts": ["once upon a time there was a king", "write a story"]},
}


def _recipe(tmp_path, fam, gate_mode="cheap_embed", experts=("e1", "e2"), **extra):
    doc = {"base_model": str(fam["base"]), "gate_mode": gate_mode, "experts": []}
    for name in experts:
        doc["experts"].append({"source_model": str(fam[name]), **PROMPTS.get(name, {})})
    doc.update(extra)
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _build(tmp_path, recipe, *args):
    out = tmp_path / "out"
    code, stdout, err = run_cli("moe", recipe, out, "-q", *args)
    assert code == 0, err
    return out


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _mlp(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


# --- weights and routers, by value -------------------------------------------------------


def test_mixtral_takes_each_expert_mlp_from_its_source_and_the_rest_from_base(tmp_path, fam):
    out = _build(tmp_path, _recipe(tmp_path, fam))
    got, base = _tensors(out), _tensors(fam["base"])
    experts = [_tensors(fam["e1"]), _tensors(fam["e2"])]
    for layer in range(LAYERS):
        moe = f"model.layers.{layer}.block_sparse_moe"
        for e, src in enumerate(experts):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(
                    got[f"{moe}.experts.{e}.{w}.weight"],
                    src[f"model.layers.{layer}.mlp.{proj}.weight"],
                )
        assert got[f"{moe}.gate.weight"].shape == (2, 32)
    dense = {n for n in base if ".mlp." not in n}
    assert dense == {n for n in got if "block_sparse_moe" not in n}
    for name in dense:
        assert torch.equal(got[name], base[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    q = model.model.layers[2].self_attn.q_proj.weight
    assert torch.equal(q, base["model.layers.2.self_attn.q_proj.weight"])
    assert (out / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    assert "graft" in (out / "README.md").read_text()


def test_cheap_embed_rows_are_normalised_prompt_embeddings(tmp_path, fam):
    out = _build(tmp_path, _recipe(tmp_path, fam))
    embed = _tensors(fam["base"])["model.embed_tokens.weight"]

    def side(prompts):  # every token of every prompt, summed, unit norm
        return _unit(sum(embed[_ids(p)].sum(0) for p in prompts))

    e1 = _unit(side(PROMPTS["e1"]["positive_prompts"]) - side(PROMPTS["e1"]["negative_prompts"]))
    e2 = side(PROMPTS["e2"]["positive_prompts"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer in range(LAYERS):
        rows = model.model.layers[layer].mlp.gate.weight.detach()
        torch.testing.assert_close(rows, torch.stack([e1, e2]), atol=1e-6, rtol=0)


@functools.lru_cache(maxsize=2)
def _causal_lm(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _layer_inputs(path, ids):
    """The hidden state entering each decoder layer, caught with pre-hooks: (layers, T, H)."""
    model = _causal_lm(path)
    seen = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(
                kwargs.get("hidden_states", args[0] if args else None)[0]
            ),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_rows_are_normalised_mean_hidden_states(tmp_path, fam, mode):
    out = _build(tmp_path, _recipe(tmp_path, fam, gate_mode=mode))

    def side(prompts):  # per prompt: last token (hidden) or token mean (hidden_avg)
        vecs = []
        for p in prompts:
            h = _layer_inputs(fam["base"], _ids(p))
            vecs.append(h.mean(1) if mode == "hidden_avg" else h[:, -1])
        return torch.stack(vecs).mean(0)

    e1 = _unit(side(PROMPTS["e1"]["positive_prompts"]) - side(PROMPTS["e1"]["negative_prompts"]))
    e2 = _unit(side(PROMPTS["e2"]["positive_prompts"]))
    got = _tensors(out)
    for layer in range(LAYERS):
        rows = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(rows, torch.stack([e1[layer], e2[layer]]), atol=1e-5, rtol=0)
    # the rows differ from layer to layer (they are not one vector repeated)
    assert not torch.allclose(
        got["model.layers.0.block_sparse_moe.gate.weight"],
        got["model.layers.3.block_sparse_moe.gate.weight"],
        atol=1e-3,
    )


# --- routing invariants ---------------------------------------------------------------------


def _dense_reference(base, expert):
    """The base model with every MLP replaced by ``expert``'s."""
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    src = _tensors(expert)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(src[name])
    return model


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_identical_experts_give_the_dense_models_logits(tmp_path, fam, gate_mode):
    # three copies of e1, two per token: whatever the router does, the weights of the
    # chosen experts sum to 1, so each MoE block is e1's MLP, and the logits are those of
    # base-with-e1's-MLPs. Swapped w1/w3, a transposed weight or a wrong block would not be.
    prompts = [{"positive_prompts": [p]} for p in ("def add", "a cat", "the sea")]
    doc = {
        "base_model": str(fam["base"]),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": [{"source_model": str(fam["e1"]), **p} for p in prompts],
    }
    recipe = tmp_path / "same.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = _build(tmp_path, recipe, "--i-understand-this-is-not-useful-without-training")
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, 20, 30, 40]])
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = _dense_reference(fam["base"], fam["e1"])(ids).logits
        got = moe(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_output_is_the_top_k_weighted_sum_of_source_mlps(tmp_path, fam):
    out = _build(
        tmp_path,
        _recipe(
            tmp_path, fam, gate_mode="random", experts=("e1", "e2", "base"), experts_per_token=2
        ),
    )
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    srcs = [_tensors(fam[n]) for n in ("e1", "e2", "base")]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    for layer in (0, 3):
        gate = _tensors(out)[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        probs = torch.softmax(x @ gate.T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        mlps = torch.stack(
            [
                _mlp(
                    x,
                    *(
                        s[f"model.layers.{layer}.mlp.{p}.weight"]
                        for p in ("gate_proj", "up_proj", "down_proj")
                    ),
                )
                for s in srcs
            ],
            dim=1,
        )  # (tokens, experts, hidden)
        want = (mlps.gather(1, idx[..., None].expand(-1, -1, 32)) * top[..., None]).sum(1)
        with torch.no_grad():
            got = moe.model.layers[layer].mlp(x[None])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mistral_experts_give_mixtral(tmp_path, fam):
    doc = {
        "base_model": str(fam["m-base"]),
        "gate_mode": "cheap_embed",
        "experts": [
            {"source_model": str(fam["m-e1"]), **PROMPTS["e1"]},
            {"source_model": str(fam["m-base"]), **PROMPTS["e2"]},
        ],
    }
    recipe = tmp_path / "m.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = _build(tmp_path, recipe)
    got, src = _tensors(out), _tensors(fam["m-e1"])
    assert torch.equal(
        got["model.layers.1.block_sparse_moe.experts.0.w3.weight"],
        src["model.layers.1.mlp.up_proj.weight"],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# --- Qwen2-MoE with a shared expert -----------------------------------------------------------


def test_shared_expert_gives_qwen2_moe(tmp_path, fam):
    shared = {"source_model": str(fam["base"]), "positive_prompts": ["the cat sat on a mat"]}
    out = _build(tmp_path, _recipe(tmp_path, fam, shared_experts=[shared]))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    got, base = _tensors(out), _tensors(fam["base"])
    srcs = [_tensors(fam["e1"]), _tensors(fam["e2"])]
    assert torch.equal(
        got["model.layers.1.mlp.experts.1.down_proj.weight"],
        srcs[1]["model.layers.1.mlp.down_proj.weight"],
    )
    assert torch.equal(
        got["model.layers.1.mlp.shared_expert.gate_proj.weight"],
        base["model.layers.1.mlp.gate_proj.weight"],
    )
    assert torch.equal(
        got["model.layers.0.self_attn.k_proj.weight"],
        base["model.layers.0.self_attn.k_proj.weight"],
    )
    assert not got["model.layers.0.self_attn.q_proj.bias"].any()  # Qwen2 needs q/k/v biases
    embed = base["model.embed_tokens.weight"]
    shared_row = _unit(embed[_ids("the cat sat on a mat")].sum(0))
    torch.testing.assert_close(
        got["model.layers.2.mlp.shared_expert_gate.weight"][0], shared_row, atol=1e-6, rtol=0
    )
    # the block: top-2 (of 2) routed experts weighted by the softmax, plus the shared expert
    # scaled by sigmoid(shared gate)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    layer = 2
    names = ("gate_proj", "up_proj", "down_proj")
    gate = got[f"model.layers.{layer}.mlp.gate.weight"]
    w = torch.softmax(x @ gate.T, dim=-1)
    routed = sum(
        w[:, e : e + 1] * _mlp(x, *(s[f"model.layers.{layer}.mlp.{p}.weight"] for p in names))
        for e, s in enumerate(srcs)
    )
    shared_out = _mlp(x, *(base[f"model.layers.{layer}.mlp.{p}.weight"] for p in names))
    want = routed + torch.sigmoid(x @ shared_row[:, None]) * shared_out
    with torch.no_grad():
        got_block = model.model.layers[layer].mlp(x[None])[0]
    torch.testing.assert_close(got_block, want, atol=1e-5, rtol=1e-5)


# --- dtype, scales, seeds ----------------------------------------------------------------------


def test_dtype_and_residual_scale(tmp_path, fam):
    recipe = _recipe(tmp_path, fam, dtype="bfloat16")
    doc = yaml.safe_load(recipe.read_text())
    doc["experts"][1]["residual_scale"] = 0.5
    recipe.write_text(yaml.safe_dump(doc))
    out = _build(tmp_path, recipe)
    got, e2 = _tensors(out), _tensors(fam["e2"])
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    moe = "model.layers.0.block_sparse_moe.experts.1"
    down = e2["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got[f"{moe}.w2.weight"], (down * 0.5).to(torch.bfloat16))
    assert torch.equal(
        got[f"{moe}.w1.weight"], e2["model.layers.0.mlp.gate_proj.weight"].to(torch.bfloat16)
    )


def test_noise_scale_is_seeded_noise_of_that_scale(tmp_path, fam):
    recipe = _recipe(tmp_path, fam, gate_mode="random")
    doc = yaml.safe_load(recipe.read_text())
    doc["experts"][0]["noise_scale"] = 0.01
    recipe.write_text(yaml.safe_dump(doc))
    name = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    runs = []
    for i, seed in enumerate(("1", "1", "2")):
        out = tmp_path / f"out{i}"
        code, _, err = run_cli("moe", recipe, out, "-q", "--seed", seed)
        assert code == 0, err
        runs.append(_tensors(out))
    src = _tensors(fam["e1"])["model.layers.1.mlp.gate_proj.weight"]
    noise = runs[0][name] - src
    assert 0.008 < noise.std().item() < 0.012
    assert torch.equal(runs[0][name], runs[1][name]) and not torch.equal(
        runs[0][name], runs[2][name]
    )
    assert torch.equal(
        runs[0]["model.layers.1.block_sparse_moe.experts.1.w1.weight"],
        _tensors(fam["e2"])["model.layers.1.mlp.gate_proj.weight"],
    )


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_follow_mergekit_scales(tmp_path, fam, mode):
    doc = {
        "base_model": str(fam["base"]),
        "gate_mode": mode,
        "experts": [{"source_model": str(fam[n])} for n in ("e1", "e2", "base", "e1")] * 4,
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = _build(tmp_path, recipe)
    rows = torch.stack([g for n, g in _tensors(out).items() if n.endswith("gate.weight")])
    assert rows.shape == (LAYERS, 16, 32)
    if mode == "random":  # N(0, 1), not normalised
        assert 0.9 < rows.std().item() < 1.1
    else:  # U(-1/sqrt(32), 1/sqrt(32))
        assert rows.abs().max().item() <= 32**-0.5 and rows.abs().max().item() > 0.9 * 32**-0.5


# --- CLI: dry run, summary, errors ---------------------------------------------------------------


def test_dry_run_reads_nothing_and_json_plan(tmp_path, fam):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "moe", _recipe(tmp_path, fam, gate_mode="hidden"), out, "--dry-run", "--json"
    )
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["architecture"] == "MixtralForCausalLM"
    assert plan["output"]["by_kind"] == {
        "copy": 3 + 6 * LAYERS,
        "router": LAYERS,
        "expert": 2 * 3 * LAYERS,
    }
    assert plan["prompts_to_run"] == 5 and not out.exists()


def test_json_summary(tmp_path, fam):
    out = tmp_path / "out"
    code, stdout, err = run_cli("moe", _recipe(tmp_path, fam), out, "-q", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert (s["architecture"], s["experts"], s["layers"]) == ("MixtralForCausalLM", 2, LAYERS)
    assert s["tensors"] == 3 + 6 * LAYERS + LAYERS + 2 * 3 * LAYERS
    assert s["bytes_written"] == (out / "model.safetensors").stat().st_size - (
        8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    )


def test_help_names_the_modes():
    code, stdout, _ = run_cli("moe", "--help")
    assert code == 0 and "cheap_embed" in stdout and "Mixtral" in stdout


def test_graft_merge_points_moe_recipes_to_graft_moe(tmp_path, fam):
    code, _, err = run_cli("merge", _recipe(tmp_path, fam), tmp_path / "out")
    assert code == 2 and "graft moe" in err and not (tmp_path / "out").exists()


BAD = [
    ({"gate_modee": "random"}, "gate_modee"),
    ({"gate_mode": "smart"}, "gate_mode"),
    ({"base_model": None}, "base_model"),
    ({"experts": []}, "experts"),
    ({"experts": [{"positive_prompts": ["a"]}]}, "experts[0]"),
    ({"experts": [{"source_model": "E1", "postive_prompts": ["a"]}]}, "postive_prompts"),
    ({"experts_per_token": 3}, "experts_per_token"),
    ({"experts_per_token": 0}, "experts_per_token"),
    ({"dtype": "int8"}, "dtype"),
    ({"architecture": "deepseek"}, "architecture"),
    ({"architecture": "gpt"}, "architecture"),
    ({"architecture": "qwen"}, "shared_experts"),
    (
        {
            "shared_experts": [{"source_model": "E1", "positive_prompts": ["x"]}],
            "architecture": "mixtral",
        },
        "shared_experts",
    ),
    ({"merge_method": "linear"}, "graft merge"),
]


@pytest.mark.parametrize("edit,needle", BAD)
def test_bad_recipes_fail_with_one_line_naming_the_key(tmp_path, fam, edit, needle):
    doc = yaml.safe_load(_recipe(tmp_path, fam).read_text())
    for k, v in edit.items():
        doc[k] = v
    text = yaml.safe_dump(doc).replace("E1", str(fam["e1"]))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code, _, err = run_cli("moe", recipe, out, "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _expert_edit(tmp_path, fam, **changes):
    doc = yaml.safe_load(_recipe(tmp_path, fam, gate_mode="hidden").read_text())
    for k, v in changes.items():
        if v is None:
            doc["experts"][1].pop(k, None)
        else:
            doc["experts"][1][k] = v
    return doc


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no_prompts", "experts[1].positive_prompts"),
        ("same_prompts", "same positive and negative prompts"),
        ("same_models", "--i-understand-this-is-not-useful-without-training"),
        ("prompt_not_list", "experts[1].negative_prompts"),
        ("missing_model", "not found"),
        ("gpt2_expert", "'gpt2' model"),
        ("no_tokenizer", "tokenizer"),
        ("bad_scale", "experts[1].residual_scale"),
    ],
)
def test_bad_experts_fail_with_one_line(tmp_path, fam, case, needle):
    doc = _expert_edit(tmp_path, fam)
    if case == "no_prompts":
        doc["experts"][1].pop("positive_prompts")
    elif case == "same_prompts":
        doc["experts"][1] = {**doc["experts"][0], "source_model": doc["experts"][1]["source_model"]}
    elif case == "same_models":
        doc["experts"][1]["source_model"] = doc["experts"][0]["source_model"]
    elif case == "prompt_not_list":
        doc["experts"][1]["negative_prompts"] = "write a poem"
    elif case == "missing_model":
        doc["experts"][1]["source_model"] = str(tmp_path / "nowhere")
    elif case == "gpt2_expert":
        doc["experts"][1]["source_model"] = str(make_hf_model("gpt2", tmp_path / "g"))
    elif case == "no_tokenizer":
        doc["base_model"] = str(make_hf_model("llama", tmp_path / "notok", seed=11))
    elif case == "bad_scale":
        doc["experts"][1]["residual_scale"] = "big"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    code, _, err = run_cli("moe", recipe, out, "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_expert_with_other_shapes_is_refused(tmp_path, fam):
    big = tmp_path / "wide"
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(big)
    doc = yaml.safe_load(_recipe(tmp_path, fam, gate_mode="random").read_text())
    doc["experts"][1]["source_model"] = str(big)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli("moe", recipe, tmp_path / "out", "-q")
    assert code == 2 and "intermediate_size" in err and "expert model" in err
    assert not (tmp_path / "out").exists()


# --- against mergekit-moe itself ---------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("mode,atol", [("cheap_embed", 1e-6), ("hidden", 2e-2)])
def test_routers_and_experts_match_mergekit_moe(tmp_path, fam, mode, atol):
    """mergekit-moe 0.1.5 on the same recipe: cheap_embed rows agree to float32 rounding;
    hidden rows to bfloat16's (mergekit runs the base in bfloat16, graft in float32, and
    mergekit pads the prompts of a batch on the left, graft runs each alone). mergekit
    writes transformers 5's fused ``experts.gate_up_proj``; graft the classic per-expert
    names: the same numbers."""
    import subprocess

    from test_mergekit_crosscheck import mergekit_python

    py, reason = mergekit_python()
    if py is None:
        pytest.skip(reason)
    recipe = _recipe(tmp_path, fam, gate_mode=mode)
    ours = _build(tmp_path, recipe)
    theirs = tmp_path / "mk"
    r = subprocess.run(
        [py, "-m", "mergekit.scripts.moe", str(recipe), str(theirs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _tensors(ours), load_file(str(theirs / "model.safetensors"))
    for layer in range(LAYERS):
        torch.testing.assert_close(
            a[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
            b[f"model.layers.{layer}.mlp.gate.weight"].float(),
            atol=atol,
            rtol=0,
        )
        gate_up = b[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = b[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(2):
            moe = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            assert torch.equal(
                torch.cat([a[f"{moe}.w1.weight"], a[f"{moe}.w3.weight"]]), gate_up[e]
            )
            assert torch.equal(a[f"{moe}.w2.weight"], down[e])


def test_missing_recipe_and_existing_output_are_refused(tmp_path, fam):
    code, _, err = run_cli("moe", tmp_path / "nope.yaml", tmp_path / "out")
    assert code == 2 and "nope.yaml" in err and not (tmp_path / "out").exists()
    recipe = _recipe(tmp_path, fam, gate_mode="random")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ((), ("--force",)):
        code, _, err = run_cli("moe", recipe, mine, "-q", *extra)
        assert code == 2 and "--force" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = _build(tmp_path, recipe)
    code, _, err = run_cli("moe", recipe, out, "-q")
    assert code == 2 and "exists" in err
    code, _, err = run_cli("moe", recipe, out, "-q", "--force", "--seed", "5")
    assert code == 0, err
