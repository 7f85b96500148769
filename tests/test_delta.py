"""Deltas: diff/apply round trips, transfer, compressors (hand-computed values and
invariants over every registered compressor), bit packing, and bad input via the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import graft.cli.app as cli_app
from conftest import run_cli
from graft.cli import delta_cmds
from graft.delta import COMPRESSORS, get_compressor, open_delta, passes
from graft.delta._bits import pack_bits, unpack_bits
from graft.delta.compeft import compeft
from graft.delta.lowrank import truncated_svd
from graft.io import load_state_dict, save_state_dict

DELTA_COMMANDS = {
    "diff": delta_cmds.diff,
    "apply": delta_cmds.apply,
    "transfer": delta_cmds.transfer,
    "compress": delta_cmds.compress,
    "extract-lora": delta_cmds.extract_lora,
    "merge-lora": delta_cmds.merge_lora,
}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Register the delta commands on the CLI if cli/app.py does not (yet)."""
    have = {c.name for c in cli_app.app.registered_commands}
    added = []
    for name, fn in DELTA_COMMANDS.items():
        if name not in have:
            cli_app.app.command(name)(fn)
            added.append(cli_app.app.registered_commands[-1])
    yield
    for cmd in added:
        cli_app.app.registered_commands.remove(cmd)


def _model(seed: int, *, rows: int = 10, dtype=torch.float32, like=None, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    if like is None:
        sd = {
            "model.embed_tokens.weight": torch.randn(rows, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
            "model.layers.1.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
            "model.norm.weight": torch.ones(8),
            "model.position_ids": torch.arange(6),
        }
    else:
        sd = {
            k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in like.items()
        }
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture
def pair(tmp_path):
    base = _model(0)
    ft = _model(1, like=base)
    save_state_dict(base, tmp_path / "base", config={"num_hidden_layers": 2})
    save_state_dict(ft, tmp_path / "ft", config={"num_hidden_layers": 2})
    return tmp_path / "base", tmp_path / "ft", base, ft


# --- bits ------------------------------------------------------------------------------


def test_pack_bits_golden_bytes():
    bits = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b10100000, 0b10000000]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_pack_bits_round_trips_on_odd_sizes(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), bits)


# --- diff / apply / transfer ------------------------------------------------------------


def test_diff_then_apply_reproduces_the_finetune_exactly_in_fp32(pair, tmp_path):
    base_p, ft_p, _, ft = pair
    code, _, err = run_cli("diff", ft_p, base_p, "-o", tmp_path / "d.safetensors", "-q")
    assert code == 0, err
    delta = open_delta(tmp_path / "d.safetensors")
    assert delta.method == "dense"
    assert delta.metadata["graft_dtype"] == "float32"  # of the float tensors; ids are int64
    assert len(delta.base_fingerprint) == 32
    assert delta.layout["model.position_ids"].codec == "replace"
    delta.close()
    code, _, err = run_cli(
        "apply", base_p, tmp_path / "d.safetensors", "-o", tmp_path / "out", "-q"
    )
    assert code == 0, err
    out = load_state_dict(tmp_path / "out")
    assert out.keys() == ft.keys()
    for k in ft:
        assert torch.equal(out[k], ft[k]), k
    assert (tmp_path / "out" / "config.json").is_file()


def test_diff_then_apply_in_bfloat16_is_within_dtype_rounding(tmp_path):
    base = _model(0, dtype=torch.bfloat16)
    ft = _model(1, like=base, dtype=torch.bfloat16)
    save_state_dict(base, tmp_path / "base")
    save_state_dict(ft, tmp_path / "ft")
    passes.diff(tmp_path / "ft", tmp_path / "base", tmp_path / "d.safetensors")
    passes.apply(tmp_path / "base", [tmp_path / "d.safetensors"], tmp_path / "out")
    out = load_state_dict(tmp_path / "out")
    eps = torch.finfo(torch.bfloat16).eps
    for k, v in ft.items():
        if v.is_floating_point():
            # two roundings: the bf16 delta (relative to |delta|), then the bf16 sum
            delta = v.float() - base[k].float()
            bound = eps * (v.float().abs() + delta.abs())
            assert ((out[k].float() - v.float()).abs() <= bound).all(), k
            assert (out[k] != v).float().mean() < 0.5, k


def test_apply_adds_several_deltas_with_scales_and_layer_gradients(pair, tmp_path):
    base_p, ft_p, base, ft = pair
    passes.diff(ft_p, base_p, tmp_path / "d.safetensors")
    passes.apply(
        base_p, [tmp_path / "d.safetensors"] * 2, tmp_path / "out", scales=[0.5, [0.0, 1.0]]
    )
    out = load_state_dict(tmp_path / "out")
    for name, t in (
        ("model.layers.0.mlp.up_proj.weight", 0.0),
        ("model.layers.1.mlp.up_proj.weight", 1.0),
    ):
        d = ft[name] - base[name]
        assert torch.allclose(out[name], base[name] + 0.5 * d + t * d, atol=1e-6)
    # embeddings sit outside the blocks: the gradient is read at t = 0
    d = ft["model.embed_tokens.weight"] - base["model.embed_tokens.weight"]
    assert torch.allclose(
        out["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + 0.5 * d
    )


def test_transfer_onto_the_same_base_equals_apply(pair, tmp_path):
    base_p, ft_p, *_ = pair
    passes.diff(ft_p, base_p, tmp_path / "d.safetensors")
    passes.apply(base_p, [tmp_path / "d.safetensors"], tmp_path / "applied", scales=[0.7])
    code, _, err = run_cli(
        "transfer",
        "--from-base",
        base_p,
        "--from-ft",
        ft_p,
        "--onto",
        base_p,
        "--scale",
        "0.7",
        "-o",
        tmp_path / "moved",
        "-q",
    )
    assert code == 0, err
    a, b = load_state_dict(tmp_path / "applied"), load_state_dict(tmp_path / "moved")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transfer_over_overlapping_rows_when_the_vocabulary_grew(pair, tmp_path):
    base_p, ft_p, base, ft = pair
    v2 = _model(5, like=base, noise=0.01)
    v2["model.embed_tokens.weight"] = torch.cat([v2["model.embed_tokens.weight"], torch.ones(3, 8)])
    save_state_dict(v2, tmp_path / "v2")
    code, out, err = run_cli(
        "transfer",
        "--from-base",
        base_p,
        "--from-ft",
        ft_p,
        "--onto",
        tmp_path / "v2",
        "-o",
        tmp_path / "moved",
        "-q",
    )
    assert code == 0, err
    assert "overlapping rows only: model.embed_tokens.weight" in out
    got = load_state_dict(tmp_path / "moved")["model.embed_tokens.weight"]
    d = ft["model.embed_tokens.weight"] - base["model.embed_tokens.weight"]
    assert torch.allclose(got[:10], v2["model.embed_tokens.weight"][:10] + d)
    assert torch.equal(got[10:], torch.ones(3, 8))


# --- compressors -----------------------------------------------------------------------


def test_compeft_hand_computed():
    delta = torch.tensor([0.5, -2.0, 0.1, 3.0])
    codec, parts = compeft(delta, value_dtype=torch.float32, density=0.5, alpha=2.0)
    assert codec == "ternary"
    sigma = delta.std(correction=0)
    from graft.delta.codecs import decode

    got = decode(codec, parts, (4,))
    assert torch.allclose(got, torch.tensor([0.0, -1.0, 0.0, 1.0]) * 2 * sigma)
    assert parts["mask"].tolist() == [0b01010000] and parts["sign"].tolist() == [0b01000000]


@pytest.mark.parametrize(
    "method,params",
    [("compeft", {"density": 1.0, "quantize": False}), ("dare", {"density": 1.0, "seed": 3}),
     ("nonzero", {})],
)  # fmt: skip
def test_density_one_without_quantization_is_lossless(pair, tmp_path, method, params):
    base_p, ft_p, _, ft = pair
    passes.diff(ft_p, base_p, tmp_path / "d.safetensors")
    passes.compress(
        tmp_path / "d.safetensors",
        tmp_path / "p.safetensors",
        method=get_compressor(method),
        params=params,
    )
    passes.apply(base_p, [tmp_path / "p.safetensors"], tmp_path / "out")
    out = load_state_dict(tmp_path / "out")
    assert all(torch.equal(out[k], ft[k]) for k in ft)


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_every_compressor_round_trips_through_apply_and_is_deterministic(pair, tmp_path, method):
    base_p, ft_p, base, ft = pair
    passes.diff(ft_p, base_p, tmp_path / "d.safetensors")
    params = {"rank": 4} if method == "lowrank" else {} if method == "nonzero" else {"density": 0.5}
    for name in ("p1", "p2"):
        passes.compress(
            tmp_path / "d.safetensors",
            tmp_path / f"{name}.safetensors",
            method=get_compressor(method),
            params=params,
            threads=2,
        )
    assert (tmp_path / "p1.safetensors").read_bytes() == (tmp_path / "p2.safetensors").read_bytes()
    passes.apply(base_p, [tmp_path / "p1.safetensors"], tmp_path / "out")
    out = load_state_dict(tmp_path / "out")
    assert torch.equal(out["model.position_ids"], ft["model.position_ids"])
    for k in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        err = (out[k] - ft[k]).norm() / (ft[k] - base[k]).norm()
        assert 0 <= err < (1.01 if method != "dare" else 1.5), (k, err)


def test_nonzero_patch_stores_only_the_changed_entries():
    from graft.delta.codecs import decode
    from graft.delta.nonzero import nonzero

    delta = torch.tensor([0.0, 1.5, -0.0, -2.0, 0.0, 0.25])
    codec, parts = nonzero(delta, value_dtype=torch.float32)
    assert codec == "sparse" and parts["values"].tolist() == [1.5, -2.0, 0.25]
    assert parts["mask"].tolist() == [0b01010100]
    assert torch.equal(decode(codec, parts, (6,)), delta.abs() * delta.sign())


def test_compeft_patch_is_really_bits_on_disk(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(1000, 1000)}
    save_state_dict(base, tmp_path / "base")
    save_state_dict({"w": torch.randn(1000, 1000, generator=g)}, tmp_path / "ft")
    passes.diff(tmp_path / "ft", tmp_path / "base", tmp_path / "d.safetensors")
    r = passes.compress(
        tmp_path / "d.safetensors",
        tmp_path / "p.safetensors",
        method=get_compressor("compeft"),
        params={"density": 0.1},
    )
    # mask: 1e6 bits, signs: 1e5 bits, scale: 4 bytes (+ header)
    assert 137_504 <= r.bytes_on_disk < 139_000
    assert r.bytes_before > 4_000_000 and r.ratio > 28


def test_dare_rescales_exactly_and_is_seeded():
    delta = torch.ones(10_000)
    spec = get_compressor("dare")
    from graft.delta.codecs import decode

    outs = []
    for seed in (1, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        codec, parts = spec.encode(delta, value_dtype=torch.float32, generator=gen, density=0.25)
        outs.append(decode(codec, parts, (10_000,)))
    assert set(outs[0].unique().tolist()) == {0.0, 4.0}
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert abs(outs[0].mean().item() - 1.0) < 0.1


def test_truncated_svd_matches_full_svd_and_randomized_path():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 30, generator=g)
    u, s, vh = truncated_svd(a, rank=5)
    ref = torch.linalg.svd(a, full_matrices=False)
    assert torch.allclose((u * s) @ vh, (ref.U[:, :5] * ref.S[:5]) @ ref.Vh[:5], atol=1e-4)
    # a 600 x 400 matrix of rank 6 plus noise takes the randomized path and is recovered
    low = torch.randn(600, 6, generator=g) @ torch.randn(6, 400, generator=g)
    big = low + 1e-3 * torch.randn(600, 400, generator=g)
    u, s, vh = truncated_svd(big, rank=6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose((u * s) @ vh, low, atol=1e-2)
    _, s, _ = truncated_svd(big, energy=0.999, generator=torch.Generator().manual_seed(1))
    assert s.numel() == 6


# --- bad input -------------------------------------------------------------------------


def _fails(out, *args, contains: str):
    code, _, err = run_cli(*args, "-q")
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert contains in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "graft-" in p.name]


def test_bad_inputs_fail_in_one_line_and_write_nothing(pair, tmp_path):
    base_p, ft_p, base, _ = pair
    d = tmp_path / "d.safetensors"
    passes.diff(ft_p, base_p, d)
    other = _model(9, like=base)
    save_state_dict(other, tmp_path / "other")
    out = tmp_path / "out"
    _fails(out, "apply", tmp_path / "other", d, "-o", out, contains="--force-base")
    code, _, err = run_cli("apply", tmp_path / "other", d, "-o", out, "--force-base", "-q")
    assert code == 0 and "warning:" in err and out.exists()

    wide = dict(base, **{"model.norm.weight": torch.ones(9)})
    save_state_dict(wide, tmp_path / "wide")
    _fails(
        tmp_path / "x",
        "diff",
        tmp_path / "wide",
        base_p,
        "-o",
        tmp_path / "x",
        contains="shape mismatch for model.norm.weight",
    )
    _fails(
        tmp_path / "p",
        "compress",
        d,
        "--method",
        "zip",
        "-o",
        tmp_path / "p",
        contains="valid: compeft, dare, lowrank",
    )
    _fails(
        tmp_path / "p",
        "compress",
        d,
        "--method",
        "compeft",
        "--rank",
        "2",
        "-o",
        tmp_path / "p",
        contains="compeft takes no parameter 'rank'",
    )

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(d.read_bytes()[:-10])
    _fails(tmp_path / "o2", "apply", base_p, truncated, "-o", tmp_path / "o2", contains="truncated")
    passes.compress(d, tmp_path / "c.safetensors", method=get_compressor("compeft"), params={})
    raw = bytearray((tmp_path / "c.safetensors").read_bytes())
    i = raw.find(b"ternary")  # inside the graft_layout metadata; same length keeps the file valid
    assert i > 0
    raw[i : i + 7] = b"lowrank"
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    _fails(
        tmp_path / "o3",
        "apply",
        base_p,
        tmp_path / "bad.safetensors",
        "-o",
        tmp_path / "o3",
        contains="corrupt patch",
    )


def test_cli_compress_reports_bytes_and_ratio(pair, tmp_path):
    base_p, ft_p, *_ = pair
    passes.diff(ft_p, base_p, tmp_path / "d.safetensors")
    code, out, err = run_cli(
        "compress",
        tmp_path / "d.safetensors",
        "-m",
        "compeft",
        "--density",
        "0.2",
        "-o",
        tmp_path / "p.safetensors",
        "--json",
        "-q",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bytes_on_disk"] == (tmp_path / "p.safetensors").stat().st_size
    assert doc["ratio"] == pytest.approx(doc["dense_delta_bytes"] / doc["bytes_on_disk"], rel=1e-3)


def test_end_to_end_on_a_transformers_model(hf_family, tmp_path):
    transformers = pytest.importorskip("transformers")
    fam, _ = hf_family
    base, ft, _ = fam["gpt2"]
    d, p = tmp_path / "d.safetensors", tmp_path / "p.safetensors"
    assert run_cli("diff", ft, base, "-o", d, "-q")[0] == 0
    assert (
        run_cli("compress", d, "-m", "compeft", "--density", "1", "--no-quantize", "-o", p, "-q")[0]
        == 0
    )
    code, _, err = run_cli("apply", base, p, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    ids = torch.arange(10).unsqueeze(0)
    want = transformers.GPT2LMHeadModel.from_pretrained(ft).eval()
    got = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model_relation: finetune" in card


def test_cli_extract_and_merge_lora(hf_family, tmp_path):
    fam, _ = hf_family
    base, ft1, ft2 = fam["llama"]
    code, out, err = run_cli("extract-lora", ft1, base, "--rank", "2", "-o", tmp_path / "a1", "-q")
    assert code == 0, err
    assert "rank 2" in out and "not in it" in out
    assert run_cli("extract-lora", ft2, base, "-r", "2", "-o", tmp_path / "a2", "-q")[0] == 0
    code, _, err = run_cli(
        "merge-lora",
        tmp_path / "a1",
        tmp_path / "a2",
        "--weight",
        "0.5",
        "--weight",
        "0.5",
        "--rank",
        "3",
        "-o",
        tmp_path / "m",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3
    _fails(
        tmp_path / "big",
        "extract-lora",
        ft1,
        base,
        "--rank",
        "999",
        "-o",
        tmp_path / "big",
        contains="--rank 999 is larger than every target tensor allows",
    )


def test_compeft_patch_applies_the_hand_computed_ternary_delta(tmp_path):
    # Through the files (diff, compress, apply), not just the encoder: an all-zero patch
    # (scale 0 anywhere on the way) would leave the base unchanged, relative error 1.
    base = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": torch.tensor([0.0, 0.0, 0.0, 0.0])}
    ft = {"w": torch.tensor([[4.0, -2.0], [1.1, 0.9]]), "b": torch.tensor([0.0, 0.5, 0.0, -1.0])}
    save_state_dict(base, tmp_path / "base")
    save_state_dict(ft, tmp_path / "ft")
    passes.diff(tmp_path / "ft", tmp_path / "base", tmp_path / "d.safetensors")
    passes.compress(
        tmp_path / "d.safetensors",
        tmp_path / "p.safetensors",
        method=get_compressor("compeft"),
        params={"density": 0.5, "alpha": 1.0},
    )
    passes.apply(tmp_path / "base", [tmp_path / "p.safetensors"], tmp_path / "out")
    out = load_state_dict(tmp_path / "out")
    # w: delta (3, -3, 0.1, -0.1); top 2 of 4 by |.| are 3 and -3; sigma is the population
    # std of the dense delta: mean 0, sqrt((9 + 9 + 0.01 + 0.01) / 4).
    s_w = math.sqrt(18.02 / 4)
    torch.testing.assert_close(out["w"], torch.tensor([[1 + s_w, 1 - s_w], [1.0, 1.0]]))
    # b: delta (0, 0.5, 0, -1), mean -0.125; top 2 are -1 and 0.5.
    s_b = math.sqrt(((0.125**2) * 2 + 0.625**2 + 0.875**2) / 4)
    torch.testing.assert_close(out["b"], torch.tensor([0.0, s_b, 0.0, -s_b]))
    err = (out["w"] - ft["w"]).norm() / (ft["w"] - base["w"]).norm()
    assert err < 0.3  # sqrt(2·(3 - 2.1225)² + 0.02) / sqrt(18.02) = 0.294


def test_compeft_never_keeps_an_exact_zero_and_always_keeps_one_entry():
    from graft.delta.codecs import decode

    # density 0.75 asks for 3 of 4 entries, but zeros have no sign: only the 1 is kept.
    delta = torch.tensor([0.0, 0.0, 1.0, 0.0])
    codec, parts = compeft(delta, value_dtype=torch.float32, density=0.75)
    assert parts["mask"].tolist() == [0b00100000] and parts["sign"].tolist() == [0b10000000]
    sigma = math.sqrt(3 / 16)  # population std of (0, 0, 1, 0): mean 1/4
    torch.testing.assert_close(decode(codec, parts, (4,)), torch.tensor([0.0, 0.0, sigma, 0.0]))
    # density 0.01 of 4 entries rounds to 0: at least one (the largest |.|, -3) is kept.
    codec, parts = compeft(
        torch.tensor([0.5, -3.0, 1.0, 2.0]), value_dtype=torch.float32, density=0.01
    )
    assert parts["mask"].tolist() == [0b01000000] and parts["sign"].tolist() == [0]
