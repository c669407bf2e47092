"""Analytical FLOPs of a diffusers UNet2DConditionModel and of one Diffusion-DPO pair.

    python -m benchmarks.flops --model=sd15 [--check_torch]

prints, e.g. for sd15:

    UNet forward (1 image, 64x64 latents): 0.677 TFLOP  [convs ..., attention ..., linears ...]
    DPO pair: policy fwd+bwd on w and l (6F) + reference fwd on w and l (2F) + text = ... TFLOP
    1000 steps x 128 pairs at 100% MFU on one H100 (989 TFLOP/s bf16 dense): ... s

Counts are 2 x multiply-accumulates of convolutions, linear layers and attention matmuls (what
dominates); norms, activations, softmax and residual adds are left out (well under 1%). The
backward pass of a layer is counted as 2x its forward (gradients w.r.t. inputs and weights).
`--check_torch` cross-checks the forward count with torch.utils.flop_counter on the PyTorch
UNet built on the meta device (no weights allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense tensor-core peak


@dataclasses.dataclass
class Count:
    conv: float = 0.0
    linear: float = 0.0
    attention: float = 0.0  # QK^T and AV only (the projections are in `linear`)

    @property
    def total(self) -> float:
        return self.conv + self.linear + self.attention


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_forward_flops(config: Mapping[str, Any], latent_hw: int, text_len: int = 77) -> Count:
    """FLOPs of one forward pass of one image (batch 1) through a UNet2DConditionModel config."""
    c = Count()
    chans = list(config["block_out_channels"])
    n = len(chans)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    tlayers = _per_block(config.get("transformer_layers_per_block", 1), n)
    cross_dim = config["cross_attention_dim"]
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    temb = 4 * chans[0]

    def conv(cin: int, cout: int, hw: int, k: int = 3) -> None:
        c.conv += 2.0 * k * k * cin * cout * hw * hw

    def linear(din: int, dout: int, tokens: int = 1) -> None:
        c.linear += 2.0 * din * dout * tokens

    def resnet(cin: int, cout: int, hw: int) -> None:
        conv(cin, cout, hw)
        linear(temb, cout)  # time embedding projection
        conv(cout, cout, hw)
        if cin != cout:
            conv(cin, cout, hw, k=1)

    def transformer(ch: int, hw: int, layers: int) -> None:
        tokens = hw * hw
        linear(ch, ch, tokens)  # proj_in (a 1x1 conv or a linear layer: same FLOPs)
        for _ in range(layers):
            linear(ch, 3 * ch, tokens)  # self-attention q, k, v
            c.attention += 2 * 2.0 * tokens * tokens * ch  # QK^T and AV
            linear(ch, ch, tokens)  # out
            linear(ch, ch, tokens)  # cross-attention q
            linear(cross_dim, 2 * ch, text_len)  # cross-attention k, v on the text
            c.attention += 2 * 2.0 * tokens * text_len * ch
            linear(ch, ch, tokens)  # out
            linear(ch, 8 * ch, tokens)  # GEGLU in (value and gate, 4x width each)
            linear(4 * ch, ch, tokens)  # feed-forward out
        linear(ch, ch, tokens)  # proj_out

    # Time embedding (and SDXL's text_time embedding): per image, tiny but counted.
    linear(chans[0], temb)
    linear(temb, temb)
    if config.get("addition_embed_type") == "text_time":
        linear(config["projection_class_embeddings_input_dim"], temb)
        linear(temb, temb)

    hw = latent_hw
    conv(config.get("in_channels", 4), chans[0], hw)
    prev = chans[0]
    for i, kind in enumerate(down_types):
        for j in range(lpb[i]):
            resnet(prev if j == 0 else chans[i], chans[i], hw)
            if kind.startswith("CrossAttn"):
                transformer(chans[i], hw, tlayers[i])
        prev = chans[i]
        if i < n - 1:
            conv(chans[i], chans[i], hw // 2)  # stride-2 downsampler: output resolution
            hw //= 2

    resnet(chans[-1], chans[-1], hw)  # UNetMidBlock2DCrossAttn
    transformer(chans[-1], hw, tlayers[-1])
    resnet(chans[-1], chans[-1], hw)

    rev = chans[::-1]
    rev_lpb = lpb[::-1]
    rev_tl = tlayers[::-1]
    out_ch = rev[0]
    for i, kind in enumerate(up_types):
        prev_out, out_ch = out_ch, rev[i]
        skip_in = rev[min(i + 1, n - 1)]
        layers = rev_lpb[i] + 1
        for j in range(layers):
            res_skip = skip_in if j == layers - 1 else out_ch
            res_in = prev_out if j == 0 else out_ch
            resnet(res_in + res_skip, out_ch, hw)
            if kind.startswith("CrossAttn"):
                transformer(out_ch, hw, rev_tl[i])
        if i < n - 1:
            hw *= 2
            conv(out_ch, out_ch, hw)  # nearest upsample, then a 3x3 conv at the new resolution
    conv(chans[0], config.get("out_channels", 4), hw)
    return c


def clip_text_flops(hidden: int, layers: int, intermediate: int, seq: int = 77) -> float:
    """One prompt through a CLIP text transformer (no projection head)."""
    per_layer = 2.0 * seq * hidden * 4 * hidden + 2 * 2.0 * seq * seq * hidden + 2 * 2.0 * seq * hidden * intermediate
    return layers * per_layer


def dpo_pair_flops(unet_fwd: float, text_fwd: float = 0.0, remat_recompute: float = 0.0) -> dict[str, float]:
    """One (winner, loser) pair of a Diffusion-DPO step.

    policy forward + backward on both images: 2 x (1 + 2) F; reference forward on both: 2 F;
    the prompt is encoded once per pair (frozen encoder: forward only). `remat_recompute` is the
    fraction of the policy forward recomputed in the backward pass (0 without remat).
    """
    policy = 2 * 3 * unet_fwd
    reference = 2 * unet_fwd
    recompute = 2 * remat_recompute * unet_fwd
    return {"policy_fwd_bwd": policy, "reference_fwd": reference, "text_encoder": text_fwd,
            "remat_recompute": recompute, "total": policy + reference + text_fwd + recompute}


def torch_forward_flops(config: Mapping[str, Any], latent_hw: int, text_len: int = 77) -> float:
    """torch.utils.flop_counter's count of one UNet forward (batch 1), built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        x = torch.zeros(1, config.get("in_channels", 4), latent_hw, latent_hw)
        ctx = torch.zeros(1, text_len, config["cross_attention_dim"])
        added = None
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, torch.zeros(1), ctx, added_cond_kwargs=added)
    return float(counter.get_total_flops())


TEXT_ENCODERS = {  # (hidden, layers, intermediate) of the text tower each size uses
    "tiny": [(32, 2, 64)],
    "mid": [(256, 4, 1024)],
    "sd15": [(768, 12, 3072)],  # CLIP ViT-L/14
    "sdxl": [(768, 12, 3072), (1280, 32, 5120)],  # CLIP ViT-L/14 + OpenCLIP ViT-bigG/14
}


def model_flops(size: str) -> dict[str, Any]:
    from benchmarks import common

    spec = common.SIZES[size]
    count = unet_forward_flops(common.unet_config(size), spec.latent_size, spec.text_len)
    text = sum(clip_text_flops(h, layers, i, spec.text_len) for h, layers, i in TEXT_ENCODERS[size])
    return {"unet_forward": dataclasses.asdict(count) | {"total": count.total},
            "text_forward": text, "dpo_pair": dpo_pair_flops(count.total, text)}


def _main(argv: Sequence[str] | None = None) -> None:
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=list(common.SIZES))
    parser.add_argument("--check_torch", action="store_true",
                        help="cross-check the UNet forward with torch.utils.flop_counter")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--peak_flops", type=float, default=H100_BF16_DENSE)
    args = parser.parse_args(argv)
    spec = common.SIZES[args.model]
    out = model_flops(args.model)
    f = out["unet_forward"]
    print(f"UNet forward (1 image, {spec.latent_size}x{spec.latent_size} latents): {f['total'] / 1e12:.4g} TFLOP "
          f"[convs {f['conv'] / 1e12:.4g}, attention matmuls {f['attention'] / 1e12:.4g}, "
          f"linears {f['linear'] / 1e12:.4g}]")
    if args.check_torch:
        ref = torch_forward_flops(common.unet_config(args.model), spec.latent_size, spec.text_len)
        print(f"torch.utils.flop_counter UNet forward: {ref / 1e12:.4g} TFLOP "
              f"(analytical / torch = {f['total'] / ref:.4f})")
    pair = out["dpo_pair"]
    print(f"text encoder forward (1 prompt): {out['text_forward'] / 1e9:.4g} GFLOP")
    print(f"DPO pair: policy fwd+bwd on w and l (6F) {pair['policy_fwd_bwd'] / 1e12:.4g} + reference fwd "
          f"(2F) {pair['reference_fwd'] / 1e12:.4g} + text {pair['text_encoder'] / 1e12:.4g} = "
          f"{pair['total'] / 1e12:.4g} TFLOP")
    total = args.steps * args.batch * pair["total"]
    print(f"{args.steps} steps x {args.batch} pairs = {total / 1e18:.4g} EFLOP: "
          f"{total / args.peak_flops:.4g} s ({total / args.peak_flops / 3600:.3g} h) at 100% of "
          f"{args.peak_flops / 1e12:.4g} TFLOP/s")


if __name__ == "__main__":
    _main()
