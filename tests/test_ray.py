"""Scale-out on a real local Ray cluster (one per test session, bound to 127.0.0.1):
distributed merges byte-identical to local ones, a worker SIGKILLed mid-task and retried,
a task lost for good, and the parallel search finding the local search's best candidate."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import yaml

from conftest import make_hf_model, run_cli

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def s3_env():
    """A local S3-compatible server (moto's server mode, a real HTTP server on
    127.0.0.1) and the AWS_* variables that point boto at it; {} without moto."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield {}
        return
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "graft-test",
        "AWS_SECRET_ACCESS_KEY": "graft-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_env):
    """A 2-CPU Ray instance whose workers load tests/_ray_faults.py (the kill switch) and
    see the test's S3 server."""
    flag = tmp_path_factory.mktemp("ray-faults") / "kill"
    path = os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
    )
    # Workers at the tests' priority, not Ray's nice 15 (starved on a busy machine).
    os.environ.setdefault("RAY_worker_niceness", "0")
    for attempt in range(3):  # Ray gives a node 30 s to start: a busy machine can miss it
        try:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=200 * 2**20,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                runtime_env={
                    "env_vars": {"GRAFT_TEST_KILL": str(flag), "PYTHONPATH": path, **s3_env},
                    "worker_process_setup_hook": "_ray_faults.install",
                },
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield flag
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-family")
    base = make_hf_model("llama", root / "base", seed=1)
    ft1 = make_hf_model("llama", root / "ft1", seed=2, like=base)
    ft2 = make_hf_model("llama", root / "ft2", seed=3, like=base)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {  # random masks (DARE): byte identity also checks the per-tensor seeds
                "merge_method": "dare_ties",
                "base_model": str(base),
                "parameters": {"lambda": 0.9},
                "models": [
                    {"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.3}},
                ],
                "dtype": "float32",
                "seed": 7,
            }
        )
    )
    local = root / "local"
    code, _, err = run_cli("merge", recipe, local, "--out-shard-size", "20KB", "-q")
    assert code == 0, err
    return recipe, local


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ray_merge_is_byte_identical_to_the_local_merge(ray_cluster, family, tmp_path):
    recipe, local = family
    out = tmp_path / "ray"
    code, _, err = run_cli(
        "merge", recipe, out, "--out-shard-size", "20KB", "--ray", "auto", "--workers", "3", "-q"
    )
    assert code == 0, err
    want, got = _files(local), _files(out)
    assert len([n for n in want if n.endswith(".safetensors")]) >= 6  # several groups' worth
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    assert [p.name for p in tmp_path.iterdir()] == ["ray"]  # no staging debris


def test_ray_merge_reads_inputs_from_s3_and_file_urls(ray_cluster, s3_env, family, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    if not s3_env:
        pytest.skip("moto[server] is not installed")
    recipe, local = family
    doc = yaml.safe_load(recipe.read_text())
    s3 = fsspec.filesystem("s3")
    s3.mkdir("graft-test")
    for model in (doc["base_model"], doc["models"][0]["model"]):
        s3.put(model, f"graft-test/{Path(model).name}", recursive=True)
    doc["base_model"] = f"s3://graft-test/{Path(doc['base_model']).name}"
    doc["models"][0]["model"] = f"s3://graft-test/{Path(doc['models'][0]['model']).name}"
    doc["models"][1]["model"] = "file://" + doc["models"][1]["model"]
    urls = tmp_path / "urls.yaml"
    urls.write_text(yaml.safe_dump(doc))
    out, here = tmp_path / "out", tmp_path / "here"
    code, _, err = run_cli("merge", urls, out, "--out-shard-size", "20KB", "--ray", "auto", "-q")
    assert code == 0, err
    code, _, err = run_cli("merge", urls, here, "--out-shard-size", "20KB", "-q")
    assert code == 0, err
    assert _files(out) == _files(here)  # the same recipe (its hash is in every header)
    assert "s3://graft-test/" in _files(out)["README.md"].decode()
    from graft.io import load_state_dict

    want, got = load_state_dict(local), load_state_dict(out)
    assert sorted(got) == sorted(want)
    for name in want:  # read from s3:// and file://, merged as from the local paths
        assert got[name].dtype == want[name].dtype and bool((got[name] == want[name]).all())


def test_a_worker_killed_mid_task_is_retried_and_the_bytes_still_match(
    ray_cluster, family, tmp_path
):
    from graft.plan import plan_merge
    from graft.plan.distributed import run_plan_ray
    from graft.recipe import load_recipe

    recipe, local = family
    ray_cluster.write_text("armed")
    seen = [0, 0]

    def progress(n, nbytes):
        seen[0] += n
        seen[1] += nbytes

    plan = plan_merge(load_recipe(recipe))
    try:
        stats = run_plan_ray(
            plan, tmp_path / "ray", workers=2, max_shard_bytes=20_000, progress=progress
        )
    finally:
        plan.close()
    assert not ray_cluster.exists()  # a worker claimed the flag and SIGKILLed itself
    assert _files(tmp_path / "ray") == _files(local)
    assert seen == [stats.tensors, stats.bytes_read + stats.bytes_written]
    assert stats.tensors == len(plan.jobs)


def test_a_task_lost_for_good_ends_with_one_line_and_nothing_at_out(ray_cluster, family, tmp_path):
    from graft._ray import RayError
    from graft.plan import plan_merge
    from graft.plan.distributed import run_plan_ray
    from graft.recipe import load_recipe

    recipe, _ = family
    always = Path(str(ray_cluster) + ".always")
    always.write_text("armed")
    plan = plan_merge(load_recipe(recipe))
    try:
        with pytest.raises(RayError) as err:
            run_plan_ray(plan, tmp_path / "ray", workers=1, max_shard_bytes=20_000, max_retries=1)
    finally:
        always.unlink()
        plan.close()
    msg = str(err.value)
    assert "\n" not in msg and "after 1 retries" in msg and "nothing was written" in msg
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the staging folder


def test_balance_keeps_groups_near_equal_by_bytes():
    from graft.plan.distributed import balance

    groups = balance([10, 1, 1, 1, 7, 3, 3], 3)
    loads = sorted(sum([10, 1, 1, 1, 7, 3, 3][i] for i in g) for g in groups)
    assert loads == [8, 8, 10]  # LPT: 10 | 7+1 | 3+3+1+1
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert balance([5, 5], 8) == [[0], [1]]  # never more groups than shards


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from graft.zoo.build import build_zoo

    # test_zoo.py's quick zoo: whichever module runs first builds it, the others reuse it.
    return build_zoo(
        tmp_path_factory.getbasetemp() / "quick-zoo-0", seed=0, quick=True, log=lambda m: None
    )


def _search(zoo, tmp_path, name, *extra):
    import json

    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(zoo.base),
                "parameters": {"lambda": 0.5},
                "models": [
                    {"model": str(zoo.finetuned[t]), "parameters": {"weight": 1.0}}
                    for t in ("rot90-digit", "rot180-digit")
                ],
            }
        )
    )
    out = tmp_path / f"{name}.yaml"
    code, stdout, err = run_cli(
        "search",
        recipe,
        "--param",
        "lambda=0.2:1.2:0.2",
        "-o",
        out,
        "--zoo",
        zoo.root,
        "--data",
        "rot90-digit",
        "--data",
        "rot180-digit",
        "--json",
        "-q",
        *extra,
    )
    assert code == 0, err
    return json.loads(stdout), out.read_text()


def test_ray_search_finds_the_local_grid_searchs_best(ray_cluster, zoo, tmp_path):
    local, local_recipe = _search(zoo, tmp_path, "local")
    grid, grid_recipe = _search(zoo, tmp_path, "grid", "--ray", "auto", "--workers", "2")
    scores = {c["params"]["lambda"]: c["score"] for c in local["candidates"]}
    assert len(set(scores.values())) > 1  # the search has something to choose
    assert [c["params"] for c in grid["candidates"]] == [c["params"] for c in local["candidates"]]
    for c in grid["candidates"]:
        assert c["score"] == pytest.approx(scores[c["params"]["lambda"]], abs=1e-12)
    assert grid["best"]["params"] == local["best"]["params"]
    assert grid_recipe == local_recipe


def test_tpe_proposes_in_batches_as_wide_as_the_evaluator_and_never_repeats_a_point():
    pytest.importorskip("optuna")
    from graft.eval.trials import run

    batches = []

    def evaluate(batch, progress=None):  # scores peak at x = 7 of 0..19
        batches.append(len(batch))
        return [{"params": p, "score": -abs(p["x"] - 7)} for p in batch]

    evaluate.width = 3
    rows = run({"x": list(range(20))}, evaluate, sampler="tpe", trials=12, seed=0)
    xs = [r["params"]["x"] for r in rows]
    assert len(xs) == len(set(xs)) and len(xs) <= 12
    assert max(batches) <= 3 and sum(batches) == len(rows)
    assert max(rows, key=lambda r: r["score"])["params"]["x"] in (6, 7, 8)
    assert run({"x": [1, 2, 3]}, evaluate, sampler="random", trials=2, seed=0) == run(
        {"x": [1, 2, 3]}, evaluate, sampler="random", trials=2, seed=0
    )
