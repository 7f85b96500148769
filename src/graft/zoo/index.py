"""The zoo index: one SQLite file listing every checkpoint graft has scanned, in folders or
in the Hugging Face hub cache, so models can be found, compared and traced without
opening them again.

Per model it keeps what the headers say (format, architecture, parameter count, dtypes,
the tensor-name signature), what the card says (``base_model``, ``base_model_relation``,
license, ``model-index`` claims) and a small fixed sample of the weights (for lineage,
`graft.zoo.lineage`). A scan reads headers, a 256-byte prefix of every tensor (the
fingerprint) and the sample, never whole tensors.

Change detection is cheap, not cryptographic: a model is read again when the size or
mtime of one of its files changes; its ``fingerprint`` (names, dtypes, shapes and the first
256 bytes of every tensor, `Checkpoint.fingerprint`) stands in for a content hash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from graft.io import (
    GraftIOError,
    default_db_path,
    discover_checkpoints,
    file_stats,
    fingerprint_nbytes,
    header_nbytes,
    is_hf_cache,
    is_model_dir,
    not_a_model,
    open_checkpoint,
    open_db,
    read_model_card,
    scan_hf_cache,
)
from graft.zoo._weights import (
    SampleSpec,
    describe,
    plan_from_json,
    plan_hash,
    plan_sample,
    plan_to_json,
    read_sample,
)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    repo_id TEXT,
    revision TEXT,
    refs TEXT,
    status TEXT NOT NULL,
    error TEXT,
    format TEXT,
    architecture TEXT,
    model_type TEXT,
    num_params INTEGER,
    num_tensors INTEGER,
    total_bytes INTEGER,
    dtypes TEXT,
    signature TEXT,
    fingerprint TEXT,
    files TEXT NOT NULL,
    card TEXT,
    card_error TEXT,
    bytes_read INTEGER,
    scan_seconds REAL,
    scanned_at TEXT
);
CREATE INDEX IF NOT EXISTS models_signature ON models(signature);
CREATE TABLE IF NOT EXISTS samples (
    model_id INTEGER PRIMARY KEY REFERENCES models(id) ON DELETE CASCADE,
    plan_hash TEXT NOT NULL,
    plan TEXT NOT NULL,
    data BLOB NOT NULL
);
"""
_COMMIT_EVERY = 25  # models per transaction during a scan


class ZooIndexError(ValueError):
    """A model reference matches nothing (or several things) in the index."""


@dataclass(frozen=True)
class ModelRecord:
    """One indexed checkpoint (a row of the index)."""

    id: int
    path: str
    source: str  # "path" or "hf-cache"
    status: str  # "ok" or "error"
    error: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    refs: tuple[str, ...] = ()
    format: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    num_params: int | None = None
    num_tensors: int | None = None
    total_bytes: int | None = None
    dtypes: dict = field(default_factory=dict)
    signature: str | None = None
    fingerprint: str | None = None
    card: dict = field(default_factory=dict)
    card_error: str | None = None
    bytes_read: int | None = None
    scanned_at: str | None = None

    @property
    def name(self) -> str:
        """``org/name@rev`` for a hub-cache snapshot, else the path."""
        if self.repo_id:
            return f"{self.repo_id}@{(self.revision or '')[:8]}"
        return self.path

    def to_json(self) -> dict:
        out = asdict(self)
        out["refs"] = list(self.refs)
        out["name"] = self.name
        return out


@dataclass
class ScanReport:
    """What a scan did. ``errors``: ``(path, reason)`` of checkpoints that could not be read
    (recorded in the index with status "error")."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    not_models: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "errors": [list(e) for e in self.errors]}


def card_summary(meta: dict, notes: list[str] | None = None) -> dict:
    """The card fields the index keeps: base models, relation, license, tags, data sets and
    the ``model-index`` claims flattened to ``{model, task, task_name, dataset, metric,
    value}`` rows. Malformed fields and entries are dropped, not fatal; a line naming each
    dropped field is appended to ``notes`` when given."""
    notes = [] if notes is None else notes

    def wrong(field: str, value: object, want: str) -> None:
        notes.append(f"{field} is {_describe(value)}, expected {want}")

    base = meta.get("base_model")
    if isinstance(base, str):
        base = [base]
    elif isinstance(base, list):
        if not all(isinstance(b, str) for b in base):
            wrong("base_model", base, "a list of model ids")
        base = [b for b in base if isinstance(b, str) and b]
    else:
        if base is not None:
            wrong("base_model", base, "a model id or a list of them")
        base = []
    claims = []
    entries = meta.get("model-index")
    if entries is not None and not isinstance(entries, list):
        wrong("model-index", entries, "a list")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            wrong("a model-index entry", entry, "a mapping")
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            if results is not None:
                wrong("model-index results", results, "a list")
            continue
        for res in results:
            if not isinstance(res, dict):
                continue
            task, ds, metrics = (
                _as_dict(res.get("task")),
                _as_dict(res.get("dataset")),
                res.get("metrics"),
            )
            if not isinstance(metrics, list):
                if metrics is not None:
                    wrong("model-index metrics", metrics, "a list")
                continue
            for m in metrics:
                m = _as_dict(m)
                claims.append(
                    {
                        "model": _scalar(entry.get("name")),
                        "task": _scalar(task.get("type") or task.get("name")),
                        "task_name": _scalar(task.get("name")),
                        "dataset": _scalar(ds.get("name") or ds.get("type")),
                        "dataset_type": _scalar(ds.get("type")),
                        "metric": _scalar(m.get("type") or m.get("name")),
                        "value": _scalar(m.get("value")),
                    }
                )
    listed = {}
    for key in ("tags", "datasets"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str | list):
            wrong(key, value, "a string or a list of strings")
        listed[key] = _str_list(value)
    texts = {}
    for key in ("base_model_relation", "license", "pipeline_tag"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            wrong(key, value, "a string")
        texts[key] = value if isinstance(value, str) else None
    return {"base_model": base, **texts, **listed, "claims": claims}


class ZooIndex:
    """The index file, opened. Use as a context manager or call `close`.

    Args:
        path: the SQLite file; default `graft.io.default_db_path()`.
        create: create the file if missing (scans); queries pass False.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True):
        self.path = Path(path) if path is not None else default_db_path()
        self._con = open_db(self.path, _SCHEMA, version=SCHEMA_VERSION, create=create)

    def __enter__(self) -> ZooIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    # --- scanning ------------------------------------------------------------------

    def scan(
        self,
        paths: Iterable[str | os.PathLike] = (),
        *,
        hf_cache: bool = False,
        hf_cache_dir: str | os.PathLike | None = None,
        warn: Callable[[str], None] | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> ScanReport:
        """Index the checkpoints at or under ``paths`` (and the HF cache), updating rows.

        A path may be a model folder, a weight file, a folder of models (searched
        recursively) or a Hugging Face hub cache folder. Unchanged files (same sizes and
        mtimes) are skipped; rows under a scanned folder whose checkpoint is gone are
        removed. A checkpoint that cannot be read is recorded with status "error" and
        reported through ``warn``; the scan goes on. graft's own statistics and head files
        (``graft_statistic`` metadata) are not models and are left out.

        Args:
            paths: where to look.
            hf_cache: also scan the Hugging Face hub cache (``huggingface_hub`` needed).
            hf_cache_dir: that cache's folder, if not the default.
            warn: called with one line per unreadable checkpoint (default: stderr).
            progress: called ``(done, total, path)`` after each checkpoint.

        Raises:
            GraftIOError: a given path does not exist; the cache cannot be scanned.
        """
        warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
        start = time.perf_counter()
        report = ScanReport()
        targets, roots = self._targets(paths, hf_cache, hf_cache_dir, report)
        known = {r["path"]: r for r in self._con.execute("SELECT id, path, files FROM models")}
        with self._con:
            for k, (path, snap) in enumerate(targets):
                self._scan_one(path, snap, known.get(str(path)), report, warn)
                if (k + 1) % _COMMIT_EVERY == 0:
                    self._con.commit()
                if progress:
                    progress(k + 1, len(targets), str(path))
            report.removed = self._prune(roots, {str(p) for p, _ in targets})
        for w in report.warnings:
            warn(w)
        report.seconds = time.perf_counter() - start
        return report

    def _targets(self, paths, hf_cache, hf_cache_dir, report):
        targets: dict[Path, object] = {}
        roots: list[Path] = []
        caches = [Path(hf_cache_dir) if hf_cache_dir else None] if hf_cache else []
        for p in paths:
            p = Path(os.path.abspath(p))
            if is_hf_cache(p):
                caches.append(p)
                continue
            roots.append(p)
            targets.update({c: None for c in discover_checkpoints(p)})
        for cache in caches:
            where, snaps, warnings = scan_hf_cache(cache)
            roots.append(Path(os.path.abspath(where)))
            report.warnings += [f"Hugging Face cache: {w}" for w in warnings]
            for snap in snaps:
                found = [snap.path] if is_model_dir(snap.path) else discover_checkpoints(snap.path)
                targets.update({Path(os.path.abspath(c)): snap for c in found})
        return sorted(targets.items(), key=lambda kv: str(kv[0])), roots

    def _scan_one(self, path: Path, snap, row, report: ScanReport, warn) -> None:
        files = json.dumps(file_stats(path))
        if row is not None and row["files"] == files:
            report.unchanged += 1
            return
        rec, sample = _read_model(path)
        if rec is None:  # a file graft wrote that is no model (`graft.io.not_a_model`)
            report.not_models += 1
            if row is not None:
                self._con.execute("DELETE FROM models WHERE id = ?", (row["id"],))
            return
        report.read += 1
        report.bytes_read += rec.get("bytes_read") or 0
        if rec["status"] == "error":
            report.errors.append((str(path), rec["error"]))
            warn(f"skipped {path}: {rec['error']}")
        rec.update(
            path=str(path),
            source="hf-cache" if snap else "path",
            repo_id=snap.repo_id if snap else None,
            revision=snap.revision if snap else None,
            refs=json.dumps(list(snap.refs)) if snap else None,
            files=files,
            scanned_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        cols = list(rec)
        self._con.execute(
            f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT(path) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols)}",
            [rec[c] for c in cols],
        )
        model_id = self._con.execute(
            "SELECT id FROM models WHERE path = ?", (str(path),)
        ).fetchone()[0]
        self._con.execute("DELETE FROM samples WHERE model_id = ?", (model_id,))
        if sample is not None:
            plan, data = sample
            self._con.execute(
                "INSERT INTO samples (model_id, plan_hash, plan, data) VALUES (?, ?, ?, ?)",
                (model_id, plan_hash(plan), plan_to_json(plan), data.numpy().tobytes()),
            )
        if row is None:
            report.added += 1
        else:
            report.updated += 1

    def _prune(self, roots: list[Path], seen: set[str]) -> int:
        gone = []
        for row in self._con.execute("SELECT id, path FROM models"):
            if row["path"] in seen:
                continue
            p = row["path"]
            if any(p == str(r) or p.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots):
                gone.append(row["id"])
        self._con.executemany("DELETE FROM models WHERE id = ?", [(i,) for i in gone])
        return len(gone)

    # --- queries -------------------------------------------------------------------

    def models(self, *, include_errors: bool = False) -> list[ModelRecord]:
        """Every indexed model, by path; with ``include_errors`` also unreadable ones."""
        sql = "SELECT * FROM models" + ("" if include_errors else " WHERE status = 'ok'")
        return [_record(r) for r in self._con.execute(sql + " ORDER BY path")]

    def model(self, ref: str | int) -> ModelRecord:
        """The model ``ref`` names: an id, a path, a hub repo id (``org/name``, the
        revision ``main`` points at if several) or a unique path suffix.

        Raises:
            ZooIndexError: nothing or more than one model matches.
        """
        rows = self.models(include_errors=True)
        text = str(ref)
        if text.isdigit():
            hit = [r for r in rows if r.id == int(text)]
        else:
            absolute = os.path.abspath(text)
            hit = [r for r in rows if r.path == absolute]
            hit = hit or [r for r in rows if r.repo_id == text]
            if len(hit) > 1:
                hit = [r for r in hit if "main" in r.refs] or hit
            hit = hit or [r for r in rows if r.path.endswith(os.sep + text.strip(os.sep))]
        if len(hit) == 1:
            return hit[0]
        if not hit:
            raise ZooIndexError(
                f"no model {text!r} in the index {self.path}; `graft zoo ls` lists them"
            )
        names = ", ".join(r.name for r in hit[:4])
        raise ZooIndexError(
            f"{text!r} matches {len(hit)} models ({names}); give a longer path or the id"
        )

    def find(
        self, *, arch: str | None = None, base: str | None = None, task: str | None = None
    ) -> list[ModelRecord]:
        """Models matching every filter given (case-insensitive).

        Args:
            arch: a substring of the architecture or model type.
            base: models whose card names this base model, or that descend from it by the
                weights (`graft.zoo.lineage`) when it is in the index.
            task: a substring of a ``model-index`` claim's task or data set, a tag, a
                card ``datasets`` entry or the pipeline tag.
        """
        out = self.models()
        if arch:
            a = arch.casefold()
            out = [
                r
                for r in out
                if a in (r.architecture or "").casefold() or a in (r.model_type or "").casefold()
            ]
        if task:
            out = [r for r in out if _matches_task(r.card, task.casefold())]
        if base:
            keep = {
                r.id for r in out if any(_same_model(b, base) for b in r.card.get("base_model", []))
            }
            keep |= self._descendants(base)
            out = [r for r in out if r.id in keep]
        return out

    def _descendants(self, base: str) -> set[int]:
        from graft.zoo.lineage import index_lineage

        try:
            root = self.model(base)
        except ZooIndexError:
            return set()
        children: dict[int, list[int]] = {}
        for fam in index_lineage(self).families:
            for child, parent in fam.parents.items():
                if parent is not None:
                    children.setdefault(parent, []).append(child)
        out, todo = set(), [root.id]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return out

    def samples(
        self, ids: Iterable[int] | None = None
    ) -> dict[int, tuple[str, list[SampleSpec], torch.Tensor]]:
        """``{model id: (plan hash, plan, flat float32 sample)}`` for readable models (all,
        or those in ``ids``)."""
        sql = "SELECT model_id, plan_hash, plan, data FROM samples"
        if ids is None:
            rows = self._con.execute(sql).fetchall()
        else:
            wanted, rows = list(ids), []
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                rows += self._con.execute(f"{sql} WHERE model_id IN ({marks})", chunk).fetchall()
        out = {}
        for r in rows:
            raw = bytearray(r["data"] or b"")
            # an empty sample (a checkpoint of zero-element tensors) has no buffer to view
            data = torch.frombuffer(raw, dtype=torch.float32) if raw else torch.zeros(0)
            out[r["model_id"]] = (r["plan_hash"], plan_from_json(r["plan"]), data)
        return out


def _read_model(path: Path) -> tuple[dict | None, tuple | None]:
    """Columns for one checkpoint and its ``(plan, sample)``; ``(None, None)`` for a file
    graft wrote that is no model (statistics, head, delta, patch, continual state).
    Unreadable checkpoints give a row with status "error"."""
    start = time.perf_counter()
    try:
        with open_checkpoint(path) as ckpt:
            if not_a_model(ckpt.metadata) is not None:
                return None, None
            if not ckpt.names:
                raise GraftIOError(f"{path} holds no tensors")
            rec = describe(ckpt)
            rec["fingerprint"] = ckpt.fingerprint()
            infos = [ckpt.info(n) for n in ckpt.names]
            plan = plan_sample(infos)
            data, nbytes = read_sample(ckpt, plan)
            rec["bytes_read"] = header_nbytes(ckpt) + fingerprint_nbytes(ckpt) + nbytes
    except (GraftIOError, ValueError, RuntimeError, OSError) as e:
        return {
            "status": "error",
            "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
        }, None
    card, card_error = {}, None
    if path.is_dir():
        notes: list[str] = []
        try:
            card = card_summary(read_model_card(path) or {}, notes)
        except GraftIOError as e:
            card_error = str(e)
        if notes:
            more = f" (and {len(notes) - 3} more)" if len(notes) > 3 else ""
            card_error = f"{path / 'README.md'} front matter: {'; '.join(notes[:3])}{more}"
    rec.update(
        status="ok",
        error=None,
        dtypes=json.dumps(rec["dtypes"]),
        card=json.dumps(card, default=str),
        card_error=card_error,
        scan_seconds=round(time.perf_counter() - start, 4),
    )
    return rec, (plan, data)


def _record(r) -> ModelRecord:
    return ModelRecord(
        id=r["id"],
        path=r["path"],
        source=r["source"],
        status=r["status"],
        error=r["error"],
        repo_id=r["repo_id"],
        revision=r["revision"],
        refs=tuple(json.loads(r["refs"] or "[]")),
        format=r["format"],
        architecture=r["architecture"],
        model_type=r["model_type"],
        num_params=r["num_params"],
        num_tensors=r["num_tensors"],
        total_bytes=r["total_bytes"],
        dtypes=json.loads(r["dtypes"] or "{}"),
        signature=r["signature"],
        fingerprint=r["fingerprint"],
        card=json.loads(r["card"] or "{}"),
        card_error=r["card_error"],
        bytes_read=r["bytes_read"],
        scanned_at=r["scanned_at"],
    )


def _same_model(declared: str, ref: str) -> bool:
    """Whether a card's ``base_model`` entry and a user's reference name the same model:
    equal, or one is a path / repo id ending in the other."""
    a, b = declared.strip().rstrip("/").casefold(), ref.strip().rstrip("/").casefold()
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def _matches_task(card: dict, needle: str) -> bool:
    fields = [*card.get("tags", []), *card.get("datasets", []), card.get("pipeline_tag") or ""]
    for c in card.get("claims", []):
        fields += [str(c.get(k) or "") for k in ("task", "task_name", "dataset", "dataset_type")]
    return any(needle in str(f).casefold() for f in fields)


def _as_dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _scalar(x):
    """``x`` when it is a plain YAML scalar (text, number, bool), else None."""
    return x if isinstance(x, str | int | float | bool) else None


def _str_list(x) -> list[str]:
    if isinstance(x, str):
        return [x]
    return [str(v) for v in x if _scalar(v) is not None] if isinstance(x, list) else []


def _describe(value: object) -> str:
    """A short phrase for a card value of the wrong type: ``an int (5)``, ``a dict``."""
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    shown = repr(value)
    return f"{article} {kind}" + (f" ({shown})" if len(shown) <= 40 else "")
