"""agfsync-jax: AGFSync and InstructEngine (AI feedback + Diffusion-DPO) in JAX/Flax.

Importing the package is cheap on purpose: it pulls in neither JAX nor PyTorch, so the
PyTorch prep stage (data_prep) can share its schemas without starting JAX.
"""

__version__ = "0.1.0"
