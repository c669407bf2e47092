"""Topology names -> chips and grids; libtpu's absence is one clear error (no libtpu needed)."""

from __future__ import annotations

import importlib.util

import pytest

from agfsync_jax.plan import topology


@pytest.mark.parametrize("text, name, chips, accelerator_type", [
    ("v5e:2x2", "v5e:2x2", 4, "v5e-4"),
    ("v5e-8", "v5e:2x4", 8, "v5e-8"),
    ("v5litepod-16", "v5e:4x4", 16, "v5e-16"),
    ("v6e-8", "v6e:2x4", 8, "v6e-8"),
    # v4 and v5p accelerator types count TensorCores (two per chip): v5p-8 is 4 chips.
    ("v5p-8", "v5p:2x2x1", 4, "v5p-8"),
    ("v5p:2x2x1", "v5p:2x2x1", 4, "v5p-8"),
    ("v4-8", "v4:2x2x1", 4, "v4-8"),
    ("v4-16", "v4:2x2x2", 8, "v4-16"),
])
def test_topology_names(text, name, chips, accelerator_type):
    t = topology.parse_topology(text)
    assert (t.name, t.num_chips, t.accelerator_type) == (name, chips, accelerator_type)


def test_chip_table_is_googles_published_numbers():
    """HBM per chip and peak bf16 FLOP/s from the Cloud TPU system-architecture pages."""
    gib = 2**30
    assert {k: (c.hbm_bytes // gib, c.peak_bf16_flops / 1e12) for k, c in topology.CHIPS.items()} == {
        "v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}


@pytest.mark.parametrize("text, message", [
    ("v7x:2x2", "unknown TPU generation"),
    ("v5p:2x2", "3-D chip grids"),
    ("v5e:2x2x1", "2-D chip grids"),
    ("v5p-6", "no known v5p slice with 6 TensorCores"),
    ("tpu", "expected a chip grid"),
])
def test_bad_topologies_say_what_is_accepted(text, message):
    with pytest.raises(topology.TopologyError, match=message):
        topology.parse_topology(text)


def test_a_list_of_topologies():
    assert [t.name for t in topology.parse_topologies("v5p-8, v5e:2x4")] == ["v5p:2x2x1", "v5e:2x4"]
    with pytest.raises(topology.TopologyError, match="empty"):
        topology.parse_topologies(" , ")


def test_missing_libtpu_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(topology.LibtpuUnavailable, match=r"agfsync-jax\[tpu-plan\]") as e:
        topology.compile_only_devices(topology.parse_topology("v5e:2x2"))
    assert "\n" not in str(e.value)
