"""Stage fingerprints: what counts, what does not, and the fields a change names."""

from __future__ import annotations

import pytest

from agfsync_jax import done_marker, fingerprint
from agfsync_jax.errors import StageChangedError
from configs.common import base_config


def test_a_new_field_counts_by_default_and_ignored_ones_do_not():
    config = base_config()
    before = fingerprint.config_settings(config, ("seed", "sampling"), ("sampling.batch_size",))
    assert "sampling.steps" in before and "seed" in before and "sampling.batch_size" not in before
    assert not any(k.startswith("train.") for k in before)
    config.sampling.batch_size = 64
    assert fingerprint.digest(fingerprint.config_settings(config, ("seed", "sampling"), ("sampling.batch_size",))) \
        == fingerprint.digest(before)
    config.sampling.brand_new_field = 3  # a field added later, listed nowhere
    after = fingerprint.config_settings(config, ("seed", "sampling"), ("sampling.batch_size",))
    assert fingerprint.changed_fields(before, after) == ["sampling.brand_new_field"]


def test_ignoring_a_section_prefix_drops_everything_below_it():
    settings = fingerprint.config_settings(base_config(), ("prompts",), ("prompts.llm",))
    assert not any(k.startswith("prompts.llm.") for k in settings) and "prompts.per_category" in settings
    with pytest.raises(KeyError, match="no section 'nope'"):
        fingerprint.config_settings(base_config(), ("nope",))


def test_stored_lists_equal_live_tuples():
    assert fingerprint.changed_fields({"a": [1, 2]}, {"a": (1, 2)}) == []


def test_done_marker_check_names_the_changed_fields_and_the_fix(tmp_path):
    settings = {"train.learning_rate": 1e-6, "seed": 0}
    assert done_marker.check("train", tmp_path, settings, tmp_path) is None  # not done
    done_marker.write(tmp_path, {"step": 4}, settings)
    assert done_marker.check("train", tmp_path, settings, tmp_path)["step"] == 4
    with pytest.raises(StageChangedError, match=r"train.learning_rate changed\); `agfsync-jax clean train --workdir="):
        done_marker.check("train", tmp_path, {**settings, "train.learning_rate": 2e-6}, tmp_path)
    done_marker.clear(tmp_path)
    assert not done_marker.is_done(tmp_path)


def test_a_marker_without_settings_is_not_taken_for_current(tmp_path):
    done_marker.write(tmp_path, {"pairs": 3})  # as written before fingerprints existed
    assert done_marker.changed_fields(done_marker.read(tmp_path), {"x": 1}) == [
        "<no settings recorded: made by an older version>"]
