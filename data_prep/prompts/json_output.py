"""Extracts the JSON value from an LLM reply that may wrap it in prose or code fences."""

from __future__ import annotations

import json
import re
from typing import Any

# ```json ... ``` or ``` ... ```; non-greedy so the first fenced block wins.
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)


class JSONOutputError(ValueError):
    """The reply holds no parseable JSON value; the message quotes the start of the reply."""


def _excerpt(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def parse_json_output(text: str) -> Any:
    """Returns the first JSON object or array in `text`.

    Tolerates a code fence around the value, prose before it and trailing text after it
    (chat models often add an explanation). Raises JSONOutputError when nothing parses.
    """
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        # Try every opening bracket in order: prose before the value may contain one too
        # ("[note] here is the list: [...]").
        for match in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            return value
    raise JSONOutputError(f"no JSON object or array in the reply: {_excerpt(text)!r}")
