"""graft vs mergekit on the same recipes: the merged tensors must agree.

mergekit is never a graft dependency. It lives in its own virtual environment; point
``GRAFT_MERGEKIT_PYTHON`` at that environment's python (default: /work/mkvenv/bin/python
when it exists). Without a python that can ``import mergekit`` every test here is
skipped with the reason.

Tiny Llama-shaped models are generated in the test (fp32 and bf16 variants). All
mergekit merges run in ONE subprocess (importing mergekit costs seconds), driven through
its own ``mergekit-yaml`` click command; graft runs in-process through its library API
(the same calls ``graft merge`` makes).

Tolerances and deliberate differences:

* TIES on bf16 inputs: many deltas tie in magnitude at the trim threshold, and which of
  them the top-k keeps is up to the sort (graft: lowest index; mergekit: unstable
  ``argsort``). The bf16-input case therefore exempts exactly those positions and holds
  every other element to one bf16 rounding step.
* graft always computes in float32 and rounds once to the output dtype. mergekit
  computes in the recipe's ``dtype`` (or the inputs' promoted dtype): for bf16 models
  its ties / task_arithmetic arithmetic (deltas, sums, divisions) happens in bf16, with
  several roundings. So the *math* is compared with ``dtype: float32`` recipes
  (tolerance 1e-6 relative to the tensor's largest magnitude), and bf16 cases are
  compared only for methods where mergekit, too, computes in float32 (linear, slerp):
  there every element must be within one bf16 rounding step (ulp).
* Random methods (DARE, DELLA) are not compared: the random masks come from different
  generators, and graft's DARE rescale follows its own documented convention.
* passthrough with slices is a pure copy and must match bit for bit, including the
  output's ``num_hidden_layers``.

The methods graft took over from mergekit 0.1.5 are compared in float32 on the same tiny
family, where their math is deterministic (deltas ``0.004·N(0, 1)``):

* ``karcher``: the base is one more input in both tools. Only summation order differs
  (graft sums the tangent over models as one matrix product), a few 1e-8.
* ``sce``: mergekit's guards (equal weights when ``Σ mean(δ²) < 1e-6``, divisor floored at
  1e-6) are not reached at this delta size (``mean(δ²) ≈ 1.6e-5``), so both must agree;
  with much smaller deltas they differ by design (see graft/merge/sce.py).
* ``arcee_fusion``: every tensor has fewer than 10⁶ entries, so mergekit's quantiles are
  exact rather than sampled; the two masks must agree entry for entry.
* ``ram`` / ``ramplus_tl``: ``epsilon`` of the order of the deltas' spread leaves about a
  third of each model's entries active, so unique, shared and inactive entries all occur.
* ``slerp`` / ``model_stock`` with per-model ``weight``: mergekit ignores it, so must graft.
* A tiny T5 (encoder 2 blocks, decoder 3) merged with a weight gradient: mergekit's T5
  template plans each stack as its own module, t = l/(L − 1) per stack, as graft does.
  (mergekit 0.1.5 cannot merge a CLIPModel at all: its inferred architecture calls
  ``get_input_embeddings``, which transformers 5 does not implement for CLIPModel; so the
  CLIP case is checked only in tests/test_merge_mergekit_methods.py.)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mergekit

DEFAULT_MK_PYTHON = "/work/mkvenv/bin/python"

# Tiny Llama: 4 layers so that depth up-scaling [0,3) + [1,4) gives 6.
HIDDEN, INTER, LAYERS, HEADS, VOCAB = 32, 64, 4, 4, 128


@functools.lru_cache(maxsize=1)
def mergekit_python() -> tuple[str | None, str]:
    """(python path, reason it is unusable or '')."""
    py = os.environ.get("GRAFT_MERGEKIT_PYTHON") or (
        DEFAULT_MK_PYTHON if Path(DEFAULT_MK_PYTHON).exists() else None
    )
    if not py:
        return None, "set GRAFT_MERGEKIT_PYTHON to a python that can import mergekit"
    try:
        r = subprocess.run(
            [py, "-c", "import mergekit.scripts.run_yaml"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"GRAFT_MERGEKIT_PYTHON={py} is not runnable: {exc}"
    if r.returncode != 0:
        return None, f"{py} cannot import mergekit: {r.stderr.strip().splitlines()[-1:]}"
    return py, ""


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _draw(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def make_tiny_llama(
    out: Path, *, seed: int, dtype: torch.dtype, base_seed: int | None = None
) -> Path:
    """A tiny LlamaForCausalLM checkpoint; with ``base_seed``, a fine-tune of that base."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in _llama_shapes().items():
        offset = 1.0 if len(shape) == 1 else 0.0  # norms near 1, matrices near 0
        if base_seed is None:
            t = _draw(seed, name, shape) * 0.02 + offset
        else:
            t = _draw(base_seed, name, shape) * 0.02 + offset + _draw(seed, name, shape) * 0.004
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dname = str(dtype).replace("torch.", "")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dname,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_tiny_t5(out: Path, *, like: Path | None = None) -> Path:
    """A tiny gated T5 (mergekit's T5 template is T5 v1.1's): 2 encoder, 3 decoder blocks."""
    import transformers

    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
        num_heads=2, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if like is not None:
        model = transformers.T5ForConditionalGeneration.from_pretrained(like).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- cases
# name -> (recipe template, models dtype, tolerance kind). {base}, {a}, {b}, {c} are
# substituted with model folders of the chosen dtype ({a} = base + delta, etc.).

CASES: dict[str, tuple[str, str, str]] = {
    "linear_fp32": (
        """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "linear_bf16": (
        """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 1.0}}
  - model: {c}
    parameters: {{weight: 1.0}}
dtype: bfloat16
""",
        "bfloat16",
        "bf16",
    ),
    "task_arithmetic_fp32": (
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.4}}
parameters:
  lambda: 0.9
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "ties_fp32": (
        """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {c}
    parameters: {{weight: 0.3, density: 0.3}}
parameters:
  normalize: true
dtype: float32
""",
        "float32",
        "fp32",
    ),
    # bf16 models, float32 math in both tools, bf16 output: every element must agree within
    # one rounding step except where a model's |delta| ties with its trim threshold.
    "ties_bf16_inputs_fp32_math": (
        """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {c}
    parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
out_dtype: bfloat16
""",
        "bfloat16",
        "bf16_trim_ties",
    ),
    "slerp_fp32": (
        """
merge_method: slerp
base_model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "slerp_bf16": (
        """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: 0.3
dtype: bfloat16
""",
        "bfloat16",
        "bf16",
    ),
    "karcher_fp32": (
        """
merge_method: karcher
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters:
  max_iter: 10
  tol: 1.0e-5
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "sce_fp32": (
        """
merge_method: sce
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  select_topk: 0.5
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "sce_no_select_fp32": (
        """
merge_method: sce
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "nearswap_fp32": (
        """
merge_method: nearswap
base_model: {base}
models:
  - model: {a}
parameters:
  t: 0.003
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "arcee_fusion_fp32": (
        """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {a}
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "ram_fp32": (
        """
merge_method: ram
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  epsilon: 0.004
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "ramplus_tl_fp32": (
        """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  epsilon: 0.005
  r: 0.5
  alpha: 1.0
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "slerp_weights_fp32": (
        """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.3}}
parameters:
  t: 0.4
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "model_stock_weights_fp32": (
        """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        "float32",
        "fp32",
    ),
    "t5_stack_gradient_fp32": (
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: [0, 0.5, 1]
dtype: float32
""",
        "t5",
        "fp32",
    ),
    "passthrough_dus_bf16": (
        """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {a}
        layer_range: [1, 4]
dtype: bfloat16
""",
        "bfloat16",
        "exact",
    ),
}


MK_DRIVER = r"""
import json, sys
from mergekit.scripts.run_yaml import main
jobs = json.loads(sys.argv[1])
failed = {}
for recipe, out in jobs:
    try:
        main([recipe, out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
              "--out-shard-size", "1B"], standalone_mode=False)
    except BaseException as exc:  # report every case, do not stop at the first
        failed[recipe] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
    """Build the models, run every case through both tools; per-case output folders."""
    py, reason = mergekit_python()
    if py is None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mkcross")
    models = {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        d = root / "models" / dname
        models[dname] = {
            "base": make_tiny_llama(d / "base", seed=1, dtype=dtype),
            "a": make_tiny_llama(d / "a", seed=2, base_seed=1, dtype=dtype),
            "b": make_tiny_llama(d / "b", seed=3, base_seed=1, dtype=dtype),
            "c": make_tiny_llama(d / "c", seed=4, base_seed=1, dtype=dtype),
        }
    try:
        t5_base = make_tiny_t5(root / "models" / "t5" / "base")
        models["t5"] = {
            "base": t5_base,
            "a": make_tiny_t5(root / "models" / "t5" / "a", like=t5_base),
        }
    except ImportError:  # transformers is an optional extra of graft
        models["t5"] = None
    jobs, results = [], {}
    for case, (template, dname, _tol) in CASES.items():
        if models[dname] is None:
            results[case] = {"skip": f"{case} needs transformers to build its models"}
            continue
        recipe = root / "recipes" / f"{case}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(template.format(**{k: str(v) for k, v in models[dname].items()}))
        mk_out, g_out = root / "mergekit" / case, root / "graft" / case
        jobs.append((str(recipe), str(mk_out)))
        results[case] = {
            "recipe": recipe,
            "mergekit": mk_out,
            "graft": g_out,
            "models": models[dname],
        }

    # graft, in-process through the same calls as `graft merge`
    from graft.plan import plan_merge, run_plan
    from graft.recipe import load_recipe

    for r in results.values():
        if "skip" in r:
            continue
        try:
            plan = plan_merge(load_recipe(r["recipe"]))
            try:
                run_plan(plan, r["graft"], threads=2, device="cpu", force=True)
            finally:
                plan.close()
        except Exception as exc:  # reported by the case's test, not here
            r["graft_error"] = f"{type(exc).__name__}: {exc}"

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [py, "-c", MK_DRIVER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    try:
        failed = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        pytest.fail(f"mergekit driver crashed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    for r in results.values():
        if "skip" not in r and str(r["recipe"]) in failed:
            r["mergekit_error"] = failed[str(r["recipe"])]
    yield results
    shutil.rmtree(root, ignore_errors=True)


def _load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(x.abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(x), (e - 8).to(torch.int32))


def _trim_tie_mask(base: torch.Tensor, fts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Where some model's |delta| equals its TIES trim threshold (the k-th largest |delta|).

    bf16 weights share magnitudes often; which tied entries the top-k keeps is up to the
    sort (graft: lowest index, stable; mergekit: torch.argsort, unstable), so those
    entries may legitimately differ by a whole delta.
    """
    mask = torch.zeros(base.shape, dtype=torch.bool)
    n = base.numel()
    k = int(density * n)
    for ft in fts:
        d = (ft - base).abs()
        mask |= d == d.reshape(-1).kthvalue(n - k + 1).values
    return mask


@pytest.mark.parametrize("case", list(CASES))
def test_graft_matches_mergekit(crosscheck, case):
    r = crosscheck[case]
    if "skip" in r:
        pytest.skip(r["skip"])
    assert "graft_error" not in r, f"graft failed on {case}: {r['graft_error']}"
    assert "mergekit_error" not in r, f"mergekit failed on {case}: {r['mergekit_error']}"
    g, m = _load(r["graft"]), _load(r["mergekit"])
    inputs = {k: _load(v) for k, v in r["models"].items()}
    assert sorted(g) == sorted(m), (
        f"tensor names differ: only graft {sorted(set(g) - set(m))[:5]}, "
        f"only mergekit {sorted(set(m) - set(g))[:5]}"
    )
    tol = CASES[case][2]
    bad = []
    for name in sorted(m):
        tg, tm = g[name], m[name]
        assert tg.shape == tm.shape, f"{name}: shape {tuple(tg.shape)} vs {tuple(tm.shape)}"
        assert tg.dtype == tm.dtype, f"{name}: dtype {tg.dtype} vs {tm.dtype}"
        if tol == "exact":
            if not torch.equal(tg, tm):
                bad.append(f"{name}: not bit-identical")
            continue
        fg, fm = tg.float(), tm.float()
        diff = (fg - fm).abs()
        if tol == "fp32":
            limit = 1e-6 * float(fm.abs().max().clamp_min(1e-30))
            if float(diff.max()) > limit:
                bad.append(f"{name}: max diff {float(diff.max()):.3e} > {limit:.3e}")
        else:  # bf16: one rounding step at the larger magnitude
            ulps = diff / _bf16_ulp(torch.maximum(fg.abs(), fm.abs()))
            if tol == "bf16_trim_ties":
                ins = [inputs[k][name].float() for k in ("base", "a", "b", "c")]
                ulps = torch.where(_trim_tie_mask(ins[0], ins[1:], 0.5), 0.0, ulps)
            if float(ulps.max()) > 1:
                n = int((ulps > 1).sum())
                bad.append(
                    f"{name}: {n}/{diff.numel()} elements > 1 bf16 ulp (max {float(ulps.max()):.0f})"
                )
    assert not bad, f"{case}: {len(bad)} tensors differ, e.g. " + "; ".join(bad[:4])


def test_passthrough_depth_upscaling_config(crosscheck):
    """SOLAR-style [0,3) + [1,4) of a 4-layer model: both write 6 layers."""
    r = crosscheck["passthrough_dus_bf16"]
    if "graft_error" in r or "mergekit_error" in r:
        pytest.fail(f"a tool failed: {r.get('graft_error') or r.get('mergekit_error')}")
    cg = json.loads((r["graft"] / "config.json").read_text())
    cm = json.loads((r["mergekit"] / "config.json").read_text())
    assert cm["num_hidden_layers"] == 6
    assert cg["num_hidden_layers"] == cm["num_hidden_layers"]
    g = _load(r["graft"])
    src = _load(r["recipe"].parent.parent / "models" / "bfloat16" / "a")
    # output layer 3 is source layer 1 (second slice starts at source layer 1)
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(g[f"model.layers.3.{suffix}"], src[f"model.layers.1.{suffix}"])
        assert torch.equal(g[f"model.layers.5.{suffix}"], src[f"model.layers.3.{suffix}"])


def test_t5_gradient_is_per_stack_in_both_tools(crosscheck):
    """Encoder blocks 0, 1 get t = 0, 1; decoder blocks 0, 1, 2 get t = 0, 0.5, 1."""
    r = crosscheck["t5_stack_gradient_fp32"]
    if "skip" in r:
        pytest.skip(r["skip"])
    if "graft_error" in r or "mergekit_error" in r:
        pytest.fail(f"a tool failed: {r.get('graft_error') or r.get('mergekit_error')}")
    base, ft = _load(r["models"]["base"]), _load(r["models"]["a"])
    expected = {"encoder.block.0.": 0.0, "encoder.block.1.": 1.0, "decoder.block.0.": 0.0,
                "decoder.block.1.": 0.5, "decoder.block.2.": 1.0}  # fmt: skip
    for tool in ("graft", "mergekit"):
        out = _load(r[tool])
        for prefix, t in expected.items():
            name = prefix + "layer.0.SelfAttention.q.weight"
            delta = ft[name] - base[name]
            got = float(((out[name] - base[name]) * delta).sum() / (delta * delta).sum())
            assert got == pytest.approx(t, abs=1e-5), (tool, name, got)
