"""Parquet files of examples (Hugging Face `datasets` exports, TFDS parquet, Pick-a-Pic shards).

`encode.path` is one .parquet file or a folder of them (read in name order, as one table). An
image cell may hold the encoded bytes (a binary column: Pick-a-Pic's jpg_0 / jpg_1, TFDS image
features), a Hugging Face `Image` struct {"bytes", "path"} (bytes first, else the path), or a
path string; paths are relative to `encode.image_root` or the file's folder. Only the needed
columns are read, one row group at a time. Needs pyarrow.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agfsync_jax.encoding.record_fields import path_resolver, row_from_record
from agfsync_jax.encoding.source_rows import ImageRef, SourceError, SourceRow
from agfsync_jax.encoding.source_spec import SourceSpec


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SourceError("encode.format='parquet' needs pyarrow (pip install pyarrow)") from e
    return pq


class ParquetSource:
    def __init__(self, spec: SourceSpec):
        pq = _import_pyarrow_parquet()
        self.path = Path(spec.path)
        if self.path.is_dir():
            files = sorted(self.path.glob("*.parquet"))
            if not files:
                raise SourceError(f"{self.path}: no *.parquet files in this folder (encode.path)")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise SourceError(f"{self.path}: parquet file or folder not found (encode.path)")
        self._spec = spec
        self._columns = [k for k in (spec.prompt_key, *spec.image_keys, spec.label_key, spec.id_key,
                                     spec.category_key) if k]
        # (file, row group, first global row) of every row group, in order.
        self._groups: list[tuple[Any, Path, int, int]] = []
        self._file_starts: dict[Path, int] = {}
        total = 0
        for file in files:
            self._file_starts[file] = total
            parquet = pq.ParquetFile(file)
            names = set(parquet.schema_arrow.names)
            missing = [c for c in self._columns if c not in names]
            if missing:
                raise SourceError(f"{file}: no column(s) {missing} (encode.prompt_key / image_keys / label_key / "
                                  f"id_key / category_key); the file has {sorted(names)}")
            for g in range(parquet.num_row_groups):
                self._groups.append((parquet, file, g, total))
                total += parquet.metadata.row_group(g).num_rows
        self._num_rows = total
        self._starts = [start for _, _, _, start in self._groups]
        self._cached: tuple[int, list[dict[str, Any]]] | None = None
        self._roots = {file: Path(spec.image_root) if spec.image_root else file.parent for file in files}

    def __len__(self) -> int:
        return self._num_rows

    def _group_rows(self, group: int) -> list[dict[str, Any]]:
        if self._cached is None or self._cached[0] != group:
            parquet, _, g, _ = self._groups[group]
            self._cached = (group, parquet.read_row_group(g, columns=self._columns).to_pylist())
        return self._cached[1]

    def _resolver(self, file: Path):
        by_path = path_resolver(self._roots[file])

        def resolve(value: Any, where: str) -> ImageRef | None:
            if isinstance(value, (bytes, bytearray)):
                return ImageRef(where=where, data=bytes(value)) if value else None
            if isinstance(value, dict) and ("bytes" in value or "path" in value):
                if value.get("bytes"):
                    return ImageRef(where=where, data=bytes(value["bytes"]))
                return by_path(value.get("path") or "", where)
            return by_path(value, where)
        return resolve

    def rows(self, start: int, stop: int) -> Iterator[SourceRow]:
        stop = min(stop, self._num_rows)
        index = start
        while index < stop:
            group = bisect.bisect_right(self._starts, index) - 1
            _, file, _, first = self._groups[group]
            records = self._group_rows(group)
            resolve = self._resolver(file)
            while index < stop and index - first < len(records):
                where = f"{file} row {index - self._file_starts[file]}"
                yield row_from_record(records[index - first], index, where, self._spec, resolve)
                index += 1
