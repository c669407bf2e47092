"""The 12 AGFSync categories and our in-context examples for each (data/category_examples.json)."""

from __future__ import annotations

import json
import re
from importlib import resources

from agfsync_jax.schemas import CATEGORIES

EXAMPLES_PER_CATEGORY = 5
_EXAMPLES_FILE = "category_examples.json"


def category_slug(category: str) -> str:
    """'food and beverages' -> 'food-and-beverages': the prefix of record ids."""
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")
    if not slug:
        raise ValueError(f"category {category!r} has no letters or digits for an id")
    return slug


def load_category_examples() -> dict[str, list[str]]:
    """category -> its 5 in-context examples; checks the file covers exactly CATEGORIES."""
    source = resources.files("data_prep.prompts").joinpath("data", _EXAMPLES_FILE)
    data = json.loads(source.read_text(encoding="utf-8"))
    examples = {k: v for k, v in data.items() if not k.startswith("_")}
    if set(examples) != set(CATEGORIES):
        raise ValueError(f"{_EXAMPLES_FILE}: categories {sorted(set(examples) ^ set(CATEGORIES))} "
                         f"are missing or unknown")
    for category, items in examples.items():
        if (len(items) != EXAMPLES_PER_CATEGORY
                or not all(isinstance(x, str) and x.strip() for x in items)):
            raise ValueError(f"{_EXAMPLES_FILE}: category {category!r} needs "
                             f"{EXAMPLES_PER_CATEGORY} non-empty strings")
    return {c: examples[c] for c in CATEGORIES}
