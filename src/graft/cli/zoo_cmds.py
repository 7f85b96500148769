"""``graft zoo scan | ls | show | find | tree``: the SQLite index of checkpoints on this
machine and the family trees recovered from their weights."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from graft.cli._safe import echo_json, safe
from graft.recipe import RecipeError

zoo_app = typer.Typer(
    help="Index checkpoints (folders, the HF cache) in SQLite; list, find and trace them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DB_HELP = "Index file (default: $GRAFT_ZOO_DB, else $XDG_CACHE_HOME/graft/zoo.sqlite)."


@contextmanager
def _index(db: Path | None, *, create: bool = False):
    from graft.zoo.index import ZooIndex, ZooIndexError

    try:
        with ZooIndex(db, create=create) as index:
            yield index
    except ZooIndexError as e:
        raise RecipeError(str(e)) from e


@zoo_app.command("scan")
def scan(
    paths: list[Path] = typer.Argument(
        None, help="Model folders, weight files, folders of models or HF cache folders."
    ),
    hf_cache: bool = typer.Option(
        False, "--hf-cache", help="Also scan the Hugging Face hub cache ($HF_HUB_CACHE)."
    ),
    db: Path = typer.Option(None, "--db", help=_DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Index checkpoints: headers, card metadata and a small weight sample; unchanged files are skipped."""
    if not paths and not hf_cache:
        raise RecipeError("nothing to scan: pass one or more paths, or --hf-cache")
    with _index(db, create=True) as index:
        with _scan_progress(enabled=not quiet) as progress:
            report = index.scan(paths or [], hf_cache=hf_cache, progress=progress)
        where = index.path
    if as_json:
        echo_json({"db": str(where), **report.to_json()})
        return
    per_model = report.bytes_read / report.read if report.read else 0
    typer.echo(
        f"scanned in {report.seconds:.2f} s: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.removed} removed, {len(report.errors)} unreadable"
        + (f", {report.not_models} graft statistics files left out" if report.not_models else "")
    )
    if report.read:
        typer.echo(
            f"read {report.bytes_read / 1e6:.2f} MB ({per_model / 1e3:.1f} kB per model read)"
        )
    typer.echo(f"index: {safe(where, markup=False)}")


@contextmanager
def _scan_progress(*, enabled: bool):
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]scan"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[path]}"),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("scan", total=None, path="")

        def hook(done: int, total: int, path: str) -> None:
            progress.update(task, completed=done, total=total, path=safe(Path(path).name))

        yield hook


@zoo_app.command("ls")
def ls(
    db: Path = typer.Option(None, "--db", help=_DB_HELP),
    include_errors: bool = typer.Option(
        False, "--all", help="Also list checkpoints that could not be read."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List indexed models."""
    with _index(db) as index:
        records = index.models(include_errors=include_errors)
    _print_records(records, as_json)


@zoo_app.command("find")
def find(
    arch: str = typer.Option(None, "--arch", help="Architecture or model type contains this."),
    base: str = typer.Option(
        None, "--base", help="Card names this base model, or the weights descend from it."
    ),
    task: str = typer.Option(
        None, "--task", help="A model-index claim, tag or data set mentions this."
    ),
    db: Path = typer.Option(None, "--db", help=_DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Find indexed models by architecture, base model or task."""
    if not (arch or base or task):
        raise RecipeError("give at least one of --arch, --base, --task (or use `graft zoo ls`)")
    with _index(db) as index:
        records = index.find(arch=arch, base=base, task=task)
    _print_records(records, as_json)


def _print_records(records, as_json: bool) -> None:
    if as_json:
        echo_json([r.to_json() for r in records], default=str)
        return
    short, prefix = short_names([r.name for r in records])
    table = Table("id", "model", "architecture", "params", "dtypes", "format", "status")
    table.columns[1].overflow = "fold"
    for r in records:
        table.add_row(
            str(r.id),
            safe(short[r.name]),
            safe(r.architecture or r.model_type or "?"),
            _params(r.num_params),
            safe(", ".join(r.dtypes)),
            safe(r.format or ""),
            "ok" if r.status == "ok" else f"[red]{safe(r.error or 'error')}[/]",
        )
    Console().print(table)
    under = f" (paths under {safe(prefix, markup=False)})" if prefix else ""
    typer.echo(f"{len(records)} model{'s' if len(records) != 1 else ''}{under}")


@zoo_app.command("show")
def show(
    model: str = typer.Argument(..., help="Id, path, hub repo id or unique path suffix."),
    db: Path = typer.Option(None, "--db", help=_DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Everything the index knows about one model, with its parent and children by the weights."""
    from graft.zoo.lineage import index_lineage

    with _index(db) as index:
        rec = index.model(model)
        lin = index_lineage(index)
    parent, children = None, []
    for fam in lin.families:
        if rec.id in fam.parents:
            parent = fam.parents[rec.id]
            children = sorted(c for c, p in fam.parents.items() if p == rec.id)
    doc = {
        **rec.to_json(),
        "lineage": {
            "parent": lin.records[parent].name if parent is not None else None,
            "children": [lin.records[c].name for c in children],
        },
        "card_checks": lin.card_checks.get(rec.id, []),
    }
    if as_json:
        echo_json(doc, default=str)
        return
    console = Console()
    console.print(f"[bold]{safe(rec.name)}[/] (id {rec.id})")
    for key in (
        "path",
        "status",
        "error",
        "format",
        "architecture",
        "model_type",
        "num_tensors",
        "signature",
        "fingerprint",
        "bytes_read",
        "scanned_at",
    ):
        if doc.get(key) is not None:
            console.print(f"  {key}: {safe(str(doc[key]))}")
    if rec.num_params is not None:
        console.print(f"  parameters: {rec.num_params:,} ({(rec.total_bytes or 0) / 1e9:.3f} GB)")
    for dt, n in rec.dtypes.items():
        console.print(f"    {safe(dt)}: {n:,}")
    card = rec.card
    for key in ("base_model", "base_model_relation", "license", "pipeline_tag"):
        if card.get(key):
            console.print(f"  card {key}: {safe(str(card[key]))}")
    for c in card.get("claims", []):
        console.print(
            f"  claim: {safe(str(c.get('task')))} on {safe(str(c.get('dataset')))}: "
            f"{safe(str(c.get('metric')))} = {safe(str(c.get('value')))}"
        )
    console.print(f"  parent (weights): {safe(doc['lineage']['parent'] or 'none')}")
    for c in doc["lineage"]["children"]:
        console.print(f"  child (weights): {safe(c)}")
    for check in doc["card_checks"]:
        console.print(f"  card check: {safe(check['message'])}")


@zoo_app.command("tree")
def tree(
    db: Path = typer.Option(None, "--db", help=_DB_HELP),
    related_ratio: float = typer.Option(
        0.5, "--related-ratio", help="Pairs with distance/null below this are related."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Family trees recovered from the weights; flags cards whose base_model disagrees."""
    from graft.zoo.lineage import index_lineage

    if not 0 < related_ratio < 1:
        raise RecipeError(f"--related-ratio must be in (0, 1), got {related_ratio}")
    with _index(db) as index:
        lin = index_lineage(index, related_ratio=related_ratio)
    names = {i: r.name for i, r in lin.records.items()}
    if as_json:
        echo_json(_tree_json(lin, names))
        return
    short, prefix = short_names(list(names.values()))
    names = {i: short[n] for i, n in names.items()}
    console = Console()
    if prefix:
        console.print(f"paths under {safe(prefix)}")
    for fam in lin.families:
        root = next(m for m, p in fam.parents.items() if p is None)
        arch = lin.records[root].architecture or lin.records[root].model_type or "?"
        top = Tree(
            f"[bold]{safe(names[root])}[/] ({safe(arch)}, {_params(lin.records[root].num_params)})"
        )
        _grow(top, root, fam, names, lin.card_checks)
        _flags(top, root, lin.card_checks)
        console.print(top)
    if lin.singletons:
        console.print(f"{len(lin.singletons)} model(s) with no relative in the index")
        for i in lin.singletons:
            for check in lin.card_checks.get(i, []):
                if check["verdict"] == "disagrees":
                    console.print(f"  [red]![/] {safe(names[i])}: {safe(check['message'])}")
    o = lin.orientation
    if o["declared_related_pairs"]:
        console.print(
            f"orientation check: kurtosis rises from card base to model in "
            f"{o['kurtosis_rises']} of {o['declared_related_pairs']} card-declared related pairs"
        )


def _grow(node: Tree, mid: int, fam, names, checks) -> None:
    for child in sorted(c for c, p in fam.parents.items() if p == mid):
        permuted = ", permuted copy: units reordered" if fam.permuted.get(child) else ""
        sub = node.add(
            f"{safe(names[child])} [dim](distance {fam.distance[child]:.3g}, ratio "
            f"{fam.ratio[child]:.2f}{permuted})[/]"
        )
        _flags(sub, child, checks)
        _grow(sub, child, fam, names, checks)


def _flags(node: Tree, mid: int, checks) -> None:
    for check in checks.get(mid, []):
        if check["verdict"] == "disagrees":
            node.add(f"[red]! {safe(check['message'])}[/]")
        elif check["verdict"] in ("ancestor", "unknown"):
            node.add(f"[yellow]? {safe(check['message'])}[/]")


def _tree_json(lin, names) -> dict:
    return {
        "families": [
            {
                "signature": f.signature,
                "members": [names[m] for m in f.members],
                "edges": [
                    {
                        "parent": names[p],
                        "child": names[c],
                        "distance": f.distance[c],
                        "ratio": f.ratio[c],
                        "permuted": f.permuted.get(c, False),
                    }
                    for c, p in sorted(f.parents.items())
                    if p is not None
                ],
                "roots": [names[c] for c, p in f.parents.items() if p is None],
            }
            for f in lin.families
        ],
        "singletons": [names[i] for i in lin.singletons],
        "card_checks": {names[i]: c for i, c in lin.card_checks.items()},
        "orientation": lin.orientation,
    }


def short_names(names: list[str]) -> tuple[dict[str, str], str]:
    """Display names: paths relative to their common folder when there are several."""
    paths = [n for n in names if os.path.isabs(n)]
    if len(paths) < 2:
        return {n: n for n in names}, ""
    prefix = os.path.commonpath(paths)
    if prefix in paths:  # one path is the folder itself
        prefix = os.path.dirname(prefix)
    if prefix in ("", os.sep):
        return {n: n for n in names}, ""
    return {n: os.path.relpath(n, prefix) if n in paths else n for n in names}, prefix


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
