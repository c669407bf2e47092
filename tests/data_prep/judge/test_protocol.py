"""The judge protocol: the paper's questions verbatim, strict answers, outcomes of the two orders."""

import pytest

from data_prep.judge import protocol

PAPER_QUESTIONS = {  # seed paper, section 5 ("Evaluate by GPT-4 Vision"), quoted
    "q1": "Which image do you prefer?",
    "q2": "Which image better fits the text description?",
    "q3": "Disregarding the prompt, which image is more visually appealing?",
}


def test_questions_are_the_papers():
    assert {q.key: q.text for q in protocol.QUESTIONS} == PAPER_QUESTIONS


@pytest.mark.parametrize("reply, expected", [
    ("1", 1), ("2", 2), (" 2\n", 2), ("\t1 ", 1),
    ("1.", None), ("Image 1", None), ("12", None), ("", None), ("3", None), ("0", None),
    ("1\n2", None), ("**1**", None), ("I prefer 2", None), ("\u0661", None), ("\uff11", None),
])
def test_parse_answer_is_strict(reply, expected):
    assert protocol.parse_answer(reply) == expected


def test_chosen_model_follows_the_order():
    assert protocol.chosen_model("base_first", 1) == "base"
    assert protocol.chosen_model("base_first", 2) == "finetuned"
    assert protocol.chosen_model("finetuned_first", 1) == "finetuned"
    assert protocol.chosen_model("finetuned_first", 2) == "base"


def _rows(*spec):
    return [{"order": o, "status": s, "choice": c} for o, s, c in spec]


@pytest.mark.parametrize("spec, outcome", [
    ((("base_first", "answered", "finetuned"), ("finetuned_first", "answered", "finetuned")), "win"),
    ((("base_first", "answered", "base"), ("finetuned_first", "answered", "base")), "loss"),
    # The same position both times names two different models: a tie.
    ((("base_first", "answered", "base"), ("finetuned_first", "answered", "finetuned")), "tie"),
    ((("base_first", "malformed_answer", None), ("finetuned_first", "answered", "finetuned")),
     "malformed_answer"),
    ((("base_first", "malformed_answer", None), ("finetuned_first", "request_failed", None)),
     "request_failed"),
])
def test_pair_outcome(spec, outcome):
    assert protocol.pair_outcome(_rows(*spec)) == outcome


def test_pair_outcome_needs_both_orders():
    with pytest.raises(ValueError, match="one row per order"):
        protocol.pair_outcome(_rows(("base_first", "answered", "base"),
                                    ("base_first", "answered", "base")))


def test_message_shows_prompt_images_and_question_in_order():
    (message,) = protocol.messages(protocol.question("q3"), "a red cat", ("URL1", "URL2"))
    kinds = [(p["type"], p.get("text") or p["image_url"]["url"]) for p in message["content"]]
    assert kinds[:5] == [("text", 'Two images were generated from the text description: "a red cat"'),
                         ("text", "Image 1:"), ("image_url", "URL1"),
                         ("text", "Image 2:"), ("image_url", "URL2")]
    assert kinds[5][1].startswith(PAPER_QUESTIONS["q3"] + "\n")
    assert "exactly one character" in kinds[5][1]
