"""Multi-document recipes (mergekit-multi): documents run in dependency order, later ones
reading earlier outputs by name; intermediate outputs in -I DIR or a temp folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

pytest.importorskip("transformers")


def _state(path):
    return load_file(path / "model.safetensors")


def _fails(*args) -> str:
    code, _, err = run_cli(*args)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _chain(fam) -> str:
    """The final merge first in the file: graft must reorder. s1 = mean(ft1, ft2);
    s2 = (s1 + base) / 2; final = base + 3 (s2 - base) = base + 1.5 (s1 - base)."""
    base, ft1, ft2 = fam["llama"]
    return f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: s2
    parameters: {{weight: 3.0}}
dtype: float32
---
name: s2
merge_method: linear
models:
  - model: s1
    parameters: {{weight: 1.0}}
  - model: {base}
    parameters: {{weight: 1.0}}
---
name: s1
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
"""


def _expected(fam):
    base, ft1, ft2 = (_state(p) for p in fam["llama"])
    s1 = {n: 0.5 * ft1[n] + 0.5 * ft2[n] for n in base}
    return s1, {n: base[n] + 1.5 * (s1[n] - base[n]) for n in base}


def test_documents_run_in_dependency_order_into_a_temp_folder(hf_family, tmp_path):
    fam, _ = hf_family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_chain(fam))
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_cli("merge", recipe, work / "out", "-q", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [d["name"] for d in doc["documents"]] == ["s1", "s2", None]
    assert [d["output"] for d in doc["documents"]] == [None, None, str(work / "out")]
    _, final = _expected(fam)
    got = _state(work / "out")
    assert got.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(got[name], final[name], atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # the temp folder is gone
    card = (work / "out" / "README.md").read_text()
    assert "name: s2" not in card and "model: s2" in card  # the final document's own text


def test_intermediate_dir_keeps_named_outputs(hf_family, tmp_path):
    fam, _ = hf_family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_chain(fam))
    keep = tmp_path / "keep"
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-I", keep, "-q")
    assert code == 0, err
    s1, _ = _expected(fam)
    got = _state(keep / "s1")
    for name in s1:
        torch.testing.assert_close(got[name], s1[name], atol=1e-6, rtol=1e-6)
    assert (keep / "s2" / "config.json").is_file()
    # a second run rebuilds them: without --force the kept outputs are not replaced
    line = _fails("merge", recipe, tmp_path / "out2", "-I", keep, "-q")
    assert "exists; pass --force" in line and not (tmp_path / "out2").exists()
    code, _, err = run_cli("merge", recipe, tmp_path / "out2", "-I", keep, "-q", "--force")
    assert code == 0, err


def test_dry_run_plans_every_document_against_planned_outputs(hf_family, tmp_path):
    fam, _ = hf_family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_chain(fam))
    code, out, err = run_cli("merge", recipe, tmp_path / "out", "--dry-run", "--json")
    assert code == 0, err
    docs = json.loads(out)["documents"]
    assert [(d["name"], d["uses"], d["final"]) for d in docs] == [
        ("s1", [], False),
        ("s2", ["s1"], False),
        (None, ["s2"], True),
    ]
    n = len(_state(fam["llama"][0]))
    assert all(d["plan"]["output"]["tensors"] == n for d in docs)
    assert docs[2]["plan"]["method"] == "task_arithmetic"
    assert [m["model"] for m in docs[1]["plan"]["models"]] == ["s1", str(fam["llama"][0])]
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "multi.yaml"
    ]


def _linear(models: list[str], name: str | None = None, extra: str = "") -> str:
    head = f"name: {name}\n" if name else ""
    listed = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return f"{head}merge_method: linear\nmodels:\n{listed}{extra}"


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (
            lambda a, b: [_linear(["x"]), _linear(["y"], "x"), _linear(["x"], "y")],
            "documents depend on each other in a cycle: x -> y -> x",
        ),
        (lambda a, b: [_linear([a], "x"), _linear(["x"], "x")], "two documents are named 'x'"),
        (lambda a, b: [_linear([a]), _linear([b])], "only the final merge may be unnamed"),
        (lambda a, b: [_linear([a], "x/y"), _linear(["x/y"])], "must be a plain folder name"),
        (lambda a, b: [_linear([a], "x"), _linear([b], "y")], "documents x, y are all unused"),
        (lambda a, b: [_linear([a], "x"), _linear(["x@main"])], "write x without '@main'"),
        (
            lambda a, b: [_linear([a], "x"), _linear(["x", "xx"])],
            "document 'final merge': model 'xx' not found",
        ),
        (
            lambda a, b: [_linear([a], "x"), _linear([a], "unused"), _linear(["x"])],
            "document(s) unused are not used by the final merge",
        ),
        (
            lambda a, b: [_linear([a], "x"), "merge_method: linear\nmodels: [{model: x}]\nfoo: 1"],
            "document 2: unknown recipe key 'foo'",
        ),
    ],
    ids=["cycle", "duplicate", "two-unnamed", "bad-name", "two-finals", "revision", "typo",
         "unused", "bad-doc"],
)  # fmt: skip
def test_bad_multi_document_recipes_fail_in_one_line(hf_family, tmp_path, docs, message):
    fam, _ = hf_family
    a, b = (str(p) for p in fam["llama"][1:])
    recipe = tmp_path / "multi.yaml"
    recipe.write_text("\n---\n".join(docs(a, b)))
    line = _fails("merge", recipe, tmp_path / "out", "-q")
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]  # nothing written


def test_a_failing_later_document_leaves_nothing(hf_family, tmp_path):
    """The second document cannot be planned (GPT-2 vs Llama): every document is planned
    before any is merged, so nothing is written, not even the first one's output."""
    fam, _ = hf_family
    recipe = tmp_path / "multi.yaml"
    docs = [_linear([str(fam["llama"][1])], "x"), _linear(["x", str(fam["gpt2"][1])])]
    recipe.write_text("\n---\n".join(docs))
    line = _fails("merge", recipe, tmp_path / "out", "-q", "-I", tmp_path / "keep")
    assert line.startswith("error: document 'final merge': ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]


def test_a_trailing_separator_is_one_document(hf_family, tmp_path):
    fam, _ = hf_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_linear([str(fam["llama"][1])]) + "\n---\n")
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    got, want = _state(tmp_path / "out"), _state(fam["llama"][1])
    assert all(torch.equal(got[n], want[n]) for n in want)
