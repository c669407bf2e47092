"""TensorBoard summaries written with TensorFlow alone (no `tensorboard` package).

`tf.summary.scalar` and `tf.summary.image` live in the tensorboard package; what they write is a
tensor plus the summary metadata of their plugin, which `tf.summary.write` writes just the same.
The metadata here is what tensorboard's own `scalar`/`image` summaries attach (plugin name,
empty plugin content = proto version 0, data class), so TensorBoard shows these as its scalars
and images. An image summary is a string tensor [width, height, PNG bytes...].
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np


def scalar_metadata() -> Any:
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)


def image_metadata(description: str = "") -> Any:
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        summary_description=description,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def image_tensor(tf: Any, image: np.ndarray) -> Any:
    """(H, W, 3) uint8 -> the image plugin's tensor for one image."""
    height, width = image.shape[:2]
    return tf.constant([str(width).encode(), str(height).encode(), encode_png(image)], dtype=tf.string)


def tile(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows x columns) grid image, row-major, with white gaps."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    return grid
