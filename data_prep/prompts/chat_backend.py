"""What every chat backend shares: the request type, call statistics and the backend interface.

Two backends implement `ChatBackend`: `llm_client.OpenAIChatClient` (any OpenAI-compatible
HTTP endpoint) and `local_llm.LocalChatLM` (a transformers causal LM from a folder);
`backend_factory.build_backend` picks one from the config. Callers only see `complete_many`,
which never raises for a single failed call: it returns None in that slot and counts the
reason, so one bad prompt cannot stop a stage of thousands. A backend that cannot work at all
(an endpoint that refuses connections or the API key) raises `LLMEndpointError` instead, at
once, so a stage does not spend its time retrying thousands of calls that cannot succeed.

This module imports no backend: the backends import it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from agfsync_jax.errors import UserError


class LLMError(RuntimeError):
    """A chat call failed for good (after retries); `reason` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class LLMEndpointError(UserError, RuntimeError):
    """The backend cannot serve any call (unreachable endpoint, refused key): stop the stage."""

    def __init__(self, url: str, cause: str, fix: str):
        super().__init__(f"LLM endpoint {url} (config.prompts.llm.base_url): {cause}. {fix}")
        self.url = url
        self.cause = cause


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
        """The reply text; raises LLMError when the call fails for good, LLMEndpointError when
        no call can succeed."""

    def complete_many(self, requests: Sequence[ChatRequest], desc: str = "") -> list[str | None]:
        """Replies in request order; None where the call failed (reason counted in stats).

        Raises LLMEndpointError when no call can succeed."""

    def close(self) -> None:
        """Releases connections or memory; the backend is not used afterwards."""

