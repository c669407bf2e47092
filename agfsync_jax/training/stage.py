"""Stage `train`: Diffusion-DPO finetuning of the UNet on WORKDIR/pairs -> WORKDIR/train.

    agfsync-jax train --config=configs/tiny.py --workdir=DIR

A finished run (done marker present and at `train.steps`) is skipped; an interrupted one
resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agfsync_jax import workdir as workdir_lib


def run(config: Any, workdir: str) -> dict[str, Any]:
    done = Path(workdir) / workdir_lib.TRAIN / workdir_lib.DONE_MARKER
    if done.is_file():
        summary = json.loads(done.read_text())
        if int(summary.get("step", -1)) >= int(config.train.steps):
            print(f"train: complete at step {summary['step']}, skipped ({done})")
            return summary
    # Import JAX only now: joining the process group must precede any use of a device.
    from agfsync_jax import distributed
    from agfsync_jax.training import train

    distributed.initialize()
    summary = train.train_and_evaluate(config, workdir)
    # Losses without a preference (sft) have no implicit accuracy.
    acc = (f", implicit accuracy {summary['implicit_acc']:.3f}"
           if math.isfinite(summary.get("implicit_acc", float("nan"))) else "")
    print(f"train: step {summary['step']}, loss {summary.get('loss', float('nan')):.4f}{acc}, "
          f"{summary['nonfinite_steps']} non-finite steps skipped; checkpoint {summary['checkpoint']}")
    return summary
