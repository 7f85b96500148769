"""``org/name@revision`` model references resolve in the local Hugging Face cache only."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli

MAIN, DEV = "1111aaaa" * 5, "2222bbbb" * 5  # two commits of acme/tiny


@pytest.fixture
def cache(hf_family, tmp_path, monkeypatch):
    """acme/tiny: main -> ft1's weights, dev -> ft2's."""
    fam, _ = hf_family
    repo = tmp_path / "hub" / "models--acme--tiny"
    for commit, src in ((MAIN, fam["llama"][1]), (DEV, fam["llama"][2])):
        shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "dev").write_text(DEV)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return fam


def _merge(tmp_path, models, *, name="r.yaml"):
    doc = {"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 1.0}} for m in models
    ]}  # fmt: skip
    recipe = tmp_path / name
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / f"out-{name}"
    return run_cli("merge", recipe, out, "-q"), out


def _state(path):
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize(
    ("ref", "which"),
    [("acme/tiny", 1), ("acme/tiny@main", 1), ("acme/tiny@dev", 2), (f"acme/tiny@{DEV}", 2),
     ({"model": {"path": "acme/tiny", "revision": "dev"}}, 2)],
    ids=["default", "branch-main", "branch-dev", "commit", "mergekit-dict"],
)  # fmt: skip
def test_revision_picks_the_cached_snapshot(cache, tmp_path, ref, which):
    (code, _, err), out = _merge(tmp_path, [ref])
    assert code == 0, err
    got, want = _state(out), _state(cache["llama"][which])
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_two_revisions_of_one_repo_are_two_models(cache, tmp_path):
    (code, _, err), out = _merge(tmp_path, ["acme/tiny@main", "acme/tiny@dev"])
    assert code == 0, err
    got = _state(out)
    a, b = _state(cache["llama"][1]), _state(cache["llama"][2])
    for n in a:
        torch.testing.assert_close(got[n], (a[n] + b[n]) / 2)


def _one_line_error(code, err) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_uncached_revision_fails_naming_the_cached_ones(cache, tmp_path):
    (code, _, err), out = _merge(tmp_path, ["acme/tiny@v9"])
    line = _one_line_error(code, err)
    assert "revision 'v9' is not in the local Hugging Face cache" in line
    assert f"cached: dev, main, {MAIN}, {DEV}" in line and "never downloads" in line
    assert not out.exists()


def test_revision_on_a_local_path_fails(cache, tmp_path):
    (code, _, err), out = _merge(tmp_path, [f"{cache['llama'][1]}@main"])
    assert "is a local path, which has no revisions" in _one_line_error(code, err)
    assert not out.exists()
