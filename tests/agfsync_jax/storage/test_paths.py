"""One path type: URLs stay URLs, local paths stay local, pathlib's collapsed URLs are refused."""

from __future__ import annotations

import pathlib

import pytest
from etils import epath

from agfsync_jax import storage


def test_urls_stay_urls_and_local_paths_stay_local():
    url = storage.as_path("gs://bucket/run") / "prompts" / "prompts.jsonl"
    assert isinstance(url, epath.Path) and str(url) == "gs://bucket/run/prompts/prompts.jsonl"
    assert storage.is_remote(url) and str(url.parent) == "gs://bucket/run/prompts"
    assert str(storage.absolute("gs://bucket/run")) == "gs://bucket/run"
    local = storage.as_path("workdir/demo")
    assert str(local) == "workdir/demo" and not storage.is_remote(local)
    assert storage.absolute(local) == storage.as_path(pathlib.Path("workdir/demo").absolute())


def test_a_url_collapsed_by_pathlib_is_refused():
    collapsed = str(pathlib.Path("gs://bucket/run"))
    assert collapsed == "gs:/bucket/run"
    with pytest.raises(ValueError, match="pathlib collapsed"):
        storage.as_path(collapsed)
