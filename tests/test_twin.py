"""Twin-Merging: the SVD truncation by value, the routed mix by hand, the dynamic model
against its definition (one-hot routing gives shared + exclusive part t, and at full rank
fine-tune t), and `graft twin` / `graft eval` end to end on tiny models made here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from graft.data import load_runner, read_data, save_head_file
from graft.data.passes import features, predict
from graft.io import load_state_dict, open_checkpoint, save_state_dict
from graft.models.digits_net import backbone_state, build_backbone, default_config
from graft.twin.dynamic import build_stacks, mixed_state, predict_twin, routed
from graft.twin.exclusive import compress_exclusive, exclusive_rank, mix
from graft.twin.files import open_twin
from graft.twin.router import Router, router_from_state, router_state, train_router


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _decode(codec: str, parts: dict) -> torch.Tensor:
    return parts["B"] @ parts["A"] if codec == "lowrank" else parts[""]


# --- exclusive parts: truncation by value ---------------------------------------------


def test_rank_is_the_floor_of_keep_times_the_smaller_side_at_least_one():
    assert exclusive_rank((768, 384), keep=0.1, rank=None) == 38  # ⌊38.4⌋
    assert exclusive_rank((128, 64), keep=0.1, rank=None) == 6
    assert exclusive_rank((128, 64), keep=0.001, rank=None) == 1
    assert exclusive_rank((128, 64), keep=1.0, rank=None) == 64
    assert exclusive_rank((128, 64), keep=None, rank=100) == 64


def test_svd_truncation_keeps_the_largest_singular_values():
    # singular values 3 (|−3|), 2 and 1 on the diagonal: rank 2 keeps −3 and 2
    delta = torch.diag(torch.tensor([2.0, -3.0, 1.0]))
    codec, parts = compress_exclusive(delta, keep=0.7)  # ⌊2.1⌋ = 2
    assert codec == "lowrank" and parts["B"].shape == (3, 2) and parts["A"].shape == (2, 3)
    torch.testing.assert_close(_decode(codec, parts), torch.diag(torch.tensor([2.0, -3.0, 0.0])))
    codec, parts = compress_exclusive(delta, keep=0.5)  # ⌊1.5⌋ = 1
    torch.testing.assert_close(_decode(codec, parts), torch.diag(torch.tensor([0.0, -3.0, 0.0])))
    # columns of norm 5 and 1, orthogonal: rank 1 keeps the first column exactly
    tall = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    codec, parts = compress_exclusive(tall, rank=1)
    torch.testing.assert_close(
        _decode(codec, parts), torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 0.0]])
    )
    # B = U√S, A = √S Vᵀ: both factors carry √5
    assert math.isclose(float(parts["B"].norm()), math.sqrt(5), rel_tol=1e-6)
    assert math.isclose(float(parts["A"].norm()), math.sqrt(5), rel_tol=1e-6)


def test_full_rank_and_vectors_are_stored_dense_and_exact():
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert compress_exclusive(delta, keep=1.0) == ("dense", {"": delta})
    codec, parts = compress_exclusive(delta, rank=7)
    assert codec == "dense" and torch.equal(parts[""], delta)
    bias = torch.tensor([0.5, -1.0])
    codec, parts = compress_exclusive(bias, keep=0.1)
    assert codec == "dense" and torch.equal(parts[""], bias)


def test_mix_is_shared_plus_weighted_parts_by_hand():
    shared = torch.tensor([1.0, 2.0])
    out = mix(shared, [torch.tensor([4.0, 0.0]), None, torch.tensor([0.0, 8.0])],
              torch.tensor([0.25, 0.5, 0.25]))  # fmt: skip
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))  # [1 + 1, 2 + 2]


def test_stacks_mix_lowrank_dense_and_absent_parts():
    b1, a1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]])  # 2 x 3, rank 1
    d3 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    parts = [
        {"w": ("lowrank", {"B": b1, "A": a1}), "b": ("dense", {"": torch.tensor([1.0, 1.0])})},
        {},  # task 2 left everything as the shared model has it
        {"w": ("dense", {"": d3})},
    ]
    stacks = build_stacks(parts, {"w": (2, 3), "b": (2,), "untouched": (4,)})
    assert set(stacks) == {"w", "b"}
    w = torch.tensor([0.5, 0.3, 0.2])
    # 0.5·[[1,0,−1],[2,0,−2]] + 0.2·[[0,1,0],[0,0,3]]
    expected = torch.tensor([[0.5, 0.2, -0.5], [1.0, 0.0, -0.4]])
    torch.testing.assert_close(stacks["w"].mixed(w), expected)
    torch.testing.assert_close(stacks["b"].mixed(w), torch.tensor([0.5, 0.5]))
    shared = {"w": torch.ones(2, 3), "b": torch.zeros(2), "untouched": torch.zeros(4)}
    state = mixed_state(shared, stacks, w)
    torch.testing.assert_close(state["w"], 1 + expected)
    assert "untouched" not in state


# --- router ------------------------------------------------------------------------------


def test_router_learns_separable_tasks_and_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 6, generator=g) + torch.repeat_interleave(torch.eye(3, 6) * 4, 30, 0)
    y = torch.repeat_interleave(torch.arange(3), 30)
    router, losses = train_router(x, y, 3, steps=600, seed=1)
    assert np.mean(losses[-10:]) < losses[0] / 2
    assert float((router.weights(x).argmax(1) == y).double().mean()) == 1.0
    again = router_from_state(router_state(router))
    torch.testing.assert_close(again.weights(x), router.weights(x))
    twice, _ = train_router(x, y, 3, steps=600, seed=1)  # seeded: the same router
    torch.testing.assert_close(twice.weights(x), router.weights(x))


def _fixed_router(features: int, probs: list[float]) -> Router:
    """A router whose weights are ``probs`` for every input (only its last bias is set)."""
    router = Router(features, len(probs), 4)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        router.fc3.bias.copy_(torch.tensor(probs).log())
    return router.eval()


# --- the dynamic model on a tiny digits family -----------------------------------------


CFG = default_config(num_hidden_layers=2, hidden_size=16, intermediate_size=32)


def _task_data(task: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose first (task 0) or second (task 1) half is shifted: the router can
    tell the tasks apart; labels from a fixed random direction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    x[:, task * 32 : (task + 1) * 32] += 2.0
    y = (x @ np.random.default_rng(task).normal(size=64) > 0).astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A base, two fine-tunes (the base plus noise), a head and val/test data per task."""
    root = tmp_path_factory.mktemp("twin")
    torch.manual_seed(0)
    base = build_backbone(CFG)
    save_state_dict(backbone_state(base), root / "base", config=CFG)
    out = {"root": root, "base": root / "base", "ft": [], "head": [], "val": [], "test": []}
    base_state = backbone_state(base)
    for t in range(2):
        g = torch.Generator().manual_seed(10 + t)
        state = {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in base_state.items()}
        out["ft"].append(save_state_dict(state, root / f"ft{t}", config=CFG))
        head = nn.Linear(16, 2)
        out["head"].append(save_head_file(head, root / f"head{t}.safetensors", task=f"t{t}"))
        for split, seed in (("val", 20), ("test", 30)):
            x, y = _task_data(t, 48, seed + t)
            np.savez(root / f"t{t}-{split}.npz", x=x, label=y)
            out[split].append(root / f"t{t}-{split}.npz")
    return out


def _parts_against(shared: dict, finetuned: list[dict], keep: float) -> list[dict]:
    return [
        {n: compress_exclusive(ft[n] - shared[n], keep=keep) for n in shared} for ft in finetuned
    ]


def _shared_runner(digits, state: dict, task: int):
    runner = load_runner(digits["base"], head=digits["head"][task])
    runner.module.backbone.load_state_dict(state)
    return runner


@pytest.mark.parametrize("keep", [0.25, 1.0])
def test_one_hot_routing_is_shared_plus_that_tasks_part(digits, keep):
    fts = [load_state_dict(p) for p in digits["ft"]]
    base = load_state_dict(digits["base"])
    shared = {n: base[n] + 0.3 * sum(ft[n] - base[n] for ft in fts) for n in base}
    parts = _parts_against(shared, fts, keep)
    stacks = build_stacks(parts, {n: tuple(t.shape) for n, t in shared.items()})
    data = read_data(digits["test"][0])
    for task in range(2):
        runner = _shared_runner(digits, shared, task)
        inputs = runner.inputs(data, 0, len(data))
        one_hot = torch.nn.functional.one_hot(torch.full((len(data),), task), 2).float()
        with torch.no_grad(), routed(runner, stacks) as holder:
            holder.value = one_hot
            dynamic = runner.logits(inputs)
            holder.value = None
            plain = runner.logits(inputs)
        by_hand = {n: shared[n] + _decode(*parts[task][n]) for n in shared}
        with torch.no_grad():
            expected = runner.logits(inputs, by_hand)
            shared_logits = runner.logits(inputs, shared)
        torch.testing.assert_close(dynamic, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain, shared_logits)  # no weights: the shared model
        if keep == 1.0:  # exact parts: shared + τₜ is fine-tune t
            with torch.no_grad():
                ft_logits = runner.logits(inputs, fts[task])
            torch.testing.assert_close(dynamic, ft_logits, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(dynamic, runner.logits(inputs, fts[task]), atol=1e-3)


def test_per_input_routing_equals_one_materialised_model_per_input(digits):
    fts = [load_state_dict(p) for p in digits["ft"]]
    shared = {n: 0.5 * (fts[0][n] + fts[1][n]) for n in fts[0]}
    parts = _parts_against(shared, fts, 0.25)
    stacks = build_stacks(parts, {n: tuple(t.shape) for n, t in shared.items()})
    runner = _shared_runner(digits, shared, 0)
    data = read_data(digits["test"][1]).subset(np.arange(6))
    w = torch.softmax(torch.randn(6, 2, generator=torch.Generator().manual_seed(3)), 1)
    with torch.no_grad(), routed(runner, stacks) as holder:
        holder.value = w
        dynamic = runner.logits(runner.inputs(data, 0, 6))
    for i in range(6):
        by_hand = {n: mix(shared[n], [_decode(*p[n]) for p in parts], w[i]) for n in shared}
        with torch.no_grad():
            expected = runner.logits(runner.inputs(data, i, i + 1), by_hand)
        torch.testing.assert_close(dynamic[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_router_mixing_by_hand_per_input_and_per_batch(digits):
    fts = [load_state_dict(p) for p in digits["ft"]]
    shared = {n: 0.5 * (fts[0][n] + fts[1][n]) for n in fts[0]}
    parts = _parts_against(shared, fts, 0.5)
    stacks = build_stacks(parts, {n: tuple(t.shape) for n, t in shared.items()})
    runner = _shared_runner(digits, shared, 1)
    router = _fixed_router(16, [0.25, 0.75])  # 0.25 τ₀ + 0.75 τ₁ for every input
    data = read_data(digits["test"][0]).subset(np.arange(10))
    by_hand = {
        n: shared[n] + 0.25 * _decode(*parts[0][n]) + 0.75 * _decode(*parts[1][n]) for n in shared
    }
    expected = predict(runner, data, params=by_hand)
    for routing, batch in (("input", 4), ("batch", 3)):
        z, w = predict_twin(runner, runner, router, stacks, data, routing=routing, batch_size=batch)
        np.testing.assert_allclose(w, np.tile([0.25, 0.75], (10, 1)), rtol=1e-6)
        np.testing.assert_allclose(z, expected, atol=1e-5, rtol=1e-5)


def test_per_input_hooks_on_bert_layers_match_the_materialised_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, type_vocab_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    runner = load_runner(tmp_path / "bert")
    shared = runner.state()
    g = torch.Generator().manual_seed(1)
    parts = [
        {n: compress_exclusive(0.1 * torch.randn(t.shape, generator=g), keep=0.5)
         for n, t in shared.items()}
        for _ in range(3)
    ]  # fmt: skip
    stacks = build_stacks(parts, {n: tuple(t.shape) for n, t in shared.items()})
    assert {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"} <= set(stacks)
    ids = torch.randint(0, 50, (4, 7), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = torch.softmax(torch.randn(4, 3, generator=g), 1)
    with torch.no_grad(), routed(runner, stacks) as holder:
        holder.value = w
        dynamic = runner.features(inputs)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            expected = runner.features(one, mixed_state(shared, stacks, w[i]))
        torch.testing.assert_close(dynamic[i : i + 1], expected, atol=1e-5, rtol=1e-5)


# --- the CLI end to end --------------------------------------------------------------------


def _twin(digits, out: Path, *extra: str, steps: int = 100):
    return run_cli(
        "twin", *digits["ft"], "--base", digits["base"], "--data", digits["val"][0],
        "--data", digits["val"][1], "-o", out, "--router-steps", steps, "--json", *extra,
    )  # fmt: skip


def test_twin_cli_writes_the_folder_and_eval_runs_the_routed_model(digits, tmp_path):
    out = tmp_path / "twin"
    code, stdout, err = _twin(digits, out, "--keep", "0.25")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["tasks"] == ["t0-val", "t1-val"]
    assert report["router_train_accuracy"] == 1.0  # the halves are shifted: easy to tell
    manifest = json.loads((out / "twin.json").read_text())
    assert manifest["tasks"] == report["tasks"] and manifest["keep"] == 0.25
    assert (out / "shared" / "config.json").is_file()
    # storage: shared + exclusive + router, counted from what is on disk
    s = report["storage"]
    with open_checkpoint(out / "shared") as ckpt:
        assert s["shared"] == ckpt.total_bytes
        assert s["finetuned"] == 2 * ckpt.total_bytes
    stored = 0
    for t in report["tasks"]:
        with open_checkpoint(out / "exclusive" / f"{t}.safetensors") as ckpt:
            stored += ckpt.total_bytes
            # matrices 16x64, 32x16, 16x32: ranks 4; vectors dense
            assert tuple(ckpt.info("blocks.0.fc1.weight::B").shape) == (32, 4)
    assert s["exclusive"] == stored
    # router: mean, std (16 each), fc1 16→32, fc2 32→32, fc3 32→2, float32
    assert s["router"] == 4 * (2 * 16 + (16 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2))
    assert s["total"] == s["shared"] + s["exclusive"] + s["router"]

    # graft eval: against the definition, recomputed here from the files
    code, stdout, err = run_cli(
        "eval", out, "--data", digits["test"][0], "--head", digits["head"][0], "--json", "-q"
    )
    assert code == 0, err
    result = json.loads(stdout)["results"][str(digits["test"][0])]
    twin = open_twin(out)
    shared = load_state_dict(out / "shared")
    parts = [load_state_dict(out / "exclusive" / f"{t}.safetensors") for t in twin.tasks]
    runner = load_runner(out / "shared", head=digits["head"][0])
    data = runner.prepare(read_data(digits["test"][0]))
    w = twin.router.weights(features(load_runner(out / "shared"), data))
    tau = [{n: p[f"{n}::B"] @ p[f"{n}::A"] if f"{n}::B" in p else p.get(n) for n in shared}
           for p in parts]  # fmt: skip
    logits = []
    for i in range(len(data)):
        state = {n: mix(shared[n], [tp[n] for tp in tau], w[i]) for n in shared}
        logits.append(predict(runner, data.subset([i]), params=state))
    z = torch.from_numpy(np.concatenate(logits))
    loss = float(nn.functional.cross_entropy(z, torch.from_numpy(data.labels)))
    acc = float((z.argmax(1) == torch.from_numpy(data.labels)).double().mean())
    assert math.isclose(result["loss"], loss, rel_tol=1e-5)
    assert result["accuracy"] == acc
    assert result["routing"]["t0-val"] > 0.75  # the router sends task 0's inputs to task 0

    # per batch: the batch's mean weights; the whole set in one batch
    code, stdout, err = run_cli(
        "eval", out, "--data", digits["test"][0], "--head", digits["head"][0], "--json", "-q",
        "--routing", "batch", "--batch-size", "1000",
    )  # fmt: skip
    assert code == 0, err
    batch = json.loads(stdout)["results"][str(digits["test"][0])]
    state = {n: mix(shared[n], [tp[n] for tp in tau], w.mean(0)) for n in shared}
    expected = predict(runner, data, params=state)
    loss = float(
        nn.functional.cross_entropy(torch.from_numpy(expected), torch.from_numpy(data.labels))
    )
    assert math.isclose(batch["loss"], loss, rel_tol=1e-5)


def test_full_rank_exclusive_patch_applies_back_to_the_fine_tune(digits, tmp_path):
    out = tmp_path / "twin"
    code, _, err = _twin(digits, out, "--keep", "1", "--method", "ties", steps=1500)
    assert code == 0, err
    code, _, err = run_cli(
        "apply", out / "shared", out / "exclusive" / "t1-val.safetensors", "-o", tmp_path / "back"
    )
    assert code == 0, err
    back, ft = load_state_dict(tmp_path / "back"), load_state_dict(digits["ft"][1])
    for n in ft:
        torch.testing.assert_close(back[n], ft[n], atol=1e-6, rtol=0)
    # and the dynamic model with task 1's data routed to task 1 is fine-tune 1
    code, stdout, err = run_cli(
        "eval", out, "--data", digits["test"][1], "--head", digits["head"][1], "--json", "-q"
    )
    assert code == 0, err
    result = json.loads(stdout)["results"][str(digits["test"][1])]
    code, stdout, err = run_cli(
        "eval", digits["ft"][1], "--data", digits["test"][1], "--head", digits["head"][1],
        "--json", "-q",
    )  # fmt: skip
    ft_result = json.loads(stdout)["results"][str(digits["test"][1])]
    assert result["routing"]["t1-val"] > 0.99
    assert abs(result["loss"] - ft_result["loss"]) < 0.05


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0"], "--keep must be in (0, 1]"),
        (["--keep", "0.5", "--rank", "2"], "exactly one of --keep"),
        (["--method", "slerp"], "unknown shared-expert method"),
        (["--rank", "0"], "--rank must be >= 1"),
    ],
)
def test_bad_settings_fail_in_one_line_and_write_nothing(digits, tmp_path, args, message):
    out = tmp_path / "twin"
    code, _, err = _twin(digits, out, *args)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_inputs_fail_in_one_line_and_write_nothing(digits, tmp_path):
    out = tmp_path / "twin"
    one = run_cli("twin", digits["ft"][0], "--base", digits["base"], "--data",
                  digits["val"][0], "-o", out)  # fmt: skip
    assert one[0] == 2 and "at least two fine-tuned models" in one[2]
    count = run_cli("twin", *digits["ft"], "--base", digits["base"], "--data",
                    digits["val"][0], "-o", out)  # fmt: skip
    assert count[0] == 2 and "2 models" in count[2]
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((4, 10), np.float32))
    code, _, err = run_cli("twin", *digits["ft"], "--base", digits["base"], "--data", wide,
                           "--data", digits["val"][1], "-o", out, "-q")  # fmt: skip
    assert code == 2 and "takes 64 input values" in err and err.count("\n") == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wide.npz"]  # no temp folder left


def test_eval_refuses_a_twin_folder_whose_router_does_not_fit(digits, tmp_path):
    out = tmp_path / "twin"
    assert _twin(digits, out)[0] == 0
    manifest = json.loads((out / "twin.json").read_text())
    manifest["tasks"] = ["t1-val", "t0-val"]
    (out / "twin.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("eval", out, "--data", digits["test"][0], "--head", digits["head"][0])
    assert code == 2 and "routes tasks" in err and err.count("\n") == 1
    code, _, err = run_cli("eval", digits["ft"][0], "--data", digits["test"][0], "--head",
                           digits["head"][0], "--routing", "batch")  # fmt: skip
    assert code == 2 and "applies to Twin-Merging folders" in err


def test_a_failure_after_the_shared_merge_leaves_nothing_at_out(digits, tmp_path):
    state = load_state_dict(digits["ft"][1])
    state["blocks.0.fc1.weight"][0, 0] = float("nan")
    broken = save_state_dict(state, tmp_path / "broken", config=CFG)
    out = tmp_path / "twin"
    code, _, err = run_cli("twin", digits["ft"][0], broken, "--base", digits["base"],
                           "--data", digits["val"][0], "--data", digits["val"][1], "-o", out,
                           "-q")  # fmt: skip
    assert code == 2 and "blocks.0.fc1.weight" in err and "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no OUT, no temp folder
