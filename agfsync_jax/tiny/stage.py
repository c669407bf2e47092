"""Stage `tiny-model`: materialise the configured tiny model under WORKDIR/base_model.

    agfsync-jax tiny-model --config=configs/tiny.py --workdir=DIR

Every stage builds it on first use anyway; this stage exists to build it ahead of a multi-host
run, or to look at it.
"""

from __future__ import annotations

from typing import Any

from agfsync_jax.base_model import resolve_base_model
from agfsync_jax.errors import ConfigError


def run(config: Any, workdir: str) -> dict[str, Any]:
    if not config.model.tiny:
        raise ConfigError("tiny-model: model.tiny is empty; set --config.model.tiny=sd1 (or sdxl)")
    path = resolve_base_model(config, workdir)
    print(f"tiny-model: {config.model.tiny} pipeline at {path}")
    return {"path": str(path)}
