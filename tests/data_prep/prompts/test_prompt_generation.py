import collections
import json

from data_prep.prompts.chat_backend import CallStats
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.prompt_generation import generate_category_prompts, prompt_request

EXAMPLES = ["A frozen lake at night.", "Red rocks at dawn.", "A long river seen from above.",
            "Fog over a mountain pass.", "A beach covered in shells."]


class BatchBackend:
    """Reply per batch number; batches without an entry fail (None)."""

    def __init__(self, replies):
        self.replies = replies
        self.stats = CallStats()
        self.batches = []

    def complete_many(self, requests, desc=""):
        out = []
        for r in requests:
            batch = int(r.messages[-1][1].split("This is batch ")[1].split(" ")[0])
            self.batches.append(batch)
            out.append(self.replies.get(batch))
        return out


def test_request_holds_category_examples_and_length_mix():
    user = prompt_request("plants", EXAMPLES, 7, 3, 0.9, 512).messages[-1][1]
    assert '"plants"' in user and "Write 7 new prompts" in user and "batch 3" in user
    assert all(f"- {e}" in user for e in EXAMPLES)
    assert "short" in user and "elaborate" in user


def test_batches_until_enough_unique_prompts():
    backend = BatchBackend({
        0: json.dumps({"prompts": ["A glacier cave glowing blue.", "A frozen lake at night.",
                                   "A desert canyon after rain."]}),
        1: "```json\n[\"A glacier cave glowing blue!\", \"Salt flats under stars.\"]\n```",
        2: "I can't do that.",
        4: json.dumps(["A volcanic island at sunrise.", "A waterfall in a jungle."]),
    })
    dropped = collections.Counter()
    prompts = generate_category_prompts(backend, "natural landscapes", EXAMPLES, 4, 3, 0.9, 512,
                                        NearDuplicateFilter(0.9), dropped)
    # Round 1 asks batches 0-1 (4 wanted, 3 per request); round 2 batch 2; round 3 batch 3
    # (failed call); round 4 batch 4.
    assert backend.batches == [0, 1, 2, 3, 4]
    assert prompts == ["A glacier cave glowing blue.", "A desert canyon after rain.",
                       "Salt flats under stars.", "A volcanic island at sunrise."]
    assert dropped == {"near_duplicate": 2, "prompt_output_unparseable": 1,
                       "prompt_call_failed": 1}


def test_shortfall_is_reported():
    backend = BatchBackend({0: json.dumps(["Only one prompt here."])})
    dropped = collections.Counter()
    prompts = generate_category_prompts(backend, "plants", EXAMPLES, 3, 5, 0.9, 512,
                                        NearDuplicateFilter(0.9), dropped)
    assert prompts == ["Only one prompt here."]
    assert dropped["category_shortfall"] == 2 and dropped["prompt_call_failed"] == 3
