"""Two processes under jax.distributed (gloo) encode their own shards into one pair dataset, equal
to what one process with the same devices writes (latents bit for bit)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # three subprocesses, each loading the model and compiling: a few minutes

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _code(model_path: Path, images: Path, workdir: Path) -> str:
    return textwrap.dedent(f"""
        import jax
        from configs import tiny
        from agfsync_jax.encoding import stage
        config = tiny.get_config()
        config.model.tiny, config.model.path = "", {str(model_path)!r}
        config.encode.format, config.encode.path = "folder", {str(images)!r}
        config.encode.batch_size, config.encode.rows_per_shard = 2, 2
        summary = stage.run(config, {str(workdir)!r})
        print("process", jax.process_index(), "of", jax.process_count(), "summary", summary, flush=True)
    """)


def test_two_processes_encode_their_own_shards(tmp_path, tiny_sd1_path, run_python):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        (images / f"{i}.png").write_bytes(buf.getvalue())
        if i != 4:  # row 4 has no caption: a counted skip in process 0's shard 2
            (images / f"{i}.txt").write_text(f"picture {i}")

    port = _free_port()
    code = _code(tiny_sd1_path, images, tmp_path / "distributed")
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    summaries = [eval(out.split("summary ")[-1].strip().splitlines()[0]) for out in outputs]  # noqa: S307
    print(summaries)
    # 7 rows in 4 shards: process 0 owns shards 0 and 2, process 1 shards 1 and 3.
    assert [s["shards_encoded"] for s in summaries] == [2, 2]
    assert [s["records"] for s in summaries] == [3, 3] and summaries[0]["skipped"] == {"missing prompt": 1}
    assert summaries[0]["complete"] is True

    # One process with two devices: the same per-device batch shapes, so the same latents.
    run_python(_code(tiny_sd1_path, images, tmp_path / "single"), devices=2)
    distributed, single = (tmp_path / name / workdir_lib.PAIRS for name in ("distributed", "single"))
    assert json.loads((distributed / workdir_lib.DONE_MARKER).read_text()) == json.loads(
        (single / workdir_lib.DONE_MARKER).read_text())
    # Field by field (a process's protobuf may order the feature map differently in the bytes).
    for path in sorted(single.glob("agfsync_pairs-*")):
        theirs, ours = _decoded(path), _decoded(distributed / path.name)
        assert len(ours) == len(theirs) and ours == theirs, path.name


def _decoded(path: Path) -> list[dict]:
    from tensorflow.python.lib.io import tf_record

    from agfsync_jax.pairs.records import decode_pair_example, scan_record_offsets
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tensorflow_cpu_only()
    reader = tf_record.tf_record_random_reader(str(path))
    return [decode_pair_example(reader.read(offset)[0], str(path)) for offset in scan_record_offsets(path)]
