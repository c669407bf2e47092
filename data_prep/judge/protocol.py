"""The judge's protocol: the paper's three questions, the message, strict answers, pair outcomes.

The paper (seed paper, section 5, Table 2) submits the two images "accompanied by their
respective descriptions" to GPT-4V and asks Q1 general preference, Q2 prompt alignment and Q3
visual appeal; it reports win rates and says nothing about the answer format or image order.
Here every question is a forced choice answered with exactly "1" or "2", and every pair is asked
twice, once per image order: a judge that prefers a position rather than an image answers the
two orders differently, and that pair counts as a tie instead of a win or a loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

BASE, FINETUNED = "base", "finetuned"

# Row statuses in judgments.jsonl. "answered" and "malformed_answer" are final (the reply is
# cached and deterministic at temperature 0); "request_failed" is asked again on the next run.
ANSWERED, MALFORMED, FAILED = "answered", "malformed_answer", "request_failed"
FINAL_STATUSES = (ANSWERED, MALFORMED)

# The judge's sampling: greedy, and room for "1" plus a stray token or two, which then reads as
# a malformed answer instead of being cut into a valid-looking one.
TEMPERATURE = 0.0
MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Question:
    key: str    # "q1": the row and summary key
    label: str  # the paper's name for the aspect (its Table 2 column header in brackets)
    text: str   # the paper's wording, verbatim


QUESTIONS: tuple[Question, ...] = (
    Question("q1", "general preference (General)", "Which image do you prefer?"),
    Question("q2", "prompt alignment (Faithful)", "Which image better fits the text description?"),
    Question("q3", "visual appeal (Aesthetic)",
             "Disregarding the prompt, which image is more visually appealing?"),
)
QUESTION_KEYS = tuple(q.key for q in QUESTIONS)

# Which model's image is shown as "Image 1" in each of the two asks.
ORDERS: dict[str, tuple[str, str]] = {
    "base_first": (BASE, FINETUNED),
    "finetuned_first": (FINETUNED, BASE),
}

ANSWER_INSTRUCTION = ("Answer with exactly one character: 1 if you choose Image 1, 2 if you "
                      "choose Image 2. Do not write anything else.")


def question(key: str) -> Question:
    for q in QUESTIONS:
        if q.key == key:
            return q
    raise KeyError(f"unknown judge question {key!r}; expected one of {QUESTION_KEYS}")


def messages(q: Question, prompt: str, image_urls: Sequence[str]) -> list[dict[str, Any]]:
    """One user message: the description, Image 1, Image 2, the question and the answer format.

    `image_urls` are the two images in display order: data URLs on the wire, digests in the
    cache key. The description comes with every question, as in the paper (Q3 asks the judge to
    disregard it, which presupposes it was shown).
    """
    if len(image_urls) != 2:
        raise ValueError(f"a judge request shows two images, got {len(image_urls)}")
    return [{"role": "user", "content": [
        {"type": "text", "text": f'Two images were generated from the text description: "{prompt}"'},
        {"type": "text", "text": "Image 1:"},
        {"type": "image_url", "image_url": {"url": image_urls[0]}},
        {"type": "text", "text": "Image 2:"},
        {"type": "image_url", "image_url": {"url": image_urls[1]}},
        {"type": "text", "text": f"{q.text}\n{ANSWER_INSTRUCTION}"},
    ]}]


def parse_answer(reply: str) -> int | None:
    """1 or 2 when the reply is exactly that digit (surrounding whitespace aside), else None.

    Never guessed from a longer reply ("Image 1", "1.", "2, because ..."): such replies are
    counted as malformed, so every judged pair is one the judge answered in the asked format.
    """
    text = reply.strip()
    return int(text) if text in ("1", "2") else None


def chosen_model(order: str, answer: int) -> str:
    """The model whose image sat at the answered position in that order."""
    return ORDERS[order][answer - 1]


def pair_outcome(rows: Sequence[dict[str, Any]]) -> str:
    """"win" / "tie" / "loss" of the finetuned model, or the skip reason, from one question's
    two rows (one per order) of one pair."""
    if sorted(r["order"] for r in rows) != sorted(ORDERS):
        raise ValueError(f"a pair outcome needs one row per order {sorted(ORDERS)}, got "
                         f"{[r['order'] for r in rows]}")
    statuses = {r["status"] for r in rows}
    if FAILED in statuses:
        return FAILED
    if MALFORMED in statuses:
        return MALFORMED
    choices = {r["choice"] for r in rows}
    if choices == {FINETUNED}:
        return "win"
    if choices == {BASE}:
        return "loss"
    return "tie"  # the two orders disagree: the judge followed the position, not the image
