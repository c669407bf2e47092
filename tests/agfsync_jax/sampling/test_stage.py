"""The `sample` stage end to end on the tiny SD1.x model: outputs, resume, damage, invariance.

One reference run (1 device, batch 4) is shared; every other run is compared with it bitwise:
8 simulated devices (batch 8), and a run killed with SIGKILL (batch 1) then resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.sampling import candidate_seeds, outputs
from agfsync_jax.sampling.work_plan import plan_examples
from agfsync_jax.schemas import PromptRecord

REPO_ROOT = Path(__file__).resolve().parents[3]
RECORDS = [
    {"id": "p0", "category": "animals", "prompt": "a red cat sitting on a wooden table", "source": "test"},
    # A slash in the id must not escape the prompt's directory.
    {"id": "p/1", "category": "food and beverages", "prompt": "a cup of coffee next to a cake", "source": "test"},
    {"id": "p2", "category": "people", "prompt": "a woman reading a book under a tree", "source": "test",
     "kind": "instruction_pair", "prompt_2": "a man reading a book under a tree", "divergence": "counterfactual"},
]
NUM_CANDIDATES = 2
NUM_EXAMPLES = 8  # (1 + 1 + 2 instructions) x 2 candidates
STEPS = 3  # the program loops with fori_loop: compile time does not grow with steps
LATENT_SHAPE = (4, 16, 16)


def _config(model_path: Path, batch_size: int):
    from configs import tiny

    c = tiny.get_config()
    c.model.tiny = ""
    c.model.path = str(model_path)
    c.sampling.num_candidates = NUM_CANDIDATES
    c.sampling.steps = STEPS
    c.sampling.batch_size = batch_size
    c.sampling.microbatch = 1
    return c


def _new_workdir(root: Path) -> Path:
    prompts = root / workdir_lib.PROMPTS_FILE
    prompts.parent.mkdir(parents=True)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def _manifest_rows(workdir: Path) -> list[dict]:
    rows = []
    for path in outputs.manifest_files(workdir / workdir_lib.CANDIDATES):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _keys(rows: list[dict]) -> list[tuple]:
    return sorted((r["prompt_id"], r["instruction"], r["candidate"]) for r in rows)


def _expected_keys() -> list[tuple]:
    records = [PromptRecord.from_dict(r) for r in RECORDS]
    return sorted(e.key for e in plan_examples(records, NUM_CANDIDATES, global_seed=0))


def _assert_same_candidates(workdir: Path, reference: Path) -> None:
    """Every latent and image equals the reference bitwise; the manifests hold the same rows."""
    ours = {tuple(_key(r)): r for r in _manifest_rows(workdir)}
    ref = {tuple(_key(r)): r for r in _manifest_rows(reference)}
    assert sorted(ours) == sorted(ref)
    for key, row in ref.items():
        assert ours[key] == row
        for field in ("latent", "image"):
            a = (workdir / workdir_lib.CANDIDATES / row[field]).read_bytes()
            b = (reference / workdir_lib.CANDIDATES / row[field]).read_bytes()
            assert a == b, f"{key} {field} differs from the reference run"


def _key(row: dict) -> tuple:
    return (row["prompt_id"], row["instruction"], row["candidate"])


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """Later runs of a program that an earlier run (or subprocess) of this module compiled load it
    from JAX's persistent cache: same executable, less test time."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = [getattr(jax.config, name) for name in names]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", path)  # for the subprocesses
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        for name, value in zip(names, (path, 0)):
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        yield
        for name, value in zip(names, saved):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd1_path):
    from agfsync_jax.sampling import stage

    workdir = _new_workdir(tmp_path_factory.mktemp("reference"))
    summary = stage.run(_config(tiny_sd1_path, batch_size=4), str(workdir))
    return workdir, summary


def test_run_writes_every_candidate_once(reference):
    workdir, summary = reference
    out = workdir / workdir_lib.CANDIDATES
    assert summary["generated"] == NUM_EXAMPLES and summary["failed"] == 0 and summary["complete"]
    # One program, compiled once, reused for both batches.
    assert summary["xla_compilations"] == 1
    rows = _manifest_rows(workdir)
    assert _keys(rows) == _expected_keys()  # every candidate exactly once
    assert (out / workdir_lib.DONE_MARKER).is_file()
    latents = {}
    for row in rows:
        assert row["seed"] == candidate_seeds.candidate_seed(0, row["prompt_id"], row["instruction"], row["candidate"])
        assert row["noise_sigma"] == pytest.approx(0.1) and row["steps"] == STEPS and row["scheduler"] == "ddim"
        assert (out / row["image"]).resolve().is_relative_to(out.resolve())
        latent = np.load(out / row["latent"])
        assert latent.shape == LATENT_SHAPE and latent.dtype == np.float32
        assert outputs.verify_candidate(out, outputs.ManifestRow.from_dict(row), LATENT_SHAPE, 32) is None
        latents[_key(row)] = latent
    # Candidates of a prompt differ, and so do the two instructions of a pair.
    assert not np.array_equal(latents[("p0", 0, 0)], latents[("p0", 0, 1)])
    assert not np.array_equal(latents[("p2", 0, 0)], latents[("p2", 1, 0)])


def test_image_is_the_decoding_of_the_saved_latent(reference, tiny_sd1):
    """The .npy holds UNet-space latents: decoding latent / scaling_factor gives the PNG."""
    import jax
    from PIL import Image

    from agfsync_jax.sampling.decode import decode_to_uint8

    workdir, _ = reference
    row = next(r for r in _manifest_rows(workdir) if _key(r) == ("p0", 0, 1))
    out = workdir / workdir_lib.CANDIDATES
    latent = np.load(out / row["latent"])[None]
    vae = tiny_sd1.vae
    image = jax.jit(lambda p, z: decode_to_uint8(vae.module, p, vae.config, z))(vae.params, latent)
    png = np.asarray(Image.open(out / row["image"]))
    # Same math, another compiled program (batch 1): allow one rounding step.
    assert np.abs(np.asarray(image[0], np.int16) - png.astype(np.int16)).max() <= 1
    assert png.std() > 0  # not a blank image


def test_rerun_does_no_work(reference, tiny_sd1_path, tmp_path):
    from agfsync_jax.sampling import stage

    workdir, _ = reference
    copy = shutil.copytree(workdir, tmp_path / "rerun")
    before = [p.read_bytes() for p in outputs.manifest_files(copy / workdir_lib.CANDIDATES)]
    summary = stage.run(_config(tiny_sd1_path, batch_size=4), str(copy))
    assert summary["generated"] == 0 and summary["skipped_done"] == NUM_EXAMPLES
    assert summary["xla_compilations"] == 0  # nothing to do: the model is not even loaded
    assert [p.read_bytes() for p in outputs.manifest_files(copy / workdir_lib.CANDIDATES)] == before


def test_damaged_outputs_are_regenerated(reference, tiny_sd1_path, tmp_path):
    from agfsync_jax.sampling import stage

    workdir, _ = reference
    copy = shutil.copytree(workdir, tmp_path / "damaged")
    out = copy / workdir_lib.CANDIDATES
    rows = {_key(r): r for r in _manifest_rows(copy)}
    png = out / rows[("p0", 0, 0)]["image"]
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # half-written PNG
    np.save(out / rows[("p/1", 0, 1)]["latent"], np.zeros((4, 8, 8), np.float32))  # wrong shape
    (out / rows[("p2", 1, 0)]["image"]).unlink()  # missing PNG
    stale = png.parent / ".i0-c000.png.abc.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"partial")
    manifest = outputs.manifest_files(out)[0]
    with manifest.open("a") as f:
        f.write('{"prompt_id": "p0", "cand')  # a torn last line
    (out / workdir_lib.DONE_MARKER).unlink()

    summary = stage.run(_config(tiny_sd1_path, batch_size=4), str(copy))
    assert summary["regenerated_damaged"] == 3 and summary["generated"] == 3 and summary["complete"]
    assert not stale.exists()
    assert _keys(_manifest_rows(copy)) == _expected_keys()  # no duplicate, no torn row
    _assert_same_candidates(copy, workdir)
    assert (out / workdir_lib.DONE_MARKER).is_file()


def _stage_script(workdir: Path, model_path: Path, batch_size: int, mesh: str = "") -> str:
    return textwrap.dedent(f"""
        import json
        import jax
        from agfsync_jax.sampling import stage
        from configs import tiny
        c = tiny.get_config()
        c.model.tiny = ""
        c.model.path = {str(model_path)!r}
        c.sampling.num_candidates = {NUM_CANDIDATES}
        c.sampling.steps = {STEPS}
        c.sampling.batch_size = {batch_size}
        c.sampling.microbatch = 1
        {mesh}
        summary = stage.run(c, {str(workdir)!r})
        print("SUMMARY", json.dumps(dict(summary, devices=jax.device_count())))
    """)


@pytest.mark.slow
def test_eight_devices_match_one_device(reference, run_python, tiny_sd1_path, tmp_path):
    """Replicated parameters: bitwise equal to one device. FSDP-sharded parameters: XLA may split
    contractions across devices, so only numerically equal (documented in program.py)."""
    replicated, fsdp = _new_workdir(tmp_path / "replicated"), _new_workdir(tmp_path / "fsdp")
    mesh = "c.mesh.data = 4; c.mesh.fsdp = 2; c.mesh.min_shard_size = 1024"
    script = (_stage_script(replicated, tiny_sd1_path, batch_size=8, mesh=mesh)
              + _stage_script(fsdp, tiny_sd1_path, batch_size=8, mesh=mesh + '; c.sampling.shard_params = "fsdp"'))
    proc = run_python(script, devices=8)
    summaries = [json.loads(part.splitlines()[0]) for part in proc.stdout.split("SUMMARY")[1:]]
    for summary in summaries:
        assert summary["devices"] == 8 and summary["generated"] == NUM_EXAMPLES
        assert summary["xla_compilations"] == 1
    assert summaries[0]["sharded_param_arrays"] == 0 and summaries[1]["sharded_param_arrays"] > 0
    _assert_same_candidates(replicated, reference[0])
    out, ref_out = fsdp / workdir_lib.CANDIDATES, reference[0] / workdir_lib.CANDIDATES
    for row in _manifest_rows(reference[0]):
        diff = np.abs(np.load(out / row["latent"]) - np.load(ref_out / row["latent"])).max()
        assert diff < 1e-4, f"{_key(row)}: FSDP latents differ by {diff}"


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume(reference, tiny_sd1_path, tmp_path):
    from agfsync_jax.sampling import stage

    workdir = _new_workdir(tmp_path / "killed")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Batch 1: one candidate per program call, so there is time to kill it between writes.
    proc = subprocess.Popen([sys.executable, "-c", _stage_script(workdir, tiny_sd1_path, batch_size=1)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not _manifest_rows(workdir):
            assert proc.poll() is None, f"the run ended before any output:\n{proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no manifest row within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    written = len(_manifest_rows(workdir))
    assert 0 < written < NUM_EXAMPLES, f"not killed mid-stage ({written} rows)"
    assert not (workdir / workdir_lib.CANDIDATES / workdir_lib.DONE_MARKER).exists()

    summary = stage.run(_config(tiny_sd1_path, batch_size=1), str(workdir))
    assert summary["skipped_done"] >= written and summary["complete"]
    assert _keys(_manifest_rows(workdir)) == _expected_keys()  # nothing duplicated, nothing missing
    _assert_same_candidates(workdir, reference[0])


def test_changed_settings_are_refused(reference, tiny_sd1_path, tmp_path):
    from agfsync_jax.sampling import stage

    copy = shutil.copytree(reference[0], tmp_path / "changed")
    config = _config(tiny_sd1_path, batch_size=4)
    config.sampling.noise_sigma = 0.2
    with pytest.raises(RuntimeError, match="sampling.noise_sigma: 0.1 -> 0.2.*agfsync-jax clean sample"):
        stage.run(config, str(copy))


@pytest.mark.parametrize("field,value,change", [
    ("eta", 0.3, "sampling.eta: 0.0 -> 0.3"),
    ("negative_prompt", "blurry", "sampling.negative_prompt: '' -> 'blurry'"),
    ("scheduler", "", "sampling.scheduler: 'ddim' -> ''"),  # "" is the folder's PNDM here
])
def test_changed_sampler_settings_are_refused(reference, tiny_sd1_path, tmp_path, field, value, change):
    from agfsync_jax.errors import StageChangedError
    from agfsync_jax.sampling import stage

    copy = shutil.copytree(reference[0], tmp_path / "changed")
    settings = json.loads((copy / workdir_lib.CANDIDATES / outputs.SETTINGS_FILE).read_text())
    assert {f"sampling.{k}" for k in ("eta", "negative_prompt", "lora_path", "lora_scale")} <= set(settings)
    config = _config(tiny_sd1_path, batch_size=4)
    config.sampling[field] = value
    with pytest.raises(StageChangedError, match=change):
        stage.run(config, str(copy))


def test_lora_path_is_checked_and_never_silently_ignored(tiny_sd1_path, tmp_path):
    from agfsync_jax.sampling import model_setup, stage

    config = _config(tiny_sd1_path, batch_size=4)
    config.sampling.lora_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="sampling.lora_path"):
        stage.run(config, str(_new_workdir(tmp_path / "missing")))
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"")
    config.sampling.lora_path = str(lora)
    with pytest.raises(model_setup.LoraNotConnectedError, match="sampling.lora_path"):
        stage.run(config, str(_new_workdir(tmp_path / "lora")))
    config.sampling.lora_path = ""
    config.sampling.lora_scale = 0.5
    with pytest.raises(ValueError, match="sampling.lora_scale"):
        stage.run(config, str(_new_workdir(tmp_path / "scale")))


def test_lcm_folder_is_sampled_with_lcm_by_default(tiny_sd1_path, tmp_path):
    """A folder whose scheduler_config.json names LCMScheduler, `sampling.scheduler=""`: LCM at
    guidance 1, recorded as such in every manifest row, deterministic across runs."""
    from diffusers import LCMScheduler, PNDMScheduler

    from agfsync_jax.sampling import stage

    folder = shutil.copytree(tiny_sd1_path, tmp_path / "lcm-folder")
    LCMScheduler.from_config(PNDMScheduler.from_pretrained(folder / "scheduler").config).save_pretrained(
        folder / "scheduler")
    config = _config(folder, batch_size=4)
    config.sampling.scheduler = ""
    config.sampling.guidance_scale = 1.0
    config.sampling.steps = 2
    first = stage.run(config, str(_new_workdir(tmp_path / "a")))
    assert first["complete"] and first["generated"] == NUM_EXAMPLES and first["xla_compilations"] == 1
    rows = _manifest_rows(tmp_path / "a")
    assert {r["scheduler"] for r in rows} == {"lcm"} and {r["cfg"] for r in rows} == {1.0}
    stage.run(config, str(_new_workdir(tmp_path / "b")))
    _assert_same_candidates(tmp_path / "b", tmp_path / "a")


def test_sdxl_lcm_lora_config_gives_the_authors_sampler(tiny_sdxl_path):
    """configs/sdxl_lcm_lora.py on an SDXL folder (Euler scheduler config): LCM, 5 steps of the
    50-point distillation schedule, no classifier-free guidance."""
    from configs import sdxl_lcm_lora

    from agfsync_jax.sampling import stage

    config = sdxl_lcm_lora.get_config()
    sched = stage._scheduler(config, tiny_sdxl_path)
    assert sched.name == "lcm" and sched.needs_step_noise
    np.testing.assert_array_equal(sched.timesteps, [999, 799, 599, 399, 199])
    assert config.sampling.guidance_scale == 1.0 and config.sampling.lora_path == ""


def test_failed_candidates_make_the_stage_fail_after_saving_the_rest(reference, tiny_sd1_path, tmp_path,
                                                                    monkeypatch):
    """Non-finite latents: the other candidates are written, the run raises, no done marker; a
    re-run retries exactly the failed ones."""
    from agfsync_jax.sampling import stage

    workdir, _ = reference
    copy = shutil.copytree(workdir, tmp_path / "failing")
    out = copy / workdir_lib.CANDIDATES
    for path in outputs.manifest_files(out):
        path.unlink()  # forget every row: all 8 are sampled again
    (out / workdir_lib.DONE_MARKER).unlink()

    write = stage._Writer.write

    def poison_first(self, group, rows):
        """What a model that overflows does to some candidates: NaN latents."""
        rows = dict(rows, latents=np.array(rows["latents"]))
        rows["latents"][0] = np.nan
        return write(self, group, rows)

    monkeypatch.setattr(stage._Writer, "write", poison_first)
    with pytest.raises(stage.CandidatesFailedError, match=r"2 candidate\(s\) failed .*non-finite latents"):
        stage.run(_config(tiny_sd1_path, batch_size=4), str(copy))
    assert len(_manifest_rows(copy)) == NUM_EXAMPLES - 2  # the rest were saved
    assert not (out / workdir_lib.DONE_MARKER).exists()

    monkeypatch.setattr(stage._Writer, "write", write)
    summary = stage.run(_config(tiny_sd1_path, batch_size=4), str(copy))
    assert summary["generated"] == 2 and summary["complete"] and summary["failed"] == 0
    assert (out / workdir_lib.DONE_MARKER).is_file()
    _assert_same_candidates(copy, workdir)
