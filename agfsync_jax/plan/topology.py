"""TPU chips and topologies, and libtpu's compile-only devices for them.

    topo = parse_topology("v5p-8")          # or "v5p:2x2x1"
    devices = compile_only_devices(topo)    # TPU devices to lower and compile for; nothing runs

libtpu describes any TPU slice without the hardware (`jax.experimental.topologies`); arrays
sharded over those devices lower and compile with the real TPU compiler, while JAX's default
backend stays the CPU. Only one process at a time may hold libtpu (it takes
/tmp/libtpu_lockfile), so a plan runs in its own process and releases libtpu by exiting.

Chip numbers are Google's published per-chip specifications (Cloud TPU system architecture
pages, linked per chip). Google writes "GB" for the HBM of v5e, v5p and v6e and "GiB" for v4;
the TPU compiler's own out-of-memory messages state the budget it plans against (e.g. 15.75 GiB
usable on a v5e chip), which is what decides whether a program compiles at all.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Any

GIB = 2**30

# libtpu's lock: held by whichever process initialised libtpu, released when it exits.
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
# What `pip install agfsync-jax[tpu-plan]` installs: the libtpu that jax[tpu] pins for our jax.
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip numbers (Google's published specifications)."""

    name: str  # "v5e": the prefix of topology names
    device_kind: str  # what libtpu calls its devices
    hbm_bytes: int  # HBM per chip, as published
    hbm_published: str  # the published figure, verbatim units
    peak_bf16_flops: float  # peak dense bf16 FLOP/s per chip
    cores_per_chip: int  # TensorCores; accelerator-type names (v4-8, v5p-8) count these
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, "32 GiB", 275e12, 2, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, "16 GB", 197e12, 1, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, "95 GB", 459e12, 2, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, "32 GB", 918e12, 1, "https://cloud.google.com/tpu/docs/v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e", "v5": "v5p"}

# Chip grids of the common single-host and small multi-host slices, by chip count.
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip and chip grid ("v5e:2x4" is 8 v5e chips)."""

    chip: Chip
    grid: str  # "2x4" or "2x2x1"

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{self.grid}"

    @property
    def num_chips(self) -> int:
        n = 1
        for d in self.grid.split("x"):
            n *= int(d)
        return n

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for the slice (v4 and v5p count TensorCores, v5e and v6e chips)."""
        return f"{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}"


class TopologyError(ValueError):
    """A topology name that cannot be parsed; the message lists the accepted forms."""


class LibtpuUnavailable(RuntimeError):
    """libtpu is missing or held by another process; the message is one line saying which."""


def _chip(name: str, text: str) -> Chip:
    key = _ALIASES.get(name, name)
    if key not in CHIPS:
        raise TopologyError(f"--topology={text!r}: unknown TPU generation {name!r}; "
                            f"expected one of {sorted(CHIPS)}")
    return CHIPS[key]


def parse_topology(text: str) -> Topology:
    """'v5e:2x4' (chip grid) or 'v5e-8' (Cloud TPU accelerator type) -> Topology."""
    text = text.strip()
    grid_form = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if grid_form:
        chip = _chip(grid_form.group(1), text)
        dims = grid_form.group(2).count("x") + 1
        want = 3 if chip.cores_per_chip == 2 else 2
        if dims != want:
            raise TopologyError(f"--topology={text!r}: {chip.name} slices have {want}-D chip grids "
                                f"(e.g. {chip.name}:{'2x2x1' if want == 3 else '2x2'})")
        return Topology(chip, grid_form.group(2))
    type_form = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if type_form:
        chip = _chip(type_form.group(1), text)
        count = int(type_form.group(2))
        grids = _GRIDS_3D if chip.cores_per_chip == 2 else _GRIDS_2D
        chips, rest = divmod(count, chip.cores_per_chip)
        if rest or chips not in grids:
            raise TopologyError(f"--topology={text!r}: no known {chip.name} slice with {count} "
                                f"{'TensorCores' if chip.cores_per_chip == 2 else 'chips'}; give the chip "
                                f"grid instead, e.g. {chip.name}:{next(iter(grids.values()))}")
        return Topology(chip, grids[chips])
    raise TopologyError(f"--topology={text!r}: expected a chip grid like v5e:2x4 or v5p:2x2x1, or an "
                        "accelerator type like v5e-8 or v5p-8")


def parse_topologies(text: str) -> list[Topology]:
    """A comma-separated list of topologies."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise TopologyError("--topology is empty; give e.g. --topology=v5p:2x2x1,v5e:2x4")
    return [parse_topology(p) for p in parts]


def compile_only_devices(topology: Topology) -> list[Any]:
    """libtpu's devices of `topology`: lower and compile for them, never run.

    One JAX device per chip, as JAX uses a slice by default (v4 and v5p in megacore mode: both
    TensorCores of a chip form one device).
    """
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuUnavailable(
            f"libtpu is not installed, and the plan needs the TPU compiler: "
            f"pip install 'agfsync-jax[tpu-plan]' (installs {LIBTPU_REQUIREMENT})")
    import jax
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if topology.chip.name == "v4" else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu", **options)
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0]
        if "lockfile" in first:
            raise LibtpuUnavailable(
                f"libtpu is held by another process ({LIBTPU_LOCKFILE}); only one process at a time can "
                "use it: wait for that process to exit and run the plan again") from None
        raise LibtpuUnavailable(f"libtpu cannot describe topology {topology.name!r}: {first}") from None
    devices = list(desc.devices)
    kinds = {d.device_kind for d in devices}
    if kinds != {topology.chip.device_kind} or len(devices) != topology.num_chips:
        raise LibtpuUnavailable(
            f"libtpu describes {topology.name!r} as {len(devices)} devices of kind {sorted(kinds)}, expected "
            f"{topology.num_chips} x {topology.chip.device_kind!r}")
    return devices
