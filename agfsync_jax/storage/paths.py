"""The one path type of the project: `etils.epath.Path`, local or gs://.

    p = as_path("gs://bucket/run") / "prompts" / "prompts.jsonl"   # stays a URL
    q = as_path("workdir/demo")                                     # stays a local (relative) path

`pathlib.Path("gs://bucket/run")` is the local relative path "gs:/bucket/run": every process would
write its own private folder named "gs:". `as_path` never does that, and refuses such a string
when it reaches it from code that did.
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

from agfsync_jax.storage.clients import configure

Path = epath.Path
PathLike = Union[str, os.PathLike]

# URL schemes served by an object store (no rename, no append; see storage.files / storage.jsonl).
REMOTE_PREFIXES = ("gs://", "s3://")


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL (gs://...), False for a local path."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: gs:// URLs stay URLs, local paths stay local (and relative)."""
    text = os.fspath(path)
    for prefix in REMOTE_PREFIXES:
        scheme = prefix[:-1]  # "gs:/"
        if text.startswith(scheme) and not text.startswith(prefix):
            raise ValueError(f"{text!r} looks like a {prefix} URL that pathlib collapsed to {scheme!r}; "
                             f"pass the URL itself ({prefix}bucket/...)")
    if text.startswith(REMOTE_PREFIXES):
        configure()
    return epath.Path(text)


def absolute(path: PathLike) -> epath.Path:
    """An absolute path: a URL as it is (epath's `absolute()` would prepend the working directory)."""
    p = as_path(path)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))
