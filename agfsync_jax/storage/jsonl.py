"""JSONL files that grow while a stage runs: appended locally, written in parts on object stores.

    with JsonlAppender(path) as out:
        for batch in batches:
            for row in score(batch):
                out.append(row)
            out.flush()              # the batch is durable (a no-op locally: every row already is)
    rows = read_complete_lines(path)

Local: one file; each row is appended, flushed and fsynced. A crash can tear only the final
line, which `read_complete_lines` drops, so a resumed stage redoes that one record.

Object stores cannot append. There the file `X.jsonl` is a folder of part objects,

    X.jsonl/<generation:06d>-<part:08d>.jsonl

`flush()` uploads the rows appended since the last flush as the next part (an object appears
whole), so a crash loses at most the rows not yet flushed: the batch in flight. An appender also
flushes by itself after `max_pending_rows` rows or `max_pending_s` seconds, and on `close()`.
Replacing the content (`write_jsonl`) uploads it as part 0 of a new generation and then deletes
the older ones; readers read only the newest generation, so a rewrite is atomic too. `close()`
compacts the parts into one the same way. A plain object X.jsonl (written whole) is the oldest
generation, so a reader sees it only while there are no parts.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from agfsync_jax.storage.files import filesystem, write_text
from agfsync_jax.storage.paths import PathLike, as_path, is_remote

_PART = re.compile(r"(\d{6})-(\d{8})\.jsonl")


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


def _parts(path: PathLike) -> dict[int, list[str]]:
    """{generation: [part keys in order]} of a remote log ({} when it has none)."""
    fs, key = filesystem(path)
    prefix = key.rstrip("/") + "/"
    found: dict[int, list[tuple[int, str]]] = {}
    for name in fs.find(prefix, maxdepth=1):
        match = _PART.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match:
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), name))
    return {g: [name for _, name in sorted(parts)] for g, parts in found.items()}


def _part_number(key: str) -> int:
    return int(_PART.fullmatch(key.rsplit("/", 1)[1]).group(2))


def _part_key(path: PathLike, generation: int, part: int) -> str:
    _, key = filesystem(path)
    return f"{key.rstrip('/')}/{generation:06d}-{part:08d}.jsonl"


def read_lines(path: PathLike) -> list[tuple[str, str]]:
    """(where, line) of every line in order, `where` naming file (or part) and line number.

    A missing file has no lines. Locally the text is split on newlines as it is, so the last
    entry may be a torn line; remote parts are always whole.
    """
    p = as_path(path)
    if is_remote(p):
        generations = _parts(p)
        if generations:
            fs, _ = filesystem(p)
            keys = generations[max(generations)]
            blobs = fs.cat(keys)
            return [(f"{p}/{key.rsplit('/', 1)[1]}:{i}", line) for key in keys
                    for i, line in enumerate(blobs[key].decode("utf-8").split("\n"), start=1)]
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8")
    return [(f"{p}:{i}", line) for i, line in enumerate(text.split("\n"), start=1)]


def read_complete_lines(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file written by JsonlAppender; a torn last line (crash) is dropped.

    A malformed line anywhere else is corruption, not a crash artefact, and raises naming
    file and line.
    """
    lines = read_lines(path)
    rows = []
    for i, (where, line) in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            is_last = all(not rest.strip() for _, rest in lines[i + 1:])
            if is_last and not line.endswith("}") and not is_remote(path):
                break
            raise ValueError(f"{where}: malformed JSON line ({e.msg})") from e
    return rows


def count_lines(path: PathLike) -> int:
    """Non-blank lines, torn ones included (compare with `read_complete_lines` to find damage)."""
    return sum(1 for _, line in read_lines(path) if line.strip())


def has_torn_tail(path: PathLike) -> bool:
    """True when appending to the local file would glue the next row onto a torn last line."""
    p = as_path(path)
    if is_remote(p) or not p.is_file():
        return False
    text = p.read_text(encoding="utf-8")
    return bool(text) and (not text.endswith("\n") or text.count("\n") != len(read_complete_lines(p)))


def write_jsonl(path: PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Replaces the content of `path` with `rows`, atomically (a log included, see module doc)."""
    text = "".join(_dumps(r) for r in rows)
    p = as_path(path)
    if not is_remote(p):
        write_text(p, text)
        return
    generations = _parts(p)
    if not generations:
        write_text(p, text)
        return
    _rewrite(p, text, generations)


def _rewrite(p: Any, text: str, generations: dict[int, list[str]]) -> int:
    """Uploads `text` as the next generation's only part, then drops the older ones; returns it."""
    fs, key = filesystem(p)
    new = max(generations, default=-1) + 1
    fs.pipe_file(_part_key(p, new, 0), text.encode("utf-8"))
    # Readers already ignore what follows; removing it only saves space.
    stale = [k for g, keys in generations.items() if g != new for k in keys]
    for name in stale:
        fs.rm_file(name)
    if fs.isfile(key):
        fs.rm_file(key)
    return new


class JsonlAppender:
    """Appends rows to a JSONL file (see module doc for the object-store layout).

    Local: every `append` is flushed and fsynced at once. Remote: rows are uploaded as a part
    by `flush()`, after `max_pending_rows` rows or `max_pending_s` seconds, and by `close()`,
    which also compacts the parts into one.
    """

    def __init__(self, path: PathLike, *, max_pending_rows: int = 1000, max_pending_s: float = 30.0):
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        self.max_pending_rows, self.max_pending_s = int(max_pending_rows), float(max_pending_s)
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._since = time.monotonic()
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(os.fspath(self.path), "a", encoding="utf-8")
            return
        generations = _parts(self.path)
        if not generations and self.path.is_file():
            # Parts would hide a plain object: carry its rows over first.
            self._generation, self._next_part = _rewrite(self.path, self.path.read_text(encoding="utf-8"), {}), 1
        else:
            self._generation = max(generations, default=0)
            last = generations.get(self._generation, [])
            self._next_part = _part_number(last[-1]) + 1 if last else 0

    def append(self, row: dict[str, Any]) -> None:
        line = _dumps(row)
        with self._lock:
            if not self.remote:
                self._f.write(line)
                self._f.flush()
                os.fsync(self._f.fileno())
                return
            self._pending.append(line)
            due = (len(self._pending) >= self.max_pending_rows
                   or time.monotonic() - self._since >= self.max_pending_s)
        if due:
            self.flush()

    def flush(self) -> None:
        """Makes every appended row durable (remote: uploads them as the next part)."""
        with self._lock:
            if not self.remote or not self._pending:
                self._since = time.monotonic()
                return
            data = "".join(self._pending).encode("utf-8")
            fs, _ = filesystem(self.path)
            fs.pipe_file(_part_key(self.path, self._generation, self._next_part), data)
            self._next_part += 1
            self._pending = []
            self._since = time.monotonic()

    def close(self) -> None:
        if not self.remote:
            self._f.close()
            return
        self.flush()
        with self._lock:
            generations = _parts(self.path)
            if len(generations.get(self._generation, [])) > 1:
                text = "".join(line + "\n" for _, line in read_lines(self.path) if line.strip())
                self._generation = _rewrite(self.path, text, generations)
                self._next_part = 1

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
