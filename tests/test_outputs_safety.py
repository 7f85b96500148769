"""Nothing lost, nothing leaked: every command refuses outputs that are, hold or lie inside
its inputs; --force replaces only folders graft wrote; side files never bring in files
from outside the model folder; SIGTERM and full disks leave no debris; modes follow the
umask; graft reads what it writes; bad options and NaN inputs end in one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import graft
from conftest import run_cli
from graft.io import load_state_dict, save_state_dict
from graft.io._atomic import MARKER, _owner, remove_stale_temps

ENV = {**os.environ, "PYTHONPATH": str(Path(graft.__file__).parents[1])}


def _model(seed: int, *, extra: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.ones(8) + seed,
    }
    return {**sd, **(extra or {})}


@pytest.fixture
def family(tmp_path):
    """base, a, b (tiny models with a tokenizer file), a recipe, a delta and an adapter."""
    paths = {}
    for i, name in enumerate(["base", "a", "b"]):
        save_state_dict(_model(i), tmp_path / name, config={"num_hidden_layers": 2})
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": name}))
        paths[name] = tmp_path / name
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(paths["a"]), "parameters": {"weight": 0.5}},
                    {"model": str(paths["b"]), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    paths["recipe"] = recipe
    assert (
        run_cli("diff", paths["a"], paths["base"], "-o", tmp_path / "d.safetensors", "-q")[0] == 0
    )
    paths["delta"] = tmp_path / "d.safetensors"
    code, _, err = run_cli(
        "extract-lora", paths["a"], paths["base"], "-r", "2", "-o", tmp_path / "adapter", "-q"
    )
    assert code == 0, err
    paths["adapter"] = tmp_path / "adapter"
    return paths


def _snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under the paths (symlinks read through), by path."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        out.update({str(f): f.read_bytes() for f in files})
    return out


def _one_error(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _fails(*args) -> str:
    """Run graft; it must fail with exit 2 and one line on stderr, which is returned."""
    code, _, err = run_cli(*args)
    return _one_error(code, err)


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".graft-" in p.name)


# --- OUT is, holds or lies inside an input -------------------------------------------------


def _refusals(p, tmp_path):
    """Per command that writes: args whose OUT is one of its inputs, with --force."""
    np.save(tmp_path / "y.npy", np.array([0, 1, 1]))
    np.save(tmp_path / "old.npy", np.eye(2)[[0, 1, 0]])
    np.save(tmp_path / "new.npy", np.eye(2)[[0, 1, 1]])
    return {
        "merge": (["merge", p["recipe"], p["a"], "--force"], "is the input"),
        "diff": (
            ["diff", p["a"], p["base"], "-o", p["base"] / "model.safetensors", "--force"],
            "lies inside the input",
        ),
        "apply": (["apply", p["base"], p["delta"], "-o", p["base"], "--force"], "is the input"),
        "transfer": (
            [
                "transfer",
                "--from-base",
                p["base"],
                "--from-ft",
                p["a"],
                "--onto",
                p["b"],
                "-o",
                p["b"],
                "--force",
            ],
            "is the input",
        ),
        "compress": (
            ["compress", p["delta"], "-m", "compeft", "-o", p["delta"], "--force"],
            "is the input",
        ),
        "extract-lora": (
            ["extract-lora", p["a"], p["base"], "-r", "2", "-o", p["a"], "--force"],
            "is the input",
        ),
        "merge-lora": (["merge-lora", p["adapter"], "-o", p["adapter"], "--force"], "is the input"),
        "soup": (
            ["soup", "uniform", p["a"], p["b"], "--data", "v.csv", "-o", p["a"], "--force"],
            "is the input",
        ),
        "adamerging": (
            [
                "adamerging",
                p["base"],
                p["a"],
                "--data",
                "v.csv",
                "-o",
                tmp_path / "r.yaml",
                "--merge",
                p["base"],
                "--force",
            ],
            "is the input",
        ),
        "search": (
            [
                "search",
                p["recipe"],
                "--param",
                "weight=0.5",
                "--data",
                "v.csv",
                "-o",
                p["recipe"],
                "--force",
            ],
            "is the input",
        ),
        "check --report": (
            [
                "check",
                "--old-preds",
                tmp_path / "old.npy",
                "--new-preds",
                tmp_path / "new.npy",
                "--labels",
                tmp_path / "y.npy",
                "--report",
                tmp_path / "old.npy",
            ],
            "is the input",
        ),
    }


COMMANDS = [
    "merge",
    "diff",
    "apply",
    "transfer",
    "compress",
    "extract-lora",
    "merge-lora",
    "soup",
    "adamerging",
    "search",
    "check --report",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_force_never_writes_over_an_input(family, tmp_path, command):
    args, says = _refusals(family, tmp_path)[command]
    before = _snapshot(tmp_path)
    line = _fails(*args, "-q")
    assert says in line and "choose" in line, line
    assert _snapshot(tmp_path) == before  # every input byte for byte, nothing added
    assert _debris(tmp_path) == []


def test_force_refuses_a_folder_holding_the_inputs(family, tmp_path):
    before = _snapshot(tmp_path)
    line = _fails("merge", family["recipe"], tmp_path, "--force", "-q")
    assert line == (
        f"error: output {tmp_path} holds the input {family['recipe']}; choose another output "
        "path (replacing it would delete the input)"
    )
    line = _fails(
        "apply",
        family["a"],
        family["delta"],
        "-o",
        tmp_path,
        "--force",
        "--force-overwrite-anything",
        "-q",
    )
    assert f"output {tmp_path} holds the input" in line  # the louder flag does not lift this
    assert _snapshot(tmp_path) == before


def test_output_inside_an_input_or_a_symlink_to_one_is_refused(family, tmp_path):
    line = _fails("merge", family["recipe"], family["a"] / "merged", "-q")
    assert line == (
        f"error: output {family['a'] / 'merged'} lies inside the input {family['a']}; choose "
        "a path outside the inputs"
    )
    (tmp_path / "link").symlink_to(family["b"], target_is_directory=True)
    before = _snapshot(family["b"])
    line = _fails("merge", family["recipe"], tmp_path / "link", "--force", "-q")
    assert line.startswith(f"error: output {tmp_path / 'link'} is the input {family['b']}")
    assert _snapshot(family["b"]) == before and (tmp_path / "link").is_symlink()


def _hf_cache(tmp_path: Path, source: Path) -> Path:
    """A Hugging Face cache snapshot of ``source``: every file a symlink into ../../blobs."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(source.iterdir())):
        if f.is_file() and f.name != MARKER:
            (repo / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    return snap


def test_the_blobs_of_a_cached_input_are_part_of_it(family, tmp_path):
    snap = _hf_cache(tmp_path, family["a"])
    recipe = tmp_path / "cached.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(snap), "parameters": {"weight": 1}}],
            }
        )
    )
    blobs = snap.parents[1] / "blobs"
    before = _snapshot(blobs)
    line = _fails("merge", recipe, blobs, "--force-overwrite-anything", "-q")
    assert f"output {blobs} holds {blobs}/blob" in line and f"a file of the input {snap}" in line
    assert _snapshot(blobs) == before
    # the cached model's side files (symlinks into blobs) are copied as usual, and so are
    # those of a --local-dir download by huggingface_hub < 0.23 (absolute links to blobs)
    local = tmp_path / "local"
    local.mkdir()
    for f in snap.iterdir():
        (local / f.name).symlink_to(f.resolve())
    for model in (snap, local):
        recipe.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "linear",
                    "models": [{"model": str(model), "parameters": {"weight": 1}}],
                }
            )
        )
        code, _, err = run_cli("merge", recipe, tmp_path / f"out-{model.name}", "-q")
        assert code == 0 and "warning" not in err, err
        assert (tmp_path / f"out-{model.name}" / "tokenizer.json").read_text() == '{"model": "a"}'


# --- --force replaces only what graft wrote ---------------------------------------------------


def test_force_replaces_only_folders_graft_wrote(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = _snapshot(out)
    line = _fails("merge", family["recipe"], out, "--force", "-q")
    assert line == (
        f"error: output {out} was not written by graft (it has no .graft file); --force "
        "replaces only folders graft wrote: choose another path, remove it yourself, or pass "
        "--force-overwrite-anything to delete everything in it"
    )
    assert _snapshot(out) == before
    code, _, err = run_cli("merge", family["recipe"], out, "--force-overwrite-anything", "-q")
    assert code == 0, err
    assert not (out / "thesis.tex").exists()
    assert json.loads((out / MARKER).read_text()) == {
        "graft_version": graft.__version__,
        "written_by": "graft",
    }
    first = (out / "model.safetensors").read_bytes()
    assert run_cli("merge", family["recipe"], out, "-q")[0] == 2  # exists: --force needed
    code, _, err = run_cli("merge", family["recipe"], out, "--force", "-q")  # graft's: replaced
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() == first and _debris(tmp_path) == []
    # a file output is replaced by --force, a folder never is
    (tmp_path / "d2.safetensors").write_text("old")
    assert (
        run_cli(
            "diff", family["a"], family["base"], "-o", tmp_path / "d2.safetensors", "--force", "-q"
        )[0]
        == 0
    )
    (tmp_path / "dir.safetensors").mkdir()
    line = _fails(
        "diff", family["a"], family["base"], "-o", tmp_path / "dir.safetensors", "--force", "-q"
    )
    assert line == f"error: output {tmp_path / 'dir.safetensors'} is a directory; give a file path"


def test_every_folder_graft_writes_is_marked(family, tmp_path):
    assert (tmp_path / "adapter" / MARKER).is_file()
    assert run_cli("apply", family["base"], family["delta"], "-o", tmp_path / "ap", "-q")[0] == 0
    assert run_cli("merge-lora", family["adapter"], "-o", tmp_path / "ml", "-q")[0] == 0
    for name in ("ap", "ml"):
        assert json.loads((tmp_path / name / MARKER).read_text())["written_by"] == "graft"


# --- symlinked side files -------------------------------------------------------------------


def test_symlinked_side_files_never_leak_into_outputs(family, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # one warning per line, however long the paths
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("TOPSECRET-KEY")
    (secret / "creds.json").write_text('{"auths": "TOPSECRET-TOKEN"}')
    evil = family["a"]
    for name, target in [
        ("tokenizer.json", "id_rsa"),
        ("generation_config.json", "creds.json"),
        ("vocab.txt", "id_rsa"),
    ]:
        (evil / name).unlink(missing_ok=True)
        (evil / name).symlink_to(secret / target)
    (evil / "config.json").unlink()
    (evil / "config.json").symlink_to(secret / "creds.json")  # a JSON dict from elsewhere
    (evil / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (evil / "1_Pooling").mkdir()
    (evil / "1_Pooling" / "config.json").symlink_to(secret / "id_rsa")
    (evil / "1_Pooling" / "ok.json").write_text("{}")
    for args, out in [
        (["merge", family["recipe"], tmp_path / "m"], tmp_path / "m"),
        (["apply", evil, family["delta"], "-o", tmp_path / "ap", "--force-base"], tmp_path / "ap"),
    ]:
        code, _, err = run_cli(*args, "-q")
        assert code == 0, err
        lines = err.splitlines()
        for name in (
            "tokenizer.json",
            "generation_config.json",
            "vocab.txt",
            "config.json",
            "1_Pooling/config.json",
        ):
            want = f"warning: skipped {evil / name}: it links to {secret}/"
            assert sum(ln.startswith(want) for ln in lines) == 1, (name, err)
        assert all("graft copies only files inside it" in ln for ln in lines if "skipped" in ln)
        written = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
        assert written == [
            MARKER,
            "1_Pooling/ok.json",
            "README.md",
            "model.safetensors",
            "modules.json",
        ]
        assert not any(b"TOPSECRET" in f.read_bytes() for f in out.rglob("*") if f.is_file())


# --- SIGTERM, SIGKILL and stale temp folders ------------------------------------------------

_KILL_MID_MERGE = textwrap.dedent(
    """
    import os, signal, sys
    from graft.plan import engine
    original, sig = engine._Worker.__call__, getattr(signal, sys.argv[1])
    def call(self, job):
        os.kill(os.getpid(), sig)
        return original(self, job)
    engine._Worker.__call__ = call
    sys.argv = ["graft", "merge", sys.argv[2], sys.argv[3], "-q", "--threads", "2"]
    from graft.cli.app import main
    main()
    """
)


def test_sigterm_mid_merge_cleans_up_and_exits_143(family, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_MERGE, "SIGTERM", family["recipe"], out],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert not out.exists() and _debris(tmp_path) == []


def test_next_run_removes_the_temp_folder_of_a_killed_one(family, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_MID_MERGE, "SIGKILL", family["recipe"], out], env=ENV
    )
    assert proc.wait(timeout=120) == -signal.SIGKILL
    [stale] = _debris(tmp_path)
    owner = json.loads((tmp_path / stale / ".graft-owner").read_text())
    assert owner["pid"] == proc.pid and owner["host"] == _owner()["host"]
    # a live writer's folder stays; a reused pid (another start time) does not fool it
    live, reused, foreign = (tmp_path / f".out.graft-tmp-{n}" for n in ("live", "reused", "nfs"))
    me = _owner()
    for folder, owner in [
        (live, me),
        (reused, {**me, "start": (me["start"] or 0) + 1}),
        (foreign, {**me, "host": "another-machine", "pid": 1}),
    ]:
        folder.mkdir()
        (folder / ".graft-owner").write_text(json.dumps(owner))
    code, _, err = run_cli("merge", family["recipe"], out, "-q")
    assert code == 0, err
    kept = (
        [live.name, foreign.name]
        if me["start"] is not None
        else [live.name, reused.name, foreign.name]
    )
    assert _debris(tmp_path) == sorted(kept)
    assert remove_stale_temps(out) == []


# --- full disk, umask ---------------------------------------------------------------------------


def test_check_report_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0]))
    np.save(tmp_path / "old.npy", np.eye(2)[[0, 1, 0, 0]] * 3.0)
    np.save(tmp_path / "new.npy", np.eye(2)[[0, 1, 1, 0]] * 3.0)
    real_write = os.write

    def full(fd, data):
        if fd > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    report = tmp_path / "reports" / "r.html"
    code, _, err = run_cli(
        "check",
        "--old-preds",
        tmp_path / "old.npy",
        "--new-preds",
        tmp_path / "new.npy",
        "--labels",
        tmp_path / "y.npy",
        "--report",
        report,
    )
    line = _one_error(code, err)
    assert line == (
        f"error: no space left on device while writing {report}; free space or choose another "
        "output path"
    )
    assert list((tmp_path / "reports").iterdir()) == []


def test_outputs_follow_the_umask(family, tmp_path):
    old = os.umask(0o027)
    try:
        assert run_cli("merge", family["recipe"], tmp_path / "out", "-q")[0] == 0
        assert (
            run_cli("diff", family["b"], family["base"], "-o", tmp_path / "d3.safetensors", "-q")[0]
            == 0
        )
        assert (
            run_cli(
                "compress",
                tmp_path / "d3.safetensors",
                "-m",
                "dare",
                "--density",
                "0.5",
                "-o",
                tmp_path / "p3.safetensors",
                "-q",
            )[0]
            == 0
        )
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    for f in sorted((tmp_path / "out").iterdir()):
        assert f.stat().st_mode & 0o777 == 0o640, f
    for f in ("d3.safetensors", "p3.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o640, f


# --- graft reads what it writes -------------------------------------------------------------------


def test_diff_output_without_extension_gets_one_and_apply_reads_it(family, tmp_path):
    code, out, err = run_cli("diff", family["a"], family["base"], "-o", tmp_path / "delta", "-q")
    assert code == 0, err
    assert not (tmp_path / "delta").exists() and (tmp_path / "delta.safetensors").is_file()
    assert "note: wrote delta.safetensors, not delta: graft reads these files by extension" in out
    code, _, err = run_cli(
        "apply", family["base"], tmp_path / "delta.safetensors", "-o", tmp_path / "back", "-q"
    )
    assert code == 0, err
    got, want = load_state_dict(tmp_path / "back"), load_state_dict(family["a"])
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    code, out, _ = run_cli(
        "compress",
        tmp_path / "delta.safetensors",
        "-m",
        "dare",
        "-o",
        tmp_path / "patch",
        "--json",
        "-q",
    )
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "patch.safetensors")


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "-1", "abc", "0.0001B"])
@pytest.mark.parametrize("command", ["merge", "apply", "transfer"])
def test_bad_shard_size_is_one_line(family, tmp_path, command, size):
    out = tmp_path / "out"
    args = {
        "merge": ["merge", family["recipe"], out],
        "apply": ["apply", family["base"], family["delta"], "-o", out],
        "transfer": [
            "transfer",
            "--from-base",
            family["base"],
            "--from-ft",
            family["a"],
            "--onto",
            family["b"],
            "-o",
            out,
        ],
    }[command]
    line = _fails(*args, f"--out-shard-size={size}", "-q")
    assert line == (
        f"error: invalid --out-shard-size {size!r}: give a positive size such as 5GB, 500MB or 2GiB"
    )
    assert not out.exists() and _debris(tmp_path) == []


@pytest.mark.parametrize(
    "device,says",
    [
        ("foo", "unknown --device 'foo'; use cpu, cuda, cuda:N or mps"),
        ("meta", "--device meta cannot compute graft's outputs; use cpu, cuda, cuda:N or mps"),
    ],
)
@pytest.mark.parametrize("command", ["merge", "diff", "compress", "extract-lora", "merge-lora"])
def test_bad_device_is_one_line(family, tmp_path, command, device, says):
    out = tmp_path / "out"
    args = {
        "merge": ["merge", family["recipe"], out],
        "diff": ["diff", family["a"], family["base"], "-o", out],
        "compress": ["compress", family["delta"], "-m", "dare", "-o", out],
        "extract-lora": ["extract-lora", family["a"], family["base"], "-r", "2", "-o", out],
        "merge-lora": ["merge-lora", family["adapter"], "-o", out],
    }[command]
    line = _fails(*args, "--device", device, "-q")
    assert line == f"error: {says}"
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


# --- NaN inputs -----------------------------------------------------------------------------------


@pytest.fixture
def nan_model(family, tmp_path):
    sd = load_state_dict(family["a"])
    sd["model.layers.0.mlp.up_proj.weight"][3, 1] = float("nan")
    save_state_dict(sd, tmp_path / "nan", config={"num_hidden_layers": 2})
    return tmp_path / "nan"


def test_nan_warns_in_diff_transfer_compress_and_strict_fails(
    family, tmp_path, nan_model, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "100000")
    name = "model.layers.0.mlp.up_proj.weight"
    runs = {
        "diff": ["diff", nan_model, family["base"], "-o", tmp_path / "nd.safetensors"],
        "transfer": [
            "transfer",
            "--from-base",
            family["base"],
            "--from-ft",
            nan_model,
            "--onto",
            family["b"],
            "-o",
            tmp_path / "nt",
        ],
        "compress": [
            "compress",
            tmp_path / "nd.safetensors",
            "-m",
            "compeft",
            "-o",
            tmp_path / "np.safetensors",
        ],
    }
    where = {
        "diff": f"model {nan_model}",
        "transfer": f"model {nan_model}",
        "compress": f"delta {tmp_path / 'nd.safetensors'}",
    }
    for command, args in runs.items():
        code, _, err = run_cli(*args, "-q")
        assert code == 0, err
        assert f"warning: tensor {name} of {where[command]} contains NaN or Inf" in err, err
        out = Path(args[args.index("-o") + 1])
        line = _fails(*args, "--strict", "--force", "-q")
        assert line == (
            f"error: tensor {name} of {where[command]} contains NaN or Inf; fix the checkpoint "
            "or drop --strict"
        )
        assert out.exists()  # the earlier output is untouched by the failed --force run


def test_nan_in_extract_lora_and_lowrank_is_one_line_naming_the_tensor(family, tmp_path, nan_model):
    name = "model.layers.0.mlp.up_proj.weight"
    line = _fails("extract-lora", nan_model, family["base"], "-r", "2", "-o", tmp_path / "la", "-q")
    assert line == (
        f"error: tensor {name} of model {nan_model} contains NaN or Inf; a LoRA adapter (SVD) "
        "cannot be extracted from it; fix the checkpoint"
    )
    assert (
        run_cli("diff", nan_model, family["base"], "-o", tmp_path / "nd.safetensors", "-q")[0] == 0
    )
    line = _fails(
        "compress",
        tmp_path / "nd.safetensors",
        "-m",
        "lowrank",
        "--rank",
        "2",
        "-o",
        tmp_path / "lr.safetensors",
        "-q",
    )
    assert line == (
        f"error: tensor {name} of delta {tmp_path / 'nd.safetensors'} contains NaN or Inf; "
        "lowrank cannot factorize it; fix the models and run graft diff again"
    )
    assert not (tmp_path / "la").exists() and not (tmp_path / "lr.safetensors").exists()
    assert _debris(tmp_path) == []
    assert load_file(tmp_path / "nd.safetensors")[name].isnan().sum() == 1
