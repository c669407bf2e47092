"""Export a finetuned Flax UNet as a diffusers PyTorch pipeline folder (and a LoRA run's adapters).

A LoRA run (`train.lora.rank` > 0) also gets WORKDIR/export/lora/pytorch_lora_weights.safetensors,
which `pipe.load_lora_weights(WORKDIR/export/lora)` applies to the base pipeline, while the
pipeline folder holds the adapters merged into the base UNet. A run with `train.ema_decay` > 0
exports its EMA parameters (unless `export.use_ema` is off).

The output folder is the base model's pipeline with the UNet replaced: the other components
that `model_index.json` names are copied over unchanged, the UNet is written as safetensors,
and `model_index.json` names PyTorch classes, so `StableDiffusionPipeline.from_pretrained` (or
the SDXL pipeline) loads it. Nothing else of the base folder is copied: not its root files (a
Hub snapshot keeps multi-GB original checkpoints there), not folders the pipeline does not
name, and not the weights the pipeline does not load (Flax or ONNX copies, other variants). A
variant base (`model.variant=fp16`) is exported with its variant files under the plain names,
so the export loads without a variant argument.

Why not diffusers' `load_flax_weights_in_pytorch_model`: it maps Flax names back by replacing
"_1" with ".1" everywhere outside `time_embedding`, which turns SDXL's
`add_embedding.linear_1` into `add_embedding.linear.1`; it then only *warns* that those weights
are unused and leaves them randomly initialised. We instead invert the forward PyTorch->Flax
rules (the ones loading uses) key by key, and any parameter not matched exactly once is an error.

A gs:// output folder is written to a local temp directory (the system's) and uploaded; the
caller commits it (the export stage's done marker, written after it).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from agfsync_jax import storage
from agfsync_jax.errors import ConfigError
from agfsync_jax.models.weight_conversion import ParameterMismatchError
from agfsync_jax.storage import Path, PathLike

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Components a pipeline works without; one that model_index.json names but the base folder
# lacks is exported as absent ([null, null]). Any other missing component is an error.
_OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# Weight files of formats the PyTorch pipeline does not load.
_OTHER_WEIGHT_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".pb", ".h5", ".ckpt", ".pt", ".pth", ".ot")


def flax_unet_to_pytorch_state_dict(flax_params: Any, pt_shapes: Mapping[str, tuple[int, ...]],
                                    where: str = "unet") -> dict[str, np.ndarray]:
    """Flax UNet params -> {PyTorch key: float32 array}, exactly one Flax leaf per PyTorch key."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    flat = {k: np.asarray(v) for k, v in flatten_dict(flax_params).items()}
    state: dict[str, np.ndarray] = {}
    used: set[tuple] = set()
    problems: list[str] = []
    for pt_key, shape in pt_shapes.items():
        # A zero-stride stand-in: the renaming rules only look at shape/ndim and transpose views.
        stub = np.broadcast_to(np.float32(0), shape)
        flax_key, converted = rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), stub, flat)
        if flax_key not in flat:
            problems.append(f"{pt_key}: no Flax parameter {'/'.join(flax_key)}")
            continue
        leaf = flat[flax_key]
        if leaf.shape != converted.shape:
            problems.append(f"{pt_key}: Flax {'/'.join(flax_key)} has shape {leaf.shape}, expected {converted.shape}")
            continue
        if flax_key[-1] == "kernel" and len(shape) == 4:
            tensor = leaf.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif flax_key[-1] == "kernel":
            tensor = leaf.T
        else:
            tensor = leaf
        if flax_key in used:
            problems.append(f"{pt_key}: Flax parameter {'/'.join(flax_key)} used twice")
        used.add(flax_key)
        state[pt_key] = np.ascontiguousarray(tensor, dtype=np.float32)
    unused = sorted("/".join(k) for k in set(flat) - used)
    if unused:
        problems.append(f"Flax parameters with no PyTorch counterpart: {unused[:8]}"
                        + (f" ... ({len(unused)} in all)" if len(unused) > 8 else ""))
    if problems:
        raise ParameterMismatchError(f"{where}: cannot export; " + "; ".join(problems[:12]))
    return state


def _pytorch_class_names(index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json with any Flax class names replaced by their PyTorch counterparts."""
    out = {}
    for key, value in index.items():
        if key == "_class_name" and isinstance(value, str):
            value = value.removeprefix("Flax")
        elif isinstance(value, list) and len(value) == 2 and isinstance(value[1], str):
            value = [value[0], value[1].removeprefix("Flax")]
        out[key] = value
    return out


def pipeline_components(index: dict[str, Any]) -> list[str]:
    """The component folders model_index.json names (entries [library, class], not null)."""
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                  and len(v) == 2 and v[0] is not None and v[1] is not None)


def _copy_component(src: pathlib.Path, dst: pathlib.Path, variant: str) -> None:
    """A component folder: its configs and tokenizer files, and the weight files that loading
    with `variant` reads (renamed to the plain names), nothing else."""
    from agfsync_jax.models import weight_files

    try:
        used = weight_files.find_weight_files(src, variant)
    except weight_files.WeightsNotFoundError:
        if any(p.suffix in (".safetensors", ".bin") for p in src.iterdir()):
            raise  # weights, but not the ones loading reads: the export would lack them
        used = []  # schedulers, tokenizers and feature extractors have no weights
    used_names = {p.name for p in used}
    plain = {weight_files.variant_name(n, variant): n
             for n in weight_files.SINGLE_FILES + weight_files.INDEX_FILES} if variant else {}
    dst.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        name = path.name
        is_weights = (path.suffix in (".safetensors", ".bin") or name.endswith(".index.json")
                      or path.suffix in _OTHER_WEIGHT_SUFFIXES)
        if is_weights and name not in used_names:
            continue  # another variant or format: the pipeline would not load it
        target = dst / path.relative_to(src).parent / plain.get(name, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def export_pipeline(base_folder: PathLike, unet_params: Any, out_dir: PathLike,
                    variant: str = "") -> Path | pathlib.Path:
    """Writes base_folder's pipeline with `unet_params` as its UNet to out_dir (atomically when
    local; uploaded file by file to gs://). `base_folder` is a local folder.

    `variant`: the weight variant the base was loaded with (config.model.variant).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if storage.is_remote(out_dir):
        remote = storage.as_path(out_dir)
        if remote.exists():
            raise FileExistsError(f"{remote} exists; remove it or export elsewhere")
        with tempfile.TemporaryDirectory(prefix="agfsync-export-") as tmp:
            storage.copy_tree(export_pipeline(base_folder, unet_params, pathlib.Path(tmp) / remote.name, variant),
                              remote)
        return remote
    # Local files from here on: pathlib, whose globs (rglob in _copy_component) epath refuses.
    base_folder, out_dir = pathlib.Path(base_folder), pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or export elsewhere")
    unet_config = UNet2DConditionModel.load_config(base_folder / "unet")
    with torch.device("meta"):
        # Only the key set and shapes are needed: no memory for a full-size UNet.
        pt_shapes = {k: tuple(v.shape) for k, v in UNet2DConditionModel.from_config(unet_config).state_dict().items()}
    state = flax_unet_to_pytorch_state_dict(unet_params, pt_shapes, where=f"{base_folder}: unet")

    index = json.loads((base_folder / "model_index.json").read_text())
    components = [c for c in pipeline_components(index) if c != "unet"]
    missing = [c for c in components if not (base_folder / c).is_dir()]
    required = [c for c in missing if c not in _OPTIONAL_COMPONENTS]
    if required:
        raise FileNotFoundError(f"{base_folder}: model_index.json names components {required} that "
                                f"have no folder; the export would not load")
    for name in missing:
        index[name] = [None, None]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        for name in components:
            if name not in missing:
                _copy_component(base_folder / name, tmp / name, variant)
        (tmp / "model_index.json").write_text(json.dumps(_pytorch_class_names(index), indent=2) + "\n")
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(
            json.dumps({**dict(unet_config), "_class_name": "UNet2DConditionModel"}, indent=2) + "\n")
        save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp / "unet" / UNET_WEIGHTS),
                  metadata={"format": "pt"})
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_flax_msgpack(base_folder: PathLike, unet_params: Any, out_dir: PathLike) -> Path:
    """The UNet alone in diffusers' Flax format (`FlaxUNet2DConditionModel.from_pretrained`)."""
    from flax.serialization import to_bytes

    out_dir = storage.as_path(out_dir)
    config = storage.read_json(storage.as_path(base_folder) / "unet" / "config.json")
    storage.write_json(out_dir / "config.json", {**config, "_class_name": "FlaxUNet2DConditionModel"})
    storage.write_bytes(out_dir / "diffusion_flax_model.msgpack", to_bytes(unet_params))
    return out_dir


def trained_unet(config: Any, base_folder: str | Path, trained: Any) -> tuple[Any, Any]:
    """(UNet parameters to export, LoRA adapters or None) from a checkpoint's trained tree.

    Under LoRA the checkpoint holds adapters; they are merged into the base folder's float32 UNet.
    """
    from agfsync_jax import lora
    from agfsync_jax.models.loading import load_stable_diffusion

    rank = int(config.train.lora.rank)
    if rank > 0:
        if not lora.is_adapter_tree(trained):
            raise ConfigError(f"train.lora.rank={rank} but the checkpoint holds full UNet parameters, not "
                             "adapters: export with the config the run was trained with")
        base = load_stable_diffusion(base_folder, components=("unet",)).unet.params
        scale = lora.adapter_scale(rank, float(config.train.lora.alpha))
        return lora.merge(base, trained, scale, where="checkpoint adapters"), trained
    if lora.is_adapter_tree(trained):
        raise ConfigError("the checkpoint holds LoRA adapters but train.lora.rank=0: export with the "
                         "config the run was trained with")
    return trained, None
