"""agfsync-jax: AGFSync / InstructEngine (AI feedback + Diffusion-DPO) for Stable Diffusion in JAX.

Install PyTorch (and torchvision, for open_clip's HPS v2 scorer) before this package, the build
your machine needs: a bare `torch` requirement resolved by pip pulls whatever build pip picks.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    # diffusers removed its Flax models (FlaxUNet2DConditionModel, FlaxAutoencoderKL, the Flax
    # schedulers) in 0.40 and transformers removed Flax (FlaxCLIPTextModel...) in 5.0. These are
    # the last releases with the Flax ports this project is built on; do not lift the caps.
    "diffusers>=0.39,<0.40",
    "transformers>=4.57,<5",
    # TFRecord reading/writing for the pair dataset; TF is kept off accelerators in JAX processes.
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.6",
    # One path type for local and gs:// work directories (agfsync_jax/storage): epath over gcsfs;
    # CRC-32C for the TFRecord framing written in Python.
    "etils[epath]>=1.7",
    "gcsfs>=2024.2",
    "google-crc32c>=1.5",
    "ml-collections>=1.0",
    "scipy>=1.10",
    "numpy>=1.26",
    "safetensors>=0.4",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "pillow>=10",
    "matplotlib>=3.8",
    # prompts stage: OpenAI-compatible HTTP client with retries
    "httpx>=0.27",
    "tenacity>=8.2",
]

EXTRAS = {
    # The PyTorch side: scoring, tiny-model building, export to diffusers' PyTorch format,
    # and loading `.bin` checkpoints. Install torch first (see module docstring).
    "torch": ["torch>=2.4"],
    # open-clip-torch (with torchvision): the HPS v2 scorer. VILA runs on tensorflow-cpu (above).
    "scoring": ["torch>=2.4", "torchmetrics>=1.4", "open-clip-torch>=3.0", "torchvision"],
    # Tests: gcp-storage-emulator is the GCS emulator the gs:// pipeline test starts; peft makes
    # the LoRA files the LoRA parity tests load through diffusers.
    "dev": ["pytest>=8", "torchmetrics>=1.4", "gcp-storage-emulator>=2024.8", "peft>=0.13"],
    # `agfsync-jax plan`: the TPU compiler, for compile-only plans on any machine. The libtpu
    # that jax[tpu]==0.10.2 requires; move the pin with the jax version.
    "tpu-plan": ["libtpu==0.0.42.*"],
}

setup(
    name="agfsync-jax",
    version="0.1.0",
    description="AGFSync / InstructEngine: AI-feedback Diffusion-DPO for Stable Diffusion in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["agfsync_jax", "agfsync_jax.*", "data_prep", "data_prep.*",
                                    "configs", "configs.*"]),
    package_data={"data_prep": ["**/*.json"], "agfsync_jax.plan": ["architectures/**/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["agfsync-jax=agfsync_jax.main:run"]},
)
