"""A JSONL file of examples: one JSON object per line, images given as file paths.

    {"prompt": "a red fox in snow", "image": "images/0001.png"}                       SFT row
    {"caption": "...", "winner": "w/17.jpg", "loser": "l/17.jpg"}                     a pair
    {"caption": "...", "jpg_0": "a.jpg", "jpg_1": "b.jpg", "label_0": 0.0}            Pick-a-Pic style

Relative paths are resolved against `encode.image_root`, or the JSONL file's folder when that
is empty. Blank lines are ignored; a line that is not a JSON object stops the stage naming
file:line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agfsync_jax.encoding.record_fields import path_resolver, row_from_record
from agfsync_jax.encoding.source_rows import SourceError, SourceRow
from agfsync_jax.encoding.source_spec import SourceSpec


class JsonlSource:
    def __init__(self, spec: SourceSpec):
        self.path = Path(spec.path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: JSONL file not found (encode.path)")
        self._spec = spec
        self._resolve = path_resolver(Path(spec.image_root) if spec.image_root else self.path.parent)
        self._records: list[tuple[int, dict[str, Any]]] = []  # (line number, object)
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise SourceError(f"{self.path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                self._records.append((lineno, obj))

    def __len__(self) -> int:
        return len(self._records)

    def rows(self, start: int, stop: int) -> Iterator[SourceRow]:
        for index in range(start, min(stop, len(self._records))):
            lineno, obj = self._records[index]
            yield row_from_record(obj, index, f"{self.path}:{lineno}", self._spec, self._resolve)
