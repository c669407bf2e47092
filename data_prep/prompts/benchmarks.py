"""Benchmark prompt files -> PromptRecords, with errors that name the file and line.

Formats (config.prompts.benchmark.format):
  tifa_questions  TIFA question file: a JSON list of one object per question
                  {id, caption, question, choices, answer, element_type, element, ...};
                  rows sharing an id become one record with all its questions.
  tifa_text       TIFA text inputs: a JSON list of {id, caption, ...}.
  drawbench       DrawBench CSV with header `Prompts,Category`.
  partiprompts    PartiPrompts TSV with header `Prompt	Category	Challenge	Note`.
  hpsv2           HPS v2 style prompts: a JSON list of strings per style; the path is one
                  such file or a folder of them, and the file name (the style) is the category.
  text            plain text, one prompt per line; blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from agfsync_jax import storage
from agfsync_jax.schemas import PromptRecord, Question, SchemaError
from agfsync_jax.storage import Path

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have its format; the message starts with FILE:LINE."""


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BenchmarkFormatError(f"{path}:{line}: not UTF-8 text") from e


def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, item) for each item of a top-level JSON array, line = where the item starts."""
    text = _read_utf8(path)
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise BenchmarkFormatError(f"{path}:{_line_of(text, pos)}: expected a JSON list")
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        yield _line_of(text, pos), item
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = ws.match(text, pos + 1).end()
            if rest != len(text):
                raise BenchmarkFormatError(
                    f"{path}:{_line_of(text, rest)}: unexpected text after the JSON list")
            return
        else:
            raise BenchmarkFormatError(
                f"{path}:{_line_of(text, pos)}: expected ',' or ']' after a list item")


def _string_field(item: Any, key: str, where: str) -> str:
    if not isinstance(item, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkFormatError(f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _tifa_category(tifa_id: str) -> str:
    """'coco_301091' -> 'coco': TIFA ids start with the source dataset of the caption."""
    return tifa_id.rsplit("_", 1)[0] if "_" in tifa_id else "tifa"


def load_tifa_questions(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    captions: dict[str, str] = {}
    questions: dict[str, list[Question]] = {}
    for line, item in iter_json_array(path):
        where = f"{path}:{line}"
        tifa_id = _string_field(item, "id", where)
        caption = _string_field(item, "caption", where)
        if captions.setdefault(tifa_id, caption) != caption:
            raise BenchmarkFormatError(f"{where}: id {tifa_id!r} has a different caption than "
                                       f"its earlier rows")
        try:
            questions.setdefault(tifa_id, []).append(Question.from_dict(item, where))
        except SchemaError as e:
            raise BenchmarkFormatError(str(e)) from e
    return [PromptRecord(id=i, category=_tifa_category(i), prompt=captions[i], source="tifa",
                         questions=tuple(questions[i])) for i in captions]


def load_tifa_text(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    records, seen = [], set()
    for line, item in iter_json_array(path):
        where = f"{path}:{line}"
        tifa_id = _string_field(item, "id", where)
        if tifa_id in seen:
            raise BenchmarkFormatError(f"{where}: duplicate id {tifa_id!r}")
        seen.add(tifa_id)
        records.append(PromptRecord(id=tifa_id, category=_tifa_category(tifa_id),
                                    prompt=_string_field(item, "caption", where), source="tifa"))
    return records


def _read_table(path: Path, delimiter: str, header: list[str], quoting: int, name: str,
                required: tuple[int, ...]) -> list[tuple[int, list[str]]]:
    """(line, row) of a CSV/TSV file after checking its header; every row needs len(header)."""
    text = _read_utf8(path)
    if not text.strip():
        raise BenchmarkFormatError(f"{path}:1: empty file, expected the {name} header")
    rows = []
    # newline="" keeps line ends inside quoted fields for the csv module, as it requires.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if line == 1:
                if row != header:
                    raise BenchmarkFormatError(
                        f"{path}:1: expected the {name} header {header}, got {row}")
                continue
            if not row:
                continue
            if len(row) != len(header):
                raise BenchmarkFormatError(
                    f"{path}:{line}: expected {len(header)} fields {header}, got {len(row)}")
            for i in required:
                if not row[i].strip():
                    raise BenchmarkFormatError(f"{path}:{line}: field {header[i]!r} is empty")
            rows.append((line, row))
    except csv.Error as e:
        raise BenchmarkFormatError(f"{path}:{start}: malformed {name} ({e})") from e
    return rows


def load_drawbench(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    rows = _read_table(path, ",", ["Prompts", "Category"], csv.QUOTE_MINIMAL, "DrawBench CSV",
                       required=(0, 1))
    return [PromptRecord(id=f"drawbench-{i:04d}", category=row[1].strip(),
                         prompt=row[0].strip(), source="drawbench")
            for i, (_, row) in enumerate(rows)]


def load_partiprompts(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    # PartiPrompts quotes nothing: a '"' inside a prompt is literal text.
    rows = _read_table(path, "\t", ["Prompt", "Category", "Challenge", "Note"], csv.QUOTE_NONE,
                       "PartiPrompts TSV", required=(0, 1, 2))
    return [PromptRecord(id=f"parti-{i:04d}", category=row[1].strip(), prompt=row[0].strip(),
                         source="partiprompts")
            for i, (_, row) in enumerate(rows)]


def _hpsv2_file(path: Path) -> list[PromptRecord]:
    style = path.stem
    records = []
    for i, (line, item) in enumerate(iter_json_array(path)):
        if not isinstance(item, str) or not item.strip():
            raise BenchmarkFormatError(f"{path}:{line}: expected a non-empty string prompt")
        records.append(PromptRecord(id=f"hpsv2-{style}-{i:04d}", category=style,
                                    prompt=item.strip(), source="hpsv2"))
    return records


def load_hpsv2(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise BenchmarkFormatError(f"{path}: folder holds no *.json style files")
        return [r for f in files for r in _hpsv2_file(f)]
    return _hpsv2_file(path)


def load_text(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    records = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise BenchmarkFormatError(f"{path}:{line_no}: not UTF-8 text") from e
            if _CONTROL.search(line):
                raise BenchmarkFormatError(f"{path}:{line_no}: control character in a prompt line "
                                           f"(is this a text file?)")
            if line.strip():
                records.append(PromptRecord(id=f"{path.stem}-{len(records):05d}",
                                            category=path.stem, prompt=line.strip(),
                                            source="text"))
    return records


LOADERS: dict[str, Callable[[str | Path], list[PromptRecord]]] = {
    "tifa_questions": load_tifa_questions,
    "tifa_text": load_tifa_text,
    "drawbench": load_drawbench,
    "partiprompts": load_partiprompts,
    "hpsv2": load_hpsv2,
    "text": load_text,
}


def load_benchmark(format_name: str, path: str | Path) -> list[PromptRecord]:
    """Records of a benchmark file in `format_name` (one of LOADERS)."""
    if format_name not in LOADERS:
        raise ValueError(f"benchmark format {format_name!r} is not one of {sorted(LOADERS)}")
    if not storage.as_path(path).exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    records = LOADERS[format_name](path)
    if not records:
        raise BenchmarkFormatError(f"{path}: no prompts in this {format_name} file")
    return records
