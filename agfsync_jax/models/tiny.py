"""Tiny, randomly initialised Stable Diffusion pipelines of the real PyTorch classes.

No machine we test on can download weights, so tests and `make demo` build these (fixed seed,
tokenizer written in code), save them with `save_pretrained`, and load them back through
exactly the path a user's SD1.5 or SDXL folder takes (`models.loading`).

    python -m agfsync_jax.models.tiny --family=sd1 --out=/tmp/tiny-sd1
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.models import single_file

FAMILIES = ("sd1", "sdxl")
# Pixel resolution of the tiny models: the tiny VAE downsamples by 2, so latents are 16 x 16.
TINY_RESOLUTION = 32

# Words that become single BPE tokens, so that typical prompts fit in CLIP's 77 tokens even
# with a hand-made vocabulary. Everything else falls back to byte-level characters.
_WORDS = """a an the of in on at with and or to by from under over above below behind beside near
next inside between front left right top bottom one two three four five six seven eight nine ten
red orange yellow green blue purple pink brown black white gray grey gold silver golden dark light
bright pale small large big tiny huge tall short long round square old new wooden metal glass stone
plastic paper cotton leather marble ceramic cat dog bird horse cow fish rabbit fox bear lion tiger
elephant owl person man woman child girl boy people chef player runner cyclist artist robot car bus
bicycle train boat plane truck house tower bridge city street building castle church window door
table chair cup bowl plate vase lamp book clock phone computer camera bag hat shoe ball tree flower
rose tulip leaf grass plant garden forest mountain river lake sea ocean beach desert field sky cloud
sun moon star snow rain night morning sunset apple banana cake bread pizza coffee tea soup fruit
painting photo sculpture drawing style watercolor oil sketch abstract pattern shape circle triangle
sitting standing running flying holding wearing eating playing reading walking sleeping is are
there photograph of in-front detailed realistic cinematic vivid soft""".split()


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable stand-ins for the 256 byte values."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(out_dir: Path) -> int:
    """Writes vocab.json and merges.txt of a small CLIP BPE tokenizer; returns the vocab size.

    The end-of-text token gets the highest id, as in real CLIP: Flax CLIP pools at
    `argmax(input_ids)` while PyTorch CLIP pools at the first end-of-text id, and the two agree
    only under that layout.
    """
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(vocab)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            current = current + sym
            if current not in known:
                merges.append(merge)
                vocab.append(current)
                known.add(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _tokenizer(tmp: Path) -> tuple[Any, int]:
    from transformers import CLIPTokenizer

    vocab_size = write_tokenizer_files(tmp)
    tok = CLIPTokenizer(vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    return tok, vocab_size


def _text_config(vocab_size: int, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu", architectures=["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"])


def _vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor)


def build_tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A tiny random diffusers PyTorch pipeline (StableDiffusion or StableDiffusionXL)."""
    import torch
    from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vocab_size = _tokenizer(Path(tmp))
    # The real SD schedule (scaled-linear betas 0.00085..0.012, leading spacing, offset 1).
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1)
    torch.manual_seed(seed)
    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=32)
        vae = _vae(0.18215)
        text_encoder = CLIPTextModel(_text_config(vocab_size, with_projection=False))
        scheduler = PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32)
    vae = _vae(0.13025)
    text_encoder = CLIPTextModel(_text_config(vocab_size, with_projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, with_projection=True))
    scheduler = EulerDiscreteScheduler(**schedule, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)


# What a tiny base model folder was built with, so that a cached one that no longer matches
# the config is refused instead of silently reused.
BUILD_RECORD = "tiny_model.json"


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How the tiny UNet is pretrained (`agfsync_jax.models.tiny_pretrain`); defaults live in the config."""

    steps: int
    batch_size: int
    learning_rate: float

    @classmethod
    def from_config(cls, model: Any) -> "Pretraining | None":
        """From `config.model.tiny_pretrain_*`; None when `tiny_pretrain_steps` is 0."""
        if not model.tiny_pretrain_steps:
            return None
        return cls(int(model.tiny_pretrain_steps), int(model.tiny_pretrain_batch_size),
                   float(model.tiny_pretrain_learning_rate))


def build_record(family: str, seed: int, pretraining: Pretraining | None = None) -> dict[str, Any]:
    """The fields that decide a tiny model's weights (the pretraining ones only when it is pretrained)."""
    record: dict[str, Any] = {"family": family, "seed": int(seed),
                              "pretrain_steps": pretraining.steps if pretraining else 0}
    if pretraining:
        record.update(pretrain_batch_size=pretraining.batch_size, pretrain_learning_rate=pretraining.learning_rate)
    return record


def save_tiny_pipeline(family: str, out: str | Path, seed: int = 0, safetensors: bool = True,
                       pretraining: Pretraining | None = None) -> Path:
    """Builds and saves a tiny pipeline; the folder appears whole or not at all.

    With `pretraining` the UNet is first pretrained into a denoiser of synthetic latents
    (`agfsync_jax.models.tiny_pretrain`) and saved as safetensors whatever `safetensors` says.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    record = build_record(family, seed, pretraining)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        final = tmp / "random"
        build_tiny_pipeline(family, seed).save_pretrained(final, safe_serialization=safetensors)
        if pretraining:
            from agfsync_jax import export
            from agfsync_jax.models import loading, tiny_pretrain

            params, losses = tiny_pretrain.pretrain_unet(
                loading.load_stable_diffusion(final), steps=pretraining.steps, batch_size=pretraining.batch_size,
                learning_rate=pretraining.learning_rate, seed=seed)
            record["pretrain_loss_first_last"] = [losses[0], losses[-1]]
            final = export.export_pipeline(final, params, tmp / "pretrained")
        (final / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        final.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_build(folder: Path, expected: dict[str, Any]) -> None:
    """Raises if the cached tiny model in `folder` was built with other settings than `expected`."""
    path = folder / BUILD_RECORD
    # Folders from before the build record existed hold random, unpretrained models.
    legacy = not path.is_file()
    found = {"pretrain_steps": 0} if legacy else json.loads(path.read_text())
    for key in ("pretrain_steps",) if legacy else tuple(expected):
        if found.get(key) != expected[key]:
            where = f"no {BUILD_RECORD}" if legacy else str(path)
            raise ValueError(f"{folder} holds a tiny model built with {key}={found.get(key)!r} ({where}), but "
                             f"the config asks for {expected[key]!r}: remove {folder} to rebuild it, or use "
                             "another workdir")


def resolve_base_model(config: Any, workdir: str | Path) -> Path:
    """The base model folder of a run: `model.path`, or the tiny model under WORKDIR/base_model.

    A single-file checkpoint at `model.path` is converted once into a cached diffusers folder
    (`models.single_file`), and that folder is returned.

    The tiny model is built on first use (and pretrained when `model.tiny_pretrain_steps` > 0);
    the build is deterministic, so it is cached, and a cached one built with other settings is
    refused rather than reused.
    """
    if config.model.path and config.model.tiny:
        raise ValueError("set either model.path or model.tiny, not both")
    if config.model.path:
        if single_file.is_single_file(config.model.path):
            return single_file.converted_folder(config.model.path, single_file.cache_root(config.model, workdir),
                                                config.model.single_file_config)
        return Path(config.model.path)
    if not config.model.tiny:
        raise ValueError("no base model: set model.path (a diffusers folder) or model.tiny (sd1|sdxl)")
    out = Path(workdir) / workdir_lib.BASE_MODEL
    pretraining = Pretraining.from_config(config.model)
    if out.exists():
        _check_build(out, build_record(config.model.tiny, config.seed, pretraining))
    else:
        save_tiny_pipeline(config.model.tiny, out, seed=config.seed, pretraining=pretraining)
    return out


def resolve_base_model_on_every_process(config: Any, workdir: str | Path) -> Path:
    """`resolve_base_model` for code that every process runs: a tiny model is built by process 0
    only and the others wait for it (several builders would race for WORKDIR/base_model)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        resolve_base_model(config, workdir)
    multihost_utils.sync_global_devices("agfsync:base_model")
    return resolve_base_model(config, workdir)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Stage `tiny-model`: materialise the configured tiny model under WORKDIR/base_model."""
    path = resolve_base_model(config, workdir)
    print(f"tiny-model: {config.model.tiny} pipeline at {path}")
    return {"path": str(path)}


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bin", action="store_true", help="save .bin instead of safetensors")
    args = parser.parse_args()
    print(save_tiny_pipeline(args.family, args.out, args.seed, safetensors=not args.bin))


if __name__ == "__main__":
    _main()
