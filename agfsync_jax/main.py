"""The `agfsync-jax` command: one subcommand per stage of `agfsync_jax.stages.STAGES`.

    agfsync-jax STAGE --config=configs/tiny.py --workdir=DIR [--config.train.learning_rate=1e-6 ...]
    agfsync-jax clean STAGE --workdir=DIR

Only flags are parsed and a stage is dispatched here. The project's own errors (`errors.UserError`:
config, inputs, checkpoints, weights) print as one line and exit with status 2; the traceback goes
to a log file (and to the console with --verbose). Unexpected errors keep their traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from agfsync_jax import stages
from agfsync_jax.errors import UserError
from agfsync_jax.stage_runner import SUMMARY_ENV, USER_ERROR_EXIT

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the run (stage artifacts).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of configuration and input errors too.")
# The plan stage's own flags (absl needs every flag defined before it parses the command line).
flags.DEFINE_string("topology", None, "plan: TPU slices to plan for, comma-separated chip grids or "
                    "accelerator types (v5p:2x2x1,v5e:2x4,v5e-8,v6e-8,v4-8)")
flags.DEFINE_string("plan_out", None, "plan: also write the plan as JSON to this file")


def usage() -> str:
    lines = ["usage: agfsync-jax STAGE --config=CONFIG --workdir=DIR [--config.x.y=value ...]",
             "       agfsync-jax clean STAGE --workdir=DIR", "", "stages:"]
    lines += [f"  {s.name:<12} {s.help}" for s in stages.STAGES]
    return "\n".join(lines)


def _report_user_error(stage: str, error: UserError) -> None:
    log = os.path.join(tempfile.gettempdir(), f"agfsync-jax-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(log, "w", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(error)))
    if _VERBOSE.value:
        traceback.print_exception(error)
    message = str(error).strip().replace("\n", " ")
    print(f"agfsync-jax {stage}: error: {message}\n(traceback: {log}; --verbose prints it)", file=sys.stderr)


def _main(argv: list[str], stage_name: str) -> None:
    stage = stages.get(stage_name)
    positional = argv[1:]
    if stage.name == "clean":
        if len(positional) != 1 or _WORKDIR.value is None:
            raise app.UsageError("usage: agfsync-jax clean STAGE --workdir=DIR")
    elif positional:
        raise app.UsageError(f"unexpected arguments: {positional}")
    elif _CONFIG.value is None or (_WORKDIR.value is None and stage.needs_workdir):
        raise app.UsageError("--config and --workdir are required\n" + usage())
    if not stage.light:
        from agfsync_jax.log_noise import quiet_third_party_logs

        quiet_third_party_logs()
    logging.info("stage %s, workdir %s", stage.name, _WORKDIR.value)
    module = importlib.import_module(stage.module)
    try:
        if stage.name == "clean":
            summary = module.run_clean(positional[0], _WORKDIR.value)
        else:
            summary = module.run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        _report_user_error(stage.name, e)
        sys.exit(USER_ERROR_EXIT)
    out = os.environ.get(SUMMARY_ENV)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(summary or {}, f, default=str)


def run() -> None:
    """Console-script entry: `agfsync-jax STAGE ...`."""
    if len(sys.argv) < 2 or sys.argv[1] not in stages.BY_NAME:
        print(usage(), file=sys.stderr)
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    stage = sys.argv[1]
    argv = [f"{sys.argv[0]} {stage}"] + sys.argv[2:]
    app.run(lambda a: _main(a, stage), argv=argv)


if __name__ == "__main__":
    run()
