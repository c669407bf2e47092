"""Export of a finetuned UNet to the diffusers format (docs/design.md section 4)."""
