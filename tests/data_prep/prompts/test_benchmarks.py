"""Benchmark loaders on small fixtures in the real formats, and errors naming file:line."""

import json
import re
from pathlib import Path

import pytest

from agfsync_jax.schemas import PromptRecord
from data_prep.prompts.benchmarks import BenchmarkFormatError, load_benchmark


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def tifa_row(rid, caption, question, answer="yes", choices=("yes", "no"), etype="object",
             element="kite"):
    return {"id": rid, "caption": caption, "question": question, "choices": list(choices),
            "answer": answer, "element_type": etype, "element": element, "coco_val_id": "1"}


KITE = "Two kites above a green hill."
ROWS = [tifa_row("coco_11", KITE, "are there kites?", element="kites"),
        tifa_row("coco_11", KITE, "how many kites are there?", answer="2",
                 choices=("1", "2", "3", "4"), etype="counting", element="two"),
        tifa_row("paintskill_7", "A blue teapot.", "is the teapot blue?", etype="color",
                 element="blue")]


def expect_error(path, line, fmt):
    with pytest.raises(BenchmarkFormatError, match=rf"^{re.escape(str(path))}:{line}: "):
        load_benchmark(fmt, path)


def assert_valid(records):
    for r in records:
        assert PromptRecord.from_dict(r.to_dict()) == r


def test_tifa_questions(tmp_path):
    path = write(tmp_path / "qa.json", json.dumps(ROWS, indent=4))
    records = load_benchmark("tifa_questions", path)
    assert [(r.id, r.category, r.prompt, len(r.questions)) for r in records] == [
        ("coco_11", "coco", KITE, 2), ("paintskill_7", "paintskill", "A blue teapot.", 1)]
    mc = records[0].questions[1]
    assert (mc.answer, mc.choices, mc.element_type, mc.is_yes_no) == ("2", ("1", "2", "3", "4"),
                                                                       "counting", False)
    assert_valid(records)


def test_tifa_questions_errors_name_the_line(tmp_path):
    bad_type = ROWS[:2] + [dict(ROWS[2], element_type="vibe")]
    path = write(tmp_path / "qa.json", json.dumps(bad_type, indent=4))
    # The error names the line where the offending row starts.
    starts = [i + 1 for i, l in enumerate(path.read_text().splitlines()) if l == "    {"]
    expect_error(path, starts[2], "tifa_questions")
    wrong_answer = [ROWS[0], dict(ROWS[1], answer="7")]
    path = write(tmp_path / "qa2.json", json.dumps(wrong_answer, indent=4))
    starts = [i + 1 for i, l in enumerate(path.read_text().splitlines()) if l == "    {"]
    expect_error(path, starts[1], "tifa_questions")
    other_caption = [ROWS[0], dict(ROWS[1], caption="Something else.")]
    one_per_line = "[\n" + ",\n".join(json.dumps(r) for r in other_caption) + "\n]"
    path = write(tmp_path / "qa3.json", one_per_line)
    expect_error(path, 3, "tifa_questions")
    path = write(tmp_path / "qa4.json", "[\n" + json.dumps(ROWS[0]) + ',\n{"id": "b", oops}\n]')
    expect_error(path, 3, "tifa_questions")  # invalid JSON: the decoder's line


def test_tifa_text(tmp_path):
    items = [{"id": "coco_5", "caption": "A man on a bike.", "coco_val_id": "9"},
             {"id": "drawbench_3", "caption": "A cube on a sphere."}]
    path = write(tmp_path / "text.json", json.dumps(items, indent=4))
    records = load_benchmark("tifa_text", path)
    assert [(r.id, r.category, r.prompt, r.questions) for r in records] == [
        ("coco_5", "coco", "A man on a bike.", ()),
        ("drawbench_3", "drawbench", "A cube on a sphere.", ())]
    path = write(tmp_path / "bad.json",
                 '[\n  {"id": "coco_5", "caption": "ok"},\n  {"id": "coco_6"}\n]')
    expect_error(path, 3, "tifa_text")
    path = write(tmp_path / "dup.json",
                 '[\n{"id": "x_1", "caption": "a"},\n{"id": "x_1", "caption": "b"}\n]')
    expect_error(path, 3, "tifa_text")
    path = write(tmp_path / "trail.json", '[{"id": "x_1", "caption": "a"}]\n\ngarbage\n')
    expect_error(path, 3, "tifa_text")


def test_drawbench(tmp_path):
    path = write(tmp_path / "db.csv", 'Prompts,Category\nA green bus.,Colors\n'
                 '"Two cups, one red and one blue.",Counting\nA purple apple.,Colors')
    records = load_benchmark("drawbench", path)
    assert [(r.id, r.category, r.prompt) for r in records] == [
        ("drawbench-0000", "Colors", "A green bus."),
        ("drawbench-0001", "Counting", "Two cups, one red and one blue."),
        ("drawbench-0002", "Colors", "A purple apple.")]
    assert_valid(records)
    path = write(tmp_path / "bad.csv", 'Prompts,Category\nA green bus.,Colors\n'
                 '"A quoted\nprompt over two lines",Text\nA cat, a dog,Counting\n')
    expect_error(path, 5, "drawbench")
    path = write(tmp_path / "empty_cat.csv", 'Prompts,Category\nA green bus.,\n')
    expect_error(path, 2, "drawbench")
    path = write(tmp_path / "header.csv", 'Prompt,Category\nA green bus.,Colors\n')
    expect_error(path, 1, "drawbench")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"Prompts,Category\nA green bus.,Colors\nA caf\xe9.,Text\n")
    expect_error(latin, 3, "drawbench")


def test_partiprompts(tmp_path):
    path = write(tmp_path / "p.tsv", "Prompt\tCategory\tChallenge\tNote\n"
                 "tree\tOutdoor Scenes\tBasic\t\n"
                 'A sign that says "Hi" on a wall\tArts\tWriting & Symbols\tQuote inside\n')
    records = load_benchmark("partiprompts", path)
    assert [(r.id, r.category, r.prompt) for r in records] == [
        ("parti-0000", "Outdoor Scenes", "tree"),
        ("parti-0001", "Arts", 'A sign that says "Hi" on a wall')]
    assert_valid(records)
    path = write(tmp_path / "bad.tsv", "Prompt\tCategory\tChallenge\tNote\n"
                 "tree\tOutdoor Scenes\tBasic\t\nno tabs in this line\n")
    expect_error(path, 3, "partiprompts")


def test_hpsv2_folder_and_file(tmp_path):
    folder = tmp_path / "hps"
    folder.mkdir()
    write(folder / "anime.json", json.dumps(["A girl with a red umbrella.", "A mech in rain."]))
    write(folder / "photo.json", json.dumps(["A dog on a beach."], indent=2))
    records = load_benchmark("hpsv2", folder)
    assert [(r.id, r.category, r.prompt) for r in records] == [
        ("hpsv2-anime-0000", "anime", "A girl with a red umbrella."),
        ("hpsv2-anime-0001", "anime", "A mech in rain."),
        ("hpsv2-photo-0000", "photo", "A dog on a beach.")]
    assert [r.id for r in load_benchmark("hpsv2", folder / "photo.json")] == ["hpsv2-photo-0000"]
    assert_valid(records)
    bad = write(tmp_path / "paintings.json", '[\n  "A ship.",\n  42,\n  "A lake."\n]')
    expect_error(bad, 3, "hpsv2")
    not_list = write(tmp_path / "concept-art.json", '\n{"prompts": []}')
    expect_error(not_list, 2, "hpsv2")


def test_plain_text(tmp_path):
    path = write(tmp_path / "mine.txt", "A red kite.\n\n  A small boat at dawn.  \r\nLast line")
    records = load_benchmark("text", path)
    assert [(r.id, r.category, r.prompt) for r in records] == [
        ("mine-00000", "mine", "A red kite."), ("mine-00001", "mine", "A small boat at dawn."),
        ("mine-00002", "mine", "Last line")]
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"A red kite.\nA boat\x00\x01 here\n")
    expect_error(bad, 2, "text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    expect_error(latin, 2, "text")


def test_unknown_format_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="format"):
        load_benchmark("coco", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_benchmark("text", tmp_path / "missing.txt")
    with pytest.raises(BenchmarkFormatError, match="no prompts"):
        load_benchmark("text", write(tmp_path / "blank.txt", "\n\n"))


# --- generic layouts: jsonl and text_dir; text refuses JSON lines; BOM and CRLF everywhere ---

def test_jsonl_with_default_and_custom_keys(tmp_path):
    lines = [{"prompt": "A red kite.", "category": "objects"},
             {"prompt": "Two cats on a sofa.", "category": "animals", "extra": 1}]
    path = write(tmp_path / "mine.jsonl", "\n".join(json.dumps(d) for d in lines) + "\n\n")
    records = load_benchmark("jsonl", path)
    assert [(r.id, r.category, r.prompt, r.source) for r in records] == [
        ("mine-00000", "objects", "A red kite.", "jsonl"), ("mine-00001", "animals", "Two cats on a sofa.", "jsonl")]
    assert_valid(records)

    custom = [{"text": "A blue teapot.", "qs": ["is there a teapot?",
                                                {"question": "what color is it?", "answer": "blue",
                                                 "choices": ["red", "blue"], "element_type": "color"}]}]
    path = write(tmp_path / "hpd.jsonl", json.dumps(custom[0]) + "\n")
    (record,) = load_benchmark("jsonl", path, prompt_key="text", category_key="", questions_key="qs")
    assert (record.category, record.prompt) == ("hpd", "A blue teapot.")  # category: the file name
    assert [(q.question, q.answer, q.is_yes_no) for q in record.questions] == [
        ("is there a teapot?", "yes", True), ("what color is it?", "blue", False)]
    assert_valid([record])


def test_jsonl_errors_name_the_line_and_the_key(tmp_path):
    ok = json.dumps({"prompt": "A red kite.", "category": "objects"})
    path = write(tmp_path / "a.jsonl", ok + "\n" + '{"prompt": "x", oops}\n')
    expect_error(path, 2, "jsonl")
    path = write(tmp_path / "b.jsonl", ok + "\n\n" + json.dumps({"caption": "A boat."}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"b.jsonl:3: no field 'prompt' \(prompts.benchmark.prompt_key\)"
                                                   r".*\['caption'\]"):
        load_benchmark("jsonl", path)
    path = write(tmp_path / "c.jsonl", ok + "\n" + json.dumps(["A list."]) + "\n")
    expect_error(path, 2, "jsonl")
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "A kite.", "category": "x",
                                                   "qs": [{"question": "q?", "answer": "maybe"}]}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"d.jsonl:1: qs\[0\]: answer 'maybe'"):
        load_benchmark("jsonl", path, questions_key="qs")


def test_text_dir_takes_categories_from_file_names(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder / "animals.txt", "A cat.\nTwo dogs.\n")
    (folder / "objects.txt").write_bytes(b"\xef\xbb\xbfA red kite.\r\n\r\nA lamp.\r\n")  # BOM + CRLF
    write(folder / "README.md", "not prompts")
    records = load_benchmark("text_dir", folder)
    assert [(r.id, r.category, r.prompt) for r in records] == [
        ("animals-00000", "animals", "A cat."), ("animals-00001", "animals", "Two dogs."),
        ("objects-00000", "objects", "A red kite."), ("objects-00001", "objects", "A lamp.")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkFormatError, match="no \\*.txt files"):
        load_benchmark("text_dir", empty)


def test_text_refuses_json_lines_naming_the_line(tmp_path):
    path = write(tmp_path / "p.txt", "A red kite.\n" + json.dumps({"prompt": "A boat.", "category": "x"}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"p.txt:2: this line is a JSON object.*format jsonl"):
        load_benchmark("text", path)
    # Braces that are not a JSON object are prompt text.
    ok = write(tmp_path / "ok.txt", "{curly} braces in a prompt\n[1, 2] is a list\n")
    assert [r.prompt for r in load_benchmark("text", ok)] == ["{curly} braces in a prompt", "[1, 2] is a list"]


SAMPLES = {
    "drawbench": ("db.csv", 'Prompts,Category\nA green bus.,Colors\n"Two cups, one red.",Counting\n'),
    "partiprompts": ("p.tsv", "Prompt\tCategory\tChallenge\tNote\ntree\tOutdoor Scenes\tBasic\t\n"),
    "tifa_questions": ("qa.json", json.dumps(ROWS, indent=2)),
    "tifa_text": ("t.json", json.dumps([{"id": "coco_5", "caption": "A man on a bike."}], indent=2)),
    "hpsv2": ("anime.json", json.dumps(["A girl.", "A mech."], indent=2)),
    "text": ("mine.txt", "A red kite.\nA boat.\n"),
    "jsonl": ("mine.jsonl", '{"prompt": "A kite.", "category": "objects"}\n{"prompt": "A cat.", "category": "a"}\n'),
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_bom_and_crlf_are_accepted_by_every_format(tmp_path, fmt):
    name, text = SAMPLES[fmt]
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    plain = write(tmp_path / "plain" / name, text)
    bom = tmp_path / "bom" / name
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    expected = load_benchmark(fmt, plain)
    assert load_benchmark(fmt, bom) == expected and expected


REAL = Path("/work/shared/benchmarks")


@pytest.mark.parametrize("fmt, name, rows, categories", [
    ("drawbench", "DrawBench.csv", 200, 11),
    ("partiprompts", "PartiPrompts.tsv", 1632, None),
    ("tifa_text", "tifa_v1.0_text_inputs.json", 4081, None),
    ("tifa_questions", "sample_question_answers.json", None, None),
])
def test_real_benchmark_files(fmt, name, rows, categories):
    """The real files, read in place (never copied into the repository), when this machine has them."""
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    records = load_benchmark(fmt, path)
    assert_valid(records)
    if rows is not None:
        assert len(records) == rows
    if categories is not None:
        assert len({r.category for r in records}) == categories
    if fmt == "tifa_questions":
        assert any(not q.is_yes_no for r in records for q in r.questions)  # TIFA's multiple choice
