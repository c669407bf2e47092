"""What every chat backend shares: the request type, call statistics and the backend interface.

Two backends implement `ChatBackend`: `llm_client.OpenAIChatClient` (any OpenAI-compatible
HTTP endpoint) and `local_llm.LocalChatLM` (a transformers causal LM from a folder). Callers
only see `complete_many`, which never raises for a single failed call: it returns None in that
slot and counts the reason, so one bad prompt cannot stop a stage of thousands.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import ml_collections

from data_prep.prompts.response_cache import ResponseCache


class LLMError(RuntimeError):
    """A chat call failed for good (after retries); `reason` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: messages as (role, content) pairs plus sampling settings."""

    messages: tuple[tuple[str, str], ...]
    temperature: float = 0.0
    max_tokens: int = 1024

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI chat-completions request body; also what the cache key is built from."""
        return {
            "model": model,
            "messages": [{"role": role, "content": content} for role, content in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }


class CallStats:
    """Thread-safe counters of one backend: calls, cache hits, requests issued, failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0          # complete() invocations
        self.cached = 0         # answered from the on-disk cache, no request issued
        self.requests = 0       # requests issued: HTTP attempts incl. retries, or generate()
        self.retries = 0
        self.succeeded = 0
        self.failures: collections.Counter[str] = collections.Counter()

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "cached": self.cached, "requests": self.requests,
                    "retries": self.retries, "succeeded": self.succeeded,
                    "failed": sum(self.failures.values()),
                    "failures": dict(sorted(self.failures.items()))}


class ChatBackend(Protocol):
    stats: CallStats

    def complete(self, request: ChatRequest) -> str:
        """The reply text; raises LLMError when the call fails for good."""

    def complete_many(self, requests: Sequence[ChatRequest], desc: str = "") -> list[str | None]:
        """Replies in request order; None where the call failed (reason counted in stats)."""

    def close(self) -> None:
        """Releases connections or memory; the backend is not used afterwards."""


def build_backend(llm: ml_collections.ConfigDict, cache_dir: str, seed: int = 0) -> ChatBackend:
    """The backend named by `config.prompts.llm.backend`, sharing one response cache."""
    cache = ResponseCache(cache_dir)
    if llm.backend == "openai":
        from data_prep.prompts.llm_client import OpenAIChatClient
        return OpenAIChatClient(
            base_url=llm.base_url, model=llm.model, api_key_env=llm.api_key_env, cache=cache,
            timeout_s=llm.timeout_s, max_retries=llm.max_retries,
            max_concurrency=llm.max_concurrency, backoff_initial_s=llm.backoff_initial_s,
            backoff_max_s=llm.backoff_max_s)
    if llm.backend == "local":
        # Imported here: it pulls in PyTorch, which the HTTP backend never needs.
        from data_prep.prompts.local_llm import LocalChatLM
        return LocalChatLM(path=llm.local_path, cache=cache, seed=seed)
    raise ValueError(f"config.prompts.llm.backend is {llm.backend!r}, expected 'openai' or 'local'")
