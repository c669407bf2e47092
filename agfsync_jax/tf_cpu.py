"""TensorFlow, imported for moving bytes and CPU-only models (TFRecords, TFDS metadata,
TensorBoard summaries, the VILA SavedModel), never on an accelerator.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


@functools.cache
def tensorflow_cpu_only() -> Any:
    """Imports TensorFlow with every GPU hidden from it.

    TF would otherwise reserve most of each GPU's memory when it first touches a device, which
    starves JAX (or PyTorch) in the same process.

    When triton is installed (CUDA builds of PyTorch pull it in), it is imported first: with
    tensorflow-cpu 2.21 and triton 3.8 loaded in the other order, the process dies with a
    segmentation fault as soon as PyTorch code loads triton (e.g. `from transformers import
    CLIPModel`); in this order both work (tests/agfsync_jax/test_tf_cpu.py).
    """
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401

    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        # Raised once TF has initialised its devices; fine only if it sees no GPU at all.
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError("TensorFlow initialised its GPUs before tensorflow_cpu_only() ran") from e
    return tf
