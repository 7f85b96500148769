"""Planning: parameter precedence, layer positions, seeds, slices, and memory-flat running."""

from __future__ import annotations

import torch
import yaml

from graft.io import save_state_dict
from graft.plan import plan_merge, run_plan, tensor_seed
from graft.plan.arch import count_blocks, split_block_name, with_block_count
from graft.recipe import parse_recipe


def _models(tmp_path, n=3, layers=3):
    paths = []
    for i in range(n):
        sd = {f"model.layers.{k}.w": torch.full((2, 2), float(i + k)) for k in range(layers)}
        sd["model.embed_tokens.weight"] = torch.full((5, 2), float(i))
        sd["lm_head.weight"] = torch.full((5, 2), float(i))
        save_state_dict(
            sd,
            tmp_path / f"m{i}",
            config={"num_hidden_layers": layers, "layer_types": [f"t{k}" for k in range(layers)]},
        )
        paths.append(tmp_path / f"m{i}")
    return paths


def _plan(doc):
    return plan_merge(parse_recipe(yaml.safe_dump(doc)))


def test_parameter_precedence_model_over_global(tmp_path):
    base, a, b = _models(tmp_path)
    plan = _plan(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "parameters": {"weight": 0.2, "lambda": 0.9},
            "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b)}],
        }
    )
    job = next(j for j in plan.jobs if j.name == "model.layers.1.w")
    weights = next(v for k, v in job.params.items() if isinstance(v, list))
    assert weights == [0.5, 0.2]
    assert 0.9 in job.params.values()
    plan.close()


def test_slice_parameters_between_source_and_global(tmp_path):
    base, a, _ = _models(tmp_path)
    doc = {
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": 0.9},
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 3]},
                    {"model": str(a), "layer_range": [0, 3]},
                ],
                "parameters": {"t": [0.0, 1.0]},
            }
        ],
    }
    plan = _plan(doc)
    ts = {j.name: j.params["t"] for j in plan.jobs if j.layer is not None}
    assert ts == {"model.layers.0.w": 0.0, "model.layers.1.w": 0.5, "model.layers.2.w": 1.0}
    # outside the blocks the slice gradient is read at t = 0 (mergekit's convention)
    assert next(j for j in plan.jobs if j.name == "lm_head.weight").params["t"] == 0.0
    plan.close()


def test_depth_upscaling_plan_and_config(tmp_path):
    base, *_ = _models(tmp_path)
    plan = _plan(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(base), "layer_range": [1, 3]}]},
            ],
        }
    )
    blocks = {j.name: j.inputs[0].name for j in plan.jobs if j.layer is not None}
    assert blocks == {
        "model.layers.0.w": "model.layers.0.w",
        "model.layers.1.w": "model.layers.1.w",
        "model.layers.2.w": "model.layers.1.w",
        "model.layers.3.w": "model.layers.2.w",
    }
    assert plan.num_layers == 4
    assert plan.config["num_hidden_layers"] == 4
    assert plan.config["layer_types"] == ["t0", "t1", "t1", "t2"]
    plan.close()


def test_tensor_seed_is_stable_and_distinct():
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert tensor_seed(0, "a") != tensor_seed(0, "b")
    assert tensor_seed(0, "a") != tensor_seed(1, "a")


def test_arch_table():
    b = split_block_name("model.layers.12.self_attn.q_proj.weight")
    assert (b.prefix, b.index, b.suffix) == ("model.layers.", 12, ".self_attn.q_proj.weight")
    assert b.renumber(3) == "model.layers.3.self_attn.q_proj.weight"
    assert split_block_name("transformer.h.0.attn.c_attn.weight").index == 0
    assert split_block_name("bert.encoder.layer.5.output.dense.bias").index == 5
    assert split_block_name("model.norm.weight") is None
    assert split_block_name("model.layers_norm.weight") is None
    assert count_blocks(["a.layers.0.x", "a.layers.7.x"]) == 8
    assert count_blocks([], {"n_layer": 3}) == 3
    assert with_block_count({"n_layer": 2}, [0, 1, 1])["n_layer"] == 3


def test_threads_give_identical_bytes(tmp_path):
    base, a, b = _models(tmp_path)
    doc = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
    }
    outs = []
    for threads in (1, 3):
        plan = _plan(doc)
        run_plan(plan, tmp_path / f"out{threads}", threads=threads)
        plan.close()
        outs.append((tmp_path / f"out{threads}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_in_flight_jobs_never_exceed_threads(tmp_path, monkeypatch):
    """Peak memory is bounded by threads x inputs x largest tensor: check the bound's premise."""
    import threading
    import time

    from graft.plan import engine

    base, a, b = _models(tmp_path, layers=12)
    plan = _plan(
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b)],
        }
    )
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()
    real = engine._Worker.__call__

    def tracked(self, job):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)  # long enough that the pool fills even on a loaded machine
        try:
            return real(self, job)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(engine._Worker, "__call__", tracked)
    run_plan(plan, tmp_path / "out", threads=3)
    plan.close()
    assert state["peak"] == 3


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    import pytest

    from graft.plan import PlanError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, a, _ = _models(tmp_path)
    plan = _plan(
        {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    )
    with pytest.raises(PlanError, match="--device cpu"):
        run_plan(plan, tmp_path / "out", device="cuda")
    plan.close()
    assert not (tmp_path / "out").exists()


def test_cuda_run_matches_cpu_byte_for_byte_on_elementwise_methods(tmp_path):
    """The whole engine on the GPU (per-thread streams, pinned staging): the outputs of
    the elementwise methods, seeded DARE included, are the CPU's up to one bf16 step."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from graft.io import load_state_dict

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        sd = {f"model.layers.{k}.mlp.weight": torch.randn(64, 48, generator=g) for k in range(3)}
        sd["lm_head.weight"] = torch.randn(100, 48, generator=g)
        save_state_dict(
            {k: v.to(torch.bfloat16) for k, v in sd.items()},
            tmp_path / f"m{i}",
            config={"num_hidden_layers": 3},
        )
        paths.append(tmp_path / f"m{i}")
    for method in ("linear", "ties", "dare_ties", "della", "breadcrumbs_ties"):
        doc = {
            "merge_method": method,
            "base_model": str(paths[0]),
            "models": [
                {"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        if method == "linear":
            del doc["base_model"]
        outs = {}
        for device in ("cpu", "cuda"):
            plan = _plan(doc)
            run_plan(plan, tmp_path / f"{method}-{device}", threads=3, device=device)
            plan.close()
            outs[device] = load_state_dict(tmp_path / f"{method}-{device}")
        assert outs["cpu"].keys() == outs["cuda"].keys()
        for name, want in outs["cpu"].items():
            got = outs["cuda"][name]
            w, c = want.float(), got.float()
            step = torch.maximum(w.abs(), c.abs()) * 2**-7  # one bf16 step, entry by entry
            assert ((c - w).abs() <= step).all(), (method, name)


def test_bounded_run_starts_largest_first_within_the_byte_budget():
    """The list schedule of `_run_bounded`: the largest job starts first, a free worker
    takes the largest job that fits the budget (1.25 x the largest, two workers), so the
    two vocabulary-sized jobs never overlap and the small ones run beside them; every job
    runs once. One worker keeps the given order."""
    import threading
    import time

    from graft.plan.engine import _run_bounded

    sizes = [1, 2, 1, 1, 10, 1, 3, 1, 10, 1]
    log: list[tuple[str, int]] = []
    running: dict[int, int] = {}
    peak = {"bytes": 0}
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            log.append(("start", i))
            running[i] = sizes[i]
            peak["bytes"] = max(peak["bytes"], sum(running.values()))
        time.sleep(0.01 * sizes[i])
        with lock:
            del running[i]
            log.append(("end", i))
        return sizes[i]

    done = list(_run_bounded(list(range(len(sizes))), work, 2, lambda i: sizes[i]))
    assert sorted(i for i, _ in done) == list(range(len(sizes)))
    assert all(nbytes == sizes[i] for i, nbytes in done)
    starts = [i for what, i in log if what == "start"]
    assert starts[0] == 4  # the largest, first of the two equal ones
    assert log.index(("start", 8)) > log.index(("end", 4))  # never beside the other big one
    assert peak["bytes"] <= 12.5
    assert starts[1] == 1  # beside a big one 2.5 is left: the size-2 job, not the 3
    one = list(_run_bounded(list(range(len(sizes))), lambda i: sizes[i], 1, lambda i: sizes[i]))
    assert [i for i, _ in one] == list(range(len(sizes)))
