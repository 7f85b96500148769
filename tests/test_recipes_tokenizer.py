"""tokenizer_source / the tokenizer: block (vocabulary union, token sources, padding) and
chat_template, on tiny Llama models with WordLevel tokenizers built in the test.

Expected rows are worked out here from mergekit 0.1.5's rules (graft/plan/vocab.py): a
token a model lacks takes the only input's row that has it, else the base's, else the
mean over the inputs that have it; the merge method then runs on the aligned rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SPECIAL = ["<unk>", "<s>", "</s>"]
X_TOKENS = [*SPECIAL, "a", "b", "c"]
Y_TOKENS = [*SPECIAL, "c", "b", "d", "e"]
Z_TOKENS = [*SPECIAL, "a", "f"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def save_tokenizer(path, tokens, chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)


def make_model(path, tokens, seed, chat_template=None):
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokens), max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    save_tokenizer(path, tokens, chat_template)
    return path


@pytest.fixture(scope="module")
def xyz(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "x": make_model(root / "x", X_TOKENS, 1),
        "y": make_model(root / "y", Y_TOKENS, 2),
        "z": make_model(root / "z", Z_TOKENS, 3),
    }


def _state(path):
    return load_file(path / "model.safetensors")


def _rows(path, tokens):
    """token -> (embedding row, head row) of a model."""
    s = _state(path)
    return {t: tuple(s[n][i] for n in VOCAB_TENSORS) for i, t in enumerate(tokens)}


def _write(tmp_path, doc, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _merge(tmp_path, doc, *extra):
    recipe = _write(tmp_path, doc)
    code, out, err = run_cli("merge", recipe, tmp_path / "out", "-q", *extra)
    assert code == 0, err
    return tmp_path / "out"


def _fails(tmp_path, doc) -> str:
    code, _, err = run_cli("merge", _write(tmp_path, doc), tmp_path / "out", "-q")
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return lines[0]


def _models(*paths, weight=1.0):
    return [{"model": str(p), "parameters": {"weight": weight}} for p in paths]


def _mean(rows):
    return tuple(torch.stack(r).mean(0) for r in zip(*rows, strict=True))


def test_union_maps_rows_by_token_and_pads(xyz, tmp_path):
    out = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": _models(xyz["x"], xyz["y"], xyz["z"]),
            "tokenizer": {"source": "union", "pad_to_multiple_of": 4},
        },
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    # x's ids unchanged, then the new tokens in model order: y's d, e, then z's f
    assert tok.get_vocab() == {t: i for i, t in enumerate([*X_TOKENS, "d", "e", "f"])}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 12
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert tuple(model.model.embed_tokens.weight.shape) == (12, 16)

    x, y, z = (_rows(xyz[k], t) for k, t in (("x", X_TOKENS), ("y", Y_TOKENS), ("z", Z_TOKENS)))
    aligned = {  # each model's row per output token; a missing token's default in [ ]
        "<unk>": (x["<unk>"], y["<unk>"], z["<unk>"]),
        "a": (x["a"], _mean([x["a"], z["a"]]), z["a"]),  # y lacks a: mean of x's and z's
        "b": (x["b"], y["b"], _mean([x["b"], y["b"]])),  # z lacks b, c: mean of x, y
        "c": (x["c"], y["c"], _mean([x["c"], y["c"]])),
        "d": (y["d"],) * 3,  # only y has d, e: its row everywhere
        "e": (y["e"],) * 3,
        "f": (z["f"],) * 3,
    }
    got = _state(out)
    vocab = tok.get_vocab()
    for token, rows in aligned.items():
        want = _mean(rows)  # linear with equal weights
        for k, name in enumerate(VOCAB_TENSORS):
            torch.testing.assert_close(got[name][vocab[token]], want[k], atol=1e-6, rtol=1e-6)
    for name in VOCAB_TENSORS:  # padding rows: the mean of the real rows
        pad = got[name][9:]
        torch.testing.assert_close(pad, got[name][:9].mean(0).expand(3, -1), atol=1e-6, rtol=0)
    xs, ys = _state(xyz["x"]), _state(xyz["y"])
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], (xs[name] + ys[name] + _state(xyz["z"])[name]) / 3)


def test_missing_tokens_take_the_base_row(xyz, tmp_path):
    out = _merge(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(xyz["x"]),
            "models": _models(xyz["y"], xyz["z"]),
            "tokenizer_source": "union",
            "dtype": "float32",
        },
    )
    x, y, z = (_rows(xyz[k], t) for k, t in (("x", X_TOKENS), ("y", Y_TOKENS), ("z", Z_TOKENS)))
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    got = _state(out)
    want = {
        # y lacks a: the base's row, so y adds nothing: base + (z - base) = z
        "a": z["a"],
        # z lacks b: base's row; base + (y - base) + 0 = y
        "b": y["b"],
        # the base lacks d: only y has it, so every input's row is y's: no delta
        "d": y["d"],
        "f": z["f"],
    }
    for token, rows in want.items():
        for k, name in enumerate(VOCAB_TENSORS):
            torch.testing.assert_close(got[name][vocab[token]], rows[k], atol=1e-6, rtol=1e-6)


def test_tokens_block_sources_and_force(xyz, tmp_path):
    out = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": _models(xyz["x"], xyz["y"]),
            "tokenizer": {
                "source": "base",
                "tokens": {
                    "<new>": {"source": {"kind": "zero"}},
                    "b": {
                        "source": {"kind": "model_token", "model": str(xyz["y"]), "token": "e"},
                        "force": True,
                    },
                    "c": {"source": str(xyz["x"]), "force": True},
                    "a": {"source": {"kind": "model_token", "model": str(xyz["y"]), "token_id": 6}},
                },
            },
        },
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {t: i for i, t in enumerate([*X_TOKENS, "<new>"])}
    x, y = _rows(xyz["x"], X_TOKENS), _rows(xyz["y"], Y_TOKENS)
    got = _state(out)
    want = {
        "<new>": (torch.zeros(16), torch.zeros(16)),
        "b": y["e"],  # forced: every model's row is y's e
        "c": x["c"],  # forced: x's c
        "a": _mean([x["a"], y["e"]]),  # y lacks a: its row is y's row 6 (e); x keeps its own
    }
    for token, rows in want.items():
        for k, name in enumerate(VOCAB_TENSORS):
            torch.testing.assert_close(got[name][tok.convert_tokens_to_ids(token)], rows[k])
    assert got[VOCAB_TENSORS[0]].shape[0] == 7  # y's d and e are not in x's vocabulary


def test_tokenizer_source_model_copies_its_files(xyz, tmp_path):
    out = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": _models(xyz["x"], xyz["y"]),
            "tokenizer_source": str(xyz["y"]),
        },
    )
    assert (out / "tokenizer.json").read_bytes() == (xyz["y"] / "tokenizer.json").read_bytes()
    x, y = _rows(xyz["x"], X_TOKENS), _rows(xyz["y"], Y_TOKENS)
    got = _state(out)
    for i, token in enumerate(Y_TOKENS):
        want = _mean([x[token], y[token]]) if token in x else y[token]  # x lacks d, e
        torch.testing.assert_close(got[VOCAB_TENSORS[0]][i], want[0])


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"tokens": {"a": {"source": "/nowhere", "force": True}}}, "which is not an input"),
        (
            {
                "tokens": {
                    "a": {
                        "source": {"kind": "model_token", "model": "{x}", "token": "zz"},
                        "force": True,
                    }
                }
            },
            "source token 'zz' is not in model",
        ),
        ({"tokens": {"q": {"force": True}}}, "force: true needs a source"),
        ({"source": "union", "pad_to_multiple_of": 0}, "pad_to_multiple_of must be an integer"),
        ({"sources": "union"}, "tokenizer: unknown key 'sources'"),
        ({"tokens": {"a": {"source": {"kind": "one"}}}}, "a model path, {kind: model_token"),
    ],
    ids=["source-not-input", "no-such-token", "force-without-source", "pad", "key", "kind"],
)
def test_bad_tokenizer_settings_fail_in_one_line(xyz, tmp_path, tokenizer, message):
    text = json.dumps(tokenizer).replace("{x}", str(xyz["x"]))
    doc = {
        "merge_method": "linear",
        "models": _models(xyz["x"], xyz["z"]),
        "tokenizer": json.loads(text),
    }
    assert message in _fails(tmp_path, doc)


def test_tokenizer_and_tokenizer_source_together_fail(xyz, tmp_path):
    doc = {
        "merge_method": "linear",
        "models": _models(xyz["x"]),
        "tokenizer_source": "union",
        "tokenizer": {"source": "union"},
    }
    assert "not both" in _fails(tmp_path, doc)


def test_a_reference_model_without_tokenizer_fails(hf_family, xyz, tmp_path):
    fam, _ = hf_family  # no tokenizer files there
    doc = {"merge_method": "linear", "models": _models(fam["llama"][1]), "tokenizer_source": "base"}
    assert "has no tokenizer files" in _fails(tmp_path, doc)


# --- chat_template ----------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]
RENDERED = {  # worked out by hand from each format
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n"
    "### Instruction:\nBye### Response:\n",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_named_chat_template_is_written(xyz, tmp_path, name):
    out = _merge(
        tmp_path, {"merge_method": "linear", "models": _models(xyz["x"]), "chat_template": name}
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED[name]
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_chat_template_auto_picks_the_most_common(tmp_path):
    t1, t2 = "{{ 'one' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ 'two' }}"
    a = make_model(tmp_path / "a", X_TOKENS, 1, chat_template=t2)
    b = make_model(tmp_path / "b", X_TOKENS, 2, chat_template=t1)
    c = make_model(tmp_path / "c", X_TOKENS, 3, chat_template=t1 + "\n")  # equal once stripped
    out = _merge(
        tmp_path, {"merge_method": "linear", "models": _models(a, b, c), "chat_template": "auto"}
    )
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == t1
    assert not (out / "chat_template.jinja").exists()


def test_chat_template_jinja_text_and_union(xyz, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": _models(xyz["x"], xyz["y"]),
            "tokenizer_source": "union",
            "chat_template": template,
        },
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
        == "[user] Hi\n[assistant] Hello\n"
    )
    assert len(tok) == 8


@pytest.mark.parametrize("bad", ["nonsense", "{{ short }}", 3])
def test_bad_chat_template_fails(xyz, tmp_path, bad):
    doc = {"merge_method": "linear", "models": _models(xyz["x"]), "chat_template": bad}
    assert "chat_template" in _fails(tmp_path, doc)


def test_chat_template_without_tokenizer_warns(hf_family, tmp_path):
    fam, _ = hf_family
    recipe = _write(
        tmp_path,
        {"merge_method": "linear", "models": _models(fam["llama"][1]), "chat_template": "chatml"},
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0 and "no tokenizer_config.json; not written" in " ".join(err.split())
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()


# --- the same recipes through mergekit 0.1.5 ---------------------------------------------------


def _mergekit_python():
    py = os.environ.get("GRAFT_MERGEKIT_PYTHON")
    if not py:
        pytest.skip("set GRAFT_MERGEKIT_PYTHON to a python that can import mergekit")
    return py


def test_shipped_templates_render_as_mergekits(xyz):
    py = _mergekit_python()
    from transformers.utils.chat_template_utils import render_jinja_template

    from graft.recipe.templates import CHAT_TEMPLATES

    where = subprocess.run(
        [py, "-c", "import mergekit._data.chat_templates as t, os; print(os.path.dirname(t.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": " Q \n"}],
        [{"role": "system", "content": " S "}, {"role": "user_context", "content": "ctx"},
         {"role": "user", "content": "u"}, {"role": "assistant", "content": "a "}],
        [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}],
    ]  # fmt: skip
    for name, mine in CHAT_TEMPLATES.items():
        theirs = Path(where, f"{name}.jinja").read_text(encoding="utf-8")
        for conv in conversations:
            for gen in (False, True):
                outs = []
                for t in (mine, theirs):
                    try:
                        outs.append(render_jinja_template(
                            conversations=[conv], chat_template=t, add_generation_prompt=gen,
                            bos_token="<s>", eos_token="</s>",
                        )[0][0])  # fmt: skip
                    except Exception as e:  # both must refuse the same conversations
                        outs.append(f"error: {e}")
                assert outs[0] == outs[1], (name, conv, gen)


def _mergekit_merge(py, recipe, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [py, "-m", "mergekit.scripts.run_yaml", str(recipe), str(out), "--no-write-model-card",
         "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("case", ["union", "tokens"])
def test_vocabulary_rows_match_mergekit(xyz, tmp_path, case):
    """Row for row, by token (mergekit numbers the new tokens in hash-map order)."""
    py = _mergekit_python()
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(xyz["x"]),
        "models": _models(xyz["y"], xyz["z"], weight=0.7),
        "dtype": "float32",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
    }
    if case == "tokens":
        doc["models"] = _models(xyz["x"], xyz["y"], xyz["z"], weight=0.5)
        doc["merge_method"], doc["base_model"] = "linear", None
        del doc["base_model"]
        doc["tokenizer"]["tokens"] = {
            "<new>": {"source": {"kind": "model_token", "model": str(xyz["z"]), "token": "f"}},
            "c": {"source": str(xyz["y"]), "force": True},
        }
    recipe = _write(tmp_path, doc)
    _mergekit_merge(py, recipe, tmp_path / "mk")
    code, _, err = run_cli("merge", recipe, tmp_path / "graft", "-q")
    assert code == 0, err
    ours, theirs = _state(tmp_path / "graft"), _state(tmp_path / "mk")
    v_ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "graft").get_vocab()
    v_theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    assert v_ours.keys() == v_theirs.keys()
    for name in ours:
        if name in VOCAB_TENSORS:
            assert ours[name].shape == theirs[name].shape
            for token in v_ours:
                torch.testing.assert_close(
                    ours[name][v_ours[token]], theirs[name][v_theirs[token]], atol=1e-6, rtol=1e-5
                )
        else:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5)
    for cfg in ("graft", "mk"):
        assert json.loads((tmp_path / cfg / "config.json").read_text())["vocab_size"] == 16
