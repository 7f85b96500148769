"""Options every data command shares (``--data``, ``--head``, columns, pooling...), declared
once so their names and help read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.data import DataOptions

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Labelled data: a .csv/.tsv/.jsonl (text + label columns), a .npz, an image "
        "folder (<class>/<image>.png), or task:NAME (a zoo task).",
    ),
]
HeadOpt = Annotated[
    Path | None,
    typer.Option(
        "--head",
        help="Classification head: a head .safetensors file, or a sequence-classification "
        "model folder whose classifier runs on this model's backbone. Default: the model's "
        "own classifier, its head.safetensors, or the zoo's head for task:NAME data.",
    ),
]
ZooOpt = Annotated[
    Path | None,
    typer.Option(
        "--zoo",
        help="Zoo folder for task:NAME data (default graft-demo/zoo for digits tasks, "
        "graft-demo/text-zoo for text tasks).",
    ),
]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="Column holding the text.")]
PairColumnOpt = Annotated[
    str | None, typer.Option("--text-pair-column", help="Column holding a second text (pairs).")
]
LabelColumnOpt = Annotated[str, typer.Option("--label-column", help="Column holding the label.")]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="Read at most this many examples.")
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        min=1,
        help="Truncate texts to this many tokens (default: the head's, "
        "else the tokenizer's, at most 256).",
    ),
]
PoolingOpt = Annotated[
    str | None,
    typer.Option(
        "--pooling",
        help="Feature pooling over tokens: mean, cls, max or last (default: the head's or "
        "the sentence-transformers folder's, else mean).",
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split of a zoo task: train, val or test.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def data_options(
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    limit: int | None,
    *,
    require_labels: bool = True,
) -> DataOptions:
    return DataOptions(
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        limit=limit,
        require_labels=require_labels,
    )
