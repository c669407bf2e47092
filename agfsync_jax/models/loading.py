"""Loads a local diffusers-format Stable Diffusion folder (SD1.x or SDXL) into Flax.

    sd = load_stable_diffusion("/models/sd15", DtypePolicy(compute_dtype=jnp.bfloat16))
    sd.unet.module.apply({"params": sd.unet.params}, latents, t, embeds)

Every component is checked before anything heavy happens: the folder, `model_index.json`, the
component sub-folder, and the class its config names. Weights are read from safetensors or
`.bin`, single or sharded, optionally of a diffusers variant ("fp16"), checked for damage and
non-finite values (see weight_files), and converted strictly (see weight_conversion). Parameter trees are host numpy arrays so
the caller can place them straight onto a mesh without a detour through one device.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from agfsync_jax import storage
from agfsync_jax.models import weight_conversion, weight_files
from agfsync_jax.models.dtype_policy import DtypePolicy

FAMILY_SD1 = "sd1"
FAMILY_SDXL = "sdxl"

# component -> class names its config may declare (diffusers `_class_name`, transformers
# `architectures`).
_EXPECTED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
}
_PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": FAMILY_SD1,
    "StableDiffusionXLPipeline": FAMILY_SDXL,
}
ALL_COMPONENTS = ("unet", "vae", "text_encoders")


class ModelFolderError(ValueError):
    """The folder is not a usable diffusers SD folder; the message names folder and component."""


@dataclasses.dataclass
class FlaxComponent:
    """A Flax module (or transformers Flax model), its parameters, and its saved config."""

    module: Any
    params: Any
    config: dict[str, Any]


@dataclasses.dataclass
class StableDiffusion:
    path: Path
    family: str
    unet: FlaxComponent
    vae: FlaxComponent | None
    text_encoders: tuple[FlaxComponent, ...]
    tokenizers: tuple[Any, ...]
    scheduler_config: dict[str, Any]
    # SDXL pipelines use zero embeddings (not the encoding of "") for an empty negative prompt.
    force_zeros_for_empty_prompt: bool = False

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            raise ValueError(f"{self.path}: VAE was not loaded")
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config["in_channels"])


def _read_json(path: Path, folder: Path, component: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{folder}: component '{component}' has no {path.name} ({path})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{folder}: component '{component}': {path} is not valid JSON ({e})") from e


def _component_config(folder: Path, component: str) -> dict[str, Any]:
    sub = folder / component
    if not sub.is_dir():
        raise ModelFolderError(f"{folder}: component '{component}' is missing (no folder {sub})")
    config = _read_json(sub / "config.json", folder, component)
    declared = [config["_class_name"]] if "_class_name" in config else list(config.get("architectures") or [])
    expected = _EXPECTED_CLASSES[component]
    if not any(name in expected for name in declared):
        raise ModelFolderError(
            f"{folder}: component '{component}' is a {declared or 'model of unknown class'}, "
            f"expected {' or '.join(expected)} ({sub / 'config.json'})")
    return config


def detect_family(folder: str | Path) -> str:
    folder = Path(storage.local_copy(folder))
    if folder.is_file():
        raise ModelFolderError(f"{folder}: a single file, not a diffusers folder: set model.path to it "
                               f"and the run converts it once (agfsync_jax/models/single_file.py)")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist")
    index = _read_json(folder / "model_index.json", folder, "model_index")
    name = index.get("_class_name", "")
    if name not in _PIPELINE_FAMILIES:
        raise ModelFolderError(
            f"{folder}: model_index.json names pipeline {name!r}; supported: {sorted(_PIPELINE_FAMILIES)}")
    return _PIPELINE_FAMILIES[name]


def _read_weights(folder: Path, component: str, variant: str, where: str) -> dict[str, Any]:
    try:
        return weight_files.read_state_dict(folder / component, variant)
    except (weight_files.WeightsNotFoundError, weight_files.UnreadableWeightsError,
            weight_files.NonFiniteWeightsError) as e:
        raise ModelFolderError(f"{where}: {e}") from e


def _load_diffusers_component(folder: Path, component: str, flax_cls: Any,
                              policy: DtypePolicy, variant: str = "") -> FlaxComponent:
    config = _component_config(folder, component)
    module = flax_cls.from_config(config, dtype=policy.compute_dtype)
    expected = weight_conversion.expected_param_shapes(module.init_weights, jax.random.PRNGKey(0))
    where = f"{folder}: component '{component}'"
    state = _read_weights(folder, component, variant, where)
    params = weight_conversion.convert_diffusers_state_dict(state, expected, where)
    return FlaxComponent(module=module, params=policy.cast_params(params), config=dict(config))


def _load_text_encoder(folder: Path, component: str, policy: DtypePolicy,
                       variant: str = "") -> FlaxComponent:
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    config = _component_config(folder, component)
    flax_cls = FlaxCLIPTextModelWithProjection if component == "text_encoder_2" else FlaxCLIPTextModel
    hf_config = CLIPTextConfig.from_pretrained(folder / component)
    model = flax_cls(hf_config, dtype=policy.compute_dtype, _do_init=False)
    seq = hf_config.max_position_embeddings
    expected = weight_conversion.expected_param_shapes(
        lambda rng: model.init_weights(rng, (1, seq)), jax.random.PRNGKey(0))
    where = f"{folder}: component '{component}'"
    state = _read_weights(folder, component, variant, where)
    params = weight_conversion.convert_transformers_state_dict(
        state, expected, model.base_model_prefix, where)
    return FlaxComponent(module=model, params=policy.cast_params(params), config=dict(config))


def _load_tokenizer(folder: Path, component: str) -> Any:
    from transformers import CLIPTokenizer

    sub = folder / component
    if not sub.is_dir():
        raise ModelFolderError(f"{folder}: component '{component}' is missing (no folder {sub})")
    return CLIPTokenizer.from_pretrained(sub)


def _check_flax_unet_supports(unet_config: dict[str, Any], folder: Path) -> None:
    """Refuses UNet configs whose extra inputs diffusers' Flax UNet lacks (it would ignore them)."""
    if unet_config.get("time_cond_proj_dim") is not None:
        # LCM-distilled UNets (e.g. LCM_Dreamshaper_v7, lcm-sdxl) embed the guidance scale w
        # into the timestep embedding; FlaxUNet2DConditionModel has no such input.
        raise ModelFolderError(
            f"{folder}: component 'unet' sets time_cond_proj_dim={unet_config['time_cond_proj_dim']} "
            f"({folder / 'unet' / 'config.json'}): a guidance-embedding (LCM-distilled) UNet, which "
            "diffusers' FlaxUNet2DConditionModel cannot run; sample the base model with an LCM-LoRA "
            "(sampling.scheduler=lcm, sampling.lora_path) instead")


def load_stable_diffusion(folder: str | Path, policy: DtypePolicy = DtypePolicy(),
                          components: Sequence[str] = ALL_COMPONENTS,
                          variant: str = "") -> StableDiffusion:
    """Loads `components` (a subset of unet, vae, text_encoders) of a diffusers SD folder.

    The UNet is always loaded; training from cached latents can skip the VAE. `variant` picks
    diffusers' variant weight files (`config.model.variant`, e.g. "fp16"); every loaded
    component must have them.
    """
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    # The loaders read local files: a gs:// folder is read from its local copy (storage.local_copy).
    folder = Path(storage.local_copy(folder))
    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {ALL_COMPONENTS}")
    family = detect_family(folder)
    index = json.loads((folder / "model_index.json").read_text())
    encoder_names = ("text_encoder",) if family == FAMILY_SD1 else ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer",) if family == FAMILY_SD1 else ("tokenizer", "tokenizer_2")

    # Validate every requested component's presence and class before reading any weights.
    _check_flax_unet_supports(_component_config(folder, "unet"), folder)
    if "vae" in components:
        _component_config(folder, "vae")
    if "text_encoders" in components:
        for name in encoder_names:
            _component_config(folder, name)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", folder, "scheduler")

    unet = _load_diffusers_component(folder, "unet", FlaxUNet2DConditionModel, policy, variant)
    vae = None
    if "vae" in components:
        vae = _load_diffusers_component(folder, "vae", FlaxAutoencoderKL, policy, variant)
    encoders: tuple[FlaxComponent, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    if "text_encoders" in components:
        encoders = tuple(_load_text_encoder(folder, name, policy, variant)
                         for name in encoder_names)
        tokenizers = tuple(_load_tokenizer(folder, name) for name in tokenizer_names)
    return StableDiffusion(
        path=folder, family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == FAMILY_SDXL)))


def unet_added_cond_dims(unet_config: dict[str, Any]) -> tuple[int, int] | None:
    """(pooled text embedding dim, number of time ids) for an SDXL UNet; None for SD1.x."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    time_dim = unet_config["addition_time_embed_dim"]
    num_time_ids = 6
    return unet_config["projection_class_embeddings_input_dim"] - num_time_ids * time_dim, num_time_ids



@dataclasses.dataclass(frozen=True)
class TokenizerShape:
    """Stands in for a tokenizer where only its padded length matters (abstract models)."""

    model_max_length: int


def _abstract_params(init_fn: Any, policy: DtypePolicy) -> Any:
    """The parameter tree `init_fn(rng)` would build, as ShapeDtypeStructs in the param dtype."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    flat = flatten_dict(shapes.unfreeze() if hasattr(shapes, "unfreeze") else shapes)

    def cast(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        dtype = policy.param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype)
    return unflatten_dict({k: cast(v) for k, v in flat.items()})


def _token_length(folder: Path, tokenizer: str, encoder_config: dict[str, Any]) -> int:
    path = folder / tokenizer / "tokenizer_config.json"
    if path.is_file():
        length = json.loads(path.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 10**6:  # HF writes 1e30 for "unbounded"
            return length
    return int(encoder_config["max_position_embeddings"])


def abstract_stable_diffusion(folder: str | Path, policy: DtypePolicy = DtypePolicy(),
                              components: Sequence[str] = ALL_COMPONENTS) -> StableDiffusion:
    """`load_stable_diffusion` without weights: every parameter is a `jax.ShapeDtypeStruct`.

    Reads only the folder's JSON configs (a folder may hold no weight files at all, e.g. the
    architecture folders of agfsync_jax/plan), so full-size programs can be built and compiled
    without allocating them. Tokenizers are replaced by `TokenizerShape` (their padded length).
    """
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    folder = Path(folder)
    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {ALL_COMPONENTS}")
    family = detect_family(folder)
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", folder, "scheduler")

    def diffusers_component(component: str, flax_cls: Any) -> FlaxComponent:
        config = _component_config(folder, component)
        module = flax_cls.from_config(config, dtype=policy.compute_dtype)
        return FlaxComponent(module=module, params=_abstract_params(module.init_weights, policy),
                             config=dict(config))

    unet = diffusers_component("unet", FlaxUNet2DConditionModel)
    vae = diffusers_component("vae", FlaxAutoencoderKL) if "vae" in components else None
    encoders: list[FlaxComponent] = []
    tokenizers: list[TokenizerShape] = []
    if "text_encoders" in components:
        names = ("text_encoder",) if family == FAMILY_SD1 else ("text_encoder", "text_encoder_2")
        for i, name in enumerate(names):
            config = _component_config(folder, name)
            flax_cls = FlaxCLIPTextModelWithProjection if name == "text_encoder_2" else FlaxCLIPTextModel
            model = flax_cls(CLIPTextConfig.from_pretrained(folder / name), dtype=policy.compute_dtype,
                             _do_init=False)
            seq = int(config["max_position_embeddings"])
            params = _abstract_params(lambda rng, m=model, s=seq: m.init_weights(rng, (1, s)), policy)
            encoders.append(FlaxComponent(module=model, params=params, config=dict(config)))
            tokenizers.append(TokenizerShape(_token_length(folder, "tokenizer" if i == 0 else "tokenizer_2",
                                                           config)))
    return StableDiffusion(
        path=folder, family=family, unet=unet, vae=vae, text_encoders=tuple(encoders),
        tokenizers=tuple(tokenizers), scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == FAMILY_SDXL)))
