"""LLM questions for prompts (AGFSync section 3.2): generate yes-questions, then validate them.

Per prompt: one call writes atomic questions whose answer is "yes", each with `element` and a
TIFA `element_type`; a second call judges every question and drops ambiguous or unrelated
ones; `question_filter.finalize_questions` then removes ungrounded and duplicate questions and
drops the prompt when fewer than `min_questions` remain. Every drop is counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from agfsync_jax.schemas import ELEMENT_TYPES, Question
from data_prep.prompts.chat_backend import ChatBackend, ChatRequest
from data_prep.prompts.json_output import JSONOutputError, parse_json_output
from data_prep.prompts.question_filter import finalize_questions

# Spellings LLMs commonly use for TIFA's types. Anything else is dropped and counted.
_TYPE_ALIASES = {
    "animal": "animal/human", "human": "animal/human", "person": "animal/human",
    "people": "animal/human", "animal/person": "animal/human", "count": "counting",
    "number": "counting", "quantity": "counting", "colour": "color", "action": "activity",
    "place": "location", "scene": "location", "relation": "spatial", "position": "spatial",
}

# Record-level drop reasons.
GENERATION_FAILED = "question_call_failed"
GENERATION_UNPARSEABLE = "question_output_unparseable"
VALIDATION_FAILED = "validation_call_failed"
VALIDATION_UNPARSEABLE = "validation_output_unparseable"

_GENERATE_SYSTEM = "You turn image descriptions into verification questions. Reply with JSON only."
_GENERATE_USER = """Description: {prompt}

Write between {low} and {high} atomic questions that check whether an image shows this description.
- For an image that matches the description, the correct answer to every question is "yes".
- Each question checks exactly one thing the description states: an object, a person or animal, a
  food, an activity, an attribute, a count, a color, a material, a spatial relation, the location,
  a shape, or something else. Together the questions cover every element of the description.
- "element" is the word or words of the description that the question checks, copied from it.
- "element_type" is one of: {types}.

Reply with a JSON object:
{{"questions": [{{"question": "...", "element": "...", "element_type": "..."}}]}}"""

_VALIDATE_SYSTEM = "You check verification questions for image descriptions. Reply with JSON only."
_VALIDATE_USER = """Description: {prompt}

Questions:
{numbered}

A question is valid when an image that matches the description must get the answer "yes", the
question is not ambiguous, and it asks about something the description states. Judge each
question on its own.

Reply with a JSON object with one verdict per question:
{{"verdicts": [{{"index": 1, "valid": true}}, ...]}}"""


@dataclasses.dataclass(frozen=True)
class QuestionSettings:
    min_questions: int = 5
    max_questions: int = 12
    dedup_threshold: float = 0.9
    require_grounded: bool = True
    temperature: float = 0.2
    max_tokens: int = 2048


def generation_request(prompt: str, settings: QuestionSettings) -> ChatRequest:
    user = _GENERATE_USER.format(prompt=prompt, low=max(settings.min_questions, 1),
                                 high=max(settings.max_questions, settings.min_questions),
                                 types=", ".join(ELEMENT_TYPES))
    return ChatRequest(messages=(("system", _GENERATE_SYSTEM), ("user", user)),
                       temperature=settings.temperature, max_tokens=settings.max_tokens)


def validation_request(prompt: str, questions: Sequence[Question],
                       settings: QuestionSettings) -> ChatRequest:
    numbered = "\n".join(f"{i}. {q.question}" for i, q in enumerate(questions, start=1))
    user = _VALIDATE_USER.format(prompt=prompt, numbered=numbered)
    # Validation is a judgement, not creative writing: always greedy.
    return ChatRequest(messages=(("system", _VALIDATE_SYSTEM), ("user", user)),
                       temperature=0.0, max_tokens=settings.max_tokens)


def _list_under(value: Any, key: str) -> list[Any]:
    """The list itself, or the list under `key` of an object; else JSONOutputError."""
    if isinstance(value, dict) and isinstance(value.get(key), list):
        return value[key]
    if isinstance(value, list):
        return value
    raise JSONOutputError(f"expected a JSON list or an object with a list under {key!r}")


def parse_questions(reply: str, dropped: collections.Counter[str]) -> list[Question]:
    """Questions in a generation reply; malformed items are dropped and counted by reason."""
    out = []
    for item in _list_under(parse_json_output(reply), "questions"):
        if not isinstance(item, dict):
            dropped["malformed_question_item"] += 1
            continue
        question, element = item.get("question"), item.get("element")
        element_type = item.get("element_type")
        if not (isinstance(question, str) and question.strip() and isinstance(element, str)
                and element.strip() and isinstance(element_type, str)):
            dropped["malformed_question_item"] += 1
            continue
        answer = item.get("answer", "yes")
        if not isinstance(answer, str) or answer.strip().lower() != "yes":
            dropped["answer_not_yes"] += 1
            continue
        element_type = element_type.strip().lower()
        element_type = _TYPE_ALIASES.get(element_type, element_type)
        if element_type not in ELEMENT_TYPES:
            dropped["unknown_element_type"] += 1
            continue
        out.append(Question(question=question.strip(), element=element.strip(),
                            element_type=element_type))
    return out


def parse_verdicts(reply: str, n: int) -> dict[int, bool]:
    """1-based question index -> valid, for the indices the reply judged."""
    verdicts: dict[int, bool] = {}
    for item in _list_under(parse_json_output(reply), "verdicts"):
        if not isinstance(item, dict):
            continue
        index, valid = item.get("index"), item.get("valid")
        if isinstance(index, int) and not isinstance(index, bool) and 1 <= index <= n \
                and isinstance(valid, bool):
            verdicts[index] = valid
    return verdicts


def generate_questions(backend: ChatBackend, prompts: Sequence[str], settings: QuestionSettings,
                       questions_dropped: collections.Counter[str], desc: str = "questions"
                       ) -> list[tuple[tuple[Question, ...], str | None]]:
    """Per prompt: (questions, None), or ((), reason) when the prompt must be dropped."""
    results: list[tuple[tuple[Question, ...], str | None]] = [((), None)] * len(prompts)
    replies = backend.complete_many([generation_request(p, settings) for p in prompts],
                                    desc=f"{desc}: generate")
    drafts: dict[int, list[Question]] = {}
    for i, reply in enumerate(replies):
        if reply is None:
            results[i] = ((), GENERATION_FAILED)
            continue
        try:
            drafts[i] = parse_questions(reply, questions_dropped)
        except JSONOutputError:
            results[i] = ((), GENERATION_UNPARSEABLE)

    # Validation only for prompts with something to validate; an empty draft fails below.
    to_validate = [i for i, qs in drafts.items() if qs]
    verdict_replies = backend.complete_many(
        [validation_request(prompts[i], drafts[i], settings) for i in to_validate],
        desc=f"{desc}: validate")
    validated: dict[int, list[Question]] = {i: [] for i in drafts}
    for i, reply in zip(to_validate, verdict_replies):
        if reply is None:
            results[i] = ((), VALIDATION_FAILED)
            del validated[i]
            continue
        try:
            verdicts = parse_verdicts(reply, len(drafts[i]))
        except JSONOutputError:
            results[i] = ((), VALIDATION_UNPARSEABLE)
            del validated[i]
            continue
        for index, q in enumerate(drafts[i], start=1):
            if index not in verdicts:
                questions_dropped["no_verdict"] += 1
            elif not verdicts[index]:
                questions_dropped["rejected_by_validation"] += 1
            else:
                validated[i].append(q)

    for i, qs in validated.items():
        results[i] = finalize_questions(prompts[i], qs, settings.min_questions,
                                        settings.dedup_threshold, settings.require_grounded,
                                        questions_dropped)
    return results
