"""The embedded default prompt source: seeded compositional prompts with exact yes-questions.

No LLM and no network: each category draws scenes (objects, attributes, colours, counts,
materials, spatial relations, settings, styles) from data/offline_vocab.json and renders them
with `scene_grammar`, so every question is derived from the prompt's own structure.

Prompt i of a category depends only on (seed, category, i): shards, re-runs and different
`per_category` values agree on every prompt they share.
"""

from __future__ import annotations

import random

from agfsync_jax.schemas import KIND_PROMPT, PromptRecord
from data_prep.prompts.categories import category_slug
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.scene_grammar import Vocabulary, render, sample_scene

SOURCE = "offline"
# Candidates drawn per wanted prompt before giving up on a category: near-duplicates are rare
# in this grammar, so hitting the cap means the vocabulary is far too small for per_category.
_MAX_DRAWS_PER_PROMPT = 4


def prompt_record(vocab: Vocabulary, category: str, index: int, seed: int) -> PromptRecord:
    """Candidate `index` of `category`: half short, half elaborate prompts."""
    rng = random.Random(f"offline/{seed}/{category}/{index}")
    scene = sample_scene(vocab.pools[category], vocab, rng, elaborate=rng.random() < 0.5)
    text, questions = render(scene, vocab.counts)
    return PromptRecord(id=f"{category_slug(category)}-{index:05d}", category=category,
                        prompt=text, source=SOURCE, questions=tuple(questions), kind=KIND_PROMPT)


def category_prompts(vocab: Vocabulary, category: str, count: int, seed: int,
                     dedup: NearDuplicateFilter) -> tuple[list[PromptRecord], int]:
    """`count` near-duplicate-free records of `category` and how many candidates were dropped.

    Candidates are drawn in index order and filtered in batches; the ids keep the candidate
    index, so a dropped candidate leaves a gap rather than renumbering later prompts.
    """
    if category not in vocab.pools:
        raise ValueError(f"category {category!r} has no entry in the offline vocabulary")
    records: list[PromptRecord] = []
    next_index = 0
    while len(records) < count:
        if next_index >= _MAX_DRAWS_PER_PROMPT * count:
            raise RuntimeError(
                f"offline generator: only {len(records)} distinct prompts for {category!r} after "
                f"{next_index} draws (wanted {count}); enlarge its vocabulary or lower "
                f"config.prompts.per_category")
        batch = [prompt_record(vocab, category, i, seed)
                 for i in range(next_index, next_index + count - len(records))]
        next_index += len(batch)
        pool = records + batch
        records = [pool[i] for i in dedup.keep([r.prompt for r in pool])]
    return records, next_index - len(records)
