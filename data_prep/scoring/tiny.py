"""Tiny, randomly initialised scorer models of the real classes, saved as real folders/files.

No machine we test on can download weights, so tests (and the tiny demo) build these in code:
a CLIP model + processor, BLIP-2 with an OPT or a Flan-T5 language model + processor (tokenizers
trained in code on a small corpus), a LAION-layout aesthetic head, an open_clip model saved as an
HPS v2 checkpoint, and a TensorFlow SavedModel with VILA's serving signature. They are loaded back
by the scorers exactly as a user's downloaded folders are.

    python -m data_prep.scoring.tiny --out=/tmp/tiny-scorers
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from typing import Any

from agfsync_jax import storage
from agfsync_jax.storage import Path, PathLike

IMAGE_SIZE = 24  # smaller than the tiny SD images (32 px), so the processors really resize
PATCH_SIZE = 8
EMBED_DIM = 32
NUM_QUERY_TOKENS = 4
LANGUAGE_MODELS = ("opt", "t5")
# Scoring config fields that scoring.tiny fills in.
TINY_FIELDS = ("clip_path", "aesthetic_clip_path", "aesthetic_head_path", "vqa_path", "pickscore_path",
               "hps_path", "hps_model", "vila_path")
_TINY_DIR = "tiny_models"

_SUBJECTS = ("cat", "dog", "bird", "car", "tree", "house", "flower", "person", "boat", "cup", "chair", "horse")
_ATTRIBUTES = ("red", "blue", "green", "small", "large", "wooden", "old", "bright", "two", "three")
_PLACES = ("in the image", "on the table", "in the sky", "near the river", "in the photo", "on the street")


def _corpus() -> list[str]:
    """Question/answer lines in the VQA prompt format, so yes/no become single tokens."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, attr in enumerate(_ATTRIBUTES):
            place = _PLACES[(i + j) % len(_PLACES)]
            answer = ("yes", "no", "Yes", "No")[(i + j) % 4]
            lines.append(f"Question: is there a {attr} {subject} {place}? Answer: {answer}")
            lines.append(f"Question: is the {subject} {attr}? Answer: {answer}.")
    return lines


def _atomic_dir(out: Path, build: Callable[[Path], None]) -> Path:
    """Runs build(tmp) and publishes tmp as `out`: the folder appears whole or not at all
    (`storage.build_folder`: renamed locally, uploaded and committed on gs://)."""
    return storage.build_folder(out, build)


def save_tiny_clip(out: PathLike, seed: int = 0, logit_scale: float | None = None) -> Path:
    """A tiny CLIPModel + CLIPProcessor folder (the CLIP score, aesthetic and PickScore path)."""
    import math

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from agfsync_jax.tiny.tokenizer import write_tokenizer_files

    def build(tmp: Path) -> None:
        tok_dir = tmp / "_tokenizer_src"
        vocab_size = write_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"),
                                  pad_token="<|endoftext|>", model_max_length=77)
        shutil.rmtree(tok_dir)
        text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                    eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="quick_gelu")
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu")
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED_DIM,
                            logit_scale_init_value=math.log(100.0) if logit_scale is None else math.log(logit_scale))
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(tmp)
        image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)

    return _atomic_dir(storage.as_path(out), build)


def opt_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    # OPT prepends </s> as its BOS.
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>")


def t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    # The Unigram trainer is not reproducible (parallel reductions inside `tokenizers`): piece
    # scores vary in their last bits, and the single characters it appends get scores 1e-4 apart
    # in hash order, so pieces come out with other scores and token ids from run to run; that
    # changes the tiny BLIP-2's VQA scores and with them the demo. Scores rounded to 1e-3 and
    # sorted by (score, piece), special tokens keeping ids 0-2, make it reproducible.
    model = json.loads(tok.to_str())["model"]
    special, pieces = [tuple(ps) for ps in model["vocab"][:3]], model["vocab"][3:]
    vocab = special + sorted(((p, round(score, 3)) for p, score in pieces), key=lambda ps: (-ps[1], ps[0]))
    tok.model = models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=False)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def save_tiny_blip2(out: PathLike, language_model: str, seed: int = 0) -> Path:
    """A tiny Blip2ForConditionalGeneration + Blip2Processor folder with an OPT or T5 LM."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              OPTConfig, T5Config)

    if language_model not in LANGUAGE_MODELS:
        raise ValueError(f"language_model is {language_model!r}; expected one of {LANGUAGE_MODELS}")

    def build(tmp: Path) -> None:
        tokenizer = opt_tokenizer() if language_model == "opt" else t5_tokenizer()
        for word in ("yes", "no"):
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) != 1:
                raise AssertionError(f"tiny {language_model} tokenizer splits {word!r}")
        image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        # The processor adds the <image> token to the tokenizer; the LM vocabulary must cover it.
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   num_query_tokens=NUM_QUERY_TOKENS)
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        vocab = len(tokenizer)
        if language_model == "opt":
            text = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                             eos_token_id=1)
        else:
            text = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        config = Blip2Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
            qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                encoder_hidden_size=32, vocab_size=64),
            text_config=text.to_dict(), num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token)
        torch.manual_seed(seed)
        Blip2ForConditionalGeneration(config).save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _atomic_dir(storage.as_path(out), build)


# The tiny aesthetic head's last layer: scaled, then shifted to the middle of AVA's 1-10 ratings.
_AESTHETIC_HEAD_SCALE, _AESTHETIC_HEAD_SHIFT = 0.9, 5.5


def save_tiny_aesthetic_head(out: PathLike, embed_dim: int = EMBED_DIM, seed: int = 0) -> Path:
    """A .pth state dict in the LAION aesthetic predictor's layout (layers.0/2/4/6/7), tiny widths.

    A random head rates everything near 0, off the 1-10 AVA scale that aesthetic.py maps onto
    0-100 (so its scores would be negative). Its last layer is therefore scaled by 0.9 and its
    output shifted by 5.5, putting the ratings mid-scale as a trained head's are (scores near
    50). With the 0.9 the score, 100 (0.9 r + 5.5 - 1) / 9 = 10 r + 50, keeps the spread that
    10 x the unshifted rating r had, so candidates rank as they did before the shift.
    """
    import torch
    from torch import nn

    from agfsync_jax.atomic_io import atomic_write_bytes

    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(embed_dim, 16), nn.Dropout(0.2), nn.Linear(16, 8), nn.Dropout(0.2),
                           nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
    with torch.no_grad():
        layers[-1].weight.mul_(_AESTHETIC_HEAD_SCALE)
        layers[-1].bias.mul_(_AESTHETIC_HEAD_SCALE).add_(_AESTHETIC_HEAD_SHIFT)
    state = {f"layers.{k}": v for k, v in layers.state_dict().items()}
    out = storage.as_path(out)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out, buf.getvalue())
    return out


# The tiny HPS model: open_clip's CLIP with ViT-H-14's layout (GELU, no QuickGELU; ViT image
# tower, 77-token text tower) at tiny widths. The vocabulary stays open_clip's 49408 tokens, as
# the model uses open_clip's own tokenizer.
TINY_HPS_MODEL_CFG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.0,
                   "patch_size": PATCH_SIZE},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
HPS_CHECKPOINT = "HPS_v2_tiny.pt"


def save_tiny_hps(out: PathLike, seed: int = 0) -> Path:
    """A folder with open_clip_config.json (TINY_HPS_MODEL_CFG) and HPS_v2_tiny.pt, a random
    open_clip model saved the way HPS ships its checkpoints ({"state_dict": ...} in a .pt).
    The scorer's fields: hps_model = "local-dir:<out>", hps_path = <out>/HPS_v2_tiny.pt."""
    import torch

    from data_prep.scoring.hps import LOCAL_DIR, OPEN_CLIP_CONFIG, create_model

    def build(tmp: Path) -> None:
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_HPS_MODEL_CFG}, indent=2) + "\n")
        torch.manual_seed(seed)
        model = create_model(LOCAL_DIR + str(tmp))
        torch.save({"state_dict": model.state_dict()}, tmp / HPS_CHECKPOINT)

    return _atomic_dir(storage.as_path(out), build)


# The tiny VILA: decode, resize to a few pixels, a fixed random linear map (scaled by 4 so the
# scores spread over the scale rather than sit at 0.5), sigmoid: an image-dependent score in
# (0, 1) with VILA's serving signature.
_VILA_SIZE = 8


def save_tiny_vila(out: PathLike, seed: int = 0) -> Path:
    """A TensorFlow SavedModel folder with VILA's `serving_default` signature (scalar string
    `image_bytes` in, `predictions` of shape (1, 1) in (0, 1) out), random weights from `seed`."""
    import numpy as np

    from agfsync_jax.tf_cpu import tensorflow_cpu_only
    from data_prep.scoring.vila import INPUT, OUTPUT, SIGNATURE

    tf = tensorflow_cpu_only()
    n = _VILA_SIZE * _VILA_SIZE * 3
    weights = np.random.default_rng(seed).standard_normal(n).astype(np.float32) / np.float32(np.sqrt(n))

    class TinyVila(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name=INPUT)])
        def serve(self, image_bytes):
            image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            pixels = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [_VILA_SIZE, _VILA_SIZE], method="area")
            logit = tf.reduce_sum((tf.reshape(pixels, [-1]) - 0.5) * self.w) * 4.0
            return {OUTPUT: tf.reshape(tf.sigmoid(logit), [1, 1])}

    def build(tmp: Path) -> None:
        module = TinyVila()
        with tf.device("/CPU:0"):
            tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: module.serve})

    return _atomic_dir(storage.as_path(out), build)


def _tiny_layout(out_dir: Path, language_model: str = "t5") -> dict[str, Path | str]:
    from data_prep.scoring.hps import LOCAL_DIR

    return {
        "clip_path": out_dir / "clip",
        "aesthetic_clip_path": out_dir / "aesthetic_clip",
        "aesthetic_head_path": out_dir / "aesthetic_head.pth",
        "vqa_path": out_dir / f"blip2_{language_model}",
        "pickscore_path": out_dir / "pickscore",
        "hps_path": out_dir / "hps" / HPS_CHECKPOINT,
        "hps_model": LOCAL_DIR + str(out_dir / "hps"),
        "vila_path": out_dir / "vila",
    }


def save_tiny_scorers(out_dir: PathLike, seed: int = 0, language_model: str = "t5") -> dict[str, Path]:
    """Every tiny scorer model under `out_dir`; returns the scoring config field -> path."""
    paths = _tiny_layout(storage.as_path(out_dir), language_model)
    save_tiny_clip(paths["clip_path"], seed=seed)
    save_tiny_clip(paths["aesthetic_clip_path"], seed=seed + 1)
    save_tiny_aesthetic_head(paths["aesthetic_head_path"], seed=seed + 2)
    save_tiny_blip2(paths["vqa_path"], language_model, seed=seed + 3)
    # Real PickScore learned a logit scale near 100; 50 lets a test tell it from CLIP's fixed 100.
    save_tiny_clip(paths["pickscore_path"], seed=seed + 4, logit_scale=50.0)
    # Built after the models above (which are unchanged by them), TensorFlow last: see factory.py.
    save_tiny_hps(storage.as_path(out_dir) / "hps", seed=seed + 5)
    save_tiny_vila(paths["vila_path"], seed=seed + 6)
    return paths


def resolve_scoring_config(scoring: Any, workdir: PathLike, seed: int = 0) -> Any:
    """A copy of the scoring config; with scoring.tiny set, its model paths point at tiny random
    scorers built (once, deterministically) under `scoring.tiny_models_dir` (default
    WORKDIR/scores/tiny_models; the eval stage points it at the training run's). Scorer paths
    on gs:// are replaced by their local copies (`storage.local_copy`): the loaders read local files."""
    from agfsync_jax import workdir as workdir_lib

    resolved = scoring.copy_and_resolve_references()
    if not scoring.tiny:
        for field in TINY_FIELDS:
            setattr(resolved, field, _local(getattr(scoring, field)))
        return resolved
    from data_prep.scoring.hps import HPS_MODEL

    # hps_model's default names the real architecture; it counts as set only when changed.
    defaults = {"hps_model": HPS_MODEL}
    already = [f for f in TINY_FIELDS if getattr(scoring, f) not in ("", defaults.get(f, ""))]
    if already:
        raise ValueError(f"set either scoring.tiny or the scorer paths, not both (set: {already})")
    root = storage.as_path(scoring.tiny_models_dir or storage.as_path(workdir) / workdir_lib.SCORES / _TINY_DIR)
    if not storage.is_complete(root):
        def build(tmp: Path) -> None:
            save_tiny_scorers(tmp, seed=seed)

        _atomic_dir(root, build)
    for field, path in _tiny_layout(root).items():
        if isinstance(path, Path) and not path.exists():
            raise FileNotFoundError(f"{path} is missing from the tiny scorer models; delete {root} to rebuild")
        setattr(resolved, field, _local(str(path)))
    return resolved


def _local(value: str) -> str:
    """A scorer path (or open_clip's "local-dir:FOLDER"), a gs:// one replaced by its local copy."""
    from data_prep.scoring.hps import LOCAL_DIR

    if value.startswith(LOCAL_DIR):
        return LOCAL_DIR + _local(value[len(LOCAL_DIR):])
    return str(storage.local_copy(value)) if storage.is_remote(value) else value


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--language_model", choices=LANGUAGE_MODELS, default="t5")
    args = parser.parse_args()
    for field, path in save_tiny_scorers(args.out, args.seed, args.language_model).items():
        print(f"--config.scoring.{field}={path}")


if __name__ == "__main__":
    _main()
