"""graft.io reading and writing: golden bytes, dtype round trips, sharding, safety."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

from graft.io import (
    GraftIOError,
    ShardedWriter,
    load_state_dict,
    open_checkpoint,
    parse_size,
    read_safetensors_header,
    recipe_hash,
    save_state_dict,
)

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and infs included) so the round trip is checked bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def write(out: Path, tensors: dict[str, torch.Tensor], **kw) -> list[Path]:
    entries = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    with ShardedWriter(out, entries, **kw) as w:
        for n, t in tensors.items():
            w.write(n, t)
    return sorted(out.iterdir())


# --- format -----------------------------------------------------------------------------


def test_golden_bytes_of_one_tensor(tmp_path):
    write(tmp_path, {"w": torch.tensor([1.0, 2.0])})
    header = (
        b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    )
    assert len(header) == 85  # padded with 3 spaces to 88 = 0x58
    expected = b"\x58" + b"\0" * 7 + header + b"   " + bytes.fromhex("0000803f00000040")
    assert (tmp_path / "model.safetensors").read_bytes() == expected


def test_same_bytes_as_safetensors_writer_when_order_agrees(tmp_path):
    # The reference writer orders by dtype alignment, then name; give it that order.
    tensors = {"a": random_tensor(torch.float32, (3, 5)), "b": random_tensor(torch.float32, (7,))}
    tensors["c"] = random_tensor(torch.bfloat16, (2, 3))
    write(tmp_path, tensors)
    ref = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, ref, metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), ()], ids=["3x5", "empty", "scalar"])
def test_round_trip_bit_exact(tmp_path, dtype, shape):
    tensors = {"x": random_tensor(dtype, shape), "y": random_tensor(dtype, (2,), seed=1)}
    write(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    for loaded in (safetensors.torch.load_file(path), load_state_dict(path)):
        for name, t in tensors.items():
            assert loaded[name].dtype == dtype and loaded[name].shape == t.shape
            assert bits(loaded[name]) == bits(t)
    with open_checkpoint(path) as ckpt:
        assert ckpt.names == ["x", "y"]
        assert bits(ckpt.get("x")) == bits(tensors["x"])
        assert ckpt.info("x").nbytes == torch.Size(shape).numel() * dtype.itemsize


def test_mixed_dtypes_are_laid_out_aligned(tmp_path):
    tensors = {
        "i8": random_tensor(torch.int8, (3,)),
        "f32": random_tensor(torch.float32, (2,)),
        "f16": random_tensor(torch.float16, (1,)),
    }
    write(tmp_path, tensors)
    infos, meta = read_safetensors_header(tmp_path / "model.safetensors")
    assert meta == {"format": "pt"}
    assert list(infos) == ["f32", "f16", "i8"]  # widest first: 8 + 2 + 3 bytes
    with open_checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            got = ckpt.get(name)
            assert got.data_ptr() % t.dtype.itemsize == 0
            assert bits(got) == bits(t)


def test_reads_unaligned_file_from_another_writer(tmp_path):
    # Hand-built: unpadded 63-byte header, so the F32 data starts at odd byte 71.
    header = b'{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[2],'
    header += b'"data_offsets":[1,9]}}'
    path = tmp_path / "odd.safetensors"
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    with open_checkpoint(path) as ckpt:
        assert ckpt.get("w").tolist() == [1.5, -2.0]
        assert ckpt.get("w").data_ptr() % 4 == 0
        assert ckpt.get("b").tolist() == [7]


@pytest.mark.parametrize(
    "mangle, why",
    [
        (lambda b: b[:-3], "ends at byte 104, past the end"),
        (lambda b: b + b"\0\0", "tensors cover 8 data bytes but the file has 10"),
        (lambda b: b[:-11], "header length 88 does not fit a 93-byte file"),
        (lambda b: b[:5], "too short"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length"),
        (lambda b: b[:8] + b"\xff" * 10 + b[18:], "not valid JSON"),
        (lambda b: b.replace(b'"F32"', b'"F33"'), "unknown dtype 'F33'"),
        (lambda b: b.replace(b"[0,8]", b"[0,9]"), "spans 9 bytes"),
    ],
    ids=[
        "truncated",
        "trailing",
        "truncated-header",
        "tiny",
        "huge-header",
        "garbage",
        "dtype",
        "offsets",
    ],
)
def test_corrupt_file_names_the_file(tmp_path, mangle, why):
    write(tmp_path, {"w": torch.tensor([1.0, 2.0])})
    path = tmp_path / "model.safetensors"
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(GraftIOError, match="corrupt or truncated safetensors file") as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and why in msg and "re-download or re-save it" in msg
    assert "\n" not in msg


# --- writer -----------------------------------------------------------------------------


def test_sharding_is_greedy_and_oversized_tensors_go_alone(tmp_path):
    # 40 + 40 fit in 80; 100 > 80 goes alone; then 30 + 20.
    sizes = {"a": 10, "b": 10, "c": 25, "d": 5, "e": 5}  # float32 elements
    tensors = {
        n: random_tensor(torch.float32, (k,), seed=i) for i, (n, k) in enumerate(sizes.items())
    }
    files = write(tmp_path, tensors, max_shard_bytes=80, metadata={"method": "test"})
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [f.name for f in files] == [*names, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 220}
    shard = dict(zip("abcde", [names[0], names[0], names[1], names[2], names[2]], strict=True))
    assert index["weight_map"] == shard
    for name, t in tensors.items():
        assert bits(safetensors.torch.load_file(tmp_path / shard[name])[name]) == bits(t)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names == list("abcde") and ckpt.root == tmp_path
        assert ckpt.metadata == {"method": "test", "format": "pt"}
        assert ckpt.total_bytes == 220 and ckpt.num_params == 55
        assert ckpt.info("c").file == tmp_path / names[1]
        assert all(bits(ckpt.get(n)) == bits(t) for n, t in tensors.items())


def test_threaded_shuffled_writes_match_serial(tmp_path):
    tensors = {f"t{i}": random_tensor(torch.bfloat16, (i % 7, 33), seed=i) for i in range(60)}
    (tmp_path / "serial").mkdir()
    write(tmp_path / "serial", tensors, max_shard_bytes=2000)
    out = tmp_path / "threaded"
    out.mkdir()
    order = list(tensors)
    random.Random(0).shuffle(order)
    entries = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    with ShardedWriter(out, entries, max_shard_bytes=2000) as w, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: w.write(n, tensors[n]), order))
    serial = sorted((tmp_path / "serial").iterdir())
    assert len(serial) > 3
    for f in serial:
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_writer_rejects_plan_violations(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.int64, (1,))]
    w = ShardedWriter(tmp_path, entries)
    with pytest.raises(ValueError, match="planned torch.float32"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"planned torch.float32 \(2,\)"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not in the output plan"):
        w.write("zzz", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"1 planned tensors were never written: \['b'\]"):
        w.finish()
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path / "x", [("a", torch.float32, (1,))] * 2)


def test_writer_converts_noncontiguous_and_grad_tensors(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t().requires_grad_()
    write(tmp_path, {"t": t})
    assert torch.equal(load_state_dict(tmp_path)["t"], t.detach())


def test_writer_fails_early_without_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "graft.io._writer.shutil.disk_usage", lambda p: type("U", (), {"free": 10})()
    )
    with pytest.raises(GraftIOError, match="no space left on device for .* needs"):
        ShardedWriter(tmp_path, [("a", torch.float32, (100,))])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kb", 1500), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5XB", "", "-1GB", "GB", 0])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_recipe_hash_is_sha256_prefix():
    assert recipe_hash("abc") == "ba7816bf8f01cfea"  # FIPS 180-2 test vector


# --- reader -----------------------------------------------------------------------------


def test_get_is_a_private_view_and_survives_close(tmp_path):
    write(tmp_path, {"w": torch.tensor([1.0, 2.0])})
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.root is None and ckpt.config is None
    view = ckpt.get("w")
    view.mul_(10)  # callers must not, but if they do, the file is untouched
    assert (tmp_path / "model.safetensors").read_bytes() == before
    ckpt.close()
    assert view.tolist() == [10.0, 20.0]
    with pytest.raises(GraftIOError, match="is closed"):
        ckpt.get("w")


def test_concurrent_gets_agree(tmp_path):
    tensors = {f"t{i}": random_tensor(torch.float16, (64, 9), seed=i) for i in range(40)}
    write(tmp_path, tensors, max_shard_bytes=5000)
    with open_checkpoint(tmp_path) as ckpt, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda n: (n, bits(ckpt.get(n).to(torch.float32))), list(tensors) * 3))
    assert all(b == bits(tensors[n].to(torch.float32)) for n, b in got)


def test_lookup_errors_name_the_thing(tmp_path):
    save_state_dict({"w": torch.ones(1)}, tmp_path / "m", config={"model_type": "x"})
    with open_checkpoint(tmp_path / "m") as ckpt:
        assert ckpt.config == {"model_type": "x"} and "w" in ckpt and len(ckpt) == 1
        with pytest.raises(
            GraftIOError, match=re.escape(f"tensor 'nope' is not in checkpoint {tmp_path / 'm'}")
        ):
            ckpt.get("nope")
    with pytest.raises(
        GraftIOError, match=re.escape(f"no such file or directory: {tmp_path / 'zz'}")
    ):
        open_checkpoint(tmp_path / "zz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftIOError, match="no checkpoint in .*expected model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(GraftIOError, match="found weights.safetensors: pass one of those"):
        open_checkpoint(tmp_path / "empty")


def test_peft_adapter_dir_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    write(tmp_path, {"w": torch.ones(1)}, filename="adapter_model.safetensors")
    with pytest.raises(GraftIOError, match="is a PEFT adapter"):
        open_checkpoint(tmp_path)


def test_index_with_missing_shard(tmp_path):
    write(tmp_path, {"a": torch.ones(4), "b": torch.ones(4)}, max_shard_bytes=16)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GraftIOError, match="shard model-00002-of-00002.safetensors listed in"):
        open_checkpoint(tmp_path)


# --- torch pickles ------------------------------------------------------------------------


def test_torch_files_read_weights_only(tmp_path):
    sd = {"w": random_tensor(torch.bfloat16, (4, 3)), "step": torch.tensor(7)}
    torch.save(sd, tmp_path / "weights.pt")
    (tmp_path / "hf").mkdir()
    torch.save({"a": sd["w"]}, tmp_path / "hf" / "pytorch_model-1.bin")
    torch.save({"b": sd["step"]}, tmp_path / "hf" / "pytorch_model-2.bin")
    index = {"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}}
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path / "weights.pt") as ckpt:
        assert ckpt.names == ["w", "step"] and ckpt.info("w").nbytes == 24
        assert bits(ckpt.get("w")) == bits(sd["w"]) and ckpt.get("step").item() == 7
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert ckpt.names == ["a", "b"] and ckpt.root == tmp_path / "hf"
        assert ckpt.info("b").file == tmp_path / "hf" / "pytorch_model-2.bin"
        assert bits(ckpt.get("a")) == bits(sd["w"])


class _Exploit:
    sentinel = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_never_runs(tmp_path, container):
    sentinel = tmp_path / "SENTINEL"
    _Exploit.sentinel = str(sentinel)
    path = tmp_path / "pytorch_model.bin"
    if container == "torch-zip":
        torch.save({"w": torch.ones(1), "x": _Exploit()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(GraftIOError, match=re.escape(f"refusing to load {path}")):
        open_checkpoint(tmp_path)
    assert not sentinel.exists()


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(GraftIOError, match="not a flat state dict .*save model.state_dict"):
        open_checkpoint(tmp_path / "ckpt.pth")
