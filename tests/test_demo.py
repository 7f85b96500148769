"""`graft demo` end to end on the quick zoo: every method, every task, sane values."""

import json

from conftest import run_cli
from graft.merge import METHODS


def test_demo_json_has_every_method_and_task(tmp_path):
    code, out, err = run_cli("demo", "--quick", "--json", "--workdir", tmp_path / "d")
    assert code == 0, err
    result = json.loads(out)
    tasks = result["tasks"]
    assert len(tasks) >= 6
    names = {r["method"] for r in result["rows"]}
    expected = {m for m in METHODS if m not in result["not_applicable"]}
    assert expected <= names | {"adamerging"}  # registry methods all ran
    assert {"fisher", "regmean", "adamerging_task", "adamerging_layer"} <= names
    assert {
        "pretrained (linear probe)",
        "pretrained (fine-tuned heads)",
        "fine-tuned (individual)",
    } <= names
    for row in result["rows"]:
        assert set(row["accuracy"]) == set(tasks), row["method"]
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values()), row["method"]
        assert 0.0 <= row["average"] <= 1.0
    ft = next(r for r in result["rows"] if r["method"] == "fine-tuned (individual)")
    assert abs(ft["normalized"] - 1.0) < 1e-9
    assert [r["method"] for r in result["soup"]["rows"]] == [
        "best single ingredient (by val)",
        "uniform soup",
        "greedy soup",
    ]
    on_disk = json.loads((tmp_path / "d" / "results.json").read_text())
    assert on_disk["rows"] == result["rows"]
    assert (tmp_path / "d" / "results.md").read_text().count("\n|") >= len(result["rows"])
