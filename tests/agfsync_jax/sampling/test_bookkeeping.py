"""Host-side pieces of the stage: work plan, shards, batches, files, manifests, settings."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from agfsync_jax.sampling import batching, outputs
from agfsync_jax.sampling.program import check_batch_layout
from agfsync_jax.sampling.work_plan import Example, ShardSpec, plan_examples, shard_examples
from agfsync_jax.schemas import ManifestRow, PromptRecord

SAMPLING = ml_collections.ConfigDict(dict(noise_sigma=0.1, clean_first_candidate=True, pooled_noise_sigma=0.0,
                                          shared_initial_latents=False))


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", category="animals", prompt=f"a cat number {i}", source="test") for i in range(n)]


def test_shards_partition_the_work_by_prompt():
    examples = plan_examples(_records(7), num_candidates=3, global_seed=0)
    shards = [ShardSpec.of(s, 3, p, 2) for s in range(3) for p in range(2)]
    owned = [shard_examples(examples, shard) for shard in shards]
    assert sorted(e.key for part in owned for e in part) == sorted(e.key for e in examples)  # once each
    for part in owned:  # a prompt's candidates never straddle two shards (two manifest writers)
        for e in part:
            assert all(f.key in {g.key for g in part} for f in examples if f.prompt_id == e.prompt_id)
    with pytest.raises(ValueError, match="shard.index"):
        ShardSpec.of(3, 3, 0, 1)


def test_a_candidate_row_does_not_depend_on_its_batch(tmp_path):
    """Position, neighbours and padding never change an example's inputs."""
    from transformers import CLIPTokenizer

    from agfsync_jax.tiny.tokenizer import write_tokenizer_files

    examples = plan_examples(_records(3), num_candidates=2, global_seed=0)
    write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    target = examples[3]
    alone = batching.host_batch([target, None, None], tokenizers=[tok], sampling=SAMPLING, global_seed=0,
                                sdxl_resolution=None)
    crowded = batching.host_batch([examples[5], examples[0], target], tokenizers=[tok], sampling=SAMPLING,
                                  global_seed=0, sdxl_resolution=None)
    for field in alone:
        np.testing.assert_array_equal(alone[field][0], crowded[field][2], err_msg=field)
    # clean_first_candidate: candidate 0 gets sigma 0, the others sigma.
    sigmas = batching.host_batch(examples[:2], tokenizers=[tok], sampling=SAMPLING, global_seed=0,
                                 sdxl_resolution=None)["embeds_sigma"]
    np.testing.assert_array_equal(sigmas, np.float32([0.0, 0.1]))


def test_chunks_are_padded_to_the_compiled_size():
    examples = plan_examples(_records(5), num_candidates=1, global_seed=0)
    groups = list(batching.chunked(examples, 2))
    assert [len(g) for g in groups] == [2, 2, 2] and groups[-1][1] is None


def test_batch_layout_errors_name_the_fields():
    check_batch_layout(16, 2, 8, 1)
    with pytest.raises(ValueError, match="sampling.batch_size=12.*sampling.microbatch=2"):
        check_batch_layout(12, 2, 8, 1)
    with pytest.raises(ValueError, match="sampling.microbatch"):
        check_batch_layout(8, 0, 8, 1)


def test_prompt_directories_are_safe_and_distinct():
    assert outputs.prompt_dir_name("p0") == "p0"
    names = {outputs.prompt_dir_name(i) for i in ("a/b", "a_b", "a\\b", "..", "a b")}
    assert len(names) == 5 and all("/" not in n and n not in (".", "..") for n in names)


def _row(image: str, latent: str) -> ManifestRow:
    return ManifestRow(prompt_id="p0", candidate=0, seed=1, noise_sigma=0.1, image=image, latent=latent,
                       scheduler="ddim", steps=3, cfg=7.5)


def test_verification_catches_damage(tmp_path):
    row = _row("p0/i0-c000.png", "p0/i0-c000.npy")
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    outputs.write_candidate(tmp_path, row, np.ones((4, 16, 16), np.float32), image)
    assert outputs.verify_candidate(tmp_path, row, (4, 16, 16), 32) is None
    assert "expected RGB" in outputs.verify_candidate(tmp_path, row, (4, 16, 16), 64)
    assert "expected float32[4, 8, 8]" in outputs.verify_candidate(tmp_path, row, (4, 8, 8), 32)

    png = tmp_path / row.image
    png.write_bytes(png.read_bytes()[:-30])  # lost its tail (IDAT end, IEND)
    assert "undecodable" in outputs.verify_candidate(tmp_path, row, (4, 16, 16), 32)
    np.save(tmp_path / row.latent, np.full((4, 16, 16), np.nan, np.float32))
    assert "non-finite" in outputs.verify_candidate(tmp_path, row, (4, 16, 16), None)
    (tmp_path / row.latent).write_bytes(b"\x93NUMPY")  # torn header
    assert "unreadable" in outputs.verify_candidate(tmp_path, row, (4, 16, 16), None)


def test_manifest_writer_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "manifest-00000-of-00001.jsonl"
    first = _row("a.png", "a.npy").to_dict()
    path.write_text(json.dumps(first) + "\n" + '{"prompt_id": "p0", "cand')
    writer = outputs.ManifestWriter(path)
    second = dict(first, candidate=1)
    writer.append(ManifestRow.from_dict(second))
    writer.close()
    rows, duplicates = outputs.read_manifests(tmp_path)
    assert sorted(rows) == [("p0", 0, 0), ("p0", 0, 1)] and duplicates == 0


def test_settings_change_is_refused_naming_the_field(tmp_path):
    outputs.check_settings(tmp_path, {"steps": 50, "noise_sigma": 0.1}, write=True)
    outputs.check_settings(tmp_path, {"steps": 50, "noise_sigma": 0.1}, write=True)
    from agfsync_jax.errors import StageChangedError

    with pytest.raises(StageChangedError, match="steps: 50 -> 20.*`agfsync-jax clean sample"):
        outputs.check_settings(tmp_path, {"steps": 20, "noise_sigma": 0.1}, write=True)


def test_example_keys_cover_both_instructions():
    pair = PromptRecord(id="x", category="people", prompt="a man", source="t", kind="instruction_pair",
                        prompt_2="a woman", divergence="counterfactual")
    keys = [e.key for e in plan_examples([pair], num_candidates=2, global_seed=0)]
    assert keys == [("x", 0, 0), ("x", 0, 1), ("x", 1, 0), ("x", 1, 1)]
    assert isinstance(plan_examples([pair], 1, 0)[1], Example)
