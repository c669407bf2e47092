"""LoRA safetensors files: read diffusers/peft and kohya/A1111 layouts, write diffusers' layout.

    lora = load_lora("/loras/lcm-lora-sdv1-5", unet_config)    # folder or .safetensors file
    params = merge(unet_params, lora.adapters)                 # agfsync_jax.lora.adapters
    save_diffusers_lora(adapters, unet_config, out_dir, scale=alpha / rank)

Reading goes through diffusers' own conversions, in the order `pipe.load_lora_weights` applies
them: `lora_state_dict` (kohya/A1111 `lora_unet_*.lora_down/lora_up/alpha` keys, SDXL's SGM block
names mapped with the UNet config), then `convert_unet_state_dict_to_peft` (the older diffusers
`*.lora.down.weight` / `to_q_lora` layouts), and the per-layer rank and alpha that diffusers' and
peft's LoraConfig resolution gives (file metadata, kohya alphas, or alpha = rank). The scale
alpha / rank (alpha / sqrt(rank) under rsLoRA) is folded into `lora_b`, so the result merges with
scale 1.0 like `pipe.fuse_lora()`.

Anything this cannot apply is an error naming the file and the key: text-encoder LoRA, DoRA,
LoRA biases, layers the UNet does not have, shapes that do not fit.

Writing uses diffusers' `save_lora_weights` (peft layout, `unet.<module>.lora_A.weight` and
`lora_B.weight`, in `pytorch_lora_weights.safetensors`), with the scale folded into lora_B so
any loader reads it right with alpha = rank, diffusers' default for a file without alphas.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import unflatten_dict

from agfsync_jax.lora import adapters as adapters_lib, keys
from agfsync_jax.errors import InputError
from agfsync_jax.lora.keys import LoraKeyError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_PREFIX = "unet."


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """A LoRA file's UNet adapters in Flax layout (scale folded into lora_b) and where they came from."""

    adapters: dict[str, Any]
    source: str

    @property
    def num_modules(self) -> int:
        return len(adapters_lib.modules(self.adapters, self.source))


def resolve_file(path: str | Path) -> Path:
    """A .safetensors file, or the one LoRA file of a folder (pytorch_lora_weights.safetensors first)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: LoRA weights must be a .safetensors file (pickled .bin is not read)")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such LoRA file or folder")
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected {WEIGHT_NAME} or exactly one .safetensors file, found "
                                f"{[p.name for p in found]}")
    return found[0]


class LoraFileError(InputError):
    """A LoRA file is missing, damaged or not safetensors; the message names it."""


def _read(file: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    import safetensors.torch
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    from agfsync_jax.models.weight_files import describe_damage

    damage = describe_damage(Path(file))
    if damage is not None:
        raise LoraFileError(f"LoRA file {file} {damage}")
    try:
        return safetensors.torch.load_file(str(file), device="cpu"), _load_sft_state_dict_metadata(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types; re-raised naming the file
        raise LoraFileError(f"LoRA file {file} cannot be read as safetensors ({type(e).__name__}: {e})") from e


def _peft_unet_state_dict(state: dict[str, Any], unet_config: Mapping[str, Any],
                          where: str) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Any supported layout -> ({module.lora_A.weight: tensor, ...}, kohya alphas or None)."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    for key in state:
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoraKeyError(f"{where}: key {key!r} belongs to a DoRA adapter, which is not supported")
    try:
        state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            dict(state), unet_config=FrozenDict(dict(unet_config)))
    except ValueError as e:  # diffusers names the keys it cannot convert
        raise LoraKeyError(f"{where}: {e}") from e
    others = [k for k in state if not k.startswith(UNET_PREFIX)]
    if others:
        raise LoraKeyError(f"{where}: key {others[0]!r} ({len(others)} in all) is not a UNet LoRA weight; "
                           "text-encoder LoRA is not supported")
    # diffusers converts only when the first key is not in peft layout, which drops the attention
    # layers of files that mix both; the renaming leaves peft keys alone, so apply it to all.
    state = convert_unet_state_dict_to_peft({k.removeprefix(UNET_PREFIX): v for k, v in state.items()})
    if alphas:
        alphas = {k.removeprefix(UNET_PREFIX): v for k, v in alphas.items() if k.startswith(UNET_PREFIX)}
    return state, alphas or None


def _module_scales(state: dict[str, Any], alphas: dict[str, float] | None, metadata: dict[str, Any] | None,
                   modules: list[str], where: str) -> dict[str, float]:
    """alpha / rank per module, resolved as diffusers + peft do when loading the file."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    if metadata is not None:
        metadata = {k.removeprefix(UNET_PREFIX): v for k, v in metadata.items() if k.startswith(UNET_PREFIX)} or None
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(state, alphas, metadata, ranks)
    if config.use_dora or getattr(config, "lora_bias", False):
        raise LoraKeyError(f"{where}: the LoRA config asks for DoRA or LoRA biases, which are not supported")
    scales = {}
    for module in modules:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        rank = state[f"{module}.lora_A.weight"].shape[0]
        if r != rank:
            raise LoraKeyError(f"{where}: {module} has rank {rank} but the file's LoRA config says {r}")
        scales[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scales


def load_lora(path: str | Path, unet_config: Mapping[str, Any]) -> LoraWeights:
    """Reads a LoRA for the UNet of `unet_config` (the model folder's unet/config.json)."""
    file = resolve_file(path)
    where = str(file)
    raw, metadata = _read(file)
    state, alphas = _peft_unet_state_dict(raw, unet_config, where)
    modules = []
    for key in state:
        module, sep, tail = key.partition(".lora_A.")
        if sep and tail == "weight":
            modules.append(module)
        elif not key.endswith(".lora_B.weight"):
            raise LoraKeyError(f"{where}: key {key!r} is not a LoRA down/up weight this loader can apply")
    unpaired = [k for k in state if k.endswith(".lora_B.weight") and k[:-len(".lora_B.weight")] not in modules]
    if unpaired or not modules:
        raise LoraKeyError(f"{where}: " + (f"key {unpaired[0]!r} has no lora_A partner" if unpaired
                                            else "holds no UNet LoRA weights"))
    missing_b = [m for m in modules if f"{m}.lora_B.weight" not in state]
    if missing_b:
        raise LoraKeyError(f"{where}: key {missing_b[0] + '.lora_A.weight'!r} has no lora_B partner")
    scales = _module_scales(state, alphas, metadata, modules, where)
    layout = keys.unet_layout(unet_config)
    flat = {}
    for module in modules:
        down = state[f"{module}.lora_A.weight"].float().numpy()
        up = state[f"{module}.lora_B.weight"].float().numpy()
        a, b = keys.to_flax_pair(down, up, module, where)
        path = keys.check_module(layout, module, a.shape, b.shape, where)
        flat[path + (adapters_lib.A,)] = np.ascontiguousarray(a, np.float32)
        flat[path + (adapters_lib.B,)] = np.ascontiguousarray(b * scales[module], np.float32)
    return LoraWeights(adapters=unflatten_dict(flat), source=where)


def merge_lora(unet_params: Any, lora: LoraWeights, scale: float = 1.0) -> Any:
    """`unet_params` with `lora` fused in at `scale` (as `pipe.fuse_lora(lora_scale=scale)`)."""
    return adapters_lib.merge(unet_params, lora.adapters, scale, where=lora.source)


def diffusers_state_dict(adapters: Any, unet_config: Mapping[str, Any], scale: float = 1.0) -> dict[str, np.ndarray]:
    """Adapters -> {`<module>.lora_A.weight` / `lora_B.weight`: float32 array} (peft layout, no prefix)."""
    layout = keys.unet_layout(unet_config)
    state = {}
    for path, (a, b) in adapters_lib.modules(adapters, "adapters").items():
        module = layout.module_name.get(tuple(path))
        if module is None:
            raise LoraKeyError(f"adapter {'/'.join(path)} has no PyTorch counterpart in this UNet config")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32) * np.float32(scale)
        keys.check_module(layout, module, a.shape, b.shape, "adapters")
        down, up = keys.to_pytorch_pair(a, b)
        state[f"{module}.lora_A.weight"] = np.ascontiguousarray(down)
        state[f"{module}.lora_B.weight"] = np.ascontiguousarray(up)
    return state


def save_diffusers_lora(adapters: Any, unet_config: Mapping[str, Any], out_dir: str | Path,
                        scale: float = 1.0) -> Path:
    """Writes `out_dir/pytorch_lora_weights.safetensors` (atomically: the folder appears whole)."""
    import torch
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or export elsewhere")
    layers = {k: torch.from_numpy(v) for k, v in diffusers_state_dict(adapters, unet_config, scale).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=WEIGHT_NAME)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
