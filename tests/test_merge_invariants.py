"""Invariants every registered merge method must satisfy.

Parametrized over ``METHODS``, so a new method is covered as soon as it is registered;
``CASES`` must name it (with values for its required parameters) or the table test fails.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from graft.merge import METHODS, REQUIRED, MethodSpec, UnknownMethodError, get_method

# Per method: shared parameters and per-model parameter lists for three models (a model
# count past the method's max takes the leading entries). Per-model values differ between
# models so that the order-independence check can tell them apart.
CASES: dict[str, dict] = {
    "linear": {"per_model": {"weight": [0.2, 0.5, 0.3]}},
    "task_arithmetic": {"shared": {"lambda": 0.7}, "per_model": {"weight": [0.2, 0.5, 0.3]}},
    "ties": {"per_model": {"weight": [0.2, 0.5, 0.3], "density": [0.5, 0.7, 0.9]}},
    "dare_linear": {"per_model": {"weight": [0.2, 0.5, 0.3], "density": [0.5, 0.7, 0.9]}},
    "dare_ties": {"per_model": {"weight": [0.2, 0.5, 0.3], "density": [0.5, 0.7, 0.9]}},
    "breadcrumbs": {
        "per_model": {
            "weight": [0.2, 0.5, 0.3],
            "density": [0.5, 0.7, 0.9],
            "gamma": [0.1, 0.05, 0.0],
        }
    },
    "breadcrumbs_ties": {
        "per_model": {
            "weight": [0.2, 0.5, 0.3],
            "density": [0.5, 0.7, 0.9],
            "gamma": [0.1, 0.05, 0.0],
        }
    },
    "della": {
        "per_model": {
            "weight": [0.2, 0.5, 0.3],
            "density": [0.5, 0.6, 0.4],
            "epsilon": [0.1, 0.2, 0.15],
        }
    },
    "della_linear": {
        "per_model": {
            "weight": [0.2, 0.5, 0.3],
            "density": [0.5, 0.6, 0.4],
            "epsilon": [0.1, 0.2, 0.15],
        }
    },
    "model_stock": {},
    "slerp": {"shared": {"t": 0.3}},
    "nuslerp": {"per_model": {"weight": [0.3, 0.7]}},
    "multislerp": {"per_model": {"weight": [0.2, 0.5, 0.3]}},
    "passthrough": {"per_model": {"scale": [1.0]}},
    "karcher": {"shared": {"max_iter": 10, "tol": 1e-5}},
    "sce": {"shared": {"select_topk": 1.0}},
    "ram": {"shared": {"epsilon": 1e-5}},
    "ramplus_tl": {"shared": {"r": 0.5, "alpha": 1.0, "epsilon": 1e-5}},
    "nearswap": {"shared": {"t": 0.05}},
    "arcee_fusion": {},
    "fisher": {"shared": {"epsilon": 1e-6}, "per_model": {"weight": [0.2, 0.5, 0.3]}},
    "regmean": {"shared": {"alpha": 0.7}, "per_model": {"weight": [0.2, 0.5, 0.3]}},
    "lines": {
        "shared": {"method": "ties", "alpha": "auto", "beta": 0.5},
        "per_model": {"weight": [0.2, 0.5, 0.3], "density": [0.5, 0.7, 0.9]},
    },
    "tsv_m": {"per_model": {"weight": [0.2, 0.5, 0.3]}},
    "iso_c": {"per_model": {"weight": [0.2, 0.5, 0.3]}},
    "iso_cts": {"shared": {"common_space_fraction": 0.4}, "per_model": {"weight": [0.2, 0.5, 0.3]}},
    # Adam at the paper's lr barely leaves the sum on these 0.1-sized deltas, so the table
    # runs the exact minimiser; tests/test_merge_wudi.py holds Adam to it.
    "wudi": {"shared": {"solver": "closed_form"}},
    "emr": {},
    "opcm": {"shared": {"alpha": 0.5}},
}

# Spectral methods reshape a 2-D delta's spectrum on purpose (TSV-M keeps each task's top
# r/T components; Iso flattens the singular values), so T copies of one delta do not give
# that delta back; tests/test_merge_svd.py checks what they do give.
RESHAPE_SPECTRUM = {"tsv_m", "iso_c", "iso_cts"}

# Methods that keep only part of a single model's delta by design (Arcee Fusion keeps the
# entries whose importance passes a threshold), so one model does not come back whole;
# tests/test_merge_mergekit_methods.py checks what they keep.
SELECTIVE = {"arcee_fusion"}

NAMES = sorted(METHODS)


def _planner_only(spec, p) -> bool:
    """A data-aware method's ``statistics`` file path: the planner reads it, fn gets ``stats``."""
    return bool(spec.stats) and p.name == "statistics"


def stats_for(spec: MethodSpec, n: int) -> list[torch.Tensor]:
    """Positive per-model statistics: Fisher diagonals, or Grams of the inputs."""
    g = torch.Generator().manual_seed(99)
    if spec.stats == "gram":
        xs = [torch.randn(8, SHAPE[1], generator=g) for _ in range(n)]
        return [x.T @ x for x in xs]
    return [torch.rand(SHAPE, generator=g) + 0.1 for _ in range(n)]


SHAPE = (6, 5)


def n_models(spec: MethodSpec, wanted: int = 3) -> int:
    n = max(wanted, spec.min_models)
    return n if spec.max_models is None else min(n, spec.max_models)


def kwargs_for(spec: MethodSpec, n: int, overrides: dict | None = None) -> dict:
    """Keyword arguments for ``spec.fn`` with ``n`` models, from ``CASES`` and overrides.

    ``overrides`` maps recipe names to a scalar (shared, or repeated for every model) or
    to a list (per model).
    """
    case = CASES[spec.name]
    values = {**case.get("shared", {}), **{k: v[:n] for k, v in case.get("per_model", {}).items()}}
    for name, value in (overrides or {}).items():
        param = spec.param(name)
        if param is None:
            continue
        values[name] = value if not param.per_model or isinstance(value, list) else [value] * n
    kwargs = {spec.param(name).argname: value for name, value in values.items()}
    if spec.uses_layer:
        kwargs.update(layer=1, num_layers=4)
    if spec.stats:
        kwargs["stats"] = stats_for(spec, n)
    return kwargs


def run(spec: MethodSpec, tensors, base, kwargs, seed: int = 0) -> torch.Tensor:
    extra = {"generator": torch.Generator().manual_seed(seed)} if spec.uses_seed else {}
    return spec.fn(list(tensors), base, **kwargs, **extra)


def random_inputs(spec: MethodSpec, n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g, dtype=dtype)
    models = [base + 0.1 * torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]
    return models, (None if spec.base == "none" else base)


# --- the table and the specs ------------------------------------------------------------


def test_case_table_covers_every_method():
    missing = sorted(set(METHODS) - set(CASES))
    stale = sorted(set(CASES) - set(METHODS))
    assert not missing, f"add these methods to CASES in {__file__}: {missing}"
    assert not stale, f"CASES names unregistered methods: {stale}"


@pytest.mark.parametrize("name", NAMES)
def test_case_gives_every_required_param(name):
    spec = METHODS[name]
    case = CASES[name]
    given = set(case.get("shared", {})) | set(case.get("per_model", {}))
    required = {p.name for p in spec.params if p.default is REQUIRED and not _planner_only(spec, p)}
    assert required <= given, f"CASES[{name!r}] lacks required {sorted(required - given)}"


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_function_signature(name):
    spec = METHODS[name]
    assert spec.name == name and spec.paper and spec.summary
    sig = inspect.signature(spec.fn)
    for p in spec.params:
        if _planner_only(spec, p):
            assert p.argname not in sig.parameters and "stats" in sig.parameters
            continue
        assert p.argname in sig.parameters, f"{name}: fn lacks keyword {p.argname!r}"
        fn_default = sig.parameters[p.argname].default
        if p.default is REQUIRED:
            assert fn_default is inspect.Parameter.empty, f"{name}.{p.name} should be required"
        elif p.per_model:
            assert fn_default is None, f"{name}.{p.name}: per-model default should be None"
        else:
            assert fn_default == p.default, f"{name}.{p.name}: fn default {fn_default!r}"
        if p.choices is not None:
            assert p.kind is str and p.default in p.choices
    if spec.uses_seed:
        assert "generator" in sig.parameters
    if spec.uses_layer:
        assert {"layer", "num_layers"} <= set(sig.parameters)


def test_get_method_lists_valid_names():
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(UnknownMethodError) as info:
        get_method("tie")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "tie'" in str(info.value) and "task_arithmetic" in str(info.value)


# --- invariants ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_single_model_at_weight_one_returns_it(name):
    spec = METHODS[name]
    if spec.min_models > 1:
        pytest.skip(f"{name} needs {spec.min_models} models")
    if name in SELECTIVE:
        pytest.skip(f"{name} keeps only part of a delta by design")
    models, base = random_inputs(spec, 1)
    # slerp's "weight" of the model is t; lines at beta 0 scales by auto-alpha = 1
    kwargs = kwargs_for(
        spec, 1, {"weight": 1.0, "density": 1.0, "t": 1.0, "lambda": 1.0, "beta": 0.0}
    )
    out = run(spec, models, base, kwargs)
    torch.testing.assert_close(out, models[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_all_inputs_equal_return_the_input(name):
    spec = METHODS[name]
    n = n_models(spec)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    base = None if spec.base == "none" else x.clone()
    kwargs = kwargs_for(spec, n, {"weight": 1.0 / n})
    out = run(spec, [x.clone() for _ in range(n)], base, kwargs)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if METHODS[n].base != "none" and n not in RESHAPE_SPECTRUM]
)
def test_same_delta_everywhere_returns_base_plus_delta(name):
    spec = METHODS[name]
    n = n_models(spec)
    if n == 1 and spec.param("weight") is None:
        pytest.skip(f"{name} takes one model and no weight: the single-model test covers it")
    g = torch.Generator().manual_seed(6)
    base = torch.randn(SHAPE, generator=g)
    model = base + 0.1 * torch.randn(SHAPE, generator=g)
    # weights sum to 1 so sum and mean forms agree; density 1 so nothing is dropped
    # t = 1: slerp (whose weight is accepted and ignored) and nearswap go all the way
    overrides = {"weight": 1.0 / n, "density": 1.0, "lambda": 1.0, "beta": 0.0, "t": 1.0}
    kwargs = kwargs_for(spec, n, overrides)
    out = run(spec, [model.clone() for _ in range(n)], base, kwargs)
    torch.testing.assert_close(out, model, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_finite(name, dtype):
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n, dtype=dtype)
    out = run(spec, models, base, kwargs_for(spec, n))
    assert out.shape == SHAPE and out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_zero_deltas_stay_finite(name):
    spec = METHODS[name]
    n = n_models(spec)
    base = torch.zeros(SHAPE)
    out = run(spec, [base.clone() for _ in range(n)], base, kwargs_for(spec, n))
    assert torch.isfinite(out).all()


def _permuted_kwargs(spec: MethodSpec, kwargs: dict, order: tuple[int, ...]) -> dict:
    per_model = {p.argname for p in spec.params if p.per_model} | (
        {"stats"} if spec.stats else set()
    )
    return {
        k: [v[i] for i in order] if k in per_model and isinstance(v, list) else v
        for k, v in kwargs.items()
    }


@pytest.mark.parametrize(
    "name", [n for n in NAMES if METHODS[n].order_independent and n_models(METHODS[n]) > 1]
)
def test_order_independent(name):
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    kwargs = kwargs_for(spec, n)
    expected = run(spec, models, base, kwargs)
    for order in itertools.permutations(range(n)):
        out = run(spec, [models[i] for i in order], base, _permuted_kwargs(spec, kwargs, order))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if METHODS[n].uses_seed and METHODS[n].param("density")]
)
def test_seeded_methods_order_independent_without_dropping(name):
    # Masks are drawn in model order, so only the merge step can be order independent.
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    kwargs = kwargs_for(spec, n, {"density": 1.0})
    expected = run(spec, models, base, kwargs)
    order = (2, 0, 1)
    out = run(spec, [models[i] for i in order], base, _permuted_kwargs(spec, kwargs, order))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name):
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    kwargs = kwargs_for(spec, n)
    assert torch.equal(run(spec, models, base, kwargs, 11), run(spec, models, base, kwargs, 11))


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].uses_seed])
def test_different_seed_different_result(name):
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    kwargs = kwargs_for(spec, n)
    assert not torch.equal(run(spec, models, base, kwargs, 1), run(spec, models, base, kwargs, 2))


@pytest.mark.parametrize("name", NAMES)
def test_inputs_not_modified(name):
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    copies = [m.clone() for m in models]
    base_copy = None if base is None else base.clone()
    run(spec, models, base, kwargs_for(spec, n))
    assert all(torch.equal(m, c) for m, c in zip(models, copies, strict=True))
    assert base is None or torch.equal(base, base_copy)


def _cuda_copy(kwargs: dict) -> dict:
    return {k: ([s.cuda() for s in v] if k == "stats" else v) for k, v in kwargs.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    """Every method gives on the GPU what it gives on the CPU (the seeded ones too: their
    generator is a CPU one whatever the device, so the masks are the same)."""
    spec = METHODS[name]
    n = n_models(spec)
    models, base = random_inputs(spec, n)
    kwargs = kwargs_for(spec, n)
    expected = run(spec, models, base, kwargs, seed=5)
    got = run(
        spec,
        [m.cuda() for m in models],
        None if base is None else base.cuda(),
        _cuda_copy(kwargs),
        seed=5,
    )
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
