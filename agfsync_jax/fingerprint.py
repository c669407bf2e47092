"""Fingerprints of what a stage's output depends on.

A stage's settings are the config sections it reads, flattened to dotted names, minus the
fields listed as not counting (speed, logging, concurrency), plus the identities of its inputs
(the upstream stage's fingerprint, a model folder's identity). Listing what does *not* count
means a field added later counts by default: a changed result is never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignore)


def config_settings(config: Any, sections: Sequence[str], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """{dotted field: value} of `sections` (top-level config names) without the `ignore` fields.

    `ignore` holds dotted names; a name also drops everything below it ("prompts.llm.cache_dir",
    "mesh").
    """
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    ignore = tuple(ignore)
    out: dict[str, Any] = {}
    for section in sections:
        if section not in tree:
            raise KeyError(f"config has no section {section!r}")
        value = tree[section]
        items = flatten(value, section + ".") if isinstance(value, Mapping) else {section: value}
        out.update({k: v for k, v in items.items() if not _ignored(k, ignore)})
    return out


def digest(settings: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted names whose values differ, including fields present on one side only."""
    # JSON round trip: a stored value (list) must equal the live one (tuple).
    old = json.loads(json.dumps(dict(old), default=str))
    new = json.loads(json.dumps(dict(new), default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
