"""The wheel: `pip install .` (not editable) must carry every package and data file of the tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agfsync_jax", "data_prep", "configs")

pytestmark = pytest.mark.slow  # builds a wheel in a subprocess


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if not f.endswith((".pyc",)) and "__pycache__" not in f]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("agfsync_jax-*.whl")
    return path


def test_every_source_package_and_data_file_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _tracked_files() if f not in names]
    assert not missing, f"files of the tree missing from {wheel.name}: {missing}"


def test_every_python_folder_is_a_package():
    """find_packages skips folders without __init__.py: a non-editable install would lack them."""
    folders = {str(Path(f).parent) for f in _tracked_files() if f.endswith(".py")}
    assert [d for d in sorted(folders) if not (ROOT / d / "__init__.py").is_file()] == []


def test_the_installed_console_script_runs_every_stage_help(wheel, tmp_path):
    """Installed from the wheel alone (no repository on the path): every stage module imports."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import importlib, sys; from agfsync_jax import stages; "
            "[importlib.import_module(s.module) for s in stages.STAGES]; "
            "import agfsync_jax, configs; print(agfsync_jax.__file__, configs.__file__)")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.startswith(str(target)) for p in proc.stdout.split())
