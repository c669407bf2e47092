"""Which fields of an external dataset hold the prompt, the image(s), the label, the id."""

from __future__ import annotations

import dataclasses
from typing import Any

from agfsync_jax.encoding.source_rows import SourceError

FORMATS = ("folder", "jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """The `encode` config section's reader settings, checked.

    image_keys: one key (SFT rows) or two (preference pairs: image 0, image 1).
    label_key: for pairs, the preference of image 0 (1 / 0 / 0.5); "" means image 0 always wins.
    """

    format: str
    path: str
    prompt_key: str = "prompt"
    image_keys: tuple[str, ...] = ("image",)
    label_key: str = ""
    id_key: str = ""
    category_key: str = ""
    image_root: str = ""

    @property
    def is_pairs(self) -> bool:
        return len(self.image_keys) == 2

    @classmethod
    def from_config(cls, encode: Any) -> "SourceSpec":
        if encode.format not in FORMATS:
            raise SourceError(f"encode.format={encode.format!r}, expected one of {FORMATS}")
        if not encode.path:
            raise SourceError("encode.path is empty: set it to the folder, JSONL or parquet file to encode")
        keys = tuple(k.strip() for k in str(encode.image_keys).split(",") if k.strip())
        if len(keys) not in (1, 2) or len(set(keys)) != len(keys):
            raise SourceError(f"encode.image_keys={encode.image_keys!r}: give one key (image + prompt rows, "
                              "for train.loss=sft) or two distinct keys (preference pairs), comma-separated")
        if encode.label_key and len(keys) != 2:
            raise SourceError(f"encode.label_key={encode.label_key!r} needs two encode.image_keys (a pair)")
        if encode.format == "folder" and len(keys) != 1:
            raise SourceError("encode.format='folder' holds one image per row; preference pairs need a JSONL "
                              "or parquet source with two encode.image_keys")
        return cls(format=encode.format, path=str(encode.path), prompt_key=encode.prompt_key, image_keys=keys,
                   label_key=encode.label_key, id_key=encode.id_key, category_key=encode.category_key,
                   image_root=encode.image_root)
