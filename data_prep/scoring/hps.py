"""HPS v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip CLIP model
finetuned on human preferences, loaded from a local checkpoint file.

The paper's benchmark metric (AGFSync Table 1 uses the HPS v2 benchmark prompts) and a reward
option (`scoring.weights` "hps=...") or extra metric (`scoring.extra` "hps").

    hps(image, text) = 100 * cos(E_image, E_text)

E are open_clip's projected, L2-normalised image and text embeddings
(`encode_image(normalize=True)` / `encode_text(normalize=True)`) of the HPS checkpoint loaded
into `scoring.hps_model` (open_clip's ViT-H-14 for the published v2.0 and v2.1 files). Which
number this is: the `hpsv2` package computes `image_features @ text_features.T` of those
normalised features and takes the diagonal, i.e. the cosine itself (no logit scale): its
`hpsv2.score()` returns the cosine (about 0.2-0.3 for real images), and its benchmark evaluation
(`evaluate_benchmark`) reports 100 x that cosine, the numbers of the HPS v2 benchmark tables.
We report the latter: 100 x cosine, the same scale as our CLIP score, so it sits on the 0-100
scale of the weighted total without a further map (a negative cosine stays negative rather than
being clipped, so candidates never tie at the end of the scale).

Preprocessing is the one `hpsv2.score()` uses (its vendored open_clip's `image_transform` with
`resize_longest_max=True`, via `light_augmentation=True`): RGB -> float tensor in [0, 1]
-> bicubic resize (torchvision, on the tensor, antialiased) so the longest side is the model's
image size -> zero padding to a square, split evenly (the extra pixel right/bottom) -> normalise
with the model's mean/std (OpenAI's for ViT-H-14). Two deliberate differences: hpsv2 skips the
padding when the longest side already has the model's size, so a non-square image of that size
reaches the ViT non-square and fails; we pad it. And torchvision before 0.17, current when hpsv2
was released, did not antialias tensor resizes by default; today's torchvision, which hpsv2 also
gets when installed now, does. Text: open_clip's tokenizer for the model (77 tokens, a longer
prompt cut with the end-of-text token kept in the last position, as hpsv2).

On CUDA with float16 the model keeps float32 weights and runs under autocast (hpsv2's
precision="amp"); on the CPU it runs in float32. The cosine is taken in float64 from the
normalised float32 features.

The checkpoint is the file HPS ships (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`): a torch
pickle of a dict whose "state_dict" entry is the CLIP model's state dict; a bare state dict, or
keys prefixed "module." (open_clip training's DDP checkpoints), are accepted too. It is loaded
with weights_only and strictly: a key or shape that does not fit the architecture is an error
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_prep.scoring import file_digest
from data_prep.scoring.scorer import Scorer, ScoringItem, batches

HPS_MODEL = "ViT-H-14"  # the architecture of the published HPS v2 / v2.1 checkpoints
LOCAL_DIR = "local-dir:"  # open_clip's prefix for a folder holding open_clip_config.json
OPEN_CLIP_CONFIG = "open_clip_config.json"
_MODULE_PREFIX = "module."


def model_config(model: str) -> tuple[dict[str, Any], str]:
    """(open_clip model config, short label) of `scoring.hps_model`: an open_clip model name or
    "local-dir:FOLDER" with FOLDER/open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...})."""
    import open_clip

    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):])
        path = folder / OPEN_CLIP_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"scoring.hps_model is {model!r} but {path} does not exist "
                                    f"(a local-dir model needs its {OPEN_CLIP_CONFIG})")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
            raise ValueError(f"{path}: expected a JSON object with a 'model_cfg' object")
        return config, folder.name
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"scoring.hps_model is {model!r}: neither an open_clip model name (HPS v2 uses "
                         f"{HPS_MODEL!r}) nor '{LOCAL_DIR}FOLDER' with a {OPEN_CLIP_CONFIG}")
    return {"model_cfg": config}, model


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The CLIP state dict of an HPS checkpoint file (see the module docstring for the layout)."""
    if not path.is_file():
        raise FileNotFoundError(f"scoring.hps_path: {path} is not a file (expected the HPS v2 checkpoint, "
                                f"e.g. HPS_v2.1_compressed.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # weights_only refusals are UnpicklingError; damaged archives RuntimeError or EOFError.
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors under 'state_dict' "
                         f"(top-level keys: {sorted(checkpoint)[:8]})")
    if state and all(k.startswith(_MODULE_PREFIX) for k in state):
        state = {k[len(_MODULE_PREFIX):]: v for k, v in state.items()}
    return state


class _NoRandomInitWarnings(logging.Filter):
    """open_clip warns that a model built without weights is random; ours gets the checkpoint next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("No pretrained weights loaded",
                                                   "Local config loaded, but no CLIP weights"))


def create_model(model: str) -> torch.nn.Module:
    """open_clip's model `model` (a name or local-dir), randomly initialised, float32 on the CPU."""
    import open_clip

    root, quiet = logging.getLogger(), _NoRandomInitWarnings()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(model, pretrained=None, load_weights=False, precision="fp32", device="cpu")
    finally:
        root.removeFilter(quiet)


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, label: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit open_clip model {label!r}: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]} "
                         "(is scoring.hps_model the checkpoint's architecture?)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)} but open_clip model "
                             f"{label!r} expects {tuple(value.shape)} (is scoring.hps_model the "
                             "checkpoint's architecture?)")


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """hpsv2's evaluation transform (module docstring): (3, size, size) float32."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(image.convert("RGB"))
    height, width = x.shape[1:]
    scale = size / max(height, width)
    if scale != 1.0:
        x = TF.resize(x, [round(height * scale), round(width * scale)],
                      interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, list(mean), list(std))


class HpsScorer(Scorer):
    """100 x cosine of the HPS v2 model's normalised image and prompt embeddings."""

    name = "hps"

    def __init__(self, checkpoint: str | Path, model: str, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 16):
        import open_clip

        self.checkpoint = Path(checkpoint)
        config, self.model_label = model_config(model)
        state = load_checkpoint_state(self.checkpoint)
        net = create_model(model)
        _check_fits(net, state, self.checkpoint, self.model_label)
        net.load_state_dict(state, strict=True)
        self.model = net.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        cfg = open_clip.get_model_preprocess_cfg(net)
        size = cfg["size"]
        if not isinstance(size, int):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"scoring.hps_model {model!r} has a non-square image size {size}")
            size = int(size[0])
        self.size, self.mean, self.std = size, tuple(cfg["mean"]), tuple(cfg["std"])
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._digest = file_digest.digest([("checkpoint", self.checkpoint)],
                                          extra=[json.dumps(config, sort_keys=True)])

    @property
    def version(self) -> str:
        return f"hps:{self.model_label}:{self.checkpoint.name}:{self._digest}"

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype == torch.float16:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def features(self, items: Sequence[ScoringItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image, text) features, float32 on the CPU, one row per item."""
        images, texts = [], []
        for sl in batches(len(items), self.batch_size):
            chunk = items[sl]
            pixels = torch.stack([preprocess(it.image, self.size, self.mean, self.std) for it in chunk])
            tokens = self.tokenizer([it.text for it in chunk])
            with self._autocast():
                image = self.model.encode_image(pixels.to(self.device), normalize=True)
                text = self.model.encode_text(tokens.to(self.device), normalize=True)
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
        return torch.cat(images), torch.cat(texts)

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        if not items:
            return np.zeros((0,))
        image, text = self.features(items)
        return 100.0 * (image.double() * text.double()).sum(dim=-1).numpy()
