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


class GcsEmulator:
    """A GCS emulator (gcp-storage-emulator, in memory: tests/gcs_emulator_server.py) on 127.0.0.1,
    with one bucket."""

    def __init__(self, host: str, bucket: str):
        self.host, self.bucket = host, bucket

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def object_names(self, prefix: str = "") -> list[str]:
        """Every object name under `prefix`, listed through the emulator's JSON API."""
        import json
        import urllib.parse
        import urllib.request

        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.host}/storage/v1/b/{self.bucket}/o?{query}", timeout=30) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """Starts the emulator for the session and points this process (and its children) at it
    through STORAGE_EMULATOR_HOST, before anything here touches gs://."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host, bucket = f"http://127.0.0.1:{port}", "agfsync-test-bucket"
    log = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "gcs_emulator_server.py"),
                                 "--host=127.0.0.1", f"--port={port}", f"--bucket={bucket}"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        yield GcsEmulator(host, bucket)
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
