"""graft.io output directories: atomicity, disk-full, sidecar files, model card, transformers."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import graft
from graft.io import (
    GraftIOError,
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    copy_tokenizer,
    open_checkpoint,
    save_state_dict,
    write_model_card,
)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".graft-" in p.name)


# --- atomic_output_dir --------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_leaves_nothing(tmp_path, exc):
    target = tmp_path / "out"
    with pytest.raises(exc), atomic_output_dir(target, force=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.graft-tmp-")
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_success_moves_into_place(tmp_path):
    target = tmp_path / "a" / "out"  # parents are created
    with atomic_output_dir(target, force=False) as tmp:
        (tmp / "f").write_text("new")
        assert not target.exists()
    assert (target / "f").read_text() == "new"
    assert leftovers(target.parent) == []


def test_existing_target_needs_force(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target, force=False) as t:  # an output graft wrote (.graft marker)
        (t / "old").write_text("old")
    refused = pytest.raises(GraftIOError, match=re.escape(f"output {target} exists; pass --force"))
    with refused, atomic_output_dir(target, force=False):
        pytest.fail("must not get here")
    assert (target / "old").exists()
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new").write_text("new")
        assert (target / "old").exists()  # old output intact until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == [".graft", "new"]
    assert leftovers(tmp_path) == []


def test_failed_forced_write_keeps_old_output(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target, force=False) as t:
        (t / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(target, force=True):
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == [".graft", "old"]
    assert leftovers(tmp_path) == []


def test_force_never_replaces_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    refused = pytest.raises(GraftIOError, match="holds the current directory")
    with refused, atomic_output_dir(tmp_path, force=True):
        pytest.fail("must not get here")
    assert (tmp_path / "out").is_dir()


def test_sigkill_mid_write_leaves_only_hidden_temp_dir(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys, torch
        from graft.io import ShardedWriter, atomic_output_dir
        with atomic_output_dir(sys.argv[1], force=False) as tmp:
            w = ShardedWriter(tmp, [("a", torch.float32, (1000,)), ("b", torch.float32, (9,))])
            w.write("a", torch.ones(1000))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(graft.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    [tmp] = leftovers(tmp_path)
    assert tmp.startswith(".out.graft-tmp-")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    target = tmp_path / "out"
    with pytest.raises(GraftIOError) as e:
        save_state_dict({"w": torch.ones(4)}, target)
    assert str(e.value) == (
        f"no space left on device while writing {target}; free space or choose another output path"
    )
    assert list(tmp_path.iterdir()) == []


def test_disk_full_direct_writer_names_shard(tmp_path, monkeypatch):
    w = ShardedWriter(tmp_path, [("w", torch.float32, (4,))])
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EDQUOT, "")))
    with pytest.raises(
        GraftIOError, match=re.escape(f"while writing {tmp_path / 'model.safetensors'}")
    ):
        w.write("w", torch.ones(4))
    w.close()


# --- sidecar files and model card ------------------------------------------------------------


def test_copy_sidecar_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "config.json").write_text('{"num_hidden_layers": 12}')
    for name in ("generation_config.json", "tokenizer.json", "merges.txt", "unrelated.txt"):
        (src / name).write_text(name)
    written = copy_sidecar_files(src, dst, config={"num_hidden_layers": 6})
    assert written == ["config.json", "generation_config.json", "tokenizer.json", "merges.txt"]
    assert json.loads((dst / "config.json").read_text()) == {"num_hidden_layers": 6}
    assert (dst / "merges.txt").read_text() == "merges.txt"
    assert not (dst / "unrelated.txt").exists()
    assert copy_sidecar_files(None, tmp_path / "dst", config=None) == []


def test_copy_tokenizer_requires_a_tokenizer(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(GraftIOError, match="no tokenizer files in"):
        copy_tokenizer(tmp_path / "tok", tmp_path / "dst")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"\x00sp")
    assert copy_tokenizer(tmp_path / "tok", tmp_path / "dst") == ["tokenizer.model"]


def test_model_card_front_matter_and_recipe(tmp_path):
    recipe = "merge_method: ties\nmodels:\n  - model: org/a  # uses ```odd``` comments\n"
    path = write_model_card(tmp_path, base_models=["org/a", "org/b"], recipe_yaml=recipe)
    text = path.read_text()
    _, front, body = text.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": ["org/a", "org/b"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["graft", "merge"],
    }
    assert f"````yaml\n{recipe}````\n" in body  # fence outlasts the recipe's backticks
    with pytest.raises(ValueError, match="relation must be one of"):
        write_model_card(tmp_path, base_models=[], relation="blend", recipe_yaml="")


# --- transformers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(config).eval()


def test_transformers_loads_saved_state_dict(tmp_path, gpt2):
    transformers, model = gpt2
    sd = model.state_dict()  # includes lm_head.weight, tied to wte: written as given
    save_state_dict(sd, tmp_path / "m", config=model.config.to_dict(), max_shard_bytes="40KB")
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_reads_transformers_sharded_output(tmp_path, gpt2):
    _, model = gpt2
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    sd = model.state_dict()
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert len({ckpt.info(n).file for n in ckpt.names}) > 1
        assert ckpt.config["n_layer"] == 2
        # transformers drops the tied lm_head.weight; everything else is there, bit-exact.
        assert set(ckpt.names) == set(sd) - {"lm_head.weight"}
        assert all(torch.equal(ckpt.get(n), sd[n]) for n in ckpt.names)
