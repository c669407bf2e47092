"""LoRA for the Flax UNet: load published LoRAs, train adapters, export what diffusers loads.

Public API:

    load_lora(path, unet_config) -> LoraWeights
        A diffusers/peft (`pytorch_lora_weights.safetensors`, e.g. LCM-LoRA) or kohya/A1111 LoRA
        file (or a folder holding one), mapped onto the Flax UNet's kernels (`files`).
    merge_lora(unet_params, lora, scale=1.0) -> params
        The parameters with the LoRA fused in, as `pipe.fuse_lora(lora_scale=scale)`.
    init_adapters(unet_params, unet_config, rank, targets, rng) -> adapters
        Fresh trainable adapters (b = 0) on the target groups of `keys.TARGET_GROUPS`.
    merge(unet_params, adapters, scale) -> params
        Trained adapters fused into the base (`adapters`).
    adapter_scale(rank, alpha) -> float
        alpha / rank (alpha 0: alpha = rank).
    WithAdapters(base, adapters), variables(params), interceptor(scale)
        Run the UNet with adapters on, without merging (`adapters`).
    save_diffusers_lora(adapters, unet_config, out_dir, scale) -> out_dir
        `out_dir/pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(out_dir)` reads.

Nothing here imports a stage or data_prep. Unknown, unmatched or unsupported keys are errors that
name the file and key (`LoraKeyError`); nothing is dropped silently.
"""

from agfsync_jax.lora.adapters import WithAdapters, adapter_scale, init_adapters, interceptor, is_adapter_tree, merge, variables
from agfsync_jax.lora.files import LoraWeights, load_lora, merge_lora, save_diffusers_lora
from agfsync_jax.lora.keys import TARGET_GROUPS, LoraKeyError, parse_targets

__all__ = ["LoraKeyError", "LoraWeights", "TARGET_GROUPS", "WithAdapters", "adapter_scale", "init_adapters", "interceptor",
           "is_adapter_tree", "load_lora", "merge", "merge_lora", "parse_targets", "save_diffusers_lora",
           "variables"]
