"""VILA aesthetic score (Ke et al. 2023, VILA-R): the paper's and the authors' code's aesthetic
scorer, the published TensorFlow SavedModel run from a local folder.

The model is Google's TF-Hub / Kaggle `google/vila` ("tensorFlow2/image"), downloaded once and
unpacked into a folder (saved_model.pb + variables/); point `scoring.vila_path` at it. Its
`serving_default` signature takes one encoded image (`image_bytes`, a scalar string tensor: the
PNG/JPEG file's bytes; the model decodes and resizes inside) and returns `predictions`, one
aesthetic score in [0, 1]. The authors' code (dpo_dataset/aes_score.py in their repository)
calls it on each candidate PNG's bytes and multiplies by 100; the paper says the same ("rescale
the VQA score and aesthetic score to 0-100 by multiplying the original score by 100"). So:

    aesthetic = 100 * predictions        0 -> 0,  0.5 -> 50,  1 -> 100

Images reach the scorers decoded (ScoringItem.image), so each is re-encoded as PNG: PNG is
lossless, so the model decodes exactly the pixels of the candidate file the authors would have
passed. One image per call, as the signature takes a scalar.

TensorFlow stays off the GPUs the PyTorch scorers use: the process imports TensorFlow through
`agfsync_jax.tf_cpu.tensorflow_cpu_only()`, which hides every GPU from TensorFlow
(`tf.config.set_visible_devices([], "GPU")`, and an error if TensorFlow had already initialised
GPUs), and the model is loaded and called under `tf.device("/CPU:0")`. The project installs
tensorflow-cpu, which sees no GPU in the first place.

`scoring.aesthetic = "vila"` makes this the "aesthetic" score; `scoring.extra = "vila"` records
it as a separate "vila" score (e.g. next to the LAION head's "aesthetic").
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.scoring import file_digest
from data_prep.scoring.scorer import Scorer, ScoringItem

SIGNATURE = "serving_default"
INPUT = "image_bytes"
OUTPUT = "predictions"


def _tf() -> Any:
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    return tensorflow_cpu_only()


def _check_signature(signature: Any, folder: Path) -> None:
    tf = _tf()
    args, kwargs = signature.structured_input_signature
    inputs = {**{f"<positional {i}>": spec for i, spec in enumerate(args)}, **kwargs}
    found = {k: f"{v.dtype.name}{list(v.shape) if v.shape.rank is not None else '[?]'}" for k, v in inputs.items()}
    if set(inputs) != {INPUT}:
        raise ValueError(f"{folder}: signature {SIGNATURE!r} must take exactly one input {INPUT!r} "
                         f"(encoded image bytes); found inputs {found}")
    spec = inputs[INPUT]
    if spec.dtype != tf.string or (spec.shape.rank not in (None, 0)):
        raise ValueError(f"{folder}: input {INPUT!r} must be a scalar string tensor; found {found[INPUT]}")
    outputs = signature.structured_outputs
    if not isinstance(outputs, dict) or OUTPUT not in outputs:
        names = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ValueError(f"{folder}: signature {SIGNATURE!r} has no output {OUTPUT!r}; found outputs {names}")
    if not outputs[OUTPUT].dtype.is_floating:
        raise ValueError(f"{folder}: output {OUTPUT!r} is {outputs[OUTPUT].dtype.name}, expected a float score")


def load_vila(folder: str | Path) -> tuple[Any, Any]:
    """(loaded SavedModel, its `serving_default` signature) from `folder`, the signature checked
    to be VILA's. Keep the model alive as long as the signature is used: it owns the variables."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"scoring.vila_path: {folder} is not a directory (expected the unpacked VILA "
                                "SavedModel folder: saved_model.pb and variables/)")
    if not any((folder / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
        entries = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"scoring.vila_path: {folder} holds no saved_model.pb (found {entries[:10]}); "
                                "point it at the folder that contains saved_model.pb")
    tf = _tf()
    with tf.device("/CPU:0"):
        try:
            model = tf.saved_model.load(str(folder))
        except (tf.errors.OpError, ValueError, OSError) as e:
            raise ValueError(f"scoring.vila_path: {folder} is not a loadable SavedModel ({e})") from e
    signatures = dict(model.signatures)
    if SIGNATURE not in signatures:
        raise ValueError(f"{folder}: SavedModel has no {SIGNATURE!r} signature (found {sorted(signatures)})")
    signature = signatures[SIGNATURE]
    _check_signature(signature, folder)
    return model, signature


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


class VilaScorer(Scorer):
    """100 x VILA's [0, 1] aesthetic prediction of each image's PNG bytes."""

    def __init__(self, folder: str | Path, name: str = "aesthetic"):
        self.folder = Path(folder)
        self.name = name
        self.model, self.signature = load_vila(self.folder)
        self._digest = file_digest.folder_digest(self.folder)

    @property
    def version(self) -> str:
        return f"vila:{self.folder.name}:{self._digest}"

    def predictions(self, images: Sequence[Image.Image]) -> np.ndarray:
        """VILA's raw [0, 1] predictions, float64."""
        tf = _tf()
        out = np.zeros((len(images),))
        with tf.device("/CPU:0"):
            for i, image in enumerate(images):
                value = self.signature(**{INPUT: tf.constant(png_bytes(image))})[OUTPUT].numpy()
                if value.size != 1:
                    raise ValueError(f"{self.folder}: {OUTPUT!r} has shape {value.shape} for one image; "
                                     "expected a single score")
                out[i] = float(value.reshape(-1)[0])
        return out

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        return 100.0 * self.predictions([it.image for it in items])
