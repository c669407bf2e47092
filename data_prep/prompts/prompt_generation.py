"""LLM prompts per category (AGFSync section 3.1): in-context examples, short and elaborate.

Each request shows the category's 5 examples and asks for a batch of new prompts. Batches are
requested until the category has `per_category` prompts that survive near-duplicate removal,
or a bounded number of rounds has passed (then the shortfall is reported, not hidden).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from data_prep.prompts.chat_backend import ChatBackend, ChatRequest
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.json_output import JSONOutputError, parse_json_output

# Reasons counted while collecting prompts.
PROMPT_CALL_FAILED = "prompt_call_failed"
PROMPT_OUTPUT_UNPARSEABLE = "prompt_output_unparseable"
NEAR_DUPLICATE = "near_duplicate"
SHORTFALL = "category_shortfall"
_MAX_ROUNDS = 4

_SYSTEM = "You write prompts for a text-to-image model. Reply with JSON only."
_USER = """Write {k} new prompts for a text-to-image model in the category "{category}".

- Mix lengths: about half short (a single phrase of under 12 words) and half elaborate (one or
  two sentences with several concrete objects, their colors, materials, counts and positions,
  a setting, and sometimes an art style or lighting).
- Describe only what can be seen. Vary subjects, settings and styles; never repeat an example.

Examples from this category:
{examples}

This is batch {batch} of the category; make its prompts differ from the earlier batches.
Reply with a JSON object: {{"prompts": ["...", "..."]}}"""


def prompt_request(category: str, examples: Sequence[str], k: int, batch: int,
                   temperature: float, max_tokens: int) -> ChatRequest:
    user = _USER.format(k=k, category=category, batch=batch,
                        examples="\n".join(f"- {e}" for e in examples))
    return ChatRequest(messages=(("system", _SYSTEM), ("user", user)),
                       temperature=temperature, max_tokens=max_tokens)


def parse_prompts(reply: str) -> list[str]:
    value = parse_json_output(reply)
    if isinstance(value, dict):
        value = value.get("prompts")
    if not isinstance(value, list):
        raise JSONOutputError("expected a JSON list or an object with a list under 'prompts'")
    return [p.strip() for p in value if isinstance(p, str) and p.strip()]


def generate_category_prompts(backend: ChatBackend, category: str, examples: Sequence[str],
                              count: int, per_request: int, temperature: float, max_tokens: int,
                              dedup: NearDuplicateFilter, dropped: collections.Counter[str]
                              ) -> list[str]:
    """Up to `count` near-duplicate-free prompts for `category`, in a reproducible order.

    The in-context examples count as already taken, so copies of them are removed too.
    """
    prompts: list[str] = []
    next_batch = 0
    for _ in range(_MAX_ROUNDS):
        missing = count - len(prompts)
        if missing <= 0:
            break
        n_requests = math.ceil(missing / per_request)
        requests = [prompt_request(category, examples, per_request, b, temperature, max_tokens)
                    for b in range(next_batch, next_batch + n_requests)]
        next_batch += n_requests
        fresh: list[str] = []
        for reply in backend.complete_many(requests, desc=f"prompts: {category}"):
            if reply is None:
                dropped[PROMPT_CALL_FAILED] += 1
                continue
            try:
                fresh.extend(parse_prompts(reply))
            except JSONOutputError:
                dropped[PROMPT_OUTPUT_UNPARSEABLE] += 1
        pool = list(examples) + prompts + fresh
        kept = [pool[i] for i in dedup.keep(pool) if i >= len(examples)]
        duplicates = len(prompts) + len(fresh) - len(kept)
        if duplicates:
            dropped[NEAR_DUPLICATE] += duplicates
        prompts = kept[:count]
    if len(prompts) < count:
        dropped[SHORTFALL] += count - len(prompts)
    return prompts
