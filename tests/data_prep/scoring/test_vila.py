"""VILA scorer on SavedModels written here with VILA's serving signature.

The test model decodes the image bytes and returns the mean brightness in [0, 1], so the
expected score, 100 x the mean of the pixels / 255, is computed here with numpy alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.scoring.scorer import ScoringItem


def _tf():
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    return tensorflow_cpu_only()


def _save(folder: Path, input_name: str = "image_bytes", output_name: str = "predictions",
          signature_name: str = "serving_default", input_dtype: str = "string") -> Path:
    """A SavedModel computing mean brightness, with the given signature names."""
    tf = _tf()
    dtype = tf.string if input_dtype == "string" else tf.float32

    class Brightness(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], dtype, name=input_name)])
        def serve(self, x):
            if dtype == tf.string:
                image = tf.io.decode_image(x, channels=3, expand_animations=False)
                value = tf.reduce_mean(tf.cast(image, tf.float32)) / 255.0
            else:
                value = x
            return {output_name: tf.reshape(value, [1, 1])}

    module = Brightness()
    tf.saved_model.save(module, str(folder), signatures={signature_name: module.serve})
    return folder


@pytest.fixture(scope="module")
def brightness_model(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("vila") / "brightness")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    shapes = [(32, 32), (24, 40), (17, 9)]
    images = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    images.append(Image.fromarray(np.full((8, 8, 3), 255, np.uint8)))  # white: 100
    images.append(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))  # black: 0
    images.append(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L"))  # grey -> RGB
    return images


def test_vila_score_is_100_x_predictions(brightness_model):
    from data_prep.scoring.vila import VilaScorer

    scorer = VilaScorer(brightness_model)
    assert scorer.name == "aesthetic"
    images = _images()
    got = scorer.score([ScoringItem(im, "any prompt") for im in images])
    expected = [100.0 * np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0 for im in images]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got[3] == pytest.approx(100.0) and got[4] == pytest.approx(0.0)
    np.testing.assert_allclose(scorer.predictions(images), got / 100.0, atol=1e-12)
    assert scorer.score([]).shape == (0,)


def test_vila_version_follows_the_model_files(brightness_model, tmp_path):
    from data_prep.scoring.vila import VilaScorer

    version = VilaScorer(brightness_model).version
    assert version.startswith("vila:brightness:")
    other = _save(tmp_path / "brightness", output_name="predictions")  # same name, rebuilt
    variables = other / "variables"
    (variables / "note.txt").write_text("changed")  # any change to the folder's bytes
    assert VilaScorer(other).version != version


def test_vila_bad_folders_and_signatures_are_named(tmp_path):
    from data_prep.scoring.vila import VilaScorer

    with pytest.raises(FileNotFoundError, match=r"scoring.vila_path: .*nowhere is not a directory"):
        VilaScorer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "vila.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"empty holds no saved_model.pb \(found \['vila.tar.gz'\]\)"):
        VilaScorer(empty)
    bad = _save(tmp_path / "bad_input", input_name="image")
    with pytest.raises(ValueError, match=r"bad_input: .*exactly one input 'image_bytes'.*found inputs \{'image'"):
        VilaScorer(bad)
    bad = _save(tmp_path / "bad_output", output_name="score")
    with pytest.raises(ValueError, match=r"bad_output: .*no output 'predictions'; found outputs \['score'\]"):
        VilaScorer(bad)
    bad = _save(tmp_path / "bad_signature", signature_name="predict")
    with pytest.raises(ValueError, match=r"bad_signature: .*no 'serving_default' signature \(found \['predict'\]\)"):
        VilaScorer(bad)
    bad = _save(tmp_path / "bad_dtype", input_dtype="float")
    with pytest.raises(ValueError, match=r"bad_dtype: input 'image_bytes' must be a scalar string.*float32"):
        VilaScorer(bad)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "saved_model.pb").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"corrupt is not a loadable SavedModel"):
        VilaScorer(tmp_path / "corrupt")


def test_tensorflow_sees_no_gpu_in_the_scoring_process(brightness_model):
    from data_prep.scoring.vila import VilaScorer

    VilaScorer(brightness_model)
    tf = _tf()
    assert tf.config.get_visible_devices("GPU") == []
    assert {d.device_type for d in tf.config.get_visible_devices()} == {"CPU"}


def test_aesthetic_selects_vila_or_laion(brightness_model, tmp_path):
    from configs.common import base_config
    from data_prep.scoring import factory
    from data_prep.scoring.vila import VilaScorer

    scoring = base_config().scoring
    assert scoring.aesthetic == "vila"  # the paper's (and the authors' code's) aesthetic scorer
    scoring.device = "cpu"
    with pytest.raises(ValueError, match=r"scoring.vila_path is empty.*scoring.aesthetic='laion'"):
        factory.build_scorer("aesthetic", scoring)
    scoring.vila_path = str(brightness_model)
    aesthetic = factory.build_scorer("aesthetic", scoring)
    assert isinstance(aesthetic, VilaScorer) and aesthetic.name == "aesthetic"
    extra = factory.build_scorer("vila", scoring)
    assert isinstance(extra, VilaScorer) and extra.name == "vila"
    with pytest.raises(ValueError, match=r"scoring.aesthetic is already 'vila'"):
        factory.build_scorers(["aesthetic", "vila"], scoring)
    scoring.aesthetic = "laion"
    with pytest.raises(ValueError, match=r"scorer 'aesthetic' is needed but scoring.aesthetic_clip_path is empty"):
        factory.build_scorer("aesthetic", scoring)
    scoring.aesthetic = "nima"
    with pytest.raises(ValueError, match=r"scoring.aesthetic is 'nima'; expected one of \('vila', 'laion'\)"):
        factory.build_scorer("aesthetic", scoring)
    assert factory.parse_extra("vila, hps") == ["vila", "hps"]


def test_tiny_vila_depends_on_the_image(tmp_path):
    from data_prep.scoring import tiny
    from data_prep.scoring.vila import VilaScorer

    scorer = VilaScorer(tiny.save_tiny_vila(tmp_path / "vila", seed=6), name="vila")
    images = _images()
    scores = scorer.score([ScoringItem(im, "") for im in images])
    assert np.all((scores > 0) & (scores < 100)) and np.ptp(scores) > 1.0, scores
    rebuilt = VilaScorer(tiny.save_tiny_vila(tmp_path / "vila2", seed=6))
    np.testing.assert_array_equal(rebuilt.score([ScoringItem(im, "") for im in images]), scores)
