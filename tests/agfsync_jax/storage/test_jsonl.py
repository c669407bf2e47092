"""Appendable JSONL: one file locally, part objects on an object store, with the same crash semantics."""

from __future__ import annotations

import pytest

from agfsync_jax import storage


def test_local_rows_are_durable_one_by_one_and_a_torn_tail_is_dropped(tmp_path):
    path = tmp_path / "scores.jsonl"
    with storage.JsonlAppender(path) as out:
        out.append({"i": 0})
        assert storage.read_complete_lines(path) == [{"i": 0}]  # before any flush
        out.append({"i": 1})
    with open(path, "a") as f:
        f.write('{"i": 2')  # a writer killed mid-line
    assert storage.has_torn_tail(path) and storage.count_lines(path) == 3
    assert storage.read_complete_lines(path) == [{"i": 0}, {"i": 1}]
    path.write_text('{"i": 0}\n{"i"\n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"scores.jsonl:2: malformed JSON line"):
        storage.read_complete_lines(path)


def test_remote_log_loses_at_most_the_batch_in_flight(gcs_emulator):
    path = storage.as_path(gcs_emulator.url("jsonl", "crash", "manifest-00000-of-00001.jsonl"))
    out = storage.JsonlAppender(path)
    out.append({"i": 0})
    out.append({"i": 1})
    out.flush()
    out.append({"i": 2})
    out.flush()
    out.append({"i": 3})  # never flushed: the process dies here
    del out
    assert storage.read_complete_lines(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert gcs_emulator.object_names("jsonl/crash/") == [
        "jsonl/crash/manifest-00000-of-00001.jsonl/000000-00000000.jsonl",
        "jsonl/crash/manifest-00000-of-00001.jsonl/000000-00000001.jsonl"]
    # The log is listed like the file it is locally, and a resumed writer continues it.
    assert [p.name for p in path.parent.glob("manifest-*.jsonl")] == [path.name]
    with storage.JsonlAppender(path) as out:
        out.append({"i": 3})
    assert storage.read_complete_lines(path) == [{"i": i} for i in range(4)]
    # close() compacted the parts into one object of the next generation.
    assert gcs_emulator.object_names("jsonl/crash/") == [
        "jsonl/crash/manifest-00000-of-00001.jsonl/000001-00000000.jsonl"]


def test_remote_rewrite_replaces_the_whole_log(gcs_emulator):
    path = storage.as_path(gcs_emulator.url("jsonl", "rewrite", "judgments.jsonl"))
    storage.write_jsonl(path, [{"i": 0}, {"i": 1}])  # no log yet: a plain object
    assert gcs_emulator.object_names("jsonl/rewrite/") == ["jsonl/rewrite/judgments.jsonl"]
    with storage.JsonlAppender(path, max_pending_rows=1) as out:  # adopts the plain object's rows
        out.append({"i": 2})
        assert storage.read_complete_lines(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    storage.write_jsonl(path, [{"i": 9}])
    assert storage.read_complete_lines(path) == [{"i": 9}] and storage.count_lines(path) == 1
    assert len(gcs_emulator.object_names("jsonl/rewrite/")) == 1
