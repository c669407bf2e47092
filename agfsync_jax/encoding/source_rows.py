"""What every external-dataset reader yields: one `SourceRow` per example, images read lazily.

A row holds one image (an SFT example: the image is what the prompt should produce) or two
(a preference pair: image 0 and image 1, and a label saying which one wins). Readers only list
rows and hand out image references; decoding happens in the encode stage, where an image that
cannot be read becomes a counted skip, not a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

# Why a row is skipped (the encode stage counts each reason).
SKIP_MISSING_PROMPT = "missing prompt"
SKIP_MISSING_IMAGE = "missing image"
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_TIE = "tie (label 0.5)"


class SourceError(ValueError):
    """The source as a whole is unusable (missing file, missing column, malformed line): the
    message names the file, line or column and what to change."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image as a file path or as bytes held by the source (e.g. a parquet cell)."""

    where: str  # for messages: the path, or "file row i column c"
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        """The encoded image bytes; OSError if the file cannot be read."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise OSError(f"{self.where}: no image path or bytes")
        return self.path.read_bytes()


@dataclasses.dataclass(frozen=True)
class SourceRow:
    """One example of an external dataset.

    `index` is the row's position in the source (after nothing is filtered): what shards,
    resumption and the per-image random keys are keyed on. `images` holds 1 or 2 references
    (None: the row lacks that image, a counted skip). `label` is, for two images, the
    preference of image 0 (1: image 0 wins, 0: image 1 wins, 0.5: a tie, which is skipped);
    None means image 0 wins (the source lists winner first).
    """

    index: int
    where: str
    prompt: str | None
    images: tuple[ImageRef | None, ...]
    label: float | None = None
    row_id: str = ""  # the source's own id for the row, "" when it has none
    category: str = ""


class ImageSource(Protocol):
    """A reader of one external dataset format."""

    path: Path

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> Iterator[SourceRow]:
        """Rows [start, stop) in order."""
        ...
