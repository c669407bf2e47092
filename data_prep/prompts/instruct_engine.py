"""InstructEngine data (InstructEngine section 3.1-3.2): contrasting instruction pairs.

A theme -> subtopic -> entity taxonomy (data/instruct_taxonomy.json, ours) supplies the base
instruction; each pair then diverges along one of the three divergences:
  content_consistency  object type, count or attributes differ between the two instructions,
  counterfactual       the second instruction adds something impossible or distorted,
  aesthetic            the same content, described as appealing vs. unappealing.
Pairs come from the LLM or from the offline scene grammar (which also yields exact
yes-questions for both instructions). Pair k depends only on (seed, k).
"""

from __future__ import annotations

import dataclasses
import json
import random
from importlib import resources

from agfsync_jax.schemas import DIVERGENCES, KIND_INSTRUCTION_PAIR, PromptRecord, Question
from data_prep.prompts.chat_backend import ChatRequest
from data_prep.prompts.json_output import JSONOutputError, parse_json_output
from data_prep.prompts.scene_grammar import (Noun, Scene, ScenePool, Vocabulary, parse_pool,
                                             render, sample_scene)

TAXONOMY_FILE = "instruct_taxonomy.json"
SOURCE_OFFLINE = "instruct_offline"
SOURCE_LLM = "instruct_llm"


@dataclasses.dataclass(frozen=True)
class Subtopic:
    theme: str
    name: str
    pool: ScenePool   # the theme's pool with this subtopic's entities as subjects

    @property
    def entities(self) -> tuple[Noun, ...]:
        return self.pool.subjects


def load_taxonomy(vocab: Vocabulary) -> list[Subtopic]:
    """All subtopics of data/instruct_taxonomy.json, in file order; errors name the entry."""
    source = resources.files("data_prep.prompts").joinpath("data", TAXONOMY_FILE)
    data = json.loads(source.read_text(encoding="utf-8"))
    themes = data.get("themes")
    if not isinstance(themes, list) or not themes:
        raise ValueError(f"{TAXONOMY_FILE}: field 'themes' must be a non-empty list")
    subtopics = []
    for t, theme in enumerate(themes):
        where = f"{TAXONOMY_FILE}:themes[{t}]"
        if not isinstance(theme, dict) or not isinstance(theme.get("theme"), str):
            raise ValueError(f"{where}: needs a string field 'theme'")
        entries = theme.get("subtopics")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: field 'subtopics' must be a non-empty list")
        for s, sub in enumerate(entries):
            sub_where = f"{where}.subtopics[{s}]"
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str):
                raise ValueError(f"{sub_where}: needs a string field 'name'")
            pool = parse_pool({**theme, "entities": sub.get("entities")}, sub_where,
                              vocab.colors, vocab.materials, vocab.shapes, subjects_key="entities")
            subtopics.append(Subtopic(theme=theme["theme"], name=sub["name"], pool=pool))
    return subtopics


def pair_plan(subtopics: list[Subtopic], index: int, seed: int
              ) -> tuple[str, Subtopic, Noun, random.Random]:
    """(divergence, subtopic, entity, rng) of pair `index`: divergences cycle evenly."""
    rng = random.Random(f"instruct/{seed}/{index}")
    subtopic = rng.choice(subtopics)
    return DIVERGENCES[index % len(DIVERGENCES)], subtopic, rng.choice(subtopic.entities), rng


def pair_id(index: int) -> str:
    return f"instruct-{index:05d}"


# --- offline pairs ---------------------------------------------------------------------------

def _other(rng: random.Random, options, current):
    choices = [o for o in options if o != current]
    return rng.choice(choices) if choices else None


def _content_variant(base: Scene, pool: ScenePool, vocab: Vocabulary, rng: random.Random) -> Scene:
    """`base` with one or two content slots changed (count, attribute, companion, relation)."""
    edits = {}
    max_count = len(vocab.counts) + 1
    edits["count"] = lambda s: dataclasses.replace(
        s, count=_other(rng, range(1, max_count + 1), s.count))
    if base.modifiers:
        def change_modifier(s: Scene) -> Scene:
            i = rng.randrange(len(s.modifiers))
            new = _other(rng, pool.modifiers(s.modifiers[i].kind), s.modifiers[i])
            mods = list(s.modifiers)
            mods[i] = new if new is not None else mods[i]
            return dataclasses.replace(s, modifiers=tuple(mods))
        if any(len(pool.modifiers(m.kind)) > 1 for m in base.modifiers):
            edits["modifier"] = change_modifier
    if base.garment_color:
        edits["garment_color"] = lambda s: dataclasses.replace(
            s, garment_color=_other(rng, pool.colors, s.garment_color))
    others = [c for c in pool.companions if c != base.companion and c.name != base.subject.name]
    if others:
        edits["companion"] = lambda s: dataclasses.replace(s, companion=rng.choice(others),
                                                           companion_modifier=None)
    if len(pool.relations) > 1:
        edits["relation"] = lambda s: dataclasses.replace(
            s, relation=_other(rng, pool.relations, s.relation))
    variant = base
    for name in rng.sample(sorted(edits), min(len(edits), rng.randint(1, 2))):
        variant = edits[name](variant)
    return variant


def offline_pair(subtopics: list[Subtopic], vocab: Vocabulary, index: int, seed: int
                 ) -> tuple[PromptRecord, list[Question], list[Question]]:
    """Pair `index` and the questions of both instructions (before filtering)."""
    divergence, subtopic, entity, rng = pair_plan(subtopics, index, seed)
    pool = dataclasses.replace(subtopic.pool, subjects=(entity,))
    base = sample_scene(pool, vocab, rng, elaborate=False)
    if divergence == "content_consistency":
        first, second = base, _content_variant(base, pool, vocab, rng)
    elif divergence == "counterfactual":
        first = base
        second = dataclasses.replace(base, counterfactual=rng.choice(vocab.counterfactuals))
    else:
        first = dataclasses.replace(base, aesthetics=tuple(rng.sample(vocab.appealing, 2)))
        second = dataclasses.replace(base, aesthetics=tuple(rng.sample(vocab.unappealing, 2)))
    text1, q1 = render(first, vocab.counts)
    text2, q2 = render(second, vocab.counts)
    record = PromptRecord(id=pair_id(index), category=subtopic.theme, prompt=text1,
                          source=SOURCE_OFFLINE, kind=KIND_INSTRUCTION_PAIR, prompt_2=text2,
                          divergence=divergence, theme=subtopic.theme, subtopic=subtopic.name)
    return record, q1, q2


# --- LLM pairs -------------------------------------------------------------------------------

_DIVERGENCE_TEXT = {
    "content_consistency": (
        "content: the two instructions describe different content, e.g. a different kind of "
        "object, a different number of things, or different colors, sizes or materials"),
    "counterfactual": (
        "realism: the first instruction is realistic; the second adds something impossible or "
        "physically distorted, e.g. wrong proportions or impossible materials"),
    "aesthetic": (
        "aesthetics: the same content, but the first describes an appealing image (pleasing "
        "colors, light and composition) and the second an unappealing one (dull, murky or "
        "cluttered)"),
}
_PAIR_SYSTEM = "You write instructions for a text-to-image model. Reply with JSON only."
_PAIR_USER = """Theme: {theme}
Subtopic: {subtopic}
Base instruction: {entity}

Write two detailed text-to-image instructions built on the base instruction. They must differ
in one respect only, {divergence}. Everything else (subject, setting, style) stays the same.
Each instruction is a single sentence or two describing something that can be seen.

Reply with a JSON object: {{"instruction_1": "...", "instruction_2": "..."}}"""


def pair_request(theme: str, subtopic: str, entity: str, divergence: str, temperature: float,
                 max_tokens: int) -> ChatRequest:
    user = _PAIR_USER.format(theme=theme, subtopic=subtopic, entity=entity,
                             divergence=_DIVERGENCE_TEXT[divergence])
    return ChatRequest(messages=(("system", _PAIR_SYSTEM), ("user", user)),
                       temperature=temperature, max_tokens=max_tokens)


def parse_pair(reply: str) -> tuple[str, str]:
    value = parse_json_output(reply)
    if not isinstance(value, dict):
        raise JSONOutputError("expected a JSON object with 'instruction_1' and 'instruction_2'")
    first, second = value.get("instruction_1"), value.get("instruction_2")
    if not (isinstance(first, str) and first.strip() and isinstance(second, str)
            and second.strip()):
        raise JSONOutputError("'instruction_1' and 'instruction_2' must be non-empty strings")
    if first.strip() == second.strip():
        raise JSONOutputError("the two instructions are identical")
    return first.strip(), second.strip()
