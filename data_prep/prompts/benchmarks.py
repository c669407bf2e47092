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
  text            plain text, one prompt per line; blank lines are skipped. A line that is a
                  JSON object is refused (a JSON-lines file read as text would make its raw
                  lines the prompts): use `jsonl`.
  text_dir        a folder of .txt files in the `text` format; the file name without .txt is
                  the category.
  jsonl           JSON lines, one object per prompt: the prompt under `prompt_key`, the category
                  under `category_key` ("" = the file name), and with `questions_key` set, a list
                  of questions (Question objects, or strings for yes-questions) under that key
                  (config.prompts.benchmark.prompt_key / category_key / questions_key).

Every format accepts a UTF-8 byte-order mark and CRLF line ends.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from agfsync_jax import storage
from agfsync_jax.schemas import PromptRecord, Question, SchemaError
from agfsync_jax.storage import Path

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BOM = "\ufeff"


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have its format; the message starts with FILE:LINE."""


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix(_BOM)
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


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end) of a UTF-8 text file; a BOM is dropped."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise BenchmarkFormatError(f"{path}:{line_no}: not UTF-8 text") from e
            yield line_no, line.removeprefix(_BOM) if line_no == 1 else line


def _json_object(line: str) -> dict | None:
    if not line.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def load_text(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    records = []
    for line_no, line in _text_lines(path):
        if _CONTROL.search(line):
            raise BenchmarkFormatError(f"{path}:{line_no}: control character in a prompt line "
                                       f"(is this a text file?)")
        if _json_object(line) is not None:
            raise BenchmarkFormatError(
                f"{path}:{line_no}: this line is a JSON object, not a prompt: for JSON lines use "
                f"format jsonl (with prompts.benchmark.prompt_key / category_key)")
        if line.strip():
            records.append(PromptRecord(id=f"{path.stem}-{len(records):05d}",
                                        category=path.stem, prompt=line.strip(),
                                        source="text"))
    return records


def load_text_dir(path: str | Path) -> list[PromptRecord]:
    path = storage.as_path(path)
    if not path.is_dir():
        raise BenchmarkFormatError(f"{path}: format text_dir wants a folder of .txt files")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise BenchmarkFormatError(f"{path}: folder holds no *.txt files")
    return [r for f in files for r in load_text(f)]


def _jsonl_questions(value: Any, key: str, where: str) -> tuple[Question, ...]:
    if not isinstance(value, list):
        raise BenchmarkFormatError(f"{where}: field {key!r} must be a list of questions")
    questions = []
    for j, q in enumerate(value):
        what = f"{where}: {key}[{j}]"
        if isinstance(q, str):
            q = {"question": q}
        if not isinstance(q, dict):
            raise BenchmarkFormatError(f"{what}: expected a question object or string")
        try:
            questions.append(Question.from_dict(q, what))
        except SchemaError as e:
            raise BenchmarkFormatError(str(e)) from e
    return tuple(questions)


def load_jsonl(path: str | Path, prompt_key: str = "prompt", category_key: str = "category",
               questions_key: str = "") -> list[PromptRecord]:
    path = storage.as_path(path)
    if not prompt_key:
        raise ValueError("prompts.benchmark.prompt_key is empty: name the field that holds the prompt")
    records = []
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(item, dict):
            raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
        for key, field in ((prompt_key, "prompt_key"), (category_key, "category_key"),
                           (questions_key, "questions_key")):
            if key and key not in item:
                raise BenchmarkFormatError(
                    f"{where}: no field {key!r} (prompts.benchmark.{field}); the line has "
                    f"{sorted(item)}")
        category = _string_field(item, category_key, where) if category_key else path.stem
        questions = _jsonl_questions(item[questions_key], questions_key, where) if questions_key else ()
        records.append(PromptRecord(id=f"{path.stem}-{len(records):05d}", category=category,
                                    prompt=_string_field(item, prompt_key, where), source="jsonl",
                                    questions=questions))
    return records


LOADERS: dict[str, Callable[[str | Path], list[PromptRecord]]] = {
    "tifa_questions": load_tifa_questions,
    "tifa_text": load_tifa_text,
    "drawbench": load_drawbench,
    "partiprompts": load_partiprompts,
    "hpsv2": load_hpsv2,
    "text": load_text,
    "text_dir": load_text_dir,
    "jsonl": load_jsonl,
}


def jsonl_keys(benchmark: ml_collections.ConfigDict) -> dict[str, str]:
    """The `jsonl` format's keys from config.prompts.benchmark, as load_benchmark's arguments."""
    return {"prompt_key": benchmark.prompt_key, "category_key": benchmark.category_key,
            "questions_key": benchmark.questions_key}


def load_benchmark(format_name: str, path: str | Path, prompt_key: str = "prompt",
                   category_key: str = "category", questions_key: str = "") -> list[PromptRecord]:
    """Records of a benchmark file in `format_name` (one of LOADERS); the keys are the `jsonl`
    format's (see the module docstring) and ignored by the others."""
    if format_name not in LOADERS:
        raise ValueError(f"benchmark format {format_name!r} is not one of {sorted(LOADERS)}")
    if not storage.as_path(path).exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if format_name == "jsonl":
        records = load_jsonl(path, prompt_key, category_key, questions_key)
    else:
        records = LOADERS[format_name](path)
    if not records:
        raise BenchmarkFormatError(f"{path}: no prompts in this {format_name} file")
    return records
