"""Record types shared by every stage, defined once.

Each stage writes one of these as JSON lines (or, for pairs, as TFRecord features) and the next
stage reads it back through `from_dict`, which validates and raises `SchemaError` naming the
offending field. Readers of JSONL files go through `read_jsonl`, which adds the file and line.

This module must stay free of JAX, TensorFlow and PyTorch imports: both the JAX processes and the
PyTorch prep stage import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from agfsync_jax import storage
from agfsync_jax.storage import PathLike

# TIFA's element types (Hu et al. 2023); the questions stage and the evaluation's per-type
# accuracy both use this list.
ELEMENT_TYPES: tuple[str, ...] = (
    "object",
    "animal/human",
    "food",
    "activity",
    "attribute",
    "counting",
    "color",
    "material",
    "spatial",
    "location",
    "shape",
    "other",
)

# The AGFSync paper's 12 prompt categories (section 3.1).
CATEGORIES: tuple[str, ...] = (
    "natural landscapes",
    "cities and architecture",
    "people",
    "animals",
    "plants",
    "food and beverages",
    "sports and fitness",
    "art and culture",
    "technology and industry",
    "everyday objects",
    "transportation",
    "abstract and conceptual art",
)

# InstructEngine's three divergence types (InstructEngine section 3.2).
DIVERGENCES: tuple[str, ...] = ("content_consistency", "counterfactual", "aesthetic")

# Record kinds: a plain AGFSync prompt, or an InstructEngine pair of contrasting instructions.
KIND_PROMPT = "prompt"
KIND_INSTRUCTION_PAIR = "instruction_pair"
RECORD_KINDS: tuple[str, ...] = (KIND_PROMPT, KIND_INSTRUCTION_PAIR)

# Pair kinds in the preference dataset.
PAIR_AGFSYNC = "agfsync"  # prompt: winner > loser
PAIR_CROSS = "cross"  # InstructEngine: prompt -> winner > loser and prompt_2 -> loser > winner
# One image for the prompt, no preference (external SFT data, agfsync_jax/encoding): the image is
# stored as both winner and loser, and only train.loss=sft may train on it.
PAIR_SFT = "sft"
PAIR_KINDS: tuple[str, ...] = (PAIR_AGFSYNC, PAIR_CROSS, PAIR_SFT)


class SchemaError(ValueError):
    """A record does not match its schema; the message names the field (and file/line)."""


T = TypeVar("T")


def _require(d: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(d, dict):
        raise SchemaError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise SchemaError(f"{what}: missing field '{key}'")
    value = d[key]
    # bool is an int in Python; a schema that wants a number never wants a bool.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise SchemaError(f"{what}: field '{key}' must be {typ}, got bool")
    if not isinstance(value, typ):
        raise SchemaError(f"{what}: field '{key}' must be {typ}, got {type(value).__name__}")
    return value


def _optional(d: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any, what: str) -> Any:
    if key not in d or d[key] is None:
        return default
    return _require(d, key, typ, what)


def _finite(value: float, key: str, what: str) -> float:
    if not math.isfinite(value):
        raise SchemaError(f"{what}: field '{key}' must be finite, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Question:
    """One TIFA-style question about a prompt; AGFSync's generated questions all answer "yes"."""

    question: str
    answer: str = "yes"
    element: str = ""
    element_type: str = "other"
    choices: tuple[str, ...] = ("yes", "no")

    @property
    def is_yes_no(self) -> bool:
        return set(c.lower() for c in self.choices) == {"yes", "no"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "question") -> "Question":
        q = _require(d, "question", str, what)
        if not q.strip():
            raise SchemaError(f"{what}: field 'question' is empty")
        element_type = _optional(d, "element_type", str, "other", what)
        if element_type not in ELEMENT_TYPES:
            raise SchemaError(
                f"{what}: field 'element_type' is {element_type!r}, expected one of {ELEMENT_TYPES}")
        choices = tuple(_optional(d, "choices", list, ["yes", "no"], what))
        if not choices or not all(isinstance(c, str) for c in choices):
            raise SchemaError(f"{what}: field 'choices' must be a non-empty list of strings")
        answer = _optional(d, "answer", str, "yes", what)
        if answer not in choices:
            raise SchemaError(f"{what}: answer {answer!r} is not among choices {list(choices)}")
        return cls(question=q, answer=answer, element=_optional(d, "element", str, "", what),
                   element_type=element_type, choices=choices)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = list(self.choices)
        return d


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A line of WORKDIR/prompts/prompts.jsonl: what the sampler reads.

    For an InstructEngine record (kind == "instruction_pair"), `prompt` is instruction 1,
    `prompt_2` the contrasting instruction 2, and `questions_2` the questions for instruction 2.
    """

    id: str
    category: str
    prompt: str
    source: str
    questions: tuple[Question, ...] = ()
    kind: str = KIND_PROMPT
    prompt_2: str = ""
    questions_2: tuple[Question, ...] = ()
    divergence: str = ""
    theme: str = ""
    subtopic: str = ""

    @property
    def instructions(self) -> tuple[str, ...]:
        """The texts to sample images for: one, or two for an instruction pair."""
        return (self.prompt, self.prompt_2) if self.kind == KIND_INSTRUCTION_PAIR else (self.prompt,)

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "prompt record") -> "PromptRecord":
        rid = _require(d, "id", str, what)
        what = f"{what} id={rid!r}"
        if not rid:
            raise SchemaError(f"{what}: field 'id' is empty")
        prompt = _require(d, "prompt", str, what)
        if not prompt.strip():
            raise SchemaError(f"{what}: field 'prompt' is empty")
        kind = _optional(d, "kind", str, KIND_PROMPT, what)
        if kind not in RECORD_KINDS:
            raise SchemaError(f"{what}: field 'kind' is {kind!r}, expected one of {RECORD_KINDS}")
        questions = tuple(
            Question.from_dict(q, f"{what} questions[{i}]")
            for i, q in enumerate(_optional(d, "questions", list, [], what)))
        questions_2 = tuple(
            Question.from_dict(q, f"{what} questions_2[{i}]")
            for i, q in enumerate(_optional(d, "questions_2", list, [], what)))
        prompt_2 = _optional(d, "prompt_2", str, "", what)
        divergence = _optional(d, "divergence", str, "", what)
        if kind == KIND_INSTRUCTION_PAIR:
            if not prompt_2.strip():
                raise SchemaError(f"{what}: an instruction_pair needs a non-empty 'prompt_2'")
            if divergence not in DIVERGENCES:
                raise SchemaError(
                    f"{what}: field 'divergence' is {divergence!r}, expected one of {DIVERGENCES}")
        return cls(id=rid, category=_require(d, "category", str, what), prompt=prompt,
                   source=_require(d, "source", str, what), questions=questions, kind=kind,
                   prompt_2=prompt_2, questions_2=questions_2, divergence=divergence,
                   theme=_optional(d, "theme", str, "", what),
                   subtopic=_optional(d, "subtopic", str, "", what))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "category": self.category, "prompt": self.prompt, "source": self.source,
            "questions": [q.to_dict() for q in self.questions], "kind": self.kind,
        }
        if self.kind == KIND_INSTRUCTION_PAIR:
            d.update(prompt_2=self.prompt_2, questions_2=[q.to_dict() for q in self.questions_2],
                     divergence=self.divergence, theme=self.theme, subtopic=self.subtopic)
        return d


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One candidate image written by the sampler (a line of candidates/manifest-*.jsonl).

    `image` and `latent` are paths relative to the candidates directory. `instruction` is 0 for
    plain prompts; InstructEngine records have candidates for instruction 0 and 1.
    """

    prompt_id: str
    candidate: int
    seed: int
    noise_sigma: float
    image: str
    latent: str
    scheduler: str
    steps: int
    cfg: float
    instruction: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "manifest row") -> "ManifestRow":
        row = cls(
            prompt_id=_require(d, "prompt_id", str, what),
            candidate=_require(d, "candidate", int, what),
            seed=_require(d, "seed", int, what),
            noise_sigma=_finite(_require(d, "noise_sigma", (int, float), what), "noise_sigma", what),
            image=_require(d, "image", str, what),
            latent=_require(d, "latent", str, what),
            scheduler=_require(d, "scheduler", str, what),
            steps=_require(d, "steps", int, what),
            cfg=_finite(_require(d, "cfg", (int, float), what), "cfg", what),
            instruction=_optional(d, "instruction", int, 0, what),
        )
        if row.candidate < 0 or row.instruction not in (0, 1):
            raise SchemaError(f"{what}: candidate must be >= 0 and instruction 0 or 1")
        return row

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VqaAnswer:
    """The VQA scorer's result for one question about one candidate (an entry of
    ScoreRow.vqa_answers), enough for TIFA-style accuracy per element type.

    `question`, `element_type` and `expected` (the expected answer) are copied from the prompt
    record's Question, so a score row can be grouped by element type on its own.
    `answer`: generate mode, the decoded answer text; likelihood mode, "yes" when p_yes > 0.5,
    else "no" (a tie counts as not yes).
    `is_yes`: the answer counts as "yes" (generate mode: its first word is exactly "yes", the
    strict parse of data_prep/scoring/vqa.py; likelihood mode: p_yes > 0.5).
    `p_yes`: likelihood mode's P(yes) / (P(yes) + P(no)); None in generate mode.
    `correct`: the answer is the expected answer (TIFA's 0/1 accuracy).
    `credit`: the question's share of the VQA score, in [0, 1]: the probability of the expected
    answer in likelihood mode (p_yes, or 1 - p_yes for a "no" question), `correct` as 1/0 in
    generate mode; the VQA score is 100 x the mean credit over the candidate's questions.
    """

    question: str
    element_type: str
    expected: str
    answer: str
    is_yes: bool
    p_yes: float | None
    correct: bool
    credit: float

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "vqa answer") -> "VqaAnswer":
        element_type = _require(d, "element_type", str, what)
        if element_type not in ELEMENT_TYPES:
            raise SchemaError(
                f"{what}: field 'element_type' is {element_type!r}, expected one of {ELEMENT_TYPES}")
        p_yes = _optional(d, "p_yes", (int, float), None, what)
        if p_yes is not None:
            p_yes = _finite(p_yes, "p_yes", what)
            if not 0.0 <= p_yes <= 1.0:
                raise SchemaError(f"{what}: field 'p_yes' must be in [0, 1], got {p_yes}")
        credit = _finite(_require(d, "credit", (int, float), what), "credit", what)
        if not 0.0 <= credit <= 1.0:
            raise SchemaError(f"{what}: field 'credit' must be in [0, 1], got {credit}")
        return cls(question=_require(d, "question", str, what), element_type=element_type,
                   expected=_require(d, "expected", str, what), answer=_require(d, "answer", str, what),
                   is_yes=_require(d, "is_yes", bool, what), p_yes=p_yes,
                   correct=_require(d, "correct", bool, what), credit=credit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """Scores of one candidate (a line of scores/scores-*.jsonl), every score on 0-100.

    `scores` maps scorer name (vqa, clip, aesthetic, and any extra scorer) to its value;
    `scorers` maps the same names to a version/mode string (e.g. "blip2:likelihood").
    `vqa_answers` holds the VQA scorer's per-question results (VqaAnswer), in the order of the
    prompt record's questions for this candidate's instruction; empty when VQA was not scored.
    Evaluation groups them by element type (TIFA-style accuracy).
    """

    prompt_id: str
    candidate: int
    scores: dict[str, float]
    total: float
    scorers: dict[str, str]
    instruction: int = 0
    vqa_answers: tuple[VqaAnswer, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "score row") -> "ScoreRow":
        scores = _require(d, "scores", dict, what)
        for k, v in scores.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SchemaError(f"{what}: scores[{k!r}] must be a number")
            _finite(v, f"scores[{k!r}]", what)
        answers = tuple(VqaAnswer.from_dict(a, f"{what} vqa_answers[{i}]")
                        for i, a in enumerate(_optional(d, "vqa_answers", list, [], what)))
        return cls(prompt_id=_require(d, "prompt_id", str, what),
                   candidate=_require(d, "candidate", int, what),
                   scores={k: float(v) for k, v in scores.items()},
                   total=_finite(_require(d, "total", (int, float), what), "total", what),
                   scorers=_require(d, "scorers", dict, what),
                   instruction=_optional(d, "instruction", int, 0, what),
                   vqa_answers=answers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vqa_answers"] = [a.to_dict() for a in self.vqa_answers]
        return d


# The preference dataset's TFRecord features, by name -> (kind, dtype). Writer (data_prep) and
# reader (agfsync_jax input pipeline) both build their feature specs from this table.
# kind: "bytes" scalar, "int" scalar, "float" scalar, "int_list" variable-length ints.
PAIR_FEATURES: dict[str, str] = {
    "pair_kind": "bytes",       # PAIR_AGFSYNC, PAIR_CROSS or PAIR_SFT
    "prompt_id": "bytes",
    "category": "bytes",
    "prompt": "bytes",          # the text under which `winner` wins
    "prompt_2": "bytes",        # cross pairs: the text under which `loser` wins; else empty
    "winner_latent": "bytes",   # float16, C-order, shape latent_shape
    "loser_latent": "bytes",
    "latent_shape": "int_list",
    "winner_png": "bytes",      # optional: empty when not stored
    "loser_png": "bytes",
    "winner_candidate": "int",
    "loser_candidate": "int",
    "winner_total": "float",
    "loser_total": "float",
    "scores_json": "bytes",     # JSON: {"winner": {...}, "loser": {...}} with every score
}

LATENT_DTYPE = "float16"


def read_jsonl(path: PathLike, parse: Callable[[dict[str, Any], str], T]) -> Iterator[T]:
    """Yields parsed records of a JSONL file (local, gs://, or a log of parts: agfsync_jax.storage);
    any bad line raises SchemaError naming file:line. A missing file raises FileNotFoundError."""
    p = storage.as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    for where, line in storage.read_lines(p):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{where}: not valid JSON ({e.msg})") from e
        yield parse(obj, where)


def read_prompts(path: PathLike) -> list[PromptRecord]:
    """Reads prompts.jsonl; duplicate ids are an error because every later stage keys on them."""
    records = list(read_jsonl(path, PromptRecord.from_dict))
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise SchemaError(f"{path}: duplicate prompt id {r.id!r}")
        seen.add(r.id)
    return records
