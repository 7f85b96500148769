"""The Twin-Merging folder that `graft twin` writes and `graft eval` runs::

    OUT/
      twin.json                  manifest (below)
      shared/                    the shared expert: a normal model folder (the merge's
                                 shards, config, tokenizer, model card)
      exclusive/<task>.safetensors   each task's exclusive part: a graft low-rank patch
                                 against shared/ (`graft.delta.patch`), so
                                 ``graft apply OUT/shared OUT/exclusive/<task>.safetensors``
                                 gives shared + τₜ as a model folder
      router.safetensors         the router's tensors; metadata ``graft_statistic:
                                 twin_router``, ``tasks`` (JSON list, the output order),
                                 ``graft_model_fingerprint`` of shared/

``twin.json``: ``graft_twin`` (format, 1), ``tasks`` (names in router order),
``shared``, ``exclusive`` ({task: file}), ``router`` (paths relative to OUT),
``pooling`` and ``max_length`` (how the router reads the shared model's features),
``routing`` (the default: ``input``), ``merge`` (the shared expert's recipe), ``keep`` /
``rank``, ``router_training`` and ``storage`` (bytes, see `graft.twin.build`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from graft.data import DataError, Dataset, Runner, load_runner
from graft.delta import DeltaError, open_delta
from graft.io import GraftIOError, open_checkpoint, read_json
from graft.twin.dynamic import ROUTINGS, Stack, build_stacks, evaluate_twin
from graft.twin.router import Router, router_from_state

MANIFEST = "twin.json"
FORMAT = 1
ROUTER_KIND = "twin_router"
_FIX = "re-create it with graft twin"


@dataclass
class TwinModel:
    """An opened Twin-Merging folder: what evaluation needs, in memory."""

    root: Path
    tasks: list[str]
    shared: Path
    router: Router
    stacks: dict[str, Stack]
    pooling: str | None = None
    max_length: int | None = None
    routing: str = "input"
    manifest: dict = field(default_factory=dict)
    _router_runner: Runner | None = field(default=None, init=False, repr=False)

    def router_runner(self) -> Runner:
        """The shared model as the router reads it (the build's pooling and length)."""
        if self._router_runner is None:
            self._router_runner = load_runner(
                self.shared, pooling=self.pooling, max_length=self.max_length
            )
        return self._router_runner

    def evaluate(
        self,
        runner: Runner,
        data: Dataset,
        *,
        routing: str | None = None,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> dict:
        """`graft.twin.dynamic.evaluate_twin` of this model, judged with ``runner``'s head
        (``runner`` must run the shared model); ``routing`` defaults to the manifest's."""
        routing = routing or self.routing
        if routing not in ROUTINGS:
            raise DataError(f"unknown routing {routing!r}; valid: {', '.join(ROUTINGS)}")
        return evaluate_twin(
            runner,
            self.router_runner(),
            self.router,
            self.stacks,
            data,
            tasks=self.tasks,
            routing=routing,
            batch_size=batch_size,
            progress=progress,
        )


def is_twin_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding a Twin-Merging manifest."""
    return (Path(path) / MANIFEST).is_file()


def open_twin(path: str | os.PathLike) -> TwinModel:
    """Read a Twin-Merging folder: the manifest, the router and every exclusive part.

    Raises:
        DataError: the manifest, router or a patch is malformed or does not belong to
            this folder's shared model (one line, with the fix).
    """
    root = Path(path)
    try:
        doc = read_json(root / MANIFEST, fix=_FIX)
    except GraftIOError as e:
        raise DataError(str(e)) from None
    bad = lambda why: DataError(f"{root / MANIFEST}: {why}; {_FIX}")  # noqa: E731
    if not isinstance(doc, dict) or doc.get("graft_twin") != FORMAT:
        raise bad(f"not a Twin-Merging manifest of format {FORMAT}")
    tasks = doc.get("tasks")
    files = doc.get("exclusive")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise bad("'tasks' must be a non-empty list of names")
    if not isinstance(files, dict) or sorted(files) != sorted(tasks):
        raise bad("'exclusive' must name one file per task")
    routing = doc.get("routing", "input")
    if routing not in ROUTINGS:
        raise bad(f"unknown routing {routing!r}")
    shared = _inside(root, doc.get("shared"), bad)
    try:
        with open_checkpoint(shared) as ckpt:
            fingerprint = ckpt.fingerprint()
            shapes = {n: tuple(ckpt.info(n).shape) for n in ckpt.names}
        router = _read_router(_inside(root, doc.get("router"), bad), tasks, fingerprint)
        parts = [_read_exclusive(_inside(root, files[t], bad), fingerprint, shapes) for t in tasks]
    except (GraftIOError, DeltaError) as e:
        raise DataError(f"{root}: {e}") from None
    max_length = doc.get("max_length")
    return TwinModel(
        root,
        tasks,
        shared,
        router,
        build_stacks(parts, shapes),
        pooling=doc.get("pooling") or None,
        max_length=max_length if isinstance(max_length, int) and max_length > 0 else None,
        routing=routing,
        manifest=doc,
    )


def _inside(root: Path, rel, bad) -> Path:
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise bad(f"a path entry is {rel!r}, not a relative path")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise bad(f"path {rel!r} points outside the folder")
    if not p.exists():
        raise bad(f"{rel} is missing")
    return p


def _read_router(path: Path, tasks: list[str], fingerprint: str) -> Router:
    with open_checkpoint(path) as ckpt:
        meta = ckpt.metadata
        if meta.get("graft_statistic") != ROUTER_KIND:
            raise DataError(f"{path} is not a Twin-Merging router; {_FIX}")
        if meta.get("graft_model_fingerprint") != fingerprint:
            raise DataError(f"{path} was trained on another shared model; {_FIX}")
        if meta.get("tasks") != json.dumps(tasks):
            raise DataError(f"{path} routes tasks {meta.get('tasks')}, the manifest {tasks}")
        state = {n: ckpt.get(n) for n in ckpt.names}
    try:
        router = router_from_state(state)
    except (KeyError, RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0][:120]
        raise DataError(f"{path}: unreadable router ({why}); {_FIX}") from None
    if router.fc3.out_features != len(tasks):
        raise DataError(f"{path} has {router.fc3.out_features} outputs for {len(tasks)} tasks")
    return router


def _read_exclusive(path: Path, fingerprint: str, shapes: dict) -> dict:
    delta = open_delta(path)
    try:
        if delta.base_fingerprint != fingerprint:
            raise DataError(f"{path} was taken against another shared model; {_FIX}")
        out = {}
        for name, entry in delta.layout.items():
            if shapes.get(name) != entry.shape or entry.codec not in ("lowrank", "dense"):
                raise DataError(
                    f"{path}: tensor {name} ({entry.codec}, {entry.shape}) does not fit the "
                    f"shared model; {_FIX}"
                )
            out[name] = (entry.codec, delta.read_parts(name))
        return out
    finally:
        delta.close()
