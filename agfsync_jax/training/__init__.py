"""Diffusion-DPO training (docs/design.md section 8): losses, the jitted train step, the loop, checkpoints."""
