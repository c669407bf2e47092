"""A config that a run already resolved, read back from JSON: how a stage run as a child process
gets exactly its parent's config (overrides included).

    agfsync-jax score --config=configs/resolved.py:/tmp/run/score-config.json --workdir=DIR

Written by `agfsync_jax.stage_runner`; any `--config.x.y=value` given on top still applies.
"""

import json

import ml_collections


def get_config(path: str):
    if not path:
        raise ValueError("configs/resolved.py needs the JSON file: --config=configs/resolved.py:/path/config.json")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))
