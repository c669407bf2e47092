"""TensorFlow, imported for moving bytes only (TFRecords, TFDS metadata, TensorBoard summaries)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def tensorflow_cpu_only() -> Any:
    """Imports TensorFlow with every GPU hidden from it.

    TF would otherwise reserve most of each GPU's memory when it first touches a device, which
    starves JAX (or PyTorch) in the same process. TF only moves bytes here.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        # Raised once TF has initialised its devices; fine only if it sees no GPU at all.
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError("TensorFlow initialised its GPUs before tensorflow_cpu_only() ran") from e
    return tf
