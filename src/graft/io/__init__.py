"""graft's I/O layer, the only code in graft that touches disk.

Reading is lazy and per tensor (`open_checkpoint`); writing is memory-flat and atomic
(`atomic_output_dir` + `ShardedWriter`). POSIX only (uses `os.pread`/`os.pwrite`).
"""

from graft.io._atomic import atomic_output_dir
from graft.io._checkpoint import Checkpoint, open_checkpoint
from graft.io._errors import GraftIOError
from graft.io._format import TensorInfo, read_safetensors_header
from graft.io._sidecar import (
    copy_sidecar_files,
    copy_tokenizer,
    recipe_hash,
    write_model_card,
    write_text,
)
from graft.io._state_dict import load_state_dict, save_state_dict, save_statistics
from graft.io._writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, parse_size

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "Checkpoint",
    "GraftIOError",
    "ShardedWriter",
    "TensorInfo",
    "atomic_output_dir",
    "copy_sidecar_files",
    "copy_tokenizer",
    "load_state_dict",
    "open_checkpoint",
    "parse_size",
    "read_safetensors_header",
    "recipe_hash",
    "save_state_dict",
    "save_statistics",
    "write_model_card",
    "write_text",
]
