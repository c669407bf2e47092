"""`open_source(spec)`: the reader of `encode.format` (folder, jsonl or parquet)."""

from __future__ import annotations

from agfsync_jax.encoding.folder_source import FolderSource
from agfsync_jax.encoding.jsonl_source import JsonlSource
from agfsync_jax.encoding.parquet_source import ParquetSource
from agfsync_jax.encoding.source_rows import ImageSource
from agfsync_jax.encoding.source_spec import SourceSpec

_READERS = {"folder": FolderSource, "jsonl": JsonlSource, "parquet": ParquetSource}


def open_source(spec: SourceSpec) -> ImageSource:
    return _READERS[spec.format](spec)
