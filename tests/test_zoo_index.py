"""The zoo index: what a scan records, skipping unchanged files, noticing changed and
removed ones, unreadable checkpoints recorded and skipped, card metadata, queries, and a
Hugging Face cache layout built in the test."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from graft.io import save_state_dict, save_statistics, write_text
from graft.zoo.index import ZooIndex, card_summary

ARCH = {"architectures": ["TinyNet"], "model_type": "tiny"}


@pytest.fixture(scope="module", autouse=True)
def _cli():
    """Register the zoo commands on the CLI if app.py does not yet (no-op once it does)."""
    from graft.cli import app as cli
    from graft.cli.rank_cmd import rank
    from graft.cli.zoo_cmds import zoo_app

    if "zoo" not in {g.name for g in cli.app.registered_groups}:
        cli.app.add_typer(zoo_app, name="zoo")
    if "rank" not in {c.name for c in cli.app.registered_commands}:
        cli.app.command("rank")(rank)


def _tiny(path, seed=0, *, card=None, rows=8):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "a.weight": torch.randn(rows, 4, generator=g),
        "b.weight": torch.randn(4, rows, generator=g).to(torch.bfloat16),
        "b.bias": torch.zeros(4),
    }
    save_state_dict(tensors, path, config=ARCH, force=True)
    if card is not None:
        write_text(path / "README.md", card)
    return path


def _folder(root):
    """Two models, a loose weights file, a graft head file, a truncated file and a sharded
    model whose second shard is missing."""
    _tiny(root / "m1", 1)
    _tiny(root / "nested" / "m2", 2)
    save_file({"w": torch.ones(3, 2)}, root / "loose.safetensors")
    save_statistics(
        {"weight": torch.ones(2, 2), "bias": torch.zeros(2)},
        root / "head.safetensors",
        kind="classifier_head",
        model_fingerprint="x",
    )
    good = root / "m1" / "model.safetensors"
    (root / "bad.safetensors").write_bytes(good.read_bytes()[:50])
    partial = root / "partial"
    partial.mkdir()
    save_file({"x": torch.ones(2)}, partial / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "x": "model-00001-of-00002.safetensors",
            "y": "model-00002-of-00002.safetensors",
        }
    }
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_scan_records_models_and_skips_unreadable_ones(tmp_path):
    root = _folder(tmp_path / "zoo")
    warnings = []
    with ZooIndex(tmp_path / "z.sqlite") as index:
        report = index.scan([root], warn=warnings.append)
        ok = {os.path.relpath(r.path, root): r for r in index.models()}
        everything = index.models(include_errors=True)
    assert (report.added, report.unchanged, report.not_models) == (5, 0, 1)
    assert sorted(ok) == ["loose.safetensors", "m1", "nested/m2"]
    assert sorted(os.path.basename(p) for p, _ in report.errors) == ["bad.safetensors", "partial"]
    assert len(warnings) == 2 and all(w.startswith("skipped ") for w in warnings)
    assert any("truncated" in w for w in warnings) and any("missing" in w for w in warnings)
    assert len(everything) == 5
    m1 = ok["m1"]
    assert (m1.architecture, m1.model_type, m1.format, m1.status) == (
        "TinyNet",
        "tiny",
        "safetensors",
        "ok",
    )
    assert m1.num_params == 8 * 4 + 4 * 8 + 4 and m1.num_tensors == 3
    assert m1.dtypes == {"float32": 36, "bfloat16": 32}
    assert m1.signature == ok["nested/m2"].signature != ok["loose.safetensors"].signature
    assert m1.fingerprint != ok["nested/m2"].fingerprint


def test_rescan_is_idempotent_and_notices_changes(tmp_path):
    root = _folder(tmp_path / "zoo")
    db = tmp_path / "z.sqlite"
    with ZooIndex(db) as index:
        index.scan([root], warn=lambda m: None)
        before = {r.path: r for r in index.models(include_errors=True)}
        samples = {i: d.clone() for i, (_, _, d) in index.samples().items()}
        again = index.scan([root], warn=lambda m: None)
        assert (again.added, again.updated, again.unchanged, again.removed, again.read) == (
            0,
            0,
            5,
            0,
            0,
        )
        assert {r.path: r for r in index.models(include_errors=True)} == before
        assert all(torch.equal(samples[i], d) for i, (_, _, d) in index.samples().items())

        m1 = root / "m1"
        _tiny(m1, 99)  # new weights, same names and shapes
        st = (m1 / "model.safetensors").stat()
        os.utime(m1 / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        shutil.rmtree(root / "nested")
        changed = index.scan([root], warn=lambda m: None)
        assert (changed.updated, changed.unchanged, changed.removed, changed.read) == (1, 3, 1, 1)
        after = {r.path: r for r in index.models(include_errors=True)}
    new, old = after[str(m1)], before[str(m1)]
    assert new.signature == old.signature and new.fingerprint != old.fingerprint
    assert str(root / "nested" / "m2") not in after


def test_scan_reads_headers_and_a_small_sample_only(tmp_path):
    model = _tiny(tmp_path / "wide", rows=65536)  # ~1.8 MB of weights
    with ZooIndex(tmp_path / "z.sqlite") as index:
        report = index.scan([model])
        rec = index.models()[0]
        plan_hash, plan, data = index.samples()[rec.id]
    assert rec.total_bytes > 1_500_000
    assert report.bytes_read == rec.bytes_read < rec.total_bytes / 10
    assert sum(len(s.rows) * s.ncols for s in plan) == data.numel() <= 1 << 15
    assert {s.name for s in plan} == {"a.weight", "b.weight"}  # matrices only


CARD = """---
base_model: acme/base-model
base_model_relation: finetune
license: apache-2.0
tags: [digits]
model-index:
- name: m1
  results:
  - task: {type: image-classification, name: Image Classification}
    dataset: {name: Rotated Digits, type: rot90-digits}
    metrics:
    - {type: accuracy, value: 0.93}
---
# m1
"""


def test_card_metadata_and_find(tmp_path):
    _tiny(tmp_path / "m" / "m1", 1, card=CARD)
    _tiny(tmp_path / "m" / "m2", 2, card="no front matter here\n")
    _tiny(tmp_path / "m" / "m3", 3, card="---\nbase_model: [unclosed\n---\n")
    db = str(tmp_path / "z.sqlite")
    code, out, err = run_cli("zoo", "scan", tmp_path / "m", "--db", db, "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["added"] == 3
    code, out, _ = run_cli("zoo", "show", "m/m1", "--db", db, "--json")
    card = json.loads(out)["card"]
    assert card["base_model"] == ["acme/base-model"] and card["license"] == "apache-2.0"
    assert card["claims"] == [
        {
            "model": "m1",
            "task": "image-classification",
            "task_name": "Image Classification",
            "dataset": "Rotated Digits",
            "dataset_type": "rot90-digits",
            "metric": "accuracy",
            "value": 0.93,
        }
    ]
    code, out, _ = run_cli("zoo", "show", "m3", "--db", db, "--json")
    shown = json.loads(out)
    assert (
        shown["status"] == "ok" and "YAML" in shown["card_error"]
    )  # a bad card does not sink the model

    def found(*args):
        code, out, err = run_cli("zoo", "find", *args, "--db", db, "--json")
        assert code == 0, err
        return sorted(os.path.basename(r["path"]) for r in json.loads(out))

    assert found("--task", "rot90") == ["m1"]
    assert found("--task", "image-class") == ["m1"]
    assert found("--base", "acme/base-model") == ["m1"]
    assert found("--base", "base-model") == ["m1"]
    assert found("--arch", "tinynet") == ["m1", "m2", "m3"]
    assert found("--arch", "tiny", "--task", "nothing") == []
    code, _, err = run_cli("zoo", "find", "--db", db)
    assert code == 2 and "--arch" in err


def test_card_summary_drops_malformed_entries():
    meta = {
        "base_model": "x",
        "model-index": [
            {"name": "m", "results": ["junk", {"metrics": [{"type": "f1", "value": 1}]}]},
            3,
        ],
    }
    out = card_summary(meta)
    assert out["base_model"] == ["x"]
    assert [(c["metric"], c["value"]) for c in out["claims"]] == [("f1", 1)]


def _hf_cache(root, tmp_path):
    """``models--acme--tiny`` with two snapshots (``main`` points at the second), blobs
    linked as the hub does, plus a dataset repo that must be left out."""
    repo = root / "models--acme--tiny"
    for rev, seed in (("1111aaaa", 1), ("2222bbbb", 2)):
        src = _tiny(tmp_path / f"src-{rev}", seed, card="---\nbase_model: acme/base\n---\n")
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = repo / "blobs" / f"{rev}-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("2222bbbb")
    data = root / "datasets--acme--data" / "snapshots" / "abc"
    data.mkdir(parents=True)
    save_file({"x": torch.ones(1)}, data / "data.safetensors")
    return root


def test_hf_cache_layout_from_the_environment_and_as_a_path(tmp_path, monkeypatch):
    cache = _hf_cache(tmp_path / "hub", tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    db = str(tmp_path / "z.sqlite")
    code, out, err = run_cli("zoo", "scan", "--hf-cache", "--db", db, "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["added"] == 2
    code, out, _ = run_cli("zoo", "ls", "--db", db, "--json")
    rows = json.loads(out)
    assert sorted(r["name"] for r in rows) == ["acme/tiny@1111aaaa", "acme/tiny@2222bbbb"]
    assert {r["source"] for r in rows} == {"hf-cache"}
    code, out, _ = run_cli("zoo", "show", "acme/tiny", "--db", db, "--json")
    shown = json.loads(out)
    assert (shown["revision"], shown["refs"], shown["card"]["base_model"]) == (
        "2222bbbb",
        ["main"],
        ["acme/base"],
    )
    # the cache folder given as a path is read the same way; nothing changed, nothing re-read
    code, out, _ = run_cli("zoo", "scan", cache, "--db", db, "--json", "-q")
    assert (json.loads(out)["unchanged"], json.loads(out)["read"]) == (2, 0)
    # a snapshot deleted from the cache leaves the index
    shutil.rmtree(cache / "models--acme--tiny" / "snapshots" / "1111aaaa")
    code, out, _ = run_cli("zoo", "scan", "--hf-cache", "--db", db, "--json", "-q")
    assert json.loads(out)["removed"] == 1


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    db = tmp_path / "z.sqlite"
    code, _, err = run_cli("zoo", "ls", "--db", db)
    assert code == 2 and "no zoo index" in err and len(err.strip().splitlines()) == 1
    not_db = tmp_path / "x.sqlite"
    not_db.write_text("hello, I am not a database" * 100)
    code, _, err = run_cli("zoo", "ls", "--db", not_db)
    assert code == 2 and "not a graft zoo index" in err
    code, _, err = run_cli("zoo", "scan", tmp_path / "missing", "--db", db)
    assert code == 2 and "no such file or directory" in err
    code, _, err = run_cli("zoo", "scan", "--db", db)
    assert code == 2 and "nothing to scan" in err
    _tiny(tmp_path / "m1")
    assert run_cli("zoo", "scan", tmp_path / "m1", "--db", db, "-q")[0] == 0
    code, _, err = run_cli("zoo", "show", "nosuch", "--db", db)
    assert code == 2 and "no model 'nosuch'" in err
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    code, _, err = run_cli("zoo", "scan", "--hf-cache", "--db", db)
    assert code == 2 and "no Hugging Face cache at" in err
