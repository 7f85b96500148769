"""Hostile or odd files end in one line naming the file and the fix, never a traceback or a
hang: deep JSON and YAML, alias bombs, malformed safetensors headers, absurd config values,
shards that escape their folder, FIFOs and devices, wrong-typed card and manifest fields.

Every hostile file is generated here. Old-but-benign inputs (legacy ``torch.save`` files,
the older sentence-transformers layout) are read.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import run_cli
from graft.io import (
    GraftIOError,
    discover_checkpoints,
    file_stats,
    is_model_dir,
    open_adapter,
    open_checkpoint,
    read_model_card,
    read_safetensors_header,
    save_state_dict,
)
from graft.io._checkpoint import CONFIG_COUNT_LIMITS
from graft.plan.arch import LAYER_COUNT_KEYS
from graft.recipe import RecipeError, load_recipe, parse_recipe
from graft.zoo.build import ZooError, load_zoo, zoo_tasks

# --- helpers ------------------------------------------------------------------------------


def _st(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (JSON-encoded unless bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _deep(n: int = 5000) -> str:
    return "[" * n + "]" * n


def _one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _cli_error(*args) -> str:
    """Run graft; it must exit 2 with exactly one ``error:`` line on stderr."""
    code, _, err = run_cli(*args)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block blocks longer than ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tiny_model(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g),
        "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g),
    }
    save_state_dict(tensors, path, config=config or {"num_hidden_layers": 2}, force=True)
    return path


def _recipe(tmp_path: Path, models: list[Path], **extra) -> Path:
    doc = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# --- deep JSON ----------------------------------------------------------------------------


def test_deep_json_header_is_refused_in_one_line(tmp_path):
    f = _st(tmp_path / "deep.safetensors", _deep().encode())
    with pytest.raises(GraftIOError) as e:
        read_safetensors_header(f)
    _one_line(e.value, str(f), "nested too deeply", "re-download or re-save it")
    assert "deep.safetensors" in _cli_error("inspect", f)


@pytest.mark.parametrize("depth", [65, 5000])
def test_deep_config_json_is_refused(tmp_path, depth):
    model = _tiny_model(tmp_path / "m")
    (model / "config.json").write_text('{"num_hidden_layers": 2, "x": ' + _deep(depth) + "}")
    with open_checkpoint(model) as ckpt, pytest.raises(GraftIOError) as e:
        ckpt.config  # noqa: B018 - read lazily
    _one_line(e.value, "config.json", "nested", "fix or re-download it")


def test_deep_index_json_is_refused(tmp_path):
    model = _tiny_model(tmp_path / "m")
    (model / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep() + "}")
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(model)
    _one_line(e.value, "model.safetensors.index.json", "nested", "re-download the checkpoint")


def test_deep_adapter_config_is_refused(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + _deep() + "}")
    with pytest.raises(GraftIOError) as e:
        open_adapter(d)
    _one_line(e.value, "adapter_config.json", "nested", "fix or re-save the adapter")


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"r": True}, "positive integer r"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern is ['q_proj'], expected an object"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] is 0"),
        ({"alpha_pattern": {"(unclosed": 8}}, "'(unclosed' is not a valid pattern"),
    ],
)
def test_adapter_config_fields_graft_applies_are_checked(tmp_path, extra, needle):
    d = tmp_path / "adapter"
    d.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **extra}
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(GraftIOError) as e:
        open_adapter(d)
    _one_line(e.value, "adapter_config.json", needle)


# --- safetensors headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, data, why",
    [
        ({"w": _entry(dtype=["F32"])}, b"0000", "unknown dtype ['F32']"),
        ({"w": _entry(dtype={"a": 1})}, b"0000", "unknown dtype"),
        (
            b'{"w":'
            + json.dumps(_entry()).encode()
            + b',"w":'
            + json.dumps(_entry()).encode()
            + b"}",
            b"0000",
            "key 'w' appears twice",
        ),
        ({"__metadata__": {"k": 5}, "w": _entry()}, b"0000", "__metadata__ is not a map"),
        ({"__metadata__": ["a"], "w": _entry()}, b"0000", "__metadata__ is not a map"),
        ({"w": _entry(shape=(-1,))}, b"0000", "malformed shape"),
        ({"w": _entry(shape=(True,))}, b"0000", "malformed shape"),
        ({"w": _entry(shape=(1.0,))}, b"0000", "malformed shape"),
        ({"w": _entry(shape=(0, 2**70), offsets=(0, 0))}, b"", "2**63 elements"),
        ({"w": _entry(shape=(0, 2**62, 2**62), offsets=(0, 0))}, b"", "2**63 elements"),
        ({"w": _entry(shape=(1,) * 65)}, b"0000", "64 dimensions"),
        ({"w": _entry(offsets=(2**64, 2**64 + 4))}, b"0000", "past the end"),
        ({"w": _entry(offsets=(-4, 0))}, b"0000", "malformed shape or data_offsets"),
        ({"w": _entry(shape=(2**30, 2**30), offsets=(0, 2**62))}, b"0000", "past the end"),
        (b'{"\\ud800":' + json.dumps(_entry()).encode() + b"}", b"0000", "not valid Unicode"),
        (
            b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
            b"0000",
            "NaN is not a JSON value",
        ),
        (b"\xff\xfe{}", b"", "not valid JSON (not UTF-8"),
    ],
    ids=[
        "dtype-list",
        "dtype-dict",
        "duplicate-name",
        "metadata-int",
        "metadata-list",
        "shape-negative",
        "shape-bool",
        "shape-float",
        "shape-huge-empty",
        "shape-stride-overflow",
        "shape-65-dims",
        "offsets-beyond-u64",
        "offsets-negative",
        "offsets-huge",
        "lone-surrogate",
        "nan-literal",
        "not-utf8",
    ],
)
def test_hostile_header_fields(tmp_path, header, data, why):
    f = _st(tmp_path / "h.safetensors", header, data)
    with pytest.raises(GraftIOError) as e, open_checkpoint(f) as ckpt:
        for name in ckpt.names:  # open and read every tensor: nothing may leak
            ckpt.get(name)
    _one_line(e.value, "corrupt or truncated safetensors file", str(f), why)


def test_header_metadata_null_is_no_metadata(tmp_path):
    f = _st(tmp_path / "h.safetensors", {"__metadata__": None, "w": _entry()}, b"\0\0\x80?")
    names, meta = read_safetensors_header(f)
    assert list(names) == ["w"] and meta == {}
    assert open_checkpoint(f).get("w").tolist() == [1.0]


# --- config.json --------------------------------------------------------------------------


def test_config_validation_covers_every_layer_count_key():
    assert set(LAYER_COUNT_KEYS) <= set(CONFIG_COUNT_LIMITS)


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"num_hidden_layers": 1000000000000}', "num_hidden_layers is 1000000000000"),
        ('{"num_hidden_layers": -1}', "num_hidden_layers is -1"),
        ('{"num_hidden_layers": "12"}', "num_hidden_layers is '12'"),
        ('{"n_layer": true}', "n_layer is True"),
        ('{"hidden_size": 1.5}', "hidden_size is 1.5"),
        ('{"vocab_size": [1]}', "vocab_size is [1]"),
        ('{"architectures": "LlamaForCausalLM"}', "architectures is 'LlamaForCausalLM'"),
        ('{"torch_dtype": ["float32"]}', "torch_dtype is ['float32']"),
        ('{"tie_word_embeddings": "false"}', "tie_word_embeddings is 'false'"),
        ('{"num_hidden_layers": 2,', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_config_fails_merge_dry_run_and_apply(tmp_path, text, needle):
    base, ft = _tiny_model(tmp_path / "base"), _tiny_model(tmp_path / "ft", 1)
    delta = tmp_path / "d.safetensors"
    code, _, err = run_cli("diff", ft, base, "-o", delta, "-q")  # diff reads no config
    assert code == 0, err
    (ft / "config.json").write_text(text)  # merge reads the first model's config
    recipe = _recipe(tmp_path, [ft, base])
    line = _cli_error("merge", recipe, tmp_path / "out", "--dry-run", "-q")
    assert "ft/config.json" in line and needle in line, line
    (base / "config.json").write_text(text)  # apply copies the base's
    line = _cli_error("apply", base, delta, "-o", tmp_path / "out", "-q")
    assert "base/config.json" in line and needle in line, line
    assert not (tmp_path / "out").exists()


def test_non_utf8_config_names_the_file(tmp_path):
    model = _tiny_model(tmp_path / "m")
    (model / "config.json").write_bytes(b'{"model_type": "\xff"}')
    line = _cli_error("inspect", model)
    assert "m/config.json" in line and "not UTF-8" in line and "fix or re-download it" in line


def test_sane_config_with_nulls_is_accepted(tmp_path):
    config = {"num_hidden_layers": 2, "vocab_size": None, "n_head": None, "hidden_size": 4}
    with open_checkpoint(_tiny_model(tmp_path / "m", config=config)) as ckpt:
        assert ckpt.config == config


# --- shards that leave the folder ---------------------------------------------------------


def _sharded(d: Path) -> Path:
    _tiny_model(d)
    index = {"weight_map": {n: "model.safetensors" for n in open_checkpoint(d).names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../outside.safetensors", "sub/x.safetensors", "..", "."]
)
def test_index_shard_paths_must_be_plain_names(tmp_path, target):
    d = _sharded(tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.weight"] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(d)
    _one_line(e.value, "model.layers.0.mlp.weight", "absolute paths and '..' are refused")


def test_shard_symlink_out_of_the_folder_is_refused(tmp_path):
    d = _sharded(tmp_path / "m")
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(d)
    _one_line(e.value, "resolves to", "outside the model folder", "copy the file in")
    (d / "model.safetensors.index.json").unlink()  # the single-file layout: same rule
    with pytest.raises(GraftIOError, match="outside the model folder"):
        open_checkpoint(d)


def test_shards_linked_into_the_hub_cache_blobs_are_read(tmp_path):
    src = _sharded(tmp_path / "src")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    with open_checkpoint(snap) as ckpt:
        assert len(ckpt) == 3 and ckpt.config == {"num_hidden_layers": 2}
    local = tmp_path / "local"  # huggingface_hub < 0.23 local_dir downloads link like this
    local.mkdir()
    for f in snap.iterdir():
        (local / f.name).symlink_to(f.resolve())
    with open_checkpoint(local) as ckpt:
        assert len(ckpt) == 3


# --- FIFOs and devices --------------------------------------------------------------------


def test_fifo_given_to_inspect_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    with _deadline(20):
        line = _cli_error("inspect", fifo)
    assert "weights.safetensors is a named pipe (FIFO), not a regular file" in line


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_fifo_inside_a_model_folder_never_blocks(tmp_path, name):
    d = tmp_path / "m"
    d.mkdir()
    os.mkfifo(d / name)
    with _deadline(20), pytest.raises(GraftIOError) as e:
        open_checkpoint(d)
    _one_line(e.value, str(d))
    os.mkfifo(tmp_path / "loose.pt")
    with _deadline(20), pytest.raises(GraftIOError, match="named pipe"):
        open_checkpoint(tmp_path / "loose.pt")
    with _deadline(20):
        assert discover_checkpoints(tmp_path) == []  # pipes are not checkpoints


def test_device_linked_as_safetensors_is_refused(tmp_path):
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    with _deadline(20), pytest.raises(GraftIOError) as e:
        open_checkpoint(link)
    _one_line(e.value, "is a character device, not a regular file")


# --- legacy torch files -------------------------------------------------------------------


def test_legacy_torch_save_is_read_weights_only(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7], dtype=torch.int64)}
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "legacy.bin") as ckpt:
        assert ckpt.names == ["w", "b"]
        assert ckpt.get("w").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert ckpt.get("b").tolist() == [7]


class _Exploit:
    sentinel = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_legacy_torch_save_with_code_is_still_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    _Exploit.sentinel = str(sentinel)
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(1), "x": _Exploit()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(path)
    _one_line(e.value, f"refusing to load {path}", "torch.load(weights_only=True)")
    assert not sentinel.exists()


# --- the older sentence-transformers layout -----------------------------------------------


def _old_st(d: Path, seed: int) -> Path:
    """modules.json at the top; weights, config and tokenizer in 0_Transformer/."""
    _tiny_model(d / "0_Transformer", seed, config={"num_hidden_layers": 2, "model_type": "bert"})
    (d / "0_Transformer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (d / "1_Pooling").mkdir(parents=True)
    (d / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_Transformer",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (d / "modules.json").write_text(json.dumps(modules))
    return d


def test_older_sentence_transformers_layout_is_read(tmp_path):
    d = _old_st(tmp_path / "st", 1)
    with open_checkpoint(d) as ckpt:
        assert ckpt.path == d and ckpt.root == d / "0_Transformer" and ckpt.modules_root == d
        assert ckpt.config["model_type"] == "bert" and len(ckpt) == 3
    assert is_model_dir(d) and discover_checkpoints(tmp_path) == [d]
    names = [n for n, _, _ in file_stats(d)]
    assert "0_Transformer/model.safetensors" in names and "modules.json" in names


def test_older_sentence_transformers_layout_merges(tmp_path):
    a, b = _old_st(tmp_path / "a", 1), _old_st(tmp_path / "b", 2)
    recipe = _recipe(tmp_path, [a, b])
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\nhello\n"
    with open_checkpoint(out) as merged, open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        name = "model.layers.0.mlp.weight"
        assert torch.allclose(merged.get(name), (ca.get(name) + cb.get(name)) / 2)


def test_modules_json_pointing_outside_is_refused(tmp_path):
    d = tmp_path / "st"
    _tiny_model(tmp_path / "elsewhere")
    d.mkdir()
    (d / "modules.json").write_text(
        json.dumps([{"path": "../elsewhere", "type": "sentence_transformers.models.Transformer"}])
    )
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(d)
    _one_line(e.value, "modules.json", "outside")
    assert not is_model_dir(d)


# --- YAML: recipes ------------------------------------------------------------------------


def _alias_bomb(levels: int = 9, *, indent: str = "") -> str:
    lines = [f"{indent}l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"{indent}l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_recipe_alias_bomb_is_refused_quickly(tmp_path):
    a = _tiny_model(tmp_path / "a")
    text = "merge_method: linear\nbomb:\n" + _alias_bomb(indent="  ")
    text += f"models:\n  - model: *l8\n  - model: {a}\n"
    assert len(text) < 1000
    (tmp_path / "bomb.yaml").write_text(text)
    start = time.perf_counter()
    line = _cli_error("merge", tmp_path / "bomb.yaml", tmp_path / "out", "--dry-run", "-q")
    assert "more than 100,000 YAML nodes (aliases expanded)" in line
    assert time.perf_counter() - start < 120  # guards against hangs, not speed


@pytest.mark.parametrize(
    "bomb",
    [
        "s: &s x\nl0: &l0 [*s, *s, *s, *s, *s, *s, *s, *s, *s, *s]\n"
        + _alias_bomb()[_alias_bomb().index("\n") + 1 :],
        "l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5}\n"
        + "".join(
            f"l{i}: &l{i} {{{', '.join(f'k{j}: *l{i - 1}' for j in range(10))}}}\n"
            for i in range(1, 9)
        ),
    ],
    ids=["aliases-of-a-scalar", "mappings"],
)
def test_alias_bombs_of_every_shape_are_counted(bomb):
    from graft.io._readers import load_yaml

    with pytest.raises(ValueError, match="more than 100,000 YAML nodes"):
        load_yaml(bomb, max_nodes=100_000)
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]\n", max_nodes=13) == {
        "a": [1, 2],
        "b": [[1, 2]] * 2,
    }
    with pytest.raises(ValueError, match="more than 12 YAML nodes"):
        load_yaml("a: &a [1, 2]\nb: [*a, *a]\n", max_nodes=12)


def test_recipe_aliases_of_shared_values_still_work(tmp_path):
    shared = {"weight": 0.5}
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [{"model": "a", "parameters": shared}, {"model": "b", "parameters": shared}],
        }
    )
    assert "*id001" in text
    r = parse_recipe(text)
    assert [dict(m.parameters) for m in r.models] == [{"weight": 0.5}, {"weight": 0.5}]


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "merge_method: linear\nmodels: " + "[" * 20000 + "]" * 20000 + "\n",
            "nested more than 64",
        ),
        ("a: &a [*a]\n", "refers to a node it is part of"),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0e+308}}]\n",
            "models[0].parameters.weight: 1e+308 is out of range",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e308}}]\n",
            "models[0].parameters.weight: '1e308' is out of range",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e999}}]\n",
            "models[0].parameters.weight: expected a finite number, got '1e999'",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]\n",
            "models[0].parameters.weight: expected a finite number, got nan",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [0, .inf]}\n",
            "parameters.weight: expected a finite number, got inf",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: " + "9" * 400 + "}}]\n",
            "models[0].parameters.weight: expected a finite number, got 99999",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: "
            + "9" * 5000
            + "}}]\n",
            "recipe is not valid YAML",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 2020-13-45}}]\n",
            "recipe is not valid YAML",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
            "density: {value: 0.5, 3: x}}}]\n",
            "takes keys 'filter' and 'value'",
        ),
        ("merge_method: [linear]\nmodels: [{model: a}]\n", "unknown merge method ['linear']"),
        ("merge_method: linear\nmodels: [{model: a}]\nseed: " + "9" * 30 + "\n", "seed must be"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, "
            "1000000000000]}]}]\n",
            "layer_range must be",
        ),
        ('merge_method: linear\nmodels: [{model: a}]\n"bad\\nkey": 1\n', "unknown recipe key"),
    ],
    ids=[
        "deep",
        "recursive-alias",
        "huge-float",
        "huge-float-text",
        "overflow-text",
        "nan",
        "inf-in-gradient",
        "huge-int",
        "int-beyond-str-limit",
        "bad-date",
        "int-key",
        "method-list",
        "huge-seed",
        "huge-layer",
        "newline-key",
    ],
)
def test_hostile_recipes(text, needle):
    start = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    _one_line(e.value, needle)
    # Not a speed test: an unbounded alias expansion or recursion would not end at all;
    # the bound is loose so a loaded machine does not fail it.
    assert time.perf_counter() - start < 120


def test_non_utf8_recipe_and_directory_recipe(tmp_path):
    (tmp_path / "r.yaml").write_bytes(b"merge_method: linear\nmodels: [{model: \xff}]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    _one_line(e.value, "r.yaml is not UTF-8 text", "save it as UTF-8")
    line = _cli_error("merge", tmp_path, tmp_path / "out", "--dry-run", "-q")
    assert "is not a regular file" in line


def test_recipe_weight_overflow_in_merge_cli(tmp_path):
    a, b = _tiny_model(tmp_path / "a"), _tiny_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1e308}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\n"
    )
    line = _cli_error("merge", recipe, tmp_path / "out", "--dry-run", "-q")
    assert "models[0].parameters.weight" in line and "out of range" in line


# --- YAML: model cards --------------------------------------------------------------------


def test_card_alias_bomb_is_refused_and_the_scan_goes_on(tmp_path):
    m = _tiny_model(tmp_path / "zoo" / "m")
    (m / "README.md").write_text("---\n" + _alias_bomb() + "base_model: *l8\n---\n# m\n")
    with pytest.raises(GraftIOError) as e:
        read_model_card(m)
    _one_line(e.value, "README.md has invalid YAML front matter", "more than 100,000 YAML nodes")
    db = tmp_path / "z.sqlite"
    start = time.perf_counter()
    code, out, err = run_cli("zoo", "scan", tmp_path / "zoo", "--db", db, "--json", "-q")
    assert code == 0, err
    assert time.perf_counter() - start < 120  # guards against hangs, not speed
    code, out, _ = run_cli("zoo", "show", "m", "--db", db, "--json")
    shown = json.loads(out)
    assert shown["status"] == "ok" and "100,000 YAML nodes" in shown["card_error"]


@pytest.mark.parametrize(
    "front",
    ["deep: " + "[" * 10000 + "]" * 10000, "a: &a [*a]", "when: 2020-13-45", "n: " + "9" * 5000],
    ids=["deep", "recursive", "bad-date", "int-beyond-str-limit"],
)
def test_hostile_card_front_matter(tmp_path, front):
    (tmp_path / "README.md").write_text(f"---\n{front}\n---\n")
    with pytest.raises(GraftIOError) as e:
        read_model_card(tmp_path)
    _one_line(e.value, "README.md has invalid YAML front matter")


def test_card_fields_of_the_wrong_type_are_noted_in_the_scan(tmp_path):
    m = _tiny_model(tmp_path / "zoo" / "m")
    (m / "README.md").write_text(
        "---\nbase_model: 5\nmodel-index: 3\ntags: {a: 1}\nlicense: [mit]\n---\n"
    )
    db = tmp_path / "z.sqlite"
    code, _, err = run_cli("zoo", "scan", tmp_path / "zoo", "--db", db, "-q")
    assert code == 0, err
    code, out, _ = run_cli("zoo", "show", "m", "--db", db, "--json")
    shown = json.loads(out)
    assert shown["status"] == "ok"
    assert shown["card"]["base_model"] == [] and shown["card"]["tags"] == []
    note = shown["card_error"]
    assert "base_model is an int (5)" in note and "model-index is an int (3)" in note
    assert "(and 1 more)" in note


@pytest.mark.parametrize(
    "front",
    [
        "model-index: 3",
        "model-index: [5, {results: 7}, {results: [{metrics: [{type: accuracy, value: .nan}]}]}]",
        "model-index: [{results: [{dataset: 5, metrics: {a: 1}}]}]",
    ],
)
def test_lint_data_with_wrong_typed_card_claims(tmp_path, front):
    from graft.check.lint import lint_path

    m = _tiny_model(tmp_path / "m")
    (m / "README.md").write_text(f"---\n{front}\n---\n")
    report = lint_path(m, data=tmp_path / "unused.npz")
    claims = [f for f in report["findings"] if f["check"] == "claims"]
    assert claims and all("\n" not in f["message"] for f in claims)
    assert report["claims"] == []


def test_lint_data_with_unreadable_card(tmp_path):
    from graft.check.lint import lint_path

    m = _tiny_model(tmp_path / "m")
    (m / "README.md").write_text("---\n" + _alias_bomb() + "---\n")
    report = lint_path(m, data=tmp_path / "unused.npz")
    (finding,) = [f for f in report["findings"] if f["check"] == "claims"]
    assert finding["severity"] == "warning" and "model card not read" in finding["message"]


# --- zoo manifests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "graft-digits-zoo", "base": "base"}', "'base' is missing or not a dict"),
        ('{"format": "graft-digits-zoo", "base": {"path": "/etc"}}', "base is not a path inside"),
        ("[1]", "is not a graft digits zoo manifest"),
        ('{"format": "graft-digits-zoo", "x": ' + _deep() + "}", "nested"),
    ],
)
def test_malformed_digits_manifest(tmp_path, text, needle):
    (tmp_path / "manifest.json").write_bytes(text.encode())
    with pytest.raises(ZooError) as e:
        load_zoo(tmp_path)
    _one_line(e.value, "manifest.json", needle)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"[1, 2]", b'{"heads": [1]}', ("[" * 5000).encode()])
def test_malformed_manifest_in_eval_task_all(tmp_path, raw):
    (tmp_path / "manifest.json").write_bytes(raw)
    with pytest.raises(ZooError) as e:
        zoo_tasks(tmp_path)
    _one_line(e.value, "manifest.json")
    line = _cli_error("eval", tmp_path / "nomodel", "--task", "all", "--zoo", tmp_path)
    assert "manifest.json" in line


# --- one more: a model whose safetensors file is saved by the reference writer ------------


def test_reference_files_still_read(tmp_path):
    save_file(
        {"a": torch.ones(2, 3), "b": torch.zeros(0, 5)},
        tmp_path / "ref.safetensors",
        metadata={"format": "pt"},
    )
    names, meta = read_safetensors_header(tmp_path / "ref.safetensors")
    assert {n: i.shape for n, i in names.items()} == {"a": (2, 3), "b": (0, 5)}
    assert meta == {"format": "pt"}


def test_error_lines_show_hostile_names_escaped(tmp_path):
    """Error messages quote tensor names from the inputs: an ESC in one reaches the
    terminal as the visible text \\x1b, never as a colour or title escape sequence."""
    evil = "evil\x1b[31m\x1b]0;pwned\x07.weight"
    save_state_dict({evil: torch.zeros(4, 4)}, tmp_path / "a", force=True)
    save_state_dict({evil: torch.zeros(3, 4)}, tmp_path / "b", force=True)
    line = _cli_error(
        "merge", _recipe(tmp_path, [tmp_path / "a", tmp_path / "b"]), tmp_path / "out"
    )
    assert "\x1b" not in line and "\x07" not in line
    assert "evil\\x1b[31m\\x1b]0;pwned\\x07.weight" in line
    assert not (tmp_path / "out").exists()


def test_zoo_tree_of_checkpoints_with_only_empty_tensors(tmp_path):
    for name in ("a", "b"):
        save_file({"w": torch.zeros(0, 5)}, str(tmp_path / f"{name}.safetensors"))
    db = str(tmp_path / "zoo.sqlite")
    assert run_cli("zoo", "scan", tmp_path, "--db", db, "-q")[0] == 0
    code, out, err = run_cli("zoo", "tree", "--db", db)
    assert code == 0, err
    assert "2 model(s) with no relative in the index" in out
