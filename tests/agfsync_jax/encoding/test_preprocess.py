"""Our image preprocessing is diffusers' VaeImageProcessor (resize to cover, centre crop, [-1, 1])."""

from __future__ import annotations

import io

import numpy as np
import pytest

from agfsync_jax.encoding import preprocess


def _png(array: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("shape,mode", [((48, 80, 3), "RGB"), ((90, 40, 3), "RGB"), ((32, 32, 3), "RGB"),
                                        ((20, 26, 4), "RGBA"), ((50, 45), "L")])
def test_matches_diffusers_vae_image_processor(shape, mode):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(sum(shape))
    data = _png(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    ours = preprocess.preprocess(data, 32, "test image")
    image = Image.open(io.BytesIO(data))
    if mode == "RGBA":  # converted first, like diffusers' training scripts (preprocess.py says why)
        image = image.convert("RGB")
    reference = VaeImageProcessor(do_convert_rgb=True).preprocess(
        image, height=32, width=32, resize_mode="crop").numpy()[0]
    assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
    assert -1.0 <= ours.min() and ours.max() <= 1.0
    np.testing.assert_array_equal(ours, reference)


def test_undecodable_bytes_name_the_image():
    with pytest.raises(preprocess.ImageDecodeError, match="row 7 of my.jsonl: not a readable image"):
        preprocess.preprocess(b"\x89PNG but not really", 32, "row 7 of my.jsonl")
