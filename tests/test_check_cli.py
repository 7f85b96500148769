"""`graft check` end to end: zoo models, predictions files, a tiny transformers model,
--fail-on exit codes, JSON, and every bad input as one line on stderr with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from graft.zoo import build_zoo


def _registered() -> None:
    """Register check/lint on the app if app.py does not (yet) list them."""
    from graft.cli import app as app_module
    from graft.cli.check_cmd import check
    from graft.cli.lint_cmd import lint

    names = {c.name for c in app_module.app.registered_commands}
    for name, fn in (("check", check), ("lint", lint)):
        if name not in names:
            app_module.app.command(name)(fn)


def graft(*args):
    _registered()
    return run_cli(*args)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    # Same path as test_zoo.py's quick zoo: whichever module runs first builds it.
    return build_zoo(
        tmp_path_factory.getbasetemp() / "quick-zoo-0", seed=0, quick=True, log=lambda m: None
    )


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def preds(tmp_path):
    """Old logits, new probabilities, labels: NFR 0.3, PFR 0.1 (test_check_metrics' case)."""
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    old = np.array([0, 0, 1, 1, 2, 0, 1, 1, 2, 2])
    new = np.array([0, 1, 1, 2, 2, 2, 1, 0, 2, 1])
    np.savez(tmp_path / "old.npz", logits=np.eye(3)[old] * 3.0)
    np.savez(tmp_path / "new.npz", probs=_softmax(np.eye(3)[new] * 2.0))
    np.save(tmp_path / "y.npy", y)
    return tmp_path


def test_check_on_predictions_files_reports_known_flips_and_gates(preds, tmp_path):
    args = [
        "check",
        "--old-preds",
        preds / "old.npz",
        "--new-preds",
        preds / "new.npz",
        "--labels",
        preds / "y.npy",
    ]
    code, out, err = graft(*args, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["scores"] == {"old": "logits", "new": "probabilities"}
    assert r["metrics"]["nfr"] == pytest.approx(0.3)
    assert r["metrics"]["pfr"] == pytest.approx(0.1)
    assert r["metrics"]["new.accuracy"] == pytest.approx(0.5)
    code, out, err = graft(*args, "--fail-on", "nfr>0.25,new.ece>0.9")
    assert code == 1
    assert err.strip() == "check failed: nfr=0.3 > 0.25"
    assert graft(*args, "--fail-on", "nfr>0.35")[0] == 0


def test_check_reads_csv_predictions(preds, tmp_path):
    y = np.load(preds / "y.npy")
    np.savetxt(tmp_path / "old.csv", np.eye(3)[y] * 2.0, delimiter=",")
    np.savetxt(
        tmp_path / "new.csv",
        np.eye(3)[(y + 1) % 3] * 2.0,
        delimiter=",",
        header="a,b,c",
        comments="",
    )
    code, out, err = graft(
        "check",
        "--old-preds",
        tmp_path / "old.csv",
        "--new-preds",
        tmp_path / "new.csv",
        "--labels",
        preds / "y.npy",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["metrics"]["nfr"] == 1.0


def test_check_zoo_models_on_a_task_with_label_issues_and_report(zoo, tmp_path):
    old, new = zoo.finetuned["rot90-digit"], zoo.base
    code, out, err = graft(
        "check", old, new, "--zoo", zoo.root, "--json", "--report", tmp_path / "r.html"
    )
    assert code == 0, err  # the task is inferred from OLD, a fine-tune of rot90-digit
    r = json.loads(out)
    assert r["n"] == 497 and r["num_classes"] == 10
    assert r["temperature_fit"] == "validation split (n=200)"
    from graft.eval import evaluate_task

    expected = evaluate_task(old, "rot90-digit", zoo)["accuracy"]
    assert r["metrics"]["old.accuracy"] == pytest.approx(expected)
    li = r["label_issues"]
    assert li["n_flagged"] == len(li["flagged"]) and "10-NN" in r["label_issue_source"]
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") == 4 and "src=" not in html and "href=" not in html


def test_check_zoo_models_on_npz_data_with_a_validation_split(zoo, tmp_path):
    from graft.zoo import task_data

    X, y = task_data("inverted-digit", "test")
    Xv, yv = task_data("inverted-digit", "val")
    np.savez(
        tmp_path / "d.npz", X=X.numpy()[:100], y=y.numpy()[:100], X_val=Xv.numpy(), y_val=yv.numpy()
    )
    code, out, err = graft(
        "check",
        zoo.finetuned["inverted-digit"],
        zoo.base,
        "--zoo",
        zoo.root,
        "--task",
        "inverted-digit",
        "--data",
        tmp_path / "d.npz",
        "--json",
        "--no-label-issues",
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["n"] == 100 and r["temperature_fit"] == "validation split (n=200)"
    assert r["label_issues"] is None


def test_check_a_tiny_transformers_classifier_on_tokenized_data(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    old = transformers.BertForSequenceClassification(cfg).eval()
    old.save_pretrained(tmp_path / "old")
    new = transformers.BertForSequenceClassification(cfg).eval()
    new.save_pretrained(tmp_path / "new")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (40, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    y = torch.randint(0, 3, (40,), generator=g)
    np.savez(
        tmp_path / "tok.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), labels=y.numpy()
    )
    code, out, err = graft(
        "check", tmp_path / "old", tmp_path / "new", "--data", tmp_path / "tok.npz", "--json"
    )
    assert code == 0, err
    r = json.loads(out)
    with torch.no_grad():
        expected = (old(input_ids=ids, attention_mask=mask).logits.argmax(1) == y).float().mean()
    assert r["metrics"]["old.accuracy"] == pytest.approx(float(expected))
    # Token data has label issues now: cross-validated logistic regression on OLD's features.
    assert "logistic regression on OLD's mean-pooled features" in r["label_issue_source"]
    assert r["label_issues"]["n_flagged"] == len(r["label_issues"]["flagged"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("length", "old scores have 10 rows, new scores 10, labels 9"),
        ("unnormalised", "sums to"),
        ("single_class", "single class"),
        ("empty", "no examples"),
        ("label_range", "outside the 3 classes"),
        ("missing", "no such file"),
        ("unreadable_model", "no checkpoint in"),
        ("bad_gate", "cannot parse --fail-on"),
        ("unknown_metric", "unknown metric"),
        ("mixed", "either two models"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(preds, tmp_path, case, message):
    base = [
        "check",
        "--old-preds",
        preds / "old.npz",
        "--new-preds",
        preds / "new.npz",
        "--labels",
        preds / "y.npy",
    ]
    args = list(base)
    if case == "length":
        np.save(tmp_path / "short.npy", np.load(preds / "y.npy")[:9])
        args[-1] = tmp_path / "short.npy"
    elif case == "unnormalised":
        np.savez(tmp_path / "p.npz", probs=np.full((10, 3), 0.2))
        args[4] = tmp_path / "p.npz"
    elif case == "single_class":
        np.save(tmp_path / "one.npy", np.zeros((10, 1)))
        args[2] = tmp_path / "one.npy"
    elif case == "empty":
        np.save(tmp_path / "e.npy", np.zeros((0, 3)))
        args[2] = tmp_path / "e.npy"
    elif case == "label_range":
        np.save(tmp_path / "y5.npy", np.full(10, 5))
        args[-1] = tmp_path / "y5.npy"
    elif case == "missing":
        args[2] = tmp_path / "nope.npz"
    elif case == "unreadable_model":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("{}")
        args = ["check", tmp_path / "m", tmp_path / "m", "--task", "rot90-digit"]
    elif case == "bad_gate":
        args += ["--fail-on", "nfr>>1"]
    elif case == "unknown_metric":
        args += ["--fail-on", "bogus>1"]
    elif case == "mixed":
        args = ["check", tmp_path, *base[1:]]
    code, out, err = graft(*args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err
