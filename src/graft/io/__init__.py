"""graft's I/O layer, the only code in graft that touches disk.

Reading is lazy and per tensor (`open_checkpoint`); writing is memory-flat and atomic
(`atomic_output_dir` + `ShardedWriter`). POSIX only (uses `os.pread`/`os.pwrite`).
"""

from graft.io._adapter import Adapter, is_adapter_dir, open_adapter
from graft.io._atomic import atomic_output_dir, atomic_output_file
from graft.io._checkpoint import Checkpoint, open_checkpoint
from graft.io._discover import (
    CachedSnapshot,
    discover_checkpoints,
    file_stats,
    is_hf_cache,
    is_model_dir,
    scan_hf_cache,
)
from graft.io._errors import GraftIOError
from graft.io._format import TensorInfo, read_safetensors_header
from graft.io._readers import (
    model_files,
    read_arrays,
    read_dataset,
    read_model_card,
    read_pickle_streams,
)
from graft.io._sample import fingerprint_nbytes, header_nbytes, read_rows
from graft.io._sidecar import (
    copy_sentence_transformers_files,
    copy_sidecar_files,
    copy_tokenizer,
    recipe_hash,
    write_model_card,
    write_text,
)
from graft.io._spool import SpoolWriter
from graft.io._sqlite import default_db_path, open_db
from graft.io._state_dict import (
    load_state_dict,
    mmap_state_dict,
    save_state_dict,
    save_statistics,
)
from graft.io._writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, parse_size

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "Adapter",
    "CachedSnapshot",
    "Checkpoint",
    "GraftIOError",
    "ShardedWriter",
    "SpoolWriter",
    "TensorInfo",
    "atomic_output_dir",
    "atomic_output_file",
    "copy_sentence_transformers_files",
    "copy_sidecar_files",
    "copy_tokenizer",
    "default_db_path",
    "discover_checkpoints",
    "file_stats",
    "fingerprint_nbytes",
    "header_nbytes",
    "is_adapter_dir",
    "is_hf_cache",
    "is_model_dir",
    "load_state_dict",
    "mmap_state_dict",
    "model_files",
    "open_adapter",
    "open_checkpoint",
    "open_db",
    "parse_size",
    "read_arrays",
    "read_dataset",
    "read_model_card",
    "read_pickle_streams",
    "read_rows",
    "read_safetensors_header",
    "recipe_hash",
    "save_state_dict",
    "save_statistics",
    "scan_hf_cache",
    "write_model_card",
    "write_text",
]
