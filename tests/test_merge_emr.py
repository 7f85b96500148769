"""EMR-Merging: elect, mask and rescale by hand, the folder `graft merge` writes, task
models rebuilt byte for byte by `graft apply`, and `graft eval` on each task's own model.

Expected values are worked out in the comments beside them; never by calling graft's helpers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import run_cli
from graft.delta import DeltaError, open_delta
from graft.delta.emr import read_manifest, task_names, task_state
from graft.io import load_state_dict, save_state_dict
from graft.merge import emr

# Three tasks, two tensors. Tensor A (1x4):
#   δ1 = [ 1, -2,  0,  3]
#   δ2 = [ 2,  1, -1, -1]
#   δ3 = [-4,  1,  0,  2]
#   Σ  = [-1,  0, -1,  4] -> elected sign [-, -, -, +] (a zero sum elects -)
#   largest agreeing magnitude: 4 (δ3), 2 (δ1), 1 (δ2), 3 (δ1) -> τ_uni = [-4, -2, -1, 3]
#   M1 = [F, T, F, T], M2 = [F, F, T, F], M3 = [T, F, F, T]
# Tensor B (2 entries):
#   δ1 = [2, 0], δ2 = [0, -2], δ3 = [1, 1]; Σ = [3, -1] -> signs [+, -] -> τ_uni = [2, -2]
#   M1 = [T, F], M2 = [F, T], M3 = [T, F]
# Rescale, per-tensor means summed over tensors:
#   λ1 = (6/4 + 2/2) / (5/4 + 2/2) = 10/9
#   λ2 = (5/4 + 2/2) / (1/4 + 2/2) = 9/5
#   λ3 = (7/4 + 2/2) / (7/4 + 2/2) = 1
# (sums over all entries would give λ1 = 8/7: each tensor counts alike, not each entry.)
DELTA_A = [[1.0, -2, 0, 3], [2, 1, -1, -1], [-4, 1, 0, 2]]
DELTA_B = [[2.0, 0], [0, -2], [1, 1]]
UNIFIED_A, UNIFIED_B = [-4.0, -2, -1, 3], [2.0, -2]
MASKS_A = [[False, True, False, True], [False, False, True, False], [True, False, False, True]]
MASKS_B = [[True, False], [False, True], [True, False]]
SCALES = [10 / 9, 9 / 5, 1.0]


def test_elect_and_mask_by_hand():
    deltas = [torch.tensor(d) for d in DELTA_A]
    unified = emr.elect(deltas)
    assert unified.tolist() == UNIFIED_A
    assert [m.tolist() for m in emr.masks(deltas, unified)] == MASKS_A
    deltas_b = [torch.tensor(d) for d in DELTA_B]
    assert emr.elect(deltas_b).tolist() == UNIFIED_B


def test_rescale_uses_per_tensor_means_summed_over_tensors():
    before, after = [], []
    for rows in (DELTA_A, DELTA_B):
        deltas = [torch.tensor(d) for d in rows]
        unified = emr.elect(deltas)
        b, a = emr.rescale_terms(deltas, unified, emr.masks(deltas, unified))
        before.append(b)
        after.append(a)
    assert before[0] == [6 / 4, 5 / 4, 7 / 4] and after[0] == [5 / 4, 1 / 4, 7 / 4]
    assert emr.rescalers(before, after) == pytest.approx(SCALES, rel=1e-12)
    # a task whose masked unified vector is zero everywhere gets 1
    assert emr.rescalers([[2.0, 1.0]], [[0.0, 0.5]]) == [1.0, 2.0]


def test_method_function_returns_the_unified_model():
    base = torch.full((4,), 0.5)
    models = [base + torch.tensor(d) for d in DELTA_A]
    assert emr.emr(models, base).tolist() == [0.5 + u for u in UNIFIED_A]


def test_task_names_are_file_safe_and_distinct():
    names = task_names(["zoo/ft/mnist", "org/My Model", "other/mnist/", "x/unified", "a+b"])
    assert names == ["mnist", "My_Model", "mnist-2", "unified-task", "a_b"]


# --- the folder, graft apply, byte for byte --------------------------------------------------


def _family(tmp_path, dtype):
    """A base and three fine-tunes with the deltas above (exact in every dtype used)."""
    base = {
        "a.weight": torch.tensor([[0.5, 0.25, -0.75, 1.0]], dtype=dtype),
        "b.bias": torch.tensor([0.5, -0.25], dtype=dtype),
        "pos_ids": torch.arange(3),
    }
    save_state_dict(base, tmp_path / "base", config={"num_hidden_layers": 1})
    paths = []
    for i, name in enumerate(["t1", "t2", "t3"]):
        ft = {
            "a.weight": base["a.weight"] + torch.tensor([DELTA_A[i]], dtype=dtype),
            "b.bias": base["b.bias"] + torch.tensor(DELTA_B[i], dtype=dtype),
            "pos_ids": torch.arange(3),
        }
        save_state_dict(ft, tmp_path / "ft" / name, config={"num_hidden_layers": 1})
        paths.append(tmp_path / "ft" / name)
    return base, paths


def _merge(tmp_path, paths, out="merged"):
    recipe = {
        "merge_method": "emr",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(p)} for p in paths],
    }
    (tmp_path / "emr.yaml").write_text(yaml.safe_dump(recipe))
    code, stdout, err = run_cli("merge", tmp_path / "emr.yaml", tmp_path / out, "-q", "--json")
    assert code == 0, err
    return tmp_path / out, json.loads(stdout)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_writes_the_folder_and_apply_rebuilds_each_task_exactly(tmp_path, dtype):
    base, paths = _family(tmp_path, dtype)
    out, summary = _merge(tmp_path, paths)
    f32 = [float(torch.tensor(s, dtype=torch.float32)) for s in SCALES]
    assert summary["method"] == "emr" and list(summary["emr_tasks"]) == ["t1", "t2", "t3"]
    assert list(summary["emr_tasks"].values()) == f32
    manifest = read_manifest(out)
    assert [(t.name, t.scale) for t in manifest.tasks] == list(
        zip(["t1", "t2", "t3"], f32, strict=True)
    )
    assert manifest.base == (tmp_path / "base").resolve()
    # the folder is a model: the unified one, θ0 + τ_uni (non-float tensors copied)
    unified = load_state_dict(out)
    a_uni = torch.tensor([UNIFIED_A])
    b_uni = torch.tensor(UNIFIED_B)
    assert torch.equal(unified["a.weight"], (base["a.weight"].float() + a_uni).to(dtype))
    assert torch.equal(unified["b.bias"], (base["b.bias"].float() + b_uni).to(dtype))
    assert torch.equal(unified["pos_ids"], torch.arange(3))
    # the modulators: one bit per entry and one float32 λ per tensor
    patch = open_delta(out / "emr" / "t1.safetensors")
    assert patch.method == "emr" and set(patch.layout) == {"a.weight", "b.bias"}
    assert patch.nbytes("a.weight") == 1 + 4 + 16  # mask byte, scale, shared float32 values
    patch.close()
    for i, name in enumerate(["t1", "t2", "t3"]):
        dst = tmp_path / f"task-{name}"
        code, _, err = run_cli("apply", tmp_path / "base", out / "emr" / f"{name}.safetensors",
                               "-o", dst, "-q")  # fmt: skip
        assert code == 0, err
        got = load_state_dict(dst)
        lam = torch.tensor(f32[i], dtype=torch.float32)
        for key, uni, mask in (
            ("a.weight", a_uni, torch.tensor([MASKS_A[i]])),
            ("b.bias", b_uni, torch.tensor(MASKS_B[i])),
        ):
            want = (base[key].float() + lam * (uni * mask)).to(dtype)
            assert torch.equal(_bits(got[key]), _bits(want)), (name, key)
        assert torch.equal(got["pos_ids"], torch.arange(3))
        # task_state (what graft eval runs) is the same model, byte for byte
        state = task_state(out, name)
        assert all(torch.equal(_bits(state[k]), _bits(got[k])) for k in ("a.weight", "b.bias"))


def test_one_model_gives_itself_back(tmp_path):
    base, paths = _family(tmp_path, torch.float32)
    out, summary = _merge(tmp_path, paths[:1])
    assert summary["emr_tasks"] == {"t1": 1.0}  # M1 = (δ1 ≠ 0), so λ = 1
    state = task_state(out, "t1")
    ft = load_state_dict(paths[0])
    assert all(torch.equal(state[k], ft[k]) for k in ft)


def test_task_patches_need_their_shared_file_and_the_right_base(tmp_path):
    base, paths = _family(tmp_path, torch.float32)
    out, _ = _merge(tmp_path, paths)
    # another base: apply refuses (the patch records the base's hash)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    save_state_dict(other, tmp_path / "other", config={"num_hidden_layers": 1})
    code, _, err = run_cli("apply", tmp_path / "other", out / "emr" / "t2.safetensors",
                           "-o", tmp_path / "x", "-q")  # fmt: skip
    assert code != 0 and "hash" in err
    with pytest.raises(DeltaError, match="not the base"):
        task_state(out, "t2", base=tmp_path / "other")
    with pytest.raises(DeltaError, match="no task 't9'; its tasks: t1, t2, t3"):
        task_state(out, "t9")
    # a patch without its shared file cannot be read
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "t2.safetensors").write_bytes((out / "emr" / "t2.safetensors").read_bytes())
    with pytest.raises(DeltaError, match="unified.safetensors, which is missing"):
        open_delta(lone / "t2.safetensors")


def test_emr_and_models_that_lack_a_tensor(tmp_path):
    base, paths = _family(tmp_path, torch.float32)
    short = load_state_dict(paths[2])
    del short["b.bias"]
    save_state_dict(short, tmp_path / "ft" / "short", config={"num_hidden_layers": 1})
    recipe = {
        "merge_method": "emr",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(p)} for p in [*paths[:2], tmp_path / "ft" / "short"]],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "m", "-q")
    assert code != 0 and "b.bias is missing from model" in err
    assert not (tmp_path / "m").exists()
    # left out of the output, it is in no modulator either
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "m", "-q",
                           "--allow-drop", "b.bias")  # fmt: skip
    assert code == 0, err
    assert set(open_delta(tmp_path / "m" / "emr" / "t1.safetensors").layout) == {"a.weight"}


# --- graft eval on a zoo: each task with its own model ---------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from graft.zoo import build_zoo

    # Same path as test_zoo.py's quick zoo: whichever module runs first builds it.
    return build_zoo(
        tmp_path_factory.getbasetemp() / "quick-zoo-0", seed=0, quick=True, log=lambda m: None
    )


def test_eval_runs_each_task_with_its_own_modulated_model(zoo, tmp_path, capsys):
    from graft.cli.eval_cmd import eval_model

    tasks = list(zoo.finetuned)[:2]
    recipe = {
        "merge_method": "emr",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.finetuned[t])} for t in tasks],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "emr", "-q")
    assert code == 0, err
    assert [t.name for t in read_manifest(tmp_path / "emr").tasks] == tasks

    def accuracy(model, task, **kw):
        eval_model(model=model, task=[task], zoo=zoo.root, as_json=True, **kw)
        return json.loads(capsys.readouterr().out)["results"][f"task:{task}"]["accuracy"]

    for t in tasks:
        run_cli("apply", zoo.base, tmp_path / "emr" / "emr" / f"{t}.safetensors",
                "-o", tmp_path / f"m-{t}", "-q")  # fmt: skip
        own = accuracy(tmp_path / f"m-{t}", t)
        assert accuracy(tmp_path / "emr", t) == own
    # --modulator picks another task's model, or the unified one (the folder's own weights)
    other = accuracy(tmp_path / "emr", tasks[0], modulator=tasks[1])
    assert other == accuracy(tmp_path / f"m-{tasks[1]}", tasks[0])
    plain = tmp_path / "unified-copy"
    plain.mkdir()
    for f in (tmp_path / "emr").iterdir():
        if f.is_file():
            (plain / f.name).write_bytes(f.read_bytes())
    shared = accuracy(tmp_path / "emr", tasks[0], modulator="unified")
    assert shared == accuracy(plain, tasks[0])
    with pytest.raises(DeltaError, match="no task 'nope'"):
        eval_model(model=tmp_path / "emr", task=[tasks[0]], zoo=zoo.root, modulator="nope")


def test_zoo_bench_judges_emr_per_task_and_runs_wudi_both_ways(zoo, tmp_path, capsys):
    from graft._demo import digits_bench_zoo
    from graft.cli.eval_cmd import eval_model
    from graft.eval.zoo_bench import run_bench

    result = run_bench(
        digits_bench_zoo(zoo),
        methods=["wudi", "wudi+closed_form", "emr"],
        val_limit=0,
        batch_size=512,
        threads=1,
        save_to=tmp_path,
        log=lambda m: None,
    )
    rows = {r.method: r for r in result.rows}
    assert {"wudi", "wudi+closed_form", "emr"} <= set(rows)
    assert "300 Adam steps, lr 1e-5" in rows["wudi"].settings
    assert "not one merged model" in rows["emr"].settings
    assert all(r.kind == "data-free" for m, r in rows.items() if m.startswith(("wudi", "emr")))
    # the EMR row is each task's own model: what graft eval runs on the folder it wrote
    task = result.tasks[-1]
    eval_model(model=tmp_path / "merged" / "emr", task=[task], zoo=zoo.root, as_json=True)
    got = json.loads(capsys.readouterr().out)["results"][f"task:{task}"]["accuracy"]
    assert rows["emr"].accuracy[task] == got


def test_zoo_bench_searches_the_ties_familys_own_lambda_and_can_skip_references(zoo):
    """DARE-TIES gets a λ of its own on validation (not TIES's), and a partial rerun makes
    only the rows asked for."""
    from graft._demo import digits_bench_zoo
    from graft.eval.zoo_bench import run_bench

    result = run_bench(
        digits_bench_zoo(zoo),
        methods=["dare_ties"],
        val_limit=0,
        batch_size=512,
        threads=1,
        grids={"dare_ties": [0.2, 1.0]},
        references=False,
        log=lambda m: None,
    )
    assert [r.method for r in result.rows] == ["dare_ties"]
    settings = result.rows[0].settings
    assert settings.startswith(("lambda=0.2 (val", "lambda=1 (val")), settings
    assert "from ties" not in settings
    assert math.isnan(result.normalized(result.rows[0]))  # no fine-tuned row to divide by


def test_zoo_bench_skips_finished_rows_but_redoes_the_search_they_share(zoo):
    """An interrupted run resumes with its finished rows skipped: a skipped searched row
    is not remade, yet its search still runs for the rows that take its λ, and every row
    reaches on_row as soon as it is made."""
    from graft._demo import digits_bench_zoo
    from graft.eval.zoo_bench import run_bench

    seen = []
    result = run_bench(
        digits_bench_zoo(zoo),
        methods=["task_arithmetic", "dare_linear", "linear"],
        skip={"task_arithmetic", "linear"},
        val_limit=0,
        batch_size=512,
        threads=1,
        grids={"task_arithmetic": [0.2, 1.0]},
        references=False,
        on_row=seen.append,
        log=lambda m: None,
    )
    assert [r.method for r in result.rows] == ["dare_linear"]
    assert seen == result.rows
    assert result.rows[0].settings.endswith(
        ("λ=0.2 (from task_arithmetic)", "λ=1 (from task_arithmetic)")
    )
