"""`graft lint`: pickles scanned without running them, tensor defects, card claims."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import yaml

from graft.check.lint import lint_path
from graft.check.pickle_scan import scan_pickle
from graft.check.weights import conv_filters, dtype_anomalies
from graft.io import save_state_dict
from test_check_cli import graft, zoo  # noqa: F401  (the shared quick-zoo fixture)


class _Payload:
    """Unpickling this runs ``touch SENTINEL``."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain"])
def test_lint_flags_a_malicious_pickle_and_never_runs_it(tmp_path, fmt):
    sentinel = tmp_path / "SENTINEL"
    payload = {"weight": torch.ones(2, 2), "x": _Payload(sentinel)}
    path = tmp_path / ("model.pkl" if fmt == "plain" else "pytorch_model.bin")
    if fmt == "plain":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    code, out, err = graft("lint", path, "--json")
    assert code == 1, err
    r = json.loads(out)
    risks = [f["message"] for f in r["findings"] if f["severity"] == "risk"]
    # A plain pickle of a tensor rebuilds its storage with torch.storage._load_from_bytes,
    # a nested full torch.load: a risk of its own.
    expected = [".system (dangerous)"] + (
        ["_load_from_bytes (dangerous)"] if fmt == "plain" else []
    )
    assert len(risks) == len(expected)
    assert all(any(e in m for m in risks) for e in expected)
    assert r["tensors"] == 0  # not even weights_only-loaded
    assert not sentinel.exists()


def test_scan_lists_only_allowlisted_imports_for_an_ordinary_torch_file(tmp_path):
    torch.save({"w": torch.ones(3), "n": torch.nn.Parameter(torch.zeros(2))}, tmp_path / "a.pt")
    r = lint_path(tmp_path / "a.pt")
    assert r["ok"] and len(r["pickles"]) == 1
    names = {(g["module"], g["name"]) for g in r["pickles"][0]["globals"]}
    assert ("torch._utils", "_rebuild_tensor_v2") in names
    assert all(g["verdict"] == "safe" for g in r["pickles"][0]["globals"])
    assert r["tensors"] == 2


def test_scan_resolves_stack_global_through_the_memo_and_reports_unknown_imports():
    data = pickle.dumps(np.random.default_rng(0), protocol=4)  # STACK_GLOBAL + memo
    found = {(g["module"], g["name"]): g["verdict"] for g in scan_pickle(data)["globals"]}
    assert found.get(("numpy.random._pickle", "__generator_ctor")) == "unknown"
    assert scan_pickle(b"\x80\x04\x95garbage")["error"].startswith("malformed pickle")


def test_lint_finds_nan_zero_duplicate_degenerate_and_dtype_problems(tmp_path):
    conv = torch.randn(10, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    conv[0:3] = 0.0  # 6 of 20 kernels near zero
    conv[3, 0] = 0.5  # one kernel constant
    tensors = {
        "conv.weight": conv,
        "fc.weight": torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]]),
        "zero.weight": torch.zeros(3, 3),
        "zero.bias": torch.zeros(3),
        "a.weight": torch.arange(6.0).view(2, 3),
        "b.weight": torch.arange(6.0).view(2, 3),
        "norm.weight": torch.ones(4),
        "norm2.weight": torch.ones(4),
        "half.weight": torch.ones(2, 2, dtype=torch.float16) * 2,
    }
    save_state_dict(tensors, tmp_path / "m", config={"torch_dtype": "bfloat16"})
    r = lint_path(tmp_path / "m")
    by_check = {}
    for f in r["findings"]:
        by_check.setdefault(f["check"], []).append(f)
    assert not r["ok"]
    assert by_check["nan_inf"][0]["message"] == "fc.weight has 1 NaN and 1 Inf values of 4"
    zero = [(f["severity"], f.get("tensor"), f["message"]) for f in by_check["all_zero"]]
    assert zero[0] == ("warning", "zero.weight", "zero.weight is all zeros (shape [3, 3])")
    assert zero[1][0] == "info" and zero[1][2].startswith("1 vectors are all zeros")
    dups = [f["message"] for f in by_check["duplicate"]]
    assert len(dups) == 1 and "a.weight, b.weight" in dups[0]  # constant norms are not dups
    layer = r["conv_layers"][0]
    assert layer["filters"] == 20
    assert layer["near_zero"] == pytest.approx(6 / 20)
    assert layer["near_constant"] == pytest.approx(1 / 20)
    assert by_check["degenerate_filters"][0]["tensor"] == "conv.weight"
    messages = " ".join(f["message"] for f in by_check["dtype"])
    assert "half.weight is float16" in messages and "torch_dtype bfloat16" in messages


def test_conv_filters_and_dtype_anomalies_by_hand():
    assert conv_filters(torch.ones(4, 4)) is None
    assert conv_filters(torch.ones(2, 2, 1, 1)) is None  # 1x1 kernels have no shape
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0] = torch.tensor([[1.0, -1.0], [0.5, 0.2]])
    assert conv_filters(w) == {"filters": 2, "near_zero": 0.5, "near_constant": 0.0}
    assert dtype_anomalies({"a": torch.float32, "b": torch.float32}, "float32") == []
    assert "float64" in dtype_anomalies({"a": torch.float64}, None)[0]


def test_lint_compares_model_card_claims_with_measured_accuracy(zoo, tmp_path):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(zoo.finetuned["rot90-digit"], model)
    card = {
        "model-index": [
            {
                "name": "m",
                "results": [
                    {
                        "task": {"type": "image-classification"},
                        "dataset": {"name": "rot90 digits", "type": "digits"},
                        "metrics": [
                            {"type": "accuracy", "value": 99.5},
                            {"type": "f1", "value": 0.1},
                        ],
                    }
                ],
            }
        ]
    }
    (model / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# card\n")
    code, out, err = graft("lint", model, "--task", "rot90-digit", "--zoo", zoo.root, "--json")
    assert code == 0, err
    r = json.loads(out)
    from graft.eval import evaluate_task

    measured = evaluate_task(zoo.finetuned["rot90-digit"], "rot90-digit", zoo)["accuracy"]
    (claim,) = r["claims"]
    assert claim["claimed"] == pytest.approx(0.995)
    assert claim["measured"] == pytest.approx(measured)
    assert any(f["check"] == "claims" and f["severity"] == "warning" for f in r["findings"])


def test_lint_of_nothing_readable_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = graft("lint", tmp_path / "empty")
    assert code == 2 and err.startswith("error: no weights or pickle files")
    code, _, err = graft("lint", tmp_path / "missing")
    assert code == 2 and "no such file" in err
