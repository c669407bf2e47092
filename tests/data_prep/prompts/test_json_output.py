import pytest

from data_prep.prompts.json_output import JSONOutputError, parse_json_output


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('[1, 2]', [1, 2]),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ('```\n[{"q": "x"}]\n```', [{"q": "x"}]),
    ('Here you go:\n{"a": 1}\nHope that helps {really}.', {"a": 1}),
    ('[note] the list: ["x", "y"] done', ["x", "y"]),
    ('Text before ```json\n{"b": 2}\n``` and text after ```{"c": 3}```', {"b": 2}),
])
def test_extracts_the_json_value(text, expected):
    assert parse_json_output(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", '{"a": 1', "```json\n{bad}\n```"])
def test_raises_when_nothing_parses(text):
    with pytest.raises(JSONOutputError, match="no JSON"):
        parse_json_output(text)
