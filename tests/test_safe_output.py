"""Untrusted names in output: tensor names, model paths, card text and file names reach
the terminal through `graft.cli._safe.safe` (no rich markup, no control characters) and
the HTML report through `html.escape`."""

from __future__ import annotations

import html
import html.parser
import itertools
import os
import pickle

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from graft.check import compare
from graft.cli._safe import safe
from graft.cli.app import app
from graft.report import render_check_report

HOSTILE = {"[/]": 2, "[bold red]x": 3, "a\x1b[31mred\x1b[0m": 1, "tab\there\x9b": 1}


def test_safe_escapes_markup_and_shows_control_characters():
    assert safe("[/]") == "\\[/]"
    assert safe("[bold red]x") == "\\[bold red]x"
    assert safe("a\x1b[31mred") == "a\\x1b[31mred"  # [31m is not markup: only ESC changes
    assert safe("\x00\x07\t\n\x7f\x9b") == "\\x00\\x07\\x09\\x0a\\x7f\\x9b"
    assert safe("abc\u202edef") == "abc\\u202edef"  # right-to-left override
    assert safe("é 日本 ok.weight") == "é 日本 ok.weight"
    assert safe(3) == "3" and safe(None) == "None"
    assert safe("[b]x\x1b", markup=False) == "[b]x\\x1b"


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _shown(output: str) -> None:
    """Every hostile name printed as text, and no control byte left in the output."""
    assert "\x1b" not in output and "\x9b" not in output
    assert "[/]" in output and "[bold red]x" in output
    assert "a\\x1b[31mred\\x1b[0m" in output and "tab\\x09here\\x9b" in output


def test_inspect_tensors_prints_hostile_names_as_text(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({name: torch.ones(n) for name, n in HOSTILE.items()}, path)
    code, out = _invoke("inspect", "--tensors", path)
    assert code == 0, out
    _shown(out.replace("\n", " "))
    assert "num_tensors: 4" in out


def test_inspect_resolves_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2, 3)}, snap / "model.safetensors")
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hc = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    code, out = _invoke("inspect", "acme/tiny", "--json")
    assert code == 0, out
    assert '"num_params": 6' in out and "0123abcd" in out
    code, out = _invoke("inspect", "acme/not-cached")
    assert code != 0


def test_merge_dry_run_prints_a_hostile_model_path_as_text(tmp_path):
    models = []
    for i, name in enumerate(["[bold red]m1[/]", "m2\x1b[31m"]):
        folder = tmp_path / name  # "a[/]b" is the folder "]b" in the folder "a["
        folder.mkdir(parents=True)
        save_file({"[/]w": torch.full((2, 2), float(i))}, folder / "model.safetensors")
        models.append({"model": name, "parameters": {"weight": 0.5}})  # next to the recipe
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    code, out = _invoke("merge", recipe, tmp_path / "out", "--dry-run")
    assert code == 0, out
    assert "\x1b" not in out and "[bold red]m1[/]" in out and "m2\\x1b[31m" in out
    assert "[/]w" in out
    assert not (tmp_path / "out").exists()


def test_lint_prints_a_hostile_file_name_as_text(tmp_path):
    path = tmp_path / "[red]x[/]evil\x1b[2J.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(os.system, protocol=2))
    code, out = _invoke("lint", path)
    assert code == 1, out
    flat = out.replace("\n", "")
    assert "\x1b" not in out and "[red]x[/]evil\\x1b[2J.pkl" in flat
    assert "posix.system" in flat


# --- HTML -----------------------------------------------------------------------------

PAYLOADS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '" onerror="alert(1)']


def _hostile(value, payloads):
    """``value`` with a payload after every string (and class ids replaced by one)."""
    if isinstance(value, dict):
        out = {k: _hostile(v, payloads) for k, v in value.items()}
        if "class" in out:
            out["class"] = next(payloads)
        return out
    if isinstance(value, list):
        return [_hostile(v, payloads) for v in value]
    if isinstance(value, str):
        return value + next(payloads)
    return value


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]


@pytest.mark.parametrize("with_issues", [True, False])
def test_report_escapes_every_field(with_issues):
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    old = rng.normal(size=(120, 3)) + 2.0 * np.eye(3)[y]
    new = old + rng.normal(size=(120, 3))
    probs = np.exp(old) / np.exp(old).sum(1, keepdims=True)
    r = compare(old, new, y, label_probs=probs if with_issues else None)
    r.update(
        old="old-model",
        new="new-model",
        data="data.csv",
        heads={"old": "head-a", "new": "head-b"},
        label_names=["cat", "dog", "bird"],
        notes=["a note"],
        label_issue_source="probe on old features" if with_issues else "no label issues",
        temperature_fit="the test split",
        fail_on={"gates": ["nfr>0.01"], "failed": ["nfr=0.2 > 0.01"]},
    )
    hostile = _hostile(r, itertools.cycle(PAYLOADS))
    page = render_check_report(hostile)
    for payload in PAYLOADS:
        assert payload not in page
    for key in ("old", "new", "data", "temperature_fit", "label_issue_source"):
        assert html.escape(hostile[key]) in page  # shown, escaped
    tags = _Tags()
    tags.feed(page)
    assert tags.tags.count("script") == 2  # the page's own two, nothing injected
    assert "img" not in tags.tags
    assert not [a for a in tags.attrs if a.startswith("on")]
