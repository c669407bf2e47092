"""The training input pipeline over a pair dataset written by the scoring stage's writer, in one
process and in two real processes under jax.distributed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax.schemas import PAIR_AGFSYNC, PAIR_CROSS, PromptRecord, ScoreRow

SHARD_SIZES = (5, 0, 7)  # an empty shard on purpose: a stage shard may yield no pair
NUM_PAIRS = sum(SHARD_SIZES)
LATENT_SHAPE = (4, 8, 8)
REPO = Path(__file__).resolve().parents[3]


def _pair(i: int):
    from data_prep.scoring.pairs import Pair

    cross = i % 4 == 3
    record = PromptRecord(id=f"p{i:02d}", category="animals", prompt=f"prompt {i}", source="test",
                          kind="instruction_pair" if cross else "prompt", prompt_2=f"other {i}" if cross else "",
                          divergence="aesthetic" if cross else "")
    row = lambda c, total, ins: ScoreRow(prompt_id=record.id, candidate=c, scores={"clip": total}, total=total,
                                         scorers={"clip": "test"}, instruction=ins)
    return Pair(PAIR_CROSS if cross else PAIR_AGFSYNC, record, row(1, 30.0 + i, 0), row(2, 10.0 + i, int(cross)))


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    from agfsync_jax.pairs.records import shard_filename, tfds_features, write_tfrecord
    from data_prep.scoring.pair_records import pair_example
    from agfsync_jax.pairs.metadata import write_tfds_metadata

    out = tmp_path_factory.mktemp("pairs")
    features = tfds_features()
    rng = np.random.default_rng(0)
    latents: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    i = 0
    for shard, size in enumerate(SHARD_SIZES):
        serialized = []
        for _ in range(size):
            pair = _pair(i)
            w, l = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) * 3 for _ in range(2))
            latents[pair.record.id] = (w, l)
            serialized.append(features.serialize_example(pair_example(pair, w, l)))
            i += 1
        write_tfrecord(out / shard_filename(shard, len(SHARD_SIZES)), serialized)
    assert write_tfds_metadata(out, len(SHARD_SIZES)) == NUM_PAIRS
    return out, latents


def _dataset(path, process_index=0, process_count=1, batch=4, seed=3):
    from agfsync_jax.pairs.dataset import PairDataset

    return PairDataset(path, global_batch_size=batch, seed=seed, process_index=process_index,
                       process_count=process_count)


def test_batches_hold_decoded_latents_and_texts(pair_dir):
    path, latents = pair_dir
    ds = _dataset(path)
    assert ds.num_records == NUM_PAIRS and ds.batches_per_epoch == NUM_PAIRS // 4
    batch = next(ds)
    assert batch["winner_latent"].shape == (4, *LATENT_SHAPE) and batch["winner_latent"].dtype == np.float32
    assert batch["prompt"].dtype == object and isinstance(batch["prompt"][0], str)
    for k, pid in enumerate(batch["prompt_id"]):
        w, l = latents[pid]
        # float16 on disk, so exactly the float16 rounding of what was written, bit for bit.
        assert batch["winner_latent"][k].tobytes() == w.astype(np.float16).astype(np.float32).tobytes()
        assert batch["loser_latent"][k].tobytes() == l.astype(np.float16).astype(np.float32).tobytes()
        i = int(pid[1:])
        assert batch["prompt"][k] == f"prompt {i}"
        assert bool(batch["is_cross"][k]) == (i % 4 == 3)
        assert batch["prompt_2"][k] == (f"other {i}" if i % 4 == 3 else "")
        assert batch["winner_total"][k] == np.float32(30.0 + i)


def test_two_processes_read_disjoint_slices_covering_the_dataset(pair_dir):
    path, latents = pair_dir
    procs = [_dataset(path, process_index=p, process_count=2, batch=4) for p in range(2)]
    seen = []
    for ds in procs:
        assert ds.batch_size == 2 and ds.batches_per_epoch == 3
        ids = [pid for _ in range(ds.batches_per_epoch) for pid in next(ds)["prompt_id"]]
        assert len(ids) == len(set(ids)) == NUM_PAIRS // 2
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(latents)
    # Process 1's slice (records 6..11) lies entirely in the third file: it never opens the first.
    assert [p.name for p in procs[1].slice_files] == ["agfsync_pairs-train.tfrecord-00002-of-00003"]
    assert len(procs[0].slice_files) == 2


# Each process: join the group, read one epoch saving the position after batch 1, then (second
# phase) restore that position in a new PairDataset and read the next batch.
WORKER = textwrap.dedent("""
    import json, sys
    from agfsync_jax import distributed
    distributed.initialize()
    import jax
    from agfsync_jax.pairs.dataset import PairDataset

    data_dir, out_dir = sys.argv[1], sys.argv[2]
    me = jax.process_index()
    ds = PairDataset(data_dir, global_batch_size=4, seed=3)  # index and count from jax
    batches, saved = [], None
    for b in range(ds.batches_per_epoch):
        batches.append([str(p) for p in next(ds)["prompt_id"]])
        if b == 0:
            saved = ds.state()
    resumed = PairDataset(data_dir, global_batch_size=4, seed=3)
    resumed.restore(json.loads(json.dumps(saved)))
    after_resume = [str(p) for p in next(resumed)["prompt_id"]]
    with open(f"{out_dir}/p{me}.json", "w") as f:
        json.dump({"process": [me, jax.process_count()], "batches": batches,
                   "files": [p.name for p in ds.slice_files], "after_resume": after_resume}, f)
""")


@pytest.mark.slow
def test_two_processes_read_disjoint_slices_and_resume(pair_dir, tmp_path):
    path, latents = pair_dir
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=1", "--",
         sys.executable, str(worker), str(path), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    slices = []
    for i, r in enumerate(results):
        assert r["process"] == [i, 2]
        ids = [pid for batch in r["batches"] for pid in batch]
        assert len(ids) == len(set(ids))
        slices.append(set(ids))
        print(f"process {i}: files {r['files']}, batches {r['batches']}, after resume {r['after_resume']}")
        assert r["after_resume"] == r["batches"][1]  # the batch after the saved position
    assert not slices[0] & slices[1]
    assert slices[0] | slices[1] == set(latents)


def test_epochs_reshuffle_deterministically(pair_dir):
    path, _ = pair_dir
    a, b, other_seed = _dataset(path), _dataset(path), _dataset(path, seed=4)
    run_a = [list(next(a)["prompt_id"]) for _ in range(2 * a.batches_per_epoch)]
    run_b = [list(next(b)["prompt_id"]) for _ in range(2 * b.batches_per_epoch)]
    assert run_a == run_b
    epoch0, epoch1 = sum(run_a[:3], []), sum(run_a[3:], [])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # every pair, in a new order
    assert sum([list(next(other_seed)["prompt_id"]) for _ in range(3)], []) != epoch0


def test_resume_continues_with_the_next_batch(pair_dir):
    path, _ = pair_dir
    ds = _dataset(path, process_index=1, process_count=2)
    for _ in range(4):  # past the end of epoch 0 (3 batches)
        next(ds)
    saved = json.loads(json.dumps(ds.state()))
    assert (saved["epoch"], saved["batch"]) == (1, 1)
    reference = [next(ds) for _ in range(4)]
    resumed = _dataset(path, process_index=1, process_count=2)
    resumed.restore(saved)
    for want in reference:
        got = next(resumed)
        assert list(got["prompt_id"]) == list(want["prompt_id"])
        assert got["winner_latent"].tobytes() == want["winner_latent"].tobytes()
    other = _dataset(path, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_count=2"):
        other.restore(saved)


def test_truncated_tfrecord_names_the_file(pair_dir, tmp_path):
    from agfsync_jax.pairs.records import PairDataError

    path, _ = pair_dir
    broken = tmp_path / "pairs"
    shutil.copytree(path, broken)
    victim = broken / "agfsync_pairs-train.tfrecord-00002-of-00003"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(PairDataError, match=f"{victim}: truncated TFRecord file"):
        _dataset(broken)


def test_corrupted_record_names_the_file(pair_dir, tmp_path):
    from agfsync_jax.pairs.records import PairDataError

    path, _ = pair_dir
    broken = tmp_path / "pairs"
    shutil.copytree(path, broken)
    victim = broken / "agfsync_pairs-train.tfrecord-00000-of-00003"
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF  # inside the first record's payload: only its CRC can tell
    victim.write_bytes(bytes(data))
    ds = _dataset(broken)
    with pytest.raises(PairDataError, match=f"{victim} record 0 .*unreadable"):
        for _ in range(ds.batches_per_epoch):
            next(ds)


def test_batch_feeds_make_array_from_process_local_data(pair_dir):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    path, _ = pair_dir
    batch = next(_dataset(path, batch=4))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), batch["winner_latent"])
    assert arr.shape == (4, *LATENT_SHAPE)
    np.testing.assert_array_equal(np.asarray(arr), batch["winner_latent"])


def test_bad_batch_sizes_are_rejected(pair_dir):
    path, _ = pair_dir
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        _dataset(path, process_count=2, batch=3)
    with pytest.raises(ValueError, match="do not fill one batch"):
        _dataset(path, process_count=2, batch=16)


def test_a_dataset_in_a_bucket_reads_as_the_local_one(pair_dir, gcs_emulator):
    """Shards, TFDS metadata (written by tfds through epath) and the reader, all on gs://."""
    import tensorflow_datasets as tfds

    from agfsync_jax import storage
    from agfsync_jax.pairs.metadata import write_tfds_metadata
    from agfsync_jax.pairs.records import shard_filename

    path, _ = pair_dir
    remote = storage.as_path(gcs_emulator.url("pairs-test", "pairs"))
    for shard in range(len(SHARD_SIZES)):
        name = shard_filename(shard, len(SHARD_SIZES))
        storage.write_bytes(remote / name, (path / name).read_bytes())
    assert write_tfds_metadata(remote, len(SHARD_SIZES)) == NUM_PAIRS
    assert {"pairs-test/pairs/dataset_info.json", "pairs-test/pairs/features.json"} <= set(
        gcs_emulator.object_names("pairs-test/"))
    assert tfds.builder_from_directory(str(remote)).info.splits["train"].num_examples == NUM_PAIRS
    local, bucket = _dataset(path), _dataset(remote)
    for _ in range(4):  # across an epoch boundary
        a, b = next(local), next(bucket)
        assert list(a["prompt_id"]) == list(b["prompt_id"])
        np.testing.assert_array_equal(a["winner_latent"], b["winner_latent"])
