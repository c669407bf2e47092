"""The offline generator: grounded questions for every category, reproducible per seed."""

import collections
import re

import pytest

from agfsync_jax.schemas import CATEGORIES, ELEMENT_TYPES, PromptRecord
from data_prep.prompts.categories import category_slug
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.offline_generator import category_prompts, prompt_record
from data_prep.prompts.scene_grammar import load_vocabulary

PER_CATEGORY = 30


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


@pytest.fixture(scope="module")
def generated(vocab):
    dedup = NearDuplicateFilter(0.9)
    return {c: category_prompts(vocab, c, PER_CATEGORY, seed=0, dedup=dedup)[0] for c in CATEGORIES}


def _occurs(words: str, text: str) -> bool:
    pattern = rf"(?<![a-z0-9]){re.escape(words.lower())}(?![a-z0-9])"
    return re.search(pattern, text.lower()) is not None


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_question_refers_to_an_element_of_its_prompt(generated, category):
    records = generated[category]
    assert len(records) == PER_CATEGORY
    for r in records:
        assert r.category == category and r.source == "offline"
        assert re.fullmatch(rf"{category_slug(category)}-\d{{5}}", r.id)
        assert len(r.questions) >= 5
        assert len({q.question for q in r.questions}) == len(r.questions)
        for q in r.questions:
            assert q.answer == "yes" and q.element_type in ELEMENT_TYPES
            assert q.element and _occurs(q.element, r.prompt), (r.prompt, q)
            assert _occurs(q.element, q.question), q  # the question asks about that element
        PromptRecord.from_dict(r.to_dict())  # schema-valid


def test_mix_of_short_and_elaborate_prompts_and_element_types(generated):
    records = [r for rs in generated.values() for r in rs]
    lengths = [len(r.prompt.split()) for r in records]
    assert min(lengths) <= 10 and max(lengths) >= 22
    types = collections.Counter(q.element_type for r in records for q in r.questions)
    for t in ("object", "animal/human", "counting", "color", "material", "spatial", "location",
              "activity", "attribute", "shape", "other", "food"):
        assert types[t] > 0, t


def test_same_seed_same_prompts_other_seed_different(vocab):
    a = [prompt_record(vocab, "animals", i, seed=3) for i in range(20)]
    b = [prompt_record(vocab, "animals", i, seed=3) for i in range(20)]
    c = [prompt_record(vocab, "animals", i, seed=4) for i in range(20)]
    assert a == b
    assert sum(x.prompt != y.prompt for x, y in zip(a, c)) >= 15


def test_prompt_i_does_not_depend_on_how_many_are_made(vocab):
    dedup = NearDuplicateFilter(0.9)
    few, _ = category_prompts(vocab, "plants", 5, seed=0, dedup=dedup)
    many, _ = category_prompts(vocab, "plants", 25, seed=0, dedup=dedup)
    assert few == many[:5]


def test_ids_are_unique_across_categories(generated):
    ids = [r.id for rs in generated.values() for r in rs]
    assert len(ids) == len(set(ids))


def test_near_duplicates_are_replaced_not_kept(vocab):
    # With a strict threshold some candidates collide; the category is still filled with
    # distinct prompts and the drops are reported.
    dedup = NearDuplicateFilter(0.35)
    records, dropped = category_prompts(vocab, "animals", 30, seed=0, dedup=dedup)
    assert len(records) == 30 and dropped > 0
    assert dedup.keep([r.prompt for r in records]) == list(range(30))
    assert max(int(r.id.rsplit("-", 1)[1]) for r in records) == 30 + dropped - 1


def test_an_exhausted_vocabulary_is_an_error(vocab):
    with pytest.raises(RuntimeError, match="per_category"):
        category_prompts(vocab, "animals", 30, seed=0, dedup=NearDuplicateFilter(0.05))
