"""Tiny random Stable Diffusion models of the real classes, for tests and the demo (docs/design.md section 4)."""
