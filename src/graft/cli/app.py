"""Root of the ``graft`` CLI: registers each subcommand explicitly and turns graft's own
errors into one line on stderr with a non-zero exit."""

from __future__ import annotations

import atexit
import ctypes
import functools
import math
import os
import sys
import threading

import typer

from graft import __version__
from graft.cli import (
    adamerging_cmd,
    check_cmd,
    delta_cmds,
    demo,
    eval_cmd,
    inspect_cmd,
    lint_cmd,
    merge,
    methods,
    moe_cmd,
    pleas_cmd,
    rank_cmd,
    search_cmd,
    soup_cmd,
    stats_cmd,
)
from graft.cli._safe import safe
from graft.cli.continual_cmd import continual_app
from graft.cli.distill_cmd import distill as distill_command
from graft.cli.distill_cmd import sft as sft_command
from graft.cli.distill_cmd import update as update_command
from graft.cli.twin_cmd import twin as twin_command
from graft.cli.zoo_build_cmd import build as zoo_build
from graft.cli.zoo_build_cmd import fetch_data as zoo_fetch_data
from graft.cli.zoo_cmds import zoo_app
from graft.io import GraftIOError
from graft.recipe import RecipeError

app = typer.Typer(
    name="graft",
    help="Reuse pretrained models: merge checkpoints (mergekit recipes), inspect them, and more.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"graft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """graft: merge, transfer, compress, check and find PyTorch / Hugging Face checkpoints."""


app.command("merge")(merge.merge)
app.command("moe")(moe_cmd.moe)
app.command("methods")(methods.methods)
app.command("inspect")(inspect_cmd.inspect)
app.command("eval")(eval_cmd.eval_model)
app.command("stats")(stats_cmd.stats)
app.command("soup")(soup_cmd.soup)
app.command("search")(search_cmd.search)
app.command("adamerging")(adamerging_cmd.adamerging)
app.command("twin")(twin_command)
app.command("pleas")(pleas_cmd.pleas)
app.command("check")(check_cmd.check)
app.command("lint")(lint_cmd.lint)
app.command("distill")(distill_command)
app.command("update")(update_command)
app.command("sft")(sft_command)
app.command("diff")(delta_cmds.diff)
app.command("apply")(delta_cmds.apply)
app.command("transfer")(delta_cmds.transfer)
app.command("compress")(delta_cmds.compress)
app.command("extract-lora")(delta_cmds.extract_lora)
app.command("merge-lora")(delta_cmds.merge_lora)
zoo_app.command("build")(zoo_build)
zoo_app.command("fetch-data")(zoo_fetch_data)
app.add_typer(zoo_app, name="zoo")
app.add_typer(continual_app, name="continual")
app.command("rank")(rank_cmd.rank)
app.command("demo")(demo.demo)


def _finite_numbers(fn):
    """``fn`` refusing a NaN or infinite float option (alone or in a list), or an integer
    beyond 64 bits, before it runs.

    ``--lr nan`` parses as a float, and NaN passes every ``> 0`` check (typer's ``min=``
    ranges let inf through), so a NaN learning rate, temperature, weight or scale would
    train or merge a model full of NaNs and exit 0. No graft option means NaN or inf.
    """

    @functools.wraps(fn)  # typer reads the options from the wrapped signature
    def checked(*args, **kwargs):
        for name, value in kwargs.items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            option = "--" + name.replace("_", "-")
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise typer.BadParameter(f"{value} is not a finite number", param_hint=option)
            if any(_huge_int(v) for v in values):  # a seed torch cannot take, a count
                raise typer.BadParameter(f"{value} is out of range", param_hint=option)
        return fn(*args, **kwargs)

    return checked


def _huge_int(v: object) -> bool:
    """An integer beyond 64 bits (no graft count or seed is; torch refuses such a seed)."""
    return isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64


def _check_numbers(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None:
            command.callback = _finite_numbers(command.callback)
    for group in typer_app.registered_groups:
        _check_numbers(group.typer_instance)


_check_numbers(app)


def main() -> None:
    try:
        app()
    except (GraftIOError, RecipeError) as exc:
        # messages quote names from the inputs (tensors, columns, labels, paths): their
        # control characters are shown escaped, the message's own line breaks kept
        lines = str(exc).split("\n")
        print("error: " + "\n".join(safe(line, markup=False) for line in lines), file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """The ``graft`` program (console script and ``python -m graft``): `main`, then a quick
    exit. In-process callers use `main`, which returns or raises ``SystemExit``."""
    _tune_malloc()
    try:
        main()
    except SystemExit as exc:
        _exit_now(exc.code)
        raise
    _exit_now(0)


def _tune_malloc() -> None:
    """Let glibc reuse freed tensor buffers instead of mapping fresh pages for each one.

    A merge reads every tensor into a new buffer and frees it a moment later. By default
    glibc maps each buffer of a few MB afresh and unmaps it on free, so the kernel faults
    in and zeroes every page of every input again (half a million page faults for a 300M
    model, a tenth of the CPU time). Buffers up to 32 MiB (glibc's largest mmap threshold)
    are taken from the heap instead, and the heap's free top is not returned to the
    system after each free (the next tensor reuses it). Peak memory stays about the same,
    since the same buffers are reused (0.59-0.64 GiB for the 300M benchmark's ties merge,
    against 0.59-0.69 before). Only the ``graft`` program does this, never ``import
    graft``; ``GRAFT_MALLOC_TUNE=0`` keeps glibc's defaults.
    """
    if os.environ.get("GRAFT_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, (1 << 31) - 1)


def _exit_now(code: object) -> None:
    """Exit at once with ``code``, skipping the interpreter's teardown.

    Tearing down torch's modules and a last garbage collection over them takes about half
    a second, longer than many commands' own work. Every output is written and closed by
    then (graft writes through ``with`` blocks and atomic renames), so the process runs
    the ``atexit`` handlers (Ray, logging, temporary folders), flushes stdout and stderr,
    and leaves with ``os._exit``. Where that is not safe (a non-daemon thread still
    running, a message as exit code, a failed flush, ``GRAFT_FAST_EXIT=0``) it returns
    and Python exits as usual.
    """
    if code is not None and not isinstance(code, int):
        return
    if os.environ.get("GRAFT_FAST_EXIT", "1") == "0":
        return
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        return
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:
        return
    run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)
