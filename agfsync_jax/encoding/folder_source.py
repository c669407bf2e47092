"""A folder of images and their prompts (SFT rows: one image each).

Where the prompts come from is decided by what the folder holds, and logged:

* `metadata.jsonl` at the top (Hugging Face ImageFolder): one object per image with
  "file_name" (relative to the folder) and the prompt under `encode.prompt_key`; rows are its
  lines, in order;
* `meta_data.json` at the top (MJHQ-30K): {image id: {"prompt": ..., "category": ...}}, images
  anywhere below named <image id>.<ext> (MJHQ's <category>/<id>.jpg); rows are the image files;
* neither: a caption file <image>.txt next to every image (the DreamBooth/kohya layout); rows
  are the image files.

Image files are those with the extensions below, found recursively and sorted by relative path,
so the row order (and with it shards, resumption and keys) is the same on every machine. A
folder with both metadata files, or with no prompts at all, is an error rather than a guess.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from absl import logging

from agfsync_jax.encoding.record_fields import path_resolver, row_from_record
from agfsync_jax.encoding.source_rows import SourceError, SourceRow
from agfsync_jax.encoding.source_spec import SourceSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HF_METADATA = "metadata.jsonl"
MJHQ_METADATA = "meta_data.json"


def _image_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


class FolderSource:
    def __init__(self, spec: SourceSpec):
        self.path = Path(spec.path)
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: image folder not found (encode.path)")
        self._spec = spec
        hf, mjhq = self.path / HF_METADATA, self.path / MJHQ_METADATA
        if hf.is_file() and mjhq.is_file():
            raise SourceError(f"{self.path}: holds both {HF_METADATA} and {MJHQ_METADATA}; keep the one that "
                              "has the prompts")
        self._records: list[tuple[str, dict[str, Any]]] = []  # (where, record with the image under "file")
        self.layout = "metadata.jsonl" if hf.is_file() else "meta_data.json" if mjhq.is_file() else "txt captions"
        if hf.is_file():
            self._read_hf(hf)
        elif mjhq.is_file():
            self._read_mjhq(mjhq)
        else:
            self._read_captions()
        logging.info("encode: %s: %d rows, prompts from %s", self.path, len(self._records), self.layout)

    def _read_hf(self, path: Path) -> None:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{where}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
                    raise SourceError(f"{where}: expected an object with a 'file_name' string (Hugging Face "
                                      "ImageFolder metadata)")
                self._records.append((where, dict(obj, **{self._spec.image_keys[0]: obj["file_name"]})))

    def _read_mjhq(self, path: Path) -> None:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not valid JSON ({e.msg})") from e
        if not isinstance(meta, dict):
            raise SourceError(f"{path}: expected an object {{image id: {{prompt, category}}}} (MJHQ-30K layout)")
        for image in _image_files(self.path):
            rel = image.relative_to(self.path).as_posix()
            entry = meta.get(image.stem)
            if entry is not None and not isinstance(entry, dict):
                raise SourceError(f"{path}: entry {image.stem!r} must be an object, got {type(entry).__name__}")
            self._records.append((str(image), dict(entry or {}, **{self._spec.image_keys[0]: rel})))

    def _read_captions(self) -> None:
        images = _image_files(self.path)
        if images and not any(p.with_suffix(".txt").is_file() for p in images):
            raise SourceError(f"{self.path}: {len(images)} images but no prompts: add {HF_METADATA} (Hugging Face "
                              f"ImageFolder), {MJHQ_METADATA} (MJHQ-30K) or a <image>.txt caption per image")
        for image in images:
            caption = image.with_suffix(".txt")
            record: dict[str, Any] = {self._spec.image_keys[0]: image.relative_to(self.path).as_posix()}
            if caption.is_file():
                record[self._spec.prompt_key] = caption.read_text(encoding="utf-8").strip()
            self._records.append((str(image), record))

    def __len__(self) -> int:
        return len(self._records)

    def rows(self, start: int, stop: int) -> Iterator[SourceRow]:
        resolve = path_resolver(self.path)
        for index in range(start, min(stop, len(self._records))):
            where, record = self._records[index]
            yield row_from_record(record, index, where, self._spec, resolve)

