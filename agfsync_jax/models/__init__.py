"""Stable Diffusion components as Flax modules + parameter trees (diffusers/transformers ports)."""
