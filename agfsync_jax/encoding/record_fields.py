"""A record (a JSONL object, a parquet row, a metadata.jsonl line) -> a `SourceRow`, by key.

Shared by the readers so that every format treats the fields alike: an empty or absent prompt
or image is a counted skip of that row; a field of the wrong type or a label outside [0, 1] is
an error naming the record and the key, since it means the keys or the file are not what the
config says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agfsync_jax.encoding.source_rows import ImageRef, SourceError, SourceRow
from agfsync_jax.encoding.source_spec import SourceSpec

# (cell value, where) -> the image, or None when the cell is empty.
ImageResolver = Callable[[Any, str], "ImageRef | None"]


def _text(record: Mapping[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r:.60})")
    return value if value.strip() else None


def _label(record: Mapping[str, Any], key: str, where: str) -> float:
    if key not in record or record[key] is None:
        raise SourceError(f"{where}: missing label field {key!r} (encode.label_key)")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise SourceError(f"{where}: label field {key!r} is {value!r}; expected the preference of image 0, "
                          "a number in [0, 1] (1: image 0 wins, 0: image 1 wins, 0.5: tie)")
    return float(value)


def row_from_record(record: Mapping[str, Any], index: int, where: str, spec: SourceSpec,
                    resolve_image: ImageResolver) -> SourceRow:
    images = []
    for key in spec.image_keys:
        value = record.get(key)
        images.append(None if value is None else resolve_image(value, f"{where} field {key!r}"))
    row_id = ""
    if spec.id_key:
        value = record.get(spec.id_key)
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise SourceError(f"{where}: id field {spec.id_key!r} (encode.id_key) is {value!r}; expected a "
                              "non-empty string or integer")
        row_id = str(value)
    category = (_text(record, spec.category_key, where) or "") if spec.category_key else ""
    return SourceRow(index=index, where=where, prompt=_text(record, spec.prompt_key, where), images=tuple(images),
                     label=_label(record, spec.label_key, where) if spec.label_key else None,
                     row_id=row_id, category=category)


def path_resolver(root: Path) -> ImageResolver:
    """Cells holding a path string, relative to `root` unless absolute."""
    def resolve(value: Any, where: str) -> ImageRef | None:
        if not isinstance(value, str):
            raise SourceError(f"{where}: expected an image path string, got {type(value).__name__}")
        if not value.strip():
            return None
        path = Path(value)
        return ImageRef(where=f"{where} ({value})", path=path if path.is_absolute() else root / path)
    return resolve
