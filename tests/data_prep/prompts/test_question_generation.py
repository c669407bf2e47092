"""LLM questions: generation, validation pass, filtering and drop reasons (scripted backend)."""

import collections
import json

from agfsync_jax.schemas import Question
from data_prep.prompts.chat_backend import CallStats
from data_prep.prompts.question_filter import element_in_text, finalize_questions
from data_prep.prompts.question_generation import QuestionSettings, generate_questions

PROMPT = "Three cats and a brown dog sleeping on a red sofa in a sunny living room."


class ScriptedBackend:
    """Answers by looking up the description in the request; None means a failed call."""

    def __init__(self, generate: dict, validate: dict):
        self.generate, self.validate = generate, validate
        self.stats = CallStats()
        self.seen = []

    def complete_many(self, requests, desc=""):
        out = []
        for r in requests:
            user = r.messages[-1][1]
            self.seen.append(user)
            prompt = user.split("\n", 1)[0].removeprefix("Description: ")
            table = self.validate if "Questions:\n" in user else self.generate
            out.append(table.get(prompt))
        return out


def q(question, element, element_type, **extra):
    return {"question": question, "element": element, "element_type": element_type, **extra}


GOOD = [
    q("Are there cats?", "cats", "animal"),             # alias -> animal/human
    q("Are there three cats?", "three", "counting"),
    q("Is there a dog?", "dog", "animal/human"),
    q("Is the dog brown?", "brown", "colour"),           # alias -> color
    q("Is the dog sleeping?", "sleeping", "activity"),
    q("Is there a sofa?", "sofa", "object"),
    q("Is the sofa red?", "red", "color"),
    q("Is this a living room?", "living room", "location"),
]
EXTRA = [
    q("Is there a parrot?", "parrot", "animal/human"),   # not in the prompt
    q("Is the sofa red?", "red", "color"),               # duplicate
    q("Is the room dark?", "dark", "attribute", answer="no"),
    q("Is it cosy?", "sunny", "mood"),                   # unknown type
    {"question": "", "element": "x"},                     # malformed
    q("Is the room sunny?", "sunny", "attribute"),       # rejected by validation
]


def _verdicts(n, reject=()):
    return json.dumps({"verdicts": [{"index": i, "valid": i not in reject}
                                    for i in range(1, n + 1)]})


def test_pipeline_keeps_valid_questions_and_counts_every_drop():
    drafts = GOOD + EXTRA
    # After parsing: GOOD (8) + parrot, duplicate, sunny = 11 questions; #11 (sunny) rejected.
    backend = ScriptedBackend(
        generate={PROMPT: "```json\n" + json.dumps({"questions": drafts}) + "\n```"},
        validate={PROMPT: _verdicts(11, reject={11})})
    dropped = collections.Counter()
    [(questions, reason)] = generate_questions(backend, [PROMPT], QuestionSettings(), dropped)
    assert reason is None
    assert [x.question for x in questions] == [d["question"] for d in GOOD]
    assert questions[0].element_type == "animal/human" and questions[3].element_type == "color"
    assert all(x.answer == "yes" for x in questions)
    assert dropped == {"malformed_question_item": 1, "answer_not_yes": 1,
                       "unknown_element_type": 1, "rejected_by_validation": 1,
                       "element_not_in_prompt": 1, "duplicate_question": 1}
    validation = [s for s in backend.seen if "Questions:\n" in s][0]
    assert "1. Are there cats?" in validation and "11. Is the room sunny?" in validation


def test_prompts_are_dropped_with_reasons():
    short = "A lone boat."
    prompts = [PROMPT, short, "failed call", "bad json", "bad verdicts", "validator down"]
    backend = ScriptedBackend(
        generate={PROMPT: json.dumps(GOOD), short: json.dumps(GOOD[:2]),
                  "bad json": "Sorry, I cannot help with that.",
                  "bad verdicts": json.dumps(GOOD), "validator down": json.dumps(GOOD)},
        validate={PROMPT: _verdicts(8, reject={1, 2, 3, 4}), short: _verdicts(2),
                  "bad verdicts": "no idea"})
    dropped = collections.Counter()
    results = generate_questions(backend, prompts, QuestionSettings(min_questions=4), dropped)
    assert [r[1] for r in results] == [None, "too_few_questions", "question_call_failed",
                                       "question_output_unparseable",
                                       "validation_output_unparseable", "validation_call_failed"]
    assert len(results[0][0]) == 4 and all(r[0] == () for r in results[1:])
    # `short` questions ("cats", "three") are not in "A lone boat.": dropped as ungrounded.
    assert dropped["element_not_in_prompt"] == 2 and dropped["rejected_by_validation"] == 4


def test_missing_verdicts_drop_the_question():
    backend = ScriptedBackend(generate={PROMPT: json.dumps(GOOD)},
                              validate={PROMPT: json.dumps([{"index": i, "valid": True}
                                                            for i in range(1, 7)])})
    dropped = collections.Counter()
    [(questions, reason)] = generate_questions(backend, [PROMPT], QuestionSettings(), dropped)
    assert reason is None and len(questions) == 6 and dropped == {"no_verdict": 2}


def test_element_grounding_tolerates_inflection_only():
    text = "On a gray day a surfer carrying a white board walks on a beach with 3 dogs."
    for element in ("surfer", "walking", "boards", "gray", "white board", "three", "Beach"):
        assert element_in_text(element, text), element
    for element in ("wave", "black", "surfers riding", ""):
        assert not element_in_text(element, text), element


def test_finalize_can_skip_grounding():
    questions = [Question(f"Is there a thing {i}?", element=f"thing{i}") for i in range(5)]
    dropped = collections.Counter()
    kept, reason = finalize_questions("unrelated", questions, 5, 0.95, False, dropped)
    assert reason is None and len(kept) == 5
    kept, reason = finalize_questions("unrelated", questions, 5, 0.95, True, dropped)
    assert (kept, reason) == ((), "too_few_questions") and dropped["element_not_in_prompt"] == 5
