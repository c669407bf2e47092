"""The `score` stage end to end on a tiny work directory: scores, pairs, TFDS, resume, shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


def _q(text: str, element: str, element_type: str = "object") -> dict:
    return {"question": text, "answer": "yes", "element": element, "element_type": element_type}


RECORDS = [
    {"id": "p0", "category": "animals", "prompt": "a red cat on a table", "source": "test",
     "questions": [_q("is there a cat?", "cat", "animal/human"), _q("is the cat red?", "red", "color")]},
    {"id": "p1", "category": "transportation", "prompt": "a blue car near the river", "source": "test",
     "questions": [_q("is there a car?", "car")]},
    {"id": "p2", "category": "plants", "prompt": "a tree", "source": "test", "questions": []},
    {"id": "p3", "category": "animals", "prompt": "two dogs in the park", "source": "test",
     "questions": [_q("are there dogs?", "dogs")]},
    {"id": "ie0", "category": "plants", "prompt": "a sea of bright flowers", "source": "test",
     "questions": [_q("are there flowers?", "flowers")], "kind": "instruction_pair",
     "prompt_2": "a sea of grey lifeless flowers", "questions_2": [_q("are the flowers grey?", "grey")],
     "divergence": "aesthetic"},
]
NUM_CANDIDATES = 3


@pytest.fixture(scope="module")
def candidates_template(make_candidates, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wd_template")
    make_candidates(root, RECORDS, NUM_CANDIDATES, seed=7)
    return root


@pytest.fixture
def workdir(candidates_template, tmp_path) -> Path:
    wd = tmp_path / "wd"
    shutil.copytree(candidates_template, wd)
    return wd


def _config(models: dict[str, Path], **scoring):
    from configs.common import base_config

    c = base_config()
    c.scoring.vqa_path = str(models["blip2_t5"])
    c.scoring.clip_path = str(models["clip"])
    c.scoring.aesthetic = "laion"
    c.scoring.aesthetic_clip_path = str(models["aesthetic_clip"])
    c.scoring.aesthetic_head_path = str(models["aesthetic_head"])
    c.scoring.pickscore_path = str(models["pickscore"])
    c.scoring.extra = "pickscore"
    c.scoring.device = "cpu"
    c.scoring.batch_size = 4
    for k, v in scoring.items():
        setattr(c.scoring, k, v)
    return c


def _load_tfds(pairs_dir: Path) -> list[dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(pairs_dir))
    return sorted(tfds.as_numpy(builder.as_dataset(split="train")), key=lambda ex: ex["prompt_id"])


def test_stage_scores_pairs_and_tfds_round_trip(scorer_models, workdir, capsys):
    from data_prep.scoring import stage

    cand = workdir / "candidates"
    # Damage three candidates: a missing latent, a truncated PNG, a latent that is not an array.
    (cand / "latents" / "p0_0_1.npy").unlink()
    png = cand / "images" / "p1_0_2.png"
    png.write_bytes(png.read_bytes()[:60])
    (cand / "latents" / "p1_0_0.npy").write_bytes(b"not a numpy file")

    summary = stage.run(_config(scorer_models), str(workdir))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("score 00000-of-00001:") and "missing_latent=1" in line

    assert summary["bad_candidates"]["missing_latent"] == [str(cand / "latents" / "p0_0_1.npy")]
    assert summary["bad_candidates"]["corrupt_image"] == [str(png)]
    assert summary["bad_candidates"]["corrupt_latent"] == [str(cand / "latents" / "p1_0_0.npy")]
    assert len(summary["bad_candidates"]["no_questions"]) == NUM_CANDIDATES  # p2 has no questions
    expected_rows = 6 * NUM_CANDIDATES - 3 - 3  # (p0..p3, ie0 x 2 instructions), minus bad, minus p2
    assert summary["scored"] == expected_rows and summary["already_scored"] == 0

    from agfsync_jax.schemas import PromptRecord, ScoreRow, read_jsonl
    scores_path = workdir / "scores" / "scores-00000-of-00001.jsonl"
    rows = list(read_jsonl(scores_path, ScoreRow.from_dict))
    assert len(rows) == expected_rows
    records = {r["id"]: PromptRecord.from_dict(r) for r in RECORDS}
    for r in rows:
        assert set(r.scores) == {"vqa", "clip", "aesthetic", "pickscore"}
        assert r.scorers["vqa"].endswith(":likelihood")
        assert 0.0 <= r.scores["vqa"] <= 100.0
        # One answer per question of the candidate's instruction, with its element type.
        record = records[r.prompt_id]
        questions = record.questions_2 if r.instruction == 1 else record.questions
        assert [(a.question, a.element_type) for a in r.vqa_answers] == [(q.question, q.element_type)
                                                                        for q in questions]
        assert all(0.0 <= a.p_yes <= 1.0 and a.is_yes == (a.p_yes > 0.5) for a in r.vqa_answers)
        assert r.scores["vqa"] == pytest.approx(100 * np.mean([a.credit for a in r.vqa_answers]), abs=1e-9)
        expected_total = 0.35 * r.scores["vqa"] + 0.55 * r.scores["clip"] + 0.10 * r.scores["aesthetic"]
        assert r.total == pytest.approx(expected_total)  # pickscore recorded, not weighted

    # p0 and p3 give AGFSync pairs, ie0 a cross pair; p1 kept one candidate, p2 none.
    assert summary["pairs_by_kind"] == {"agfsync": 2, "cross": 1}
    assert summary["prompts_without_pair"] == {"too_few_candidates": ["p1", "p2"]}
    assert (workdir / "pairs" / "_DONE.json").is_file()

    examples = _load_tfds(workdir / "pairs")
    assert [ex["prompt_id"] for ex in examples] == [b"ie0", b"p0", b"p3"]
    by_key = {(r.prompt_id, r.instruction, r.candidate): r for r in rows}
    for ex in examples:
        pid = ex["prompt_id"].decode()
        scores = json.loads(ex["scores_json"])
        cross = ex["pair_kind"] == b"cross"
        w_key = (pid, scores["winner"]["instruction"], int(ex["winner_candidate"]))
        l_key = (pid, scores["loser"]["instruction"], int(ex["loser_candidate"]))
        assert scores["winner"] == by_key[w_key].to_dict() and scores["loser"] == by_key[l_key].to_dict()
        assert ex["winner_total"] == np.float32(by_key[w_key].total)
        if cross:
            assert (w_key[1], l_key[1]) == (0, 1)
            assert ex["prompt"] == b"a sea of bright flowers" and ex["prompt_2"] == b"a sea of grey lifeless flowers"
            assert by_key[w_key].total == max(r.total for k, r in by_key.items() if k[:2] == (pid, 0))
            assert by_key[l_key].total == max(r.total for k, r in by_key.items() if k[:2] == (pid, 1))
        else:
            totals = [r.total for k, r in by_key.items() if k[0] == pid]
            assert by_key[w_key].total == max(totals) and by_key[l_key].total == min(totals)
            assert ex["prompt_2"] == b""
        for side, key in (("winner", w_key), ("loser", l_key)):
            stem = f"{key[0]}_{key[1]}_{key[2]}"
            original = np.load(cand / "latents" / f"{stem}.npy")
            shape = tuple(ex["latent_shape"])
            assert shape == original.shape
            back = np.frombuffer(ex[f"{side}_latent"], dtype=np.float16).reshape(shape)
            assert back.tobytes() == original.astype(np.float16).tobytes()  # bitwise
            assert ex[f"{side}_png"] == (cand / "images" / f"{stem}.png").read_bytes()

    # Stored rows read back for re-pairing keep their per-question answers.
    assert stage.load_scores(scores_path, summary["scorers"], summary["weights"]) == rows

    # A finished shard is skipped on a re-run.
    again = stage.run(_config(scorer_models), str(workdir))
    assert again["pairs"] == 3 and "already done" in capsys.readouterr().out


def test_stage_resumes_after_a_crash_mid_scoring(scorer_models, workdir):
    from data_prep.scoring import stage

    config = _config(scorer_models, weights_preset="custom", weights="clip=0.8,aesthetic=0.2", extra="")
    first = stage.run(config, str(workdir))
    scores_path = workdir / "scores" / "scores-00000-of-00001.jsonl"
    lines = scores_path.read_text().splitlines()
    reference = _load_tfds(workdir / "pairs")
    # Simulate a crash: pairs never written, the scores file ends in a torn line.
    shutil.rmtree(workdir / "pairs")
    scores_path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    resumed = stage.run(config, str(workdir))
    assert resumed["already_scored"] == 5
    assert resumed["scored"] == first["scored"] - 5
    assert len(scores_path.read_text().splitlines()) == first["scored"]
    after = _load_tfds(workdir / "pairs")
    assert [ex["prompt_id"] for ex in after] == [ex["prompt_id"] for ex in reference]
    for a, b in zip(after, reference):
        assert a["winner_latent"] == b["winner_latent"] and a["loser_latent"] == b["loser_latent"]
        # Different batch composition moves float32 results in the 6th digit, not more.
        assert a["winner_total"] == pytest.approx(b["winner_total"], abs=1e-4)


def test_stage_shards_merge_into_one_dataset(workdir):
    from configs.common import base_config
    from data_prep.scoring import stage

    # scoring.tiny: the stage builds its own tiny scorer models in the work directory.
    config = base_config()
    config.scoring.update(dict(tiny=True, weights_preset="custom", weights="clip=1", device="cpu"))
    config.lock()
    config.shard.count = 2
    config.shard.index = 1
    s1 = stage.run(config, str(workdir))
    assert not s1["complete"] and not (workdir / "pairs" / "dataset_info.json").exists()
    config.shard.index = 0
    s0 = stage.run(config, str(workdir))
    assert s0["complete"] and (workdir / "pairs" / "_DONE.json").is_file()
    assert (workdir / "scores" / "tiny_models" / "clip" / "config.json").is_file()
    examples = _load_tfds(workdir / "pairs")
    # Without VQA, p2 (no questions) is scored too: every prompt gives a pair.
    assert sorted(ex["prompt_id"] for ex in examples) == [b"ie0", b"p0", b"p1", b"p2", b"p3"]
    assert (s0["pairs"], s1["pairs"]) == (3, 2)  # shard i takes sorted ids i::2


def test_stage_with_vila_aesthetic_and_hps_in_the_reward(workdir):
    from agfsync_jax.tf_cpu import tensorflow_cpu_only
    from agfsync_jax.schemas import ScoreRow, read_jsonl
    from configs.common import base_config
    from data_prep.scoring import stage

    config = base_config()
    config.scoring.update(dict(tiny=True, aesthetic="vila", weights_preset="custom",
                               weights="clip=0.4,aesthetic=0.3,hps=0.3", extra="pickscore", device="cpu"))
    summary = stage.run(config, str(workdir))
    assert summary["scorers"] == ["clip", "aesthetic", "pickscore", "hps"] and summary["complete"]
    rows = list(read_jsonl(workdir / "scores" / "scores-00000-of-00001.jsonl", ScoreRow.from_dict))
    assert len(rows) == 6 * NUM_CANDIDATES
    tiny_dir = workdir / "scores" / "tiny_models"
    for r in rows:
        assert set(r.scores) == {"clip", "aesthetic", "pickscore", "hps"}
        assert r.scorers["aesthetic"].startswith("vila:vila:")
        assert r.scorers["hps"].startswith("hps:hps:HPS_v2_tiny.pt:")
        assert 0.0 < r.scores["aesthetic"] < 100.0
        assert r.total == pytest.approx(0.4 * r.scores["clip"] + 0.3 * r.scores["aesthetic"] + 0.3 * r.scores["hps"])
    # The authors' call: the candidate PNG file's own bytes into the signature, x 100.
    tf = tensorflow_cpu_only()
    serve = tf.saved_model.load(str(tiny_dir / "vila")).signatures["serving_default"]
    for r in rows[:4]:
        png = (workdir / "candidates" / "images" / f"{r.prompt_id}_{r.instruction}_{r.candidate}.png").read_bytes()
        expected = 100.0 * float(serve(image_bytes=tf.constant(png))["predictions"].numpy()[0][0])
        assert r.scores["aesthetic"] == pytest.approx(expected, abs=1e-9)


def test_tiny_scorers_fill_hps_and_vila_fields(tmp_path):
    from configs.common import base_config
    from data_prep.scoring.tiny import resolve_scoring_config

    config = base_config()
    config.scoring.tiny = True
    resolved = resolve_scoring_config(config.scoring, tmp_path)  # hps_model's default is not "set"
    root = tmp_path / "scores" / "tiny_models"
    assert resolved.hps_model == f"local-dir:{root / 'hps'}"
    assert resolved.hps_path == str(root / "hps" / "HPS_v2_tiny.pt") and Path(resolved.hps_path).is_file()
    assert (Path(resolved.vila_path) / "saved_model.pb").is_file()
    config.scoring.hps_model = "ViT-L-14"
    with pytest.raises(ValueError, match=r"scoring.tiny or the scorer paths.*hps_model"):
        resolve_scoring_config(config.scoring, tmp_path)


def test_demo_config_keeps_its_reward_and_reports_hps_and_vila():
    from configs import tiny

    scoring = tiny.get_config().scoring
    assert (scoring.weights_preset, scoring.weights, scoring.aesthetic) == ("paper", "", "laion")
    # HPS v2 and VILA are eval metrics of the demo, not part of its training-candidate scoring.
    assert scoring.extra == "" and tiny.get_config().eval.extra_scorers == "hps,vila"


def test_score_stage_is_registered():
    from agfsync_jax import stages

    assert stages.get("score").module == "data_prep.scoring.stage" and stages.get("score").in_pipeline


def test_tiny_scorers_and_explicit_paths_exclude_each_other(tmp_path):
    from configs.common import base_config
    from data_prep.scoring.tiny import resolve_scoring_config

    config = base_config()
    config.scoring.tiny = True
    config.scoring.clip_path = "/models/clip"
    with pytest.raises(ValueError, match=r"scoring.tiny or the scorer paths.*clip_path"):
        resolve_scoring_config(config.scoring, tmp_path)
    assert not (tmp_path / "scores").exists()


def test_stage_refuses_unfinished_sampling(scorer_models, workdir):
    from data_prep.scoring import stage

    (workdir / "candidates" / "_DONE.json").unlink()
    with pytest.raises(FileNotFoundError, match="sampling stage has not finished"):
        stage.run(_config(scorer_models), str(workdir))


def test_manifest_rows_without_images_are_an_error(tmp_path):
    from agfsync_jax.schemas import PromptRecord, SchemaError
    from data_prep.scoring.candidates import read_candidates

    records = {"p0": PromptRecord.from_dict(RECORDS[0])}
    row = {"prompt_id": "p0", "candidate": 0, "seed": 1, "noise_sigma": 0.1, "image": "", "latent": "p0/i0-c000.npy",
           "scheduler": "ddim", "steps": 10, "cfg": 7.5}
    (tmp_path / "manifest-00000-of-00001.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SchemaError, match=r"manifest-00000-of-00001.jsonl row 1: candidate has no image"):
        read_candidates(tmp_path, records, {"p0"})


def _without_cross_pairs(workdir: Path) -> None:
    """Drops the InstructEngine record: its cross pair is kept whatever the margin."""
    prompts = workdir / "prompts" / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in prompts.read_text().splitlines() if '"ie0"' not in line))
    for manifest in (workdir / "candidates").glob("manifest-*.jsonl"):
        lines = manifest.read_text().splitlines()
        manifest.write_text("".join(line + "\n" for line in lines if line.endswith("}") and '"ie0"' not in line))


def _clip_only(scorer_models, **scoring):
    return _config(scorer_models, weights_preset="custom", weights="clip=1", extra="", **scoring)


def test_new_weights_re_pair_without_re_scoring(scorer_models, workdir, capsys):
    from data_prep.scoring import stage

    _without_cross_pairs(workdir)
    stage.run(_clip_only(scorer_models), str(workdir))
    scores = (workdir / "scores" / "scores-00000-of-00001.jsonl").read_text()
    before = {ex["prompt_id"]: (ex["winner_candidate"], ex["loser_candidate"]) for ex in _load_tfds(workdir / "pairs")}
    changed = _config(scorer_models, weights_preset="custom", weights="clip=1,aesthetic=50", extra="")
    with pytest.raises(Exception, match="scoring.weights changed|aesthetic"):
        # A newly weighted scorer needs scores that were never computed: that is a re-score.
        stage.run(changed, str(workdir))
    # Pairing settings re-pair from the stored rows, without scoring anything again.
    capsys.readouterr()
    summary = stage.run(_clip_only(scorer_models, store_png=False), str(workdir))
    assert "re-paired: pairing settings changed (scoring.store_png)" in capsys.readouterr().out
    assert summary["scored"] == 0 and summary["complete"] and summary["pairs"] == len(before)
    assert (workdir / "scores" / "scores-00000-of-00001.jsonl").read_text() == scores  # not re-scored
    assert all(ex["winner_png"] == b"" for ex in _load_tfds(workdir / "pairs"))
    weighted = stage.run(_config(scorer_models, weights_preset="custom", weights="clip=1,vqa=0", extra=""),
                         str(workdir))
    assert weighted["scored"] == 0 and weighted["complete"]


def test_a_run_without_a_single_pair_fails_with_the_counts(scorer_models, workdir):
    from agfsync_jax.errors import StageFailedError
    from data_prep.scoring import stage

    _without_cross_pairs(workdir)
    with pytest.raises(StageFailedError, match=r"no pair survived .*prompts below_margin: \d+"):
        stage.run(_clip_only(scorer_models, min_margin=1e9), str(workdir))
    assert not (workdir / "pairs" / "_DONE.json").exists()


def test_skipped_candidates_are_scored_once_readable_and_the_shard_re_paired(scorer_models, workdir, capsys):
    from data_prep.scoring import stage

    latent = workdir / "candidates" / "latents" / "p1_0_0.npy"
    good = latent.read_bytes()
    latent.write_bytes(b"damaged")
    first = stage.run(_clip_only(scorer_models), str(workdir))
    assert first["bad_candidates"]["corrupt_latent"] == [str(latent)]
    assert stage.run(_clip_only(scorer_models), str(workdir))["scored"] == 0  # still damaged: nothing to do
    latent.write_bytes(good)  # what `sample` does: it regenerates damaged candidates
    capsys.readouterr()
    second = stage.run(_clip_only(scorer_models), str(workdir))
    assert second["scored"] == 1 and not second["bad_candidates"].get("corrupt_latent")
    out = capsys.readouterr().out
    assert "1 candidate(s) skipped earlier now scored" in out and "re-paired" in out


def test_a_truncated_pair_shard_is_rebuilt(scorer_models, workdir, capsys):
    from data_prep.scoring import stage

    stage.run(_clip_only(scorer_models), str(workdir))
    shard = next((workdir / "pairs").glob("agfsync_pairs-train.tfrecord-*"))
    reference = shard.read_bytes()
    shard.write_bytes(reference[:-7])
    summary = stage.run(_clip_only(scorer_models), str(workdir))
    assert "re-paired: pair shard" in capsys.readouterr().out and summary["complete"]
    assert shard.read_bytes() == reference


def test_changed_scorer_settings_stop_with_the_fields_named(scorer_models, workdir):
    from agfsync_jax.errors import StageChangedError
    from data_prep.scoring import stage

    stage.run(_clip_only(scorer_models), str(workdir))
    other = _clip_only(scorer_models)
    other.scoring.vqa_prompt = "Q: {question} A:"
    with pytest.raises(StageChangedError, match=r"scoring.vqa_prompt changed\); `agfsync-jax clean score"):
        stage.run(other, str(workdir))


def test_no_surviving_pair_fails_with_counts_and_leaves_nothing_done(workdir):
    from configs.common import base_config
    from data_prep.scoring import stage

    config = base_config()
    config.scoring.update(dict(tiny=True, weights_preset="custom", weights="clip=1", device="cpu",
                               min_margin=1e9))  # no AGFSync pair can clear this margin
    for c in range(NUM_CANDIDATES):  # and the cross pair loses its second instruction
        (workdir / "candidates" / "latents" / f"ie0_1_{c}.npy").unlink()
    from agfsync_jax.errors import StageFailedError

    with pytest.raises(StageFailedError) as e:
        stage.run(config, str(workdir))
    msg = str(e.value)
    assert "no pair survived" in msg
    assert "prompts below_margin: 4" in msg and "prompts missing_instruction_candidates: 1" in msg
    assert "candidates missing_latent: 3" in msg and "scoring.min_margin" in msg
    assert not (workdir / "pairs" / "_DONE.json").exists()

    # Not a failure that sticks: with a margin that pairs can clear, the same workdir finishes,
    # from the scores already stored.
    config.scoring.min_margin = 0.0
    summary = stage.run(config, str(workdir))
    assert summary["pairs"] == 4 and summary["scored"] == 0 and summary["complete"]
