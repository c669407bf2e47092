"""Image bytes -> the VAE encoder's input, exactly as diffusers' `VaeImageProcessor` prepares it.

    pixels = preprocess(png_or_jpeg_bytes, resolution=512, where="mjhq/animals/0001.jpg")

The image is resized with Lanczos so that it covers the square and centre-cropped
(`VaeImageProcessor.preprocess(..., resize_mode="crop")`, which keeps the aspect ratio), scaled to
[0, 1] as float32 and mapped to [-1, 1] as 2x - 1. For RGB and grayscale images the result is
exactly VaeImageProcessor(do_convert_rgb=True)'s. Images with alpha or a palette are converted to
RGB first, as diffusers' DPO and SFT training scripts do (`image.convert("RGB")`);
VaeImageProcessor converts after resizing, which for those modes means resizing with
premultiplied alpha, or with nearest neighbour for palette images. The training scripts'
torchvision pipeline (bilinear Resize + CenterCrop) differs from this only in the filter.
"""

from __future__ import annotations

import io

import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode; the message names where they came from."""


def load_rgb(data: bytes, where: str):
    """Decodes image bytes (any format PIL reads) into an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e


def resize_and_crop(image, resolution: int):
    """`VaeImageProcessor._resize_and_crop` for a square target: cover it, then centre-crop."""
    from PIL import Image

    width = height = resolution
    ratio = width / height
    src_ratio = image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def to_uint8(data: bytes, resolution: int, where: str) -> np.ndarray:
    """Image bytes -> (resolution, resolution, 3) uint8, resized and cropped."""
    return np.asarray(resize_and_crop(load_rgb(data, where), resolution), dtype=np.uint8)


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (pil_to_numpy, then 2x - 1)."""
    return np.ascontiguousarray((2.0 * (image.astype(np.float32) / 255.0) - 1.0).transpose(2, 0, 1))


def preprocess(data: bytes, resolution: int, where: str) -> np.ndarray:
    """Image bytes -> (3, resolution, resolution) float32 in [-1, 1]."""
    return normalize(to_uint8(data, resolution, where))
