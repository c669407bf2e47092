"""Source-independent clean-up of a prompt's questions: grounding, de-duplication, minimum count.

Every generated question set (LLM or offline) goes through `finalize_questions`, so the same
rules and the same counted reasons apply whatever produced the questions.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from agfsync_jax.schemas import Question
from data_prep.prompts.dedup import NearDuplicateFilter

_NUMBER_WORDS = {str(i): w for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_SUFFIXES = ("ing", "ies", "es", "ed", "s")

# Reasons a question or a record is dropped; the stage's summary counts them by these names.
TOO_FEW_QUESTIONS = "too_few_questions"
DUPLICATE_QUESTION = "duplicate_question"
ELEMENT_NOT_IN_PROMPT = "element_not_in_prompt"


def _stem(word: str) -> str:
    word = _NUMBER_WORDS.get(word, word)
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


def _tokens(text: str) -> list[str]:
    return [_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def element_in_text(element: str, text: str) -> bool:
    """Whether every word of `element` occurs in `text`, up to inflection ('walks' ~ 'walking').

    Deliberately loose: it catches questions about things the prompt never mentions, not
    paraphrases, which the LLM validation pass judges.
    """
    words = _tokens(element)
    if not words:
        return False
    prompt_words = _tokens(text)
    return all(any(w == p or (min(len(w), len(p)) >= 3 and (w.startswith(p) or p.startswith(w)))
                   for p in prompt_words) for w in words)


def finalize_questions(prompt: str, questions: Sequence[Question], min_questions: int,
                       dedup_threshold: float, require_grounded: bool,
                       questions_dropped: collections.Counter[str]
                       ) -> tuple[tuple[Question, ...], str | None]:
    """(kept questions, None) or ((), reason) when fewer than `min_questions` survive.

    Drops, counting each in `questions_dropped`: questions whose element the prompt does not
    contain (when `require_grounded`), and near-duplicate questions (lexical; embeddings would
    merge 'Is the dog brown?' with 'Is the dog black?', which check different things).
    """
    kept = []
    for q in questions:
        if require_grounded and not element_in_text(q.element, prompt):
            questions_dropped[ELEMENT_NOT_IN_PROMPT] += 1
            continue
        kept.append(q)
    unique = NearDuplicateFilter(dedup_threshold).keep([q.question for q in kept])
    if len(unique) < len(kept):
        questions_dropped[DUPLICATE_QUESTION] += len(kept) - len(unique)
    kept = [kept[i] for i in unique]
    if len(kept) < min_questions:
        return (), TOO_FEW_QUESTIONS
    return tuple(kept), None
