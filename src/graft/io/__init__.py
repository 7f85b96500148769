"""graft's I/O layer, the only code in graft that touches disk.

Reading is lazy and per tensor (`open_checkpoint`); writing is memory-flat and atomic
(`atomic_output_dir` + `ShardedWriter`). POSIX only (uses `os.pread`/`os.pwrite`).
"""

from graft.io._adapter import Adapter, is_adapter_dir, open_adapter
from graft.io._atomic import (
    MARKER,
    atomic_output_dir,
    atomic_output_file,
    check_output,
    is_graft_output,
    remove_parts,
    remove_stale_temps,
    scratch_dir,
    staging_part,
)
from graft.io._checkpoint import Checkpoint, not_a_model, open_checkpoint, open_model
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
from graft.io._fp8 import (
    DEFAULT_FP8_BLOCK,
    dequantize_fp8,
    fp8_config,
    fp8_scale_name,
    fp8_scale_shape,
    quantize_fp8,
)
from graft.io._quant import DecodedCheckpoint, Quantization
from graft.io._readers import (
    load_yaml,
    load_yaml_documents,
    model_files,
    open_binary,
    read_arrays,
    read_dataset,
    read_json,
    read_model_card,
)
from graft.io._remote import is_url
from graft.io._sample import fingerprint_nbytes, header_nbytes, read_rows
from graft.io._sidecar import (
    copy_sentence_transformers_files,
    copy_sidecar_files,
    copy_tokenizer,
    recipe_hash,
    safe_source,
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
from graft.io._tokenizer import (
    has_tokenizer,
    load_tokenizer,
    read_chat_template,
    save_tokenizer,
    write_chat_template,
)
from graft.io._writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedWriter,
    SizeError,
    parse_size,
    plan_shards,
    write_shard_index,
)

__all__ = [
    "DEFAULT_FP8_BLOCK",
    "DEFAULT_MAX_SHARD_BYTES",
    "MARKER",
    "Adapter",
    "CachedSnapshot",
    "Checkpoint",
    "DecodedCheckpoint",
    "GraftIOError",
    "Quantization",
    "ShardedWriter",
    "SizeError",
    "SpoolWriter",
    "TensorInfo",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output",
    "copy_sentence_transformers_files",
    "copy_sidecar_files",
    "copy_tokenizer",
    "default_db_path",
    "dequantize_fp8",
    "discover_checkpoints",
    "file_stats",
    "fingerprint_nbytes",
    "fp8_config",
    "fp8_scale_name",
    "fp8_scale_shape",
    "has_tokenizer",
    "header_nbytes",
    "is_adapter_dir",
    "is_graft_output",
    "is_hf_cache",
    "is_model_dir",
    "is_url",
    "load_state_dict",
    "load_tokenizer",
    "load_yaml",
    "load_yaml_documents",
    "mmap_state_dict",
    "model_files",
    "open_adapter",
    "open_binary",
    "not_a_model",
    "open_checkpoint",
    "open_model",
    "open_db",
    "parse_size",
    "plan_shards",
    "quantize_fp8",
    "read_arrays",
    "read_chat_template",
    "read_dataset",
    "read_json",
    "read_model_card",
    "read_rows",
    "read_safetensors_header",
    "recipe_hash",
    "remove_parts",
    "remove_stale_temps",
    "safe_source",
    "scratch_dir",
    "save_state_dict",
    "save_tokenizer",
    "save_statistics",
    "scan_hf_cache",
    "staging_part",
    "write_chat_template",
    "write_model_card",
    "write_shard_index",
    "write_text",
]
