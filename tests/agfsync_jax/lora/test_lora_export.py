"""The export stage on a LoRA run's checkpoint (agfsync_jax/export/): diffusers' PyTorch
pipeline with the exported `WORKDIR/export/lora` loaded by `load_lora_weights`, and the exported
merged pipeline, both equal our Flax UNet with the adapters on (tiny SD1.x and SDXL)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from agfsync_jax import done_marker, lora, workdir as workdir_lib
from agfsync_jax.export import pipeline_export as export, stage as export_stage
from agfsync_jax.training import checkpointing
from agfsync_jax.training.train_state import TrainState

from .conftest import flax_unet_out, torch_unet_out, unet_inputs

RANK, ALPHA = 4, 8.0
TARGETS = ("attention", "feed_forward", "resnet_convs")


def _trained_adapters(sd):
    """Adapters as after training: b no longer zero."""
    fresh = lora.init_adapters(sd.unet.params, sd.unet.config, RANK, TARGETS, jax.random.PRNGKey(3))
    rng = np.random.default_rng(0)
    flat = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if k[-1] == lora.adapters.B else v
            for k, v in flatten_dict(fresh).items()}
    return unflatten_dict(flat)


@pytest.mark.slow  # three UNet compilations per family on 2 CPU cores
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_run_exports_adapters_diffusers_loads_and_the_merged_pipeline(family, request, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from configs import tiny

    folder = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    adapters = _trained_adapters(sd)
    config = tiny.get_config()
    config.model.tiny, config.model.path = "", str(folder)
    config.train.lora.rank, config.train.lora.alpha = RANK, ALPHA
    config.train.lora.targets = ",".join(TARGETS)

    state = TrainState(step=jnp.int32(7), params=jax.tree_util.tree_map(jnp.asarray, adapters), opt_state=(),
                       rng=jax.random.PRNGKey(0), nonfinite_steps=jnp.int32(0))
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(tmp_path), save_every=1, keep=1, async_save=False)
    ckpt.save(7, state, {})
    ckpt.close()
    done_marker.write(tmp_path / workdir_lib.TRAIN, {"step": 7}, {"train.lora.rank": RANK})  # training finished
    summary = export_stage.run(config, str(tmp_path))
    lora_dir = tmp_path / workdir_lib.EXPORT / "lora"
    assert summary["lora"] == str(lora_dir) and (lora_dir / lora.files.WEIGHT_NAME).is_file()

    inputs = unet_inputs(sd.unet.config)
    ours = flax_unet_out(sd.unet.module, lora.variables(lora.WithAdapters(sd.unet.params, adapters)), inputs,
                         scale=ALPHA / RANK)
    base_out = flax_unet_out(sd.unet.module, {"params": sd.unet.params}, inputs)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.load_lora_weights(lora_dir)
    with_lora = torch_unet_out(pipe.unet, inputs)
    merged = torch_unet_out(cls.from_pretrained(summary["pipeline"]).unet, inputs)
    diffs = {"diffusers + exported LoRA": float(np.abs(with_lora - ours).max()),
             "exported merged pipeline": float(np.abs(merged - ours).max())}
    print(f"{family}: max |. - ours with adapters| {diffs}; adapter effect {np.abs(ours - base_out).max():.3f}")
    assert float(np.abs(ours - base_out).max()) > 1e-2
    assert max(diffs.values()) < 1e-4
    # Our own reader gives back the same adapters (scale folded into lora_b).
    back = lora.load_lora(lora_dir, sd.unet.config)
    np.testing.assert_allclose(flax_unet_out(sd.unet.module, {"params": lora.merge_lora(sd.unet.params, back)}, inputs),
                               ours, atol=1e-4)


def test_export_refuses_a_checkpoint_that_does_not_match_the_lora_setting(tiny_sd1, tiny_sd1_path):
    from configs import tiny

    config = tiny.get_config()
    config.train.lora.rank = 4
    with pytest.raises(ValueError, match="full UNet parameters"):
        export.trained_unet(config, tiny_sd1_path, tiny_sd1.unet.params)
    config.train.lora.rank = 0
    with pytest.raises(ValueError, match="train.lora.rank=0"):
        export.trained_unet(config, tiny_sd1_path, _trained_adapters(tiny_sd1))
