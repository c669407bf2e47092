"""On-disk cache of chat replies keyed by a hash of the request, so a re-run issues no requests.

One small JSON file per reply under DIR/<2 hex>/<sha256>.json, written atomically, so parallel
workers and shards can share a directory. Only successful replies are stored: a failure is
retried on the next run instead of being replayed forever.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from agfsync_jax import storage
from agfsync_jax.atomic_io import atomic_write_json
from agfsync_jax.storage import Path, PathLike


def request_key(backend: str, body: dict[str, Any]) -> str:
    """sha256 of the canonical request; headers (and so API keys) never enter it."""
    canonical = json.dumps({"backend": backend, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:

    def __init__(self, directory: PathLike):
        self.directory = storage.as_path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            # Writes are atomic, so a broken entry is corruption, not a torn write.
            raise ValueError(f"{path}: corrupt cache entry ({e.msg}); delete it to re-query") from e
        if not isinstance(entry, dict) or not isinstance(entry.get("response"), str):
            raise ValueError(f"{path}: cache entry has no string field 'response'")
        return entry["response"]

    def put(self, key: str, body: dict[str, Any], response: str) -> None:
        # The request body is kept for debugging; it never holds credentials.
        atomic_write_json(self._path(key), {"request": body, "response": response})
