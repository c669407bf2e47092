"""Session-wide fixtures: tiny SD pipelines built once and saved as real diffusers folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests are CPU-only and must not grab every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path_factory: pytest.TempPathFactory, family: str, safetensors: bool) -> Path:
    from agfsync_jax.tiny import build as tiny

    out = tmp_path_factory.mktemp("models") / f"tiny-{family}-{'st' if safetensors else 'bin'}"
    return tiny.save_tiny_pipeline(family, out, seed=0, safetensors=safetensors)


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> Path:
    """A safetensors-only tiny SD1.x folder."""
    return _tiny(tmp_path_factory, "sd1", safetensors=True)


@pytest.fixture(scope="session")
def tiny_sd1_bin_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd1", safetensors=False)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sdxl", safetensors=True)


@pytest.fixture(scope="session")
def tiny_sdxl_bin_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sdxl", safetensors=False)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_sd1_path):
    from agfsync_jax.models.loading import load_stable_diffusion

    return load_stable_diffusion(tiny_sd1_path)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_path):
    from agfsync_jax.models.loading import load_stable_diffusion

    return load_stable_diffusion(tiny_sdxl_path)


@pytest.fixture(scope="session")
def run_python():
    """Runs a Python snippet in a fresh process (for multi-device / multi-host code paths).

    `devices=N` simulates N CPU devices; XLA reads the flag only at start-up, hence the
    subprocess. Returns the completed process; a non-zero exit fails the test with its output.
    """
    import subprocess
    import sys

    def run(code: str, devices: int = 1, timeout: float = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc
    return run
