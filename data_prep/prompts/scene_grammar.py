"""A small compositional scene grammar: one structure renders to a prompt and its yes-questions.

Both the offline AGFSync generator and the offline InstructEngine pairs build a `Scene`, then
`render` it. Every question is derived from a slot of the scene that the prompt also renders,
with `element` set to the exact words the prompt uses, so questions cannot drift from the text.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from importlib import resources
from typing import Any

from agfsync_jax.schemas import CATEGORIES, ELEMENT_TYPES, Question

VOCAB_FILE = "offline_vocab.json"
# Modifier kinds rendered before the noun, in English adjective order.
PRENOMINAL_KINDS: tuple[str, ...] = ("adjective", "shape", "color", "material")
ATTRIBUTE_KINDS: tuple[str, ...] = PRENOMINAL_KINDS + ("garment",)
_KIND_TYPE = {"shape": "shape", "color": "color", "material": "material"}


@dataclasses.dataclass(frozen=True)
class Noun:
    name: str
    plural: str
    type: str
    mods: tuple[str, ...] = ()

    def form(self, count: int) -> str:
        return self.name if count == 1 else self.plural


@dataclasses.dataclass(frozen=True)
class Phrase:
    """Words placed in the prompt, the element inside them, and (optionally) its question."""

    phrase: str
    element: str
    type: str = "other"
    question: str = ""


@dataclasses.dataclass(frozen=True)
class Modifier:
    kind: str   # one of PRENOMINAL_KINDS
    word: str
    type: str   # TIFA element type


@dataclasses.dataclass(frozen=True)
class ScenePool:
    """Everything a scene may be drawn from, for one category or one InstructEngine theme."""

    subjects: tuple[Noun, ...]
    companions: tuple[Noun, ...]
    relations: tuple[str, ...]
    settings: tuple[Phrase, ...]
    colors: tuple[str, ...]
    materials: tuple[str, ...]
    shapes: tuple[str, ...]
    adjectives: tuple[Modifier, ...] = ()
    garments: tuple[Noun, ...] = ()
    activities: tuple[str, ...] = ()

    def modifiers(self, kind: str) -> tuple[Modifier, ...]:
        if kind == "adjective":
            return self.adjectives
        words = {"color": self.colors, "material": self.materials, "shape": self.shapes}[kind]
        return tuple(Modifier(kind, w, _KIND_TYPE[kind]) for w in words)

    def attribute_kinds(self, noun: Noun) -> list[str]:
        """The attribute kinds `noun` accepts that this pool can fill."""
        kinds = [k for k in noun.mods if k in PRENOMINAL_KINDS and self.modifiers(k)]
        if "garment" in noun.mods and self.garments:
            kinds.append("garment")
        return kinds


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The parsed data/offline_vocab.json."""

    pools: dict[str, ScenePool]                 # category -> pool
    colors: tuple[str, ...]
    materials: tuple[str, ...]
    shapes: tuple[str, ...]
    counts: tuple[str, ...]                     # number words for 2, 3, ...
    styles: tuple[str, ...]
    times: tuple[Phrase, ...]
    counterfactuals: tuple[Phrase, ...]
    appealing: tuple[Phrase, ...]
    unappealing: tuple[Phrase, ...]


@dataclasses.dataclass(frozen=True)
class Scene:
    subject: Noun
    relation: str
    companion: Noun
    setting: Phrase
    count: int = 1
    modifiers: tuple[Modifier, ...] = ()
    garment: Noun | None = None
    garment_color: str = ""
    activity: str = ""
    companion_modifier: Modifier | None = None
    time: Phrase | None = None
    style: str = ""
    counterfactual: Phrase | None = None
    aesthetics: tuple[Phrase, ...] = ()


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _with_article(words: str) -> str:
    return f"{article(words)} {words}"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(scene: Scene, counts: Sequence[str]) -> tuple[str, list[Question]]:
    """The prompt text and its yes-questions; `counts` are the number words for 2, 3, ..."""
    plural = scene.count > 1
    if plural and scene.count - 2 >= len(counts):
        raise ValueError(f"count {scene.count} has no number word (have {list(counts)})")
    count_word = counts[scene.count - 2] if plural else ""
    subj = scene.subject.form(scene.count)
    be, does = ("Are", "Do") if plural else ("Is", "Does")
    questions: list[Question] = []

    def ask(question: str, element: str, element_type: str) -> None:
        questions.append(Question(question=question, element=element, element_type=element_type))

    mods = sorted(scene.modifiers, key=lambda m: PRENOMINAL_KINDS.index(m.kind))
    core = " ".join([m.word for m in mods] + [subj])
    noun_phrase = f"{count_word} {core}" if plural else _with_article(core)
    if plural:
        ask(f"Are there {subj}?", subj, scene.subject.type)
        ask(f"Are there {count_word} {subj}?", count_word, "counting")
    else:
        ask(f"Is there {_with_article(subj)}?", subj, scene.subject.type)
    for m in mods:
        ask(f"{be} the {subj} {m.word}?", m.word, m.type)

    parts = [noun_phrase]
    if scene.counterfactual is not None:
        cf = scene.counterfactual
        parts.append(cf.phrase)
        ask(cf.question.format(Be=be, Does=does, subject=subj), cf.element, cf.type)
    if scene.garment is not None:
        g = scene.garment.form(scene.count)
        colored = f"{scene.garment_color} {g}" if scene.garment_color else g
        parts.append(f"in {colored}" if plural else f"in {_with_article(colored)}")
        ask(f"{be} the {subj} wearing {g if plural else _with_article(g)}?", g, scene.garment.type)
        if scene.garment_color:
            ask(f"{be} the {g} {scene.garment_color}?", scene.garment_color, "color")
    if scene.activity:
        parts.append(scene.activity)
        ask(f"{be} the {subj} {scene.activity}?", scene.activity, "activity")

    comp = scene.companion.name
    cm = scene.companion_modifier
    parts += [scene.relation, _with_article(f"{cm.word} {comp}" if cm else comp)]
    ask(f"Is there {_with_article(comp)}?", comp, scene.companion.type)
    if cm is not None:
        ask(f"Is the {comp} {cm.word}?", cm.word, cm.type)
    ask(f"{be} the {subj} {scene.relation} the {comp}?", scene.relation, "spatial")

    parts.append(scene.setting.phrase)
    ask(f"Is the scene {scene.setting.phrase}?", scene.setting.element, "location")
    if scene.time is not None:
        parts.append(scene.time.phrase)
        ask(f"Is the scene set {scene.time.phrase}?", scene.time.element, "other")

    text = " ".join(parts)
    if scene.aesthetics:
        text += ", with " + " and ".join(a.phrase for a in scene.aesthetics)
        for a in scene.aesthetics:
            ask(a.question, a.element, a.type)
    if scene.style:
        text = f"{_with_article(scene.style)} of {text}"
        ask(f"Is this {_with_article(scene.style)}?", scene.style, "other")
    return _capitalize(text) + ".", questions


def sample_scene(pool: ScenePool, vocab: Vocabulary, rng: random.Random, elaborate: bool) -> Scene:
    """A random scene: short ones have one attribute, elaborate ones stack more slots."""
    subject = rng.choice(pool.subjects)
    kinds = pool.attribute_kinds(subject)
    if not kinds:
        raise ValueError(f"subject {subject.name!r} accepts no attribute this pool can fill")
    chosen = rng.sample(kinds, min(len(kinds), 2 if elaborate else 1))
    modifiers = tuple(rng.choice(pool.modifiers(k)) for k in chosen if k != "garment")
    garment, garment_color = None, ""
    if "garment" in chosen:
        garment = rng.choice(pool.garments)
        garment_color = rng.choice(pool.colors)
    activity = ""
    wants_activity = rng.random() < (0.7 if elaborate else 0.3)
    if "activity" in subject.mods and pool.activities and wants_activity:
        activity = rng.choice(pool.activities)
    max_count = len(vocab.counts) + 1
    count = rng.randint(2, max_count) if rng.random() < (0.6 if elaborate else 0.35) else 1
    companions = [c for c in pool.companions if c.name != subject.name] or list(pool.companions)
    companion = rng.choice(companions)
    companion_modifier = None
    companion_kinds = pool.attribute_kinds(companion)
    companion_kinds = [k for k in companion_kinds if k != "garment"]
    if elaborate and companion_kinds and rng.random() < 0.7:
        companion_modifier = rng.choice(pool.modifiers(rng.choice(companion_kinds)))
    return Scene(
        subject=subject, relation=rng.choice(pool.relations), companion=companion,
        setting=rng.choice(pool.settings), count=count, modifiers=modifiers, garment=garment,
        garment_color=garment_color, activity=activity, companion_modifier=companion_modifier,
        time=rng.choice(vocab.times) if elaborate and rng.random() < 0.5 else None,
        style=rng.choice(vocab.styles) if elaborate and rng.random() < 0.6 else "")


# --- loading ---------------------------------------------------------------------------------

def _field(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], typ):
        raise ValueError(f"{where}: field {key!r} must be {typ.__name__}")
    return d[key]


def _element_type(value: str, where: str) -> str:
    if value not in ELEMENT_TYPES:
        raise ValueError(f"{where}: element type {value!r} is not one of {ELEMENT_TYPES}")
    return value


def parse_noun(d: dict[str, Any], where: str) -> Noun:
    mods = tuple(d.get("mods", ()))
    unknown = set(mods) - set(ATTRIBUTE_KINDS) - {"activity"}
    if unknown:
        raise ValueError(f"{where}: unknown modifier kinds {sorted(unknown)}")
    return Noun(name=_field(d, "name", str, where), plural=_field(d, "plural", str, where),
                type=_element_type(_field(d, "type", str, where), where), mods=mods)


def parse_phrase(d: dict[str, Any], where: str, default_type: str = "other") -> Phrase:
    phrase = _field(d, "phrase", str, where)
    element = _field(d, "element", str, where)
    if element.lower() not in phrase.lower():
        raise ValueError(f"{where}: element {element!r} does not occur in phrase {phrase!r}")
    return Phrase(phrase=phrase, element=element,
                  type=_element_type(d.get("type", default_type), where),
                  question=d.get("question", ""))


def _strings(d: dict[str, Any], key: str, where: str,
             default: Sequence[str] = ()) -> tuple[str, ...]:
    values = d.get(key, default)
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where}: field {key!r} must be a list of non-empty strings")
    return tuple(values)


def parse_pool(d: dict[str, Any], where: str, colors: Sequence[str], materials: Sequence[str],
               shapes: Sequence[str], subjects_key: str = "subjects") -> ScenePool:
    pool = ScenePool(
        subjects=tuple(parse_noun(n, f"{where}.{subjects_key}[{i}]")
                       for i, n in enumerate(_field(d, subjects_key, list, where))),
        companions=tuple(parse_noun(n, f"{where}.companions[{i}]")
                         for i, n in enumerate(_field(d, "companions", list, where))),
        relations=_strings(d, "relations", where),
        settings=tuple(parse_phrase(s, f"{where}.settings[{i}]", "location")
                       for i, s in enumerate(_field(d, "settings", list, where))),
        colors=_strings(d, "colors", where, colors),
        materials=_strings(d, "materials", where, materials),
        shapes=_strings(d, "shapes", where, shapes),
        adjectives=tuple(
            Modifier("adjective", _field(a, "word", str, f"{where}.adjectives[{i}]"),
                     _element_type(_field(a, "type", str, f"{where}.adjectives[{i}]"), where))
            for i, a in enumerate(d.get("adjectives", []))),
        garments=tuple(parse_noun(n, f"{where}.garments[{i}]")
                       for i, n in enumerate(d.get("garments", []))),
        activities=_strings(d, "activities", where),
    )
    for name, items in (("subjects", pool.subjects), ("companions", pool.companions),
                        ("relations", pool.relations), ("settings", pool.settings)):
        if not items:
            raise ValueError(f"{where}: field {name!r} is empty")
    for i, noun in enumerate(pool.subjects):
        if not pool.attribute_kinds(noun):
            raise ValueError(f"{where}.{subjects_key}[{i}] ({noun.name!r}): none of its modifier "
                             f"kinds {list(noun.mods)} can be filled from this pool")
    return pool


def load_vocabulary() -> Vocabulary:
    """Parses and checks data/offline_vocab.json; errors name the JSON path of the bad entry."""
    where = VOCAB_FILE
    source = resources.files("data_prep.prompts").joinpath("data", VOCAB_FILE)
    d = json.loads(source.read_text(encoding="utf-8"))
    colors = _strings(d, "colors", where)
    materials = _strings(d, "materials", where)
    shapes = _strings(d, "shapes", where)
    aesthetics = _field(d, "aesthetics", dict, where)
    pools = {name: parse_pool(p, f"{where}:categories[{name!r}]", colors, materials, shapes)
             for name, p in _field(d, "categories", dict, where).items()}
    if set(pools) != set(CATEGORIES):
        raise ValueError(f"{where}: categories {sorted(set(pools) ^ set(CATEGORIES))} are "
                         f"missing or unknown")

    def phrases(items: list[Any], key: str, default_type: str,
                need_question: bool) -> tuple[Phrase, ...]:
        out = tuple(parse_phrase(x, f"{where}:{key}[{i}]", default_type)
                    for i, x in enumerate(items))
        if need_question and not all(p.question for p in out):
            raise ValueError(f"{where}:{key}: every entry needs a 'question'")
        return out

    return Vocabulary(
        pools=pools, colors=colors, materials=materials, shapes=shapes,
        counts=_strings(d, "counts", where), styles=_strings(d, "styles", where),
        times=phrases(_field(d, "times", list, where), "times", "other", False),
        counterfactuals=phrases(_field(d, "counterfactuals", list, where), "counterfactuals",
                                "attribute", True),
        appealing=phrases(_field(aesthetics, "appealing", list, where), "aesthetics.appealing",
                          "attribute", True),
        unappealing=phrases(_field(aesthetics, "unappealing", list, where),
                            "aesthetics.unappealing", "attribute", True),
    )
