"""The readers of external datasets: JSONL, image folders (HF ImageFolder, MJHQ-30K, captions)
and parquet (Pick-a-Pic bytes columns, HF Image structs); bad input names the file and field."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax.encoding.source_rows import SourceError
from agfsync_jax.encoding.source_spec import SourceSpec
from agfsync_jax.encoding.sources import open_source
from configs import common


def _spec(**overrides) -> SourceSpec:
    encode = common.base_config().encode
    for k, v in overrides.items():
        setattr(encode, k, v)
    return SourceSpec.from_config(encode)


def _png(seed: int, size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_sft_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "a cat", "image": "a.png", "kind": "extra fields are fine"},
                                           "", {"prompt": "  ", "image": "a.png"}, {"image": "a.png"},
                                           {"prompt": "no image"}])
    source = open_source(_spec(format="jsonl", path=str(path)))
    rows = list(source.rows(0, 10))
    assert len(source) == 4 and [r.index for r in rows] == [0, 1, 2, 3]
    assert rows[0].prompt == "a cat" and rows[0].images[0].read() == _png(0) and rows[0].where == f"{path}:1"
    assert rows[1].prompt is None and rows[2].prompt is None  # blank and absent: counted skips later
    assert rows[3].images == (None,) and rows[3].where == f"{path}:5"
    assert [r.index for r in source.rows(1, 3)] == [1, 2]


def test_jsonl_pairs_with_labels_and_ids(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"caption": "x", "jpg_0": "/abs/0.jpg", "jpg_1": "1.jpg", "label_0": 0, "uid": 17},
        {"caption": "y", "jpg_0": "a.jpg", "jpg_1": "b.jpg", "label_0": 0.5, "uid": "u2"}])
    spec = _spec(format="jsonl", path=str(path), prompt_key="caption", image_keys="jpg_0, jpg_1",
                 label_key="label_0", id_key="uid", image_root=str(tmp_path / "imgs"))
    rows = list(open_source(spec).rows(0, 2))
    assert spec.is_pairs and rows[0].label == 0.0 and rows[1].label == 0.5
    assert rows[0].images[0].path == Path("/abs/0.jpg") and rows[0].images[1].path == tmp_path / "imgs" / "1.jpg"
    assert (rows[0].row_id, rows[1].row_id) == ("17", "u2")


@pytest.mark.parametrize("line,match", [
    ("{not json", r"pairs.jsonl:2: not valid JSON"),
    ('["a list"]', r"pairs.jsonl:2: expected a JSON object"),
    ('{"caption": "z", "jpg_0": "a", "jpg_1": "b", "label_0": 2}', r"pairs.jsonl:2: label field 'label_0' is 2"),
    ('{"caption": "z", "jpg_0": "a", "jpg_1": "b"}', r"pairs.jsonl:2: missing label field 'label_0'"),
    ('{"caption": 5, "jpg_0": "a", "jpg_1": "b", "label_0": 1}', r"pairs.jsonl:2: field 'caption' must be a string"),
])
def test_jsonl_bad_lines_name_file_line_and_field(tmp_path, line, match):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"caption": "x", "jpg_0": "a", "jpg_1": "b", "label_0": 1}, line])
    spec = _spec(format="jsonl", path=str(path), prompt_key="caption", image_keys="jpg_0,jpg_1", label_key="label_0")
    with pytest.raises(SourceError, match=match):
        list(open_source(spec).rows(0, 2))


@pytest.mark.parametrize("overrides,match", [
    (dict(format="tfrecord", path="x"), "encode.format='tfrecord'"),
    (dict(path=""), "encode.path is empty"),
    (dict(path="x", image_keys="a,b,c"), "encode.image_keys='a,b,c'"),
    (dict(path="x", label_key="label_0"), "needs two encode.image_keys"),
    (dict(format="folder", path="x", image_keys="a,b"), "folder' holds one image per row"),
    (dict(format="jsonl", path="/nonexistent/x.jsonl"), "JSONL file not found"),
])
def test_bad_settings_are_refused(overrides, match):
    with pytest.raises(SourceError, match=match):
        open_source(_spec(**overrides))


def test_folder_with_caption_files(tmp_path):
    for name in ("b/2.png", "a/1.JPG", "c.webp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(_png(len(name)))
    (tmp_path / "a/1.txt").write_text(" a red fox \n")
    (tmp_path / "b/2.txt").write_text("a blue fox")
    (tmp_path / "notes.md").write_text("not an image")
    source = open_source(_spec(format="folder", path=str(tmp_path)))
    rows = list(source.rows(0, 10))
    assert source.layout == "txt captions"
    assert [(Path(r.where).name, r.prompt) for r in rows] == [("1.JPG", "a red fox"), ("2.png", "a blue fox"),
                                                              ("c.webp", None)]


def test_folder_mjhq_layout(tmp_path):
    """MJHQ-30K: meta_data.json {id: {category, prompt}} and <category>/<id>.jpg."""
    (tmp_path / "animals").mkdir()
    (tmp_path / "animals/abc.jpg").write_bytes(_png(1))
    (tmp_path / "animals/zzz.jpg").write_bytes(_png(2))
    (tmp_path / "meta_data.json").write_text(json.dumps({"abc": {"category": "animals", "prompt": "a lion"}}))
    rows = list(open_source(_spec(format="folder", path=str(tmp_path), category_key="category")).rows(0, 5))
    assert [(r.prompt, r.category) for r in rows] == [("a lion", "animals"), (None, "")]
    assert rows[0].images[0].read() == _png(1)


def test_folder_hf_imagefolder_metadata(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(3))
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "x.png", "text": "a boat"},
                                         {"file_name": "missing.png", "text": "gone"}])
    rows = list(open_source(_spec(format="folder", path=str(tmp_path), prompt_key="text")).rows(0, 5))
    assert [r.prompt for r in rows] == ["a boat", "gone"] and rows[0].images[0].read() == _png(3)
    with pytest.raises(OSError):
        rows[1].images[0].read()  # the stage counts this as an unreadable image


def test_folder_without_prompts_or_with_two_metadata_files_is_refused(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(3))
    with pytest.raises(SourceError, match="1 images but no prompts"):
        open_source(_spec(format="folder", path=str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / "meta_data.json").write_text("{}")
    with pytest.raises(SourceError, match="both metadata.jsonl and meta_data.json"):
        open_source(_spec(format="folder", path=str(tmp_path)))


def test_parquet_pick_a_pic_bytes_and_hf_image_structs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "on_disk.png").write_bytes(_png(9))
    first = pa.table({"caption": ["a", "b", None], "jpg_0": [_png(0), _png(1), _png(2)],
                      "jpg_1": [_png(3), b"", _png(5)], "label_0": [1.0, 0.0, 0.5]})
    pq.write_table(first, tmp_path / "train-00000.parquet", row_group_size=2)
    second = pa.table({"caption": ["c"], "jpg_0": [_png(6)], "jpg_1": [_png(7)], "label_0": [0.0]})
    pq.write_table(second, tmp_path / "train-00001.parquet")
    spec = _spec(format="parquet", path=str(tmp_path), prompt_key="caption", image_keys="jpg_0,jpg_1",
                 label_key="label_0")
    source = open_source(spec)
    rows = list(source.rows(1, 4))
    assert len(source) == 4 and [r.index for r in rows] == [1, 2, 3]
    assert rows[0].images[0].read() == _png(1) and rows[0].images[1] is None  # empty cell
    assert rows[1].prompt is None and rows[1].label == 0.5
    assert rows[2].prompt == "c" and rows[2].images[1].read() == _png(7)
    assert rows[2].where == f"{tmp_path / 'train-00001.parquet'} row 0"

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table({"prompt": ["p", "q"],
                   "image": pa.array([{"bytes": _png(4), "path": None}, {"bytes": None, "path": "on_disk.png"}],
                                     type=image_type)})
    pq.write_table(hf, tmp_path / "hf.parquet")
    rows = list(open_source(_spec(format="parquet", path=str(tmp_path / "hf.parquet"))).rows(0, 2))
    assert rows[0].images[0].read() == _png(4) and rows[1].images[0].read() == _png(9)

    with pytest.raises(SourceError, match=r"no column\(s\) \['label_1'\].*the file has"):
        open_source(_spec(format="parquet", path=str(tmp_path / "hf.parquet"), image_keys="image,label_1"))
