from agfsync_jax.schemas import CATEGORIES
from data_prep.prompts.categories import category_slug, load_category_examples


def test_five_examples_for_each_of_the_twelve_categories():
    examples = load_category_examples()
    assert list(examples) == list(CATEGORIES) and len(examples) == 12
    for items in examples.values():
        assert len(items) == 5 and len(set(items)) == 5
        lengths = sorted(len(x.split()) for x in items)
        assert lengths[0] <= 10 and lengths[-1] >= 18  # short and elaborate ones
    flat = [x for items in examples.values() for x in items]
    assert len(set(flat)) == len(flat)


def test_slugs_are_unique_and_id_safe():
    slugs = [category_slug(c) for c in CATEGORIES]
    assert len(set(slugs)) == 12
    assert category_slug("food and beverages") == "food-and-beverages"
