"""TensorFlow next to PyTorch in one process: the import order that does not crash."""

from __future__ import annotations

import pytest

import subprocess
import sys


@pytest.mark.slow
def test_tensorflow_first_then_pytorch_models_does_not_crash():
    code = ("from agfsync_jax.tf_cpu import tensorflow_cpu_only; tf = tensorflow_cpu_only(); "
            "from transformers import CLIPModel; import torch; print('ok', tf.config.get_visible_devices('GPU'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok []"
