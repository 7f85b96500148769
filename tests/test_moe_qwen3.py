"""`graft moe` with Qwen3 experts -> Qwen3-MoE, on tiny Qwen3 models made here.

As in tests/test_moe.py, expected values are written out in the test: router rows from
the embedding matrix at hand-looked-up token ids, MoE block outputs from the source MLP
weights with Qwen3-MoE's routing (softmax over all experts, top-k, renormalised), and the
logits of identical experts against the dense model.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_cli
from test_moe import _build, _tensors, _unit

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "def", "add", "return", "python",
         "once", "upon", "time", "king", "story", "sea", "poem", "write"]  # fmt: skip
VOCAB = {w: i for i, w in enumerate(WORDS)}
LAYERS, HIDDEN = 2, 32
PROMPTS = [
    {"positive_prompts": ["def add return", "python"], "negative_prompts": ["write a poem"]},
    {"positive_prompts": ["once upon a time", "king story"]},
    {"positive_prompts": ["the sea"]},
]


def _qwen3(path, seed, like=None):
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg)
    if like is not None:  # a fine-tune: the base's weights, other MLPs
        model.load_state_dict(transformers.Qwen3ForCausalLM.from_pretrained(like).state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    root = tmp_path_factory.mktemp("q3")
    base = _qwen3(root / "base", 1)
    return {
        "base": base,
        "e1": _qwen3(root / "e1", 2, like=base),
        "e2": _qwen3(root / "e2", 3, like=base),
        "e3": _qwen3(root / "e3", 4, like=base),
    }


def _recipe(tmp_path, q3, experts=("e1", "e2", "e3"), **extra):
    doc = {"base_model": str(q3["base"]), "gate_mode": "cheap_embed", "experts": []}
    for name, prompts in zip(experts, PROMPTS, strict=False):
        doc["experts"].append({"source_model": str(q3[name]), **prompts})
    doc.update(extra)
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _ids(prompt):
    return [VOCAB["<s>"]] + [VOCAB.get(w, 0) for w in prompt.split()]


def _mlp(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("architecture", [None, "qwen", "qwen3"])
def test_qwen3_experts_give_qwen3_moe_routed_by_hand(tmp_path, q3, architecture):
    extra = {"architecture": architecture} if architecture else {}
    out = _build(tmp_path, _recipe(tmp_path, q3, **extra))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_experts"], cfg["num_experts_per_tok"]) == (
        ["Qwen3MoeForCausalLM"], 3, 2
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    got, base = _tensors(out), _tensors(q3["base"])
    srcs = [_tensors(q3[e]) for e in ("e1", "e2", "e3")]
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "lm_head.weight"):  # fmt: skip
        assert torch.equal(got[name], base[name]), name
    assert torch.equal(got["model.layers.1.mlp.experts.2.up_proj.weight"], srcs[2]["model.layers.1.mlp.up_proj.weight"])  # fmt: skip
    # cheap_embed routers: each expert's prompt embeddings, summed, unit norm
    embed = base["model.embed_tokens.weight"]

    def side(prompts):
        return _unit(sum(embed[_ids(p)].sum(0) for p in prompts))

    rows = torch.stack([
        _unit(side(PROMPTS[0]["positive_prompts"]) - side(PROMPTS[0]["negative_prompts"])),
        side(PROMPTS[1]["positive_prompts"]),
        side(PROMPTS[2]["positive_prompts"]),
    ])  # fmt: skip
    for layer in range(LAYERS):
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"], rows, atol=1e-6, rtol=0)  # fmt: skip
    # a block: softmax over the 3 experts, top 2 renormalised (norm_topk_prob), their MLPs
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5))
    probs = torch.softmax(x @ rows.T, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    names = ("gate_proj", "up_proj", "down_proj")
    mlps = torch.stack(
        [_mlp(x, *(s[f"model.layers.1.mlp.{p}.weight"] for p in names)) for s in srcs], dim=1
    )  # (tokens, experts, hidden)
    want = (mlps.gather(1, idx[..., None].expand(-1, -1, HIDDEN)) * top[..., None]).sum(1)
    with torch.no_grad():
        block = model.model.layers[1].mlp(x[None])
    block = block[0] if isinstance(block, tuple) else block
    torch.testing.assert_close(block[0], want, atol=1e-5, rtol=1e-5)


def test_identical_experts_give_the_dense_models_logits(tmp_path, q3):
    """Three copies of e1, two per token: the chosen weights sum to 1, so every block is
    e1's MLP and the logits are those of the base with e1's MLPs."""
    doc = {
        "base_model": str(q3["base"]),
        "gate_mode": "random",
        "experts": [{"source_model": str(q3["e1"])}] * 3,
    }
    recipe = tmp_path / "same.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = _build(tmp_path, recipe, "--i-understand-this-is-not-useful-without-training")
    dense = transformers.Qwen3ForCausalLM.from_pretrained(q3["base"]).eval()
    src = _tensors(q3["e1"])
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if ".mlp." in name:
                p.copy_(src[name])
    ids = torch.tensor([_ids("the cat sat once upon a time python")])
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"architecture": "mixtral"}, "Mixtral takes experts of type llama, mistral"),
        ({"architecture": "qwen moe"}, "Qwen2-MoE output needs exactly one shared expert"),
        ({"architecture": "deepseek"}, "remote code"),
        (
            {
                "shared_experts": [{"source_model": "E1", "positive_prompts": ["the sea"]}],
                "architecture": "qwen3",
            },
            "Qwen3-MoE has no shared experts",
        ),  # fmt: skip
    ],
)
def test_outputs_that_do_not_take_qwen3_experts_fail_in_one_line(tmp_path, q3, edit, needle):
    doc = yaml.safe_load(_recipe(tmp_path, q3).read_text())
    doc.update(edit)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(doc).replace("E1", str(q3["e1"])))
    code, _, err = run_cli("moe", recipe, tmp_path / "out", "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.mergekit
def test_qwen3_moe_matches_mergekit_moe(tmp_path, q3):
    """mergekit-moe 0.1.5's Qwen3 MoE output on the same cheap_embed recipe: the same
    routers (float32 rounding) and, loaded by transformers, the same expert weights
    (mergekit writes the fused ``experts.gate_up_proj``, graft the per-expert names)."""
    import subprocess

    from test_mergekit_crosscheck import mergekit_python

    py, reason = mergekit_python()
    if py is None:
        pytest.skip(reason)
    recipe = _recipe(tmp_path, q3)
    ours, theirs = _build(tmp_path, recipe), tmp_path / "mk"
    r = subprocess.run(
        [py, "-m", "mergekit.scripts.moe", str(recipe), str(theirs)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    a = transformers.AutoModelForCausalLM.from_pretrained(ours).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32).state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        atol = 1e-6 if name.endswith("mlp.gate.weight") else 0
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)
