import collections
import re

import pytest

from agfsync_jax.schemas import DIVERGENCES, KIND_INSTRUCTION_PAIR, PromptRecord
from data_prep.prompts.instruct_engine import (load_taxonomy, offline_pair, pair_request,
                                               parse_pair)
from data_prep.prompts.json_output import JSONOutputError
from data_prep.prompts.scene_grammar import load_vocabulary


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


@pytest.fixture(scope="module")
def subtopics(vocab):
    return load_taxonomy(vocab)


def test_taxonomy_has_themes_with_subtopics(subtopics):
    themes = collections.Counter(s.theme for s in subtopics)
    assert len(themes) >= 6 and all(n >= 2 for n in themes.values())
    assert all(s.entities for s in subtopics)


def test_offline_pairs_diverge_as_their_type_says(subtopics, vocab):
    appealing = [a.phrase for a in vocab.appealing]
    unappealing = [a.phrase for a in vocab.unappealing]
    counterfactual = [c.phrase for c in vocab.counterfactuals]
    seen = collections.Counter()
    for k in range(60):
        record, q1, q2 = offline_pair(subtopics, vocab, k, seed=0)
        seen[record.divergence] += 1
        assert record.kind == KIND_INSTRUCTION_PAIR and record.id == f"instruct-{k:05d}"
        assert record.theme and record.subtopic and record.category == record.theme
        assert record.prompt != record.prompt_2
        for text, questions in ((record.prompt, q1), (record.prompt_2, q2)):
            assert len(questions) >= 5
            for q in questions:
                assert q.element.lower() in text.lower(), (text, q)
        if record.divergence == "aesthetic":
            head1, tail1 = record.prompt.split(", with ")
            head2, tail2 = record.prompt_2.split(", with ")
            assert head1 == head2  # same content
            assert any(p in tail1 for p in appealing) and any(p in tail2 for p in unappealing)
        elif record.divergence == "counterfactual":
            assert not any(p in record.prompt for p in counterfactual)
            assert any(p in record.prompt_2 for p in counterfactual)
        else:
            assert ", with " not in record.prompt_2
            assert not any(p in record.prompt_2 for p in counterfactual)
        full = PromptRecord.from_dict(
            {**record.to_dict(), "questions": [q.to_dict() for q in q1],
             "questions_2": [q.to_dict() for q in q2]})
        assert full.instructions == (record.prompt, record.prompt_2)
    assert set(seen) == set(DIVERGENCES) and max(seen.values()) - min(seen.values()) <= 1


def test_offline_pairs_are_seeded(subtopics, vocab):
    assert offline_pair(subtopics, vocab, 7, seed=1) == offline_pair(subtopics, vocab, 7, seed=1)
    differ = sum(offline_pair(subtopics, vocab, k, 1)[0].prompt
                 != offline_pair(subtopics, vocab, k, 2)[0].prompt for k in range(12))
    assert differ >= 8


def test_llm_pair_request_and_parsing():
    req = pair_request("animals", "grassland grazers and hunters", "zebra", "counterfactual", 0.9, 256)
    user = req.messages[-1][1]
    assert "zebra" in user and "grassland grazers and hunters" in user and "impossible" in user
    assert parse_pair('```json\n{"instruction_1": "A zebra.", "instruction_2": "A glass zebra."}'
                      '\n```') == ("A zebra.", "A glass zebra.")
    for bad in ('{"instruction_1": "same", "instruction_2": "same"}', '{"instruction_1": "x"}',
                '["A zebra.", "A glass zebra."]'):
        with pytest.raises(JSONOutputError):
            parse_pair(bad)
    assert re.search(r"content_consistency|counterfactual|aesthetic", user) is None
