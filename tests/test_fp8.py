"""FP8 checkpoints: dequantized as read (block, per-channel and per-tensor scales, ragged
edge blocks), merged with ordinary models, and written back as block-scaled FP8.

Checkpoints are built here from tiny random Llamas with hand-made scales and written with
the safetensors library itself; expected values come from an element-by-element numpy
reference of ``w[i, j] = q[i, j] * scale[i // bm, j // bn]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from conftest import run_cli
from graft.io import (
    GraftIOError,
    dequantize_fp8,
    fp8_scale_shape,
    load_state_dict,
    open_checkpoint,
    quantize_fp8,
)

transformers = pytest.importorskip("transformers")

FP8 = torch.float8_e4m3fn


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block) -> np.ndarray:
    """Element by element, in float32: ``q[i, j] * scale[i // bm, j // bn]``."""
    qf = q.float().numpy()
    s = scale.float().numpy()
    out = np.empty(qf.shape, dtype=np.float32)
    rows, cols = qf.shape
    for i in range(rows):
        for j in range(cols):
            if s.size == 1:
                sij = s.reshape(())
            elif block is None:  # per output channel
                sij = s.reshape(-1)[i]
            else:
                sij = s[i // block[0], j // block[1]]
            out[i, j] = np.float32(qf[i, j]) * np.float32(sij)
    return out


def _llama(path: Path, *, hidden: int, inter: int, seed: int, like: Path | None = None) -> Path:
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if like is not None:
        model = transformers.LlamaForCausalLM.from_pretrained(like)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.01)
    else:
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _hand_quantized(src: Path, dst: Path, *, block, kind: str = "block", seed: int = 0):
    """Write ``src`` as FP8: every 2-D block weight becomes random-rounded float8 values
    with hand-made scales (powers of two times a random mantissa), not graft's quantizer.
    Returns the stored (q, scale) pairs by weight name."""
    g = torch.Generator().manual_seed(seed)
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    out, pairs = {}, {}
    for name, t in tensors.items():
        if t.dim() != 2 or ".layers." not in name:
            out[name] = t
            continue
        rows, cols = t.shape
        if kind == "block":
            grid = fp8_scale_shape(t.shape, block)
        elif kind == "channel":
            grid = (rows, 1)
        else:
            grid = ()
        scale = torch.exp2(torch.randint(-9, -5, grid, generator=g).float())
        scale = scale * (1 + torch.rand(grid, generator=g))
        q = (torch.randn(t.shape, generator=g) * 100).clamp(-448, 448).to(FP8)
        out[name], out[name + "_scale_inv"] = q, scale
        pairs[name] = (q, scale)
    dst.mkdir()
    safetensors.torch.save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block) if kind == "block" else None,
    }
    (dst / "config.json").write_text(json.dumps(config))
    return pairs


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """hidden 160, intermediate 200: every weight has ragged edge blocks at 128×128."""
    root = tmp_path_factory.mktemp("fp8")
    base = _llama(root / "bf16", hidden=160, inter=200, seed=0)
    other = _llama(root / "other", hidden=160, inter=200, seed=1, like=base)
    pairs = _hand_quantized(base, root / "fp8", block=(128, 128))
    return root, pairs, other


# --- dequantization ------------------------------------------------------------------


def test_block_scales_dequantize_by_value_with_ragged_edges(ragged):
    root, pairs, _ = ragged
    with open_checkpoint(root / "fp8") as ckpt:
        assert not any(n.endswith("_scale_inv") for n in ckpt.names)  # consumed, not listed
        assert ckpt.quantization.method == "fp8" and ckpt.quantization.block == (128, 128)
        assert ckpt.quantization.formats == {"float8_e4m3fn 128x128 blocks": 14}
        for name, (q, scale) in pairs.items():
            assert ckpt.info(name).dtype == torch.bfloat16
            want = torch.from_numpy(reference_dequant(q, scale, (128, 128))).to(torch.bfloat16)
            got = ckpt.get(name)
            assert torch.equal(got, want), name
        # A norm is read as stored.
        norm = "model.layers.0.input_layernorm.weight"
        stored = safetensors.torch.load_file(root / "fp8" / "model.safetensors")[norm]
        assert torch.equal(ckpt.get(norm), stored)
        # The dequantized model's config is a plain bf16 one.
        assert "quantization_config" not in ckpt.config
        assert ckpt.config["torch_dtype"] == "bfloat16"


def test_one_ragged_block_by_hand():
    # 3x5 weight, 2x2 blocks: scale grid 2x3; the last row and last column are ragged.
    q = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]).to(FP8)
    s = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    want = torch.tensor(
        [
            [1, 2, 6, 8, 20],
            [6, 7, 16, 18, 40],
            [88, 96, 208, 224, 480],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(dequantize_fp8(q, s, (2, 2)), want)


@pytest.mark.parametrize("kind", ["channel", "tensor"])
def test_per_channel_and_per_tensor_scales(tmp_path, kind):
    base = _llama(tmp_path / "bf16", hidden=48, inter=80, seed=0)
    pairs = _hand_quantized(base, tmp_path / "fp8", block=None, kind=kind)
    with open_checkpoint(tmp_path / "fp8") as ckpt:
        label = {"channel": "per-channel", "tensor": "per-tensor"}[kind]
        assert ckpt.quantization.formats == {f"float8_e4m3fn {label}": 14}
        for name, (q, scale) in pairs.items():
            want = torch.from_numpy(reference_dequant(q, scale, None)).to(torch.bfloat16)
            assert torch.equal(ckpt.get(name), want), name


def test_small_blocks_from_the_config(tmp_path):
    base = _llama(tmp_path / "bf16", hidden=48, inter=80, seed=0)
    pairs = _hand_quantized(base, tmp_path / "fp8", block=(16, 32))
    with open_checkpoint(tmp_path / "fp8") as ckpt:
        name = "model.layers.1.mlp.down_proj.weight"  # 48 x 80: 3 x 3 blocks, ragged columns
        q, scale = pairs[name]
        assert scale.shape == (3, 3)
        want = torch.from_numpy(reference_dequant(q, scale, (16, 32))).to(torch.bfloat16)
        assert torch.equal(ckpt.get(name), want)


def test_scale_of_the_wrong_shape_is_refused(tmp_path):
    base = _llama(tmp_path / "bf16", hidden=48, inter=80, seed=0)
    _hand_quantized(base, tmp_path / "fp8", block=(16, 32))
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        GraftIOError,
        match=r"has scale .*_scale_inv of shape \(3, 3\).*per 128x128 block, a \(1, 1\) grid.*weight_block_size",
    ):
        open_checkpoint(tmp_path / "fp8")


@pytest.mark.parametrize(
    "method,what",
    [
        ("bitsandbytes", "bitsandbytes 4/8-bit"),
        ("awq", "AWQ"),
        ("gptq", "GPTQ"),
    ],
)
def test_other_quantized_folders_get_one_line(tmp_path, method, what):
    base = _llama(tmp_path / "m", hidden=32, inter=64, seed=0)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraftIOError) as e:
        open_checkpoint(base)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "FP8 safetensors" in msg and "GGUF" in msg


# --- requantization ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,block", [((300, 200), (128, 128)), ((7, 5), (2, 3)), ((2, 64, 48), (32, 32))]
)
def test_quantize_round_trip_is_within_e4m3_rounding(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])
    w[..., :2, :3] = 0  # an all-zero corner: its scale must stay finite
    q, s = quantize_fp8(w, block)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert s.shape == fp8_scale_shape(shape, block)
    back = dequantize_fp8(q, s, block)
    rows = s.repeat_interleave(block[0], -2)[..., : shape[-2], :]
    per_elem = rows.repeat_interleave(block[1], -1)[..., : shape[-1]]
    # e4m3: 3 mantissa bits (relative 2^-4 at round-to-nearest), subnormal step 2^-9.
    bound = (w.abs() * 2**-4 + per_elem * 2**-10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    # Each block's largest magnitude lands on e4m3's largest value, 448.
    amax = q.float().abs().amax()
    assert amax == 448


# --- merging -------------------------------------------------------------------------


def _recipe(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _fp8_output_recipe(tmp_path: Path, root: Path, other: Path) -> Path:
    """Half the FP8 model and half the bf16 one, written back as FP8 with block scales."""
    return _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "out_dtype": "float8_e4m3fn",
            "models": [
                {"model": str(root / "fp8"), "parameters": {"weight": 0.5}},
                {"model": str(other), "parameters": {"weight": 0.5}},
            ],
        },
    )


def test_linear_merge_of_fp8_with_bf16_model(ragged, tmp_path):
    root, pairs, other = ragged
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(root / "fp8"), "parameters": {"weight": 0.5}},
                {"model": str(other), "parameters": {"weight": 0.5}},
            ],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    merged = load_state_dict(tmp_path / "out")
    theirs = load_state_dict(other)
    assert not any(n.endswith("_scale_inv") for n in merged)
    for name, (q, scale) in pairs.items():
        ours = torch.from_numpy(reference_dequant(q, scale, (128, 128))).to(torch.bfloat16)
        want = 0.5 * ours.float() + 0.5 * theirs[name].float()
        assert merged[name].dtype == torch.bfloat16
        assert torch.allclose(merged[name].float(), want, rtol=2**-8, atol=0), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_fp8_output_requantizes_with_fresh_block_scales(ragged, tmp_path):
    root, pairs, other = ragged
    recipe = _fp8_output_recipe(tmp_path, root, other)
    code, _, err = run_cli("merge", recipe, tmp_path / "fp8-out", "-q")
    assert code == 0, err
    code, _, err = run_cli(
        "merge",
        _recipe(tmp_path, {**yaml.safe_load(recipe.read_text()), "out_dtype": "bfloat16"}),
        tmp_path / "bf16-out",
        "-q",
    )
    assert code == 0, err
    raw = safetensors.torch.load_file(tmp_path / "fp8-out" / "model.safetensors")
    exact = load_state_dict(tmp_path / "bf16-out")
    for name in pairs:
        q, s = raw[name], raw[name + "_scale_inv"]
        assert q.dtype == FP8 and s.dtype == torch.float32
        assert s.shape == fp8_scale_shape(q.shape, (128, 128))
        back = torch.from_numpy(reference_dequant(q, s, (128, 128)))
        w = exact[name].float()
        per_elem = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[
            :, : q.shape[1]
        ]
        # e4m3 rounding of the float32 merge, plus the bf16 rounding of the reference.
        bound = w.abs() * (2**-4 + 2**-8) + per_elem * 2**-10
        assert ((back - w).abs() <= bound).all(), name
    # Norms, embeddings and head stay bf16; nothing else is FP8.
    fp8_names = {n for n, t in raw.items() if t.dtype == FP8}
    assert fp8_names == set(pairs)
    assert raw["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "fp8-out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert config["torch_dtype"] == "bfloat16"
    # graft reads its own FP8 output back dequantized, to the reference's values.
    with open_checkpoint(tmp_path / "fp8-out") as ckpt:
        name = "model.layers.1.mlp.down_proj.weight"
        want = torch.from_numpy(reference_dequant(raw[name], raw[name + "_scale_inv"], (128, 128)))
        assert torch.equal(ckpt.get(name), want.to(torch.bfloat16))


def test_fp8_output_of_bf16_models_loads_in_transformers(tmp_path):
    """Dims that are multiples of 128: transformers' CPU loader dequantizes FP8 by
    dividing each dim by the scale grid, which is right only without ragged blocks."""
    pytest.importorskip("accelerate")
    a = _llama(tmp_path / "a", hidden=256, inter=384, seed=0)
    b = _llama(tmp_path / "b", hidden=256, inter=384, seed=1, like=a)
    recipe = _recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "out_dtype": "float8_e4m3fn",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": str(b), "parameters": {"weight": 0.5}},
            ],
        },
    )
    code, _, err = run_cli("merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    raw = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == FP8
    assert raw["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    loaded = model.state_dict()
    with open_checkpoint(tmp_path / "out") as ckpt:
        for name in ckpt.names:
            assert torch.equal(loaded[name], ckpt.get(name).to(loaded[name].dtype)), name
    code, _, err = run_cli(
        "merge",
        _recipe(tmp_path, {**yaml.safe_load(recipe.read_text()), "out_dtype": "bfloat16"}),
        tmp_path / "bf16-out",
        "-q",
    )
    assert code == 0, err
    exact = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16-out")
    ids = torch.arange(16)[None] % 96
    with torch.no_grad():
        got, want = model(ids).logits.float(), exact(ids).logits.float()
    # FP8 noise (about 2^-5 of each weight) moves the logits a little, not a lot.
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.1


def test_fp8_output_split_by_shards_gives_the_same_bytes(ragged, tmp_path):
    """A distributed merge writes each shard alone (`write_shards`); a weight and its
    scale may fall in different shards, and each shard still matches the whole output."""
    from graft.plan import plan_merge, run_plan, write_shards
    from graft.recipe import load_recipe

    root, _, other = ragged
    recipe = _fp8_output_recipe(tmp_path, root, other)
    plan = plan_merge(load_recipe(recipe))
    try:
        run_plan(plan, tmp_path / "whole", max_shard_bytes=30_000, threads=2)
        shards = sorted((tmp_path / "whole").glob("model-*.safetensors"))
        assert len(shards) > 3
        index = json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())
        split = [
            n
            for n in index["weight_map"]
            if n.endswith("_scale_inv")
            and index["weight_map"][n] != index["weight_map"][n[: -len("_scale_inv")]]
        ]
        assert split  # the case this test is about
        for i, shard in enumerate(shards):
            part = tmp_path / f"part{i}"
            part.mkdir()
            write_shards(plan, part, shards=[i], threads=2, max_shard_bytes=30_000)
            assert (part / shard.name).read_bytes() == shard.read_bytes(), shard.name
    finally:
        plan.close()
