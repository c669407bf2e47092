"""The judge's chat client: image requests over the prompts stage's retrying HTTP client.

Requests go through `OpenAIChatClient.post`, so they are retried with backoff on 429, 5xx,
timeouts and dropped connections exactly like the prompts stage's LLM calls. A refused
connection, an unknown host or HTTP 401/403/404 cannot improve by asking again: it fails at
once with `JudgeEndpointError`, naming the URL and the cause. Replies go into the prompts
stage's `ResponseCache`, keyed by the request with each image replaced by the sha256 of its PNG
bytes: the key changes with any pixel, and a cache entry does not carry the images.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from typing import Any

from agfsync_jax import storage
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.errors import UserError
from data_prep.judge import protocol
from data_prep.prompts.chat_backend import LLMEndpointError
from data_prep.prompts.llm_client import LLMError, OpenAIChatClient
from data_prep.prompts.response_cache import ResponseCache, request_key

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Failures that say the endpoint is wrong (address, key, model name), not that it is busy.
FATAL_REASONS = frozenset({"connect_error", "http_401", "http_403", "http_404"})


class JudgeEndpointError(UserError, RuntimeError):
    """The judge endpoint cannot answer any request (wrong URL, key or model): stop the stage."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class JudgeImage:
    """A PNG on disk, identified by its digest; its bytes are read only when sent."""

    path: Path
    sha256: str

    @classmethod
    def read(cls, path: PathLike) -> "JudgeImage":
        path = storage.as_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image named by the eval manifest is missing; "
                                    "re-run the eval stage's sampling")
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError(f"{path}: not a PNG file; the judge sends images as PNG data URLs")
        return cls(path, _sha256(data))

    def data_url(self) -> str:
        data = self.path.read_bytes()
        if _sha256(data) != self.sha256:
            # The cache key was built from the old digest; sending new pixels would file the
            # reply under the wrong image.
            raise ValueError(f"{self.path}: the image changed while the judge was running")
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    @property
    def digest_url(self) -> str:
        return f"sha256:{self.sha256}"


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
    """One question about two images, in display order (Image 1, Image 2)."""

    question: protocol.Question
    prompt: str
    images: tuple[JudgeImage, JudgeImage]

    def body(self, model: str, image_urls: tuple[str, str]) -> dict[str, Any]:
        return {"model": model,
                "messages": protocol.messages(self.question, self.prompt, image_urls),
                "temperature": protocol.TEMPERATURE, "max_tokens": protocol.MAX_TOKENS}

    def key_body(self, model: str) -> dict[str, Any]:
        """The body with digests for images: what the cache key and cache entry are made of."""
        return self.body(model, (self.images[0].digest_url, self.images[1].digest_url))

    def wire_body(self, model: str) -> dict[str, Any]:
        return self.body(model, (self.images[0].data_url(), self.images[1].data_url()))


class JudgeClient:
    """Cached, retried judge requests against one OpenAI-compatible endpoint."""

    backend_name = "openai_judge"  # cache-key namespace: key bodies are not wire bodies

    def __init__(self, base_url: str, model: str, api_key_env: str, cache: ResponseCache,
                 timeout_s: float = 120.0, max_retries: int = 5, max_concurrency: int = 4,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0):
        if not base_url or not model:
            raise ValueError("config.eval.judge.base_url and config.eval.judge.model must both be "
                             f"set to use the judge (got {base_url!r} and {model!r})")
        if api_key_env and not os.environ.get(api_key_env):
            # Name the variable, never a value.
            raise ValueError(f"environment variable {api_key_env} (config.eval.judge.api_key_env) "
                             "is not set; set it, or set api_key_env='' for a server without keys")
        self.base_url = base_url
        self.model = model
        self.cache = cache
        self._http = OpenAIChatClient(
            base_url=base_url, model=model, api_key_env=api_key_env, cache=cache,
            timeout_s=timeout_s, max_retries=max_retries, max_concurrency=max_concurrency,
            backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
        self.stats = self._http.stats

    def __repr__(self) -> str:
        return f"JudgeClient(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_key(self, request: JudgeRequest) -> str:
        return request_key(self.backend_name, request.key_body(self.model))

    def answer(self, request: JudgeRequest) -> str:
        """The raw reply text, from the cache or the endpoint.

        Raises JudgeEndpointError when the endpoint is unusable, LLMError when this one request
        failed for good (retries exhausted, a 400, a reply that is not a chat completion).
        """
        self.stats.add("calls")
        key_body = request.key_body(self.model)
        key = request_key(self.backend_name, key_body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add("cached")
            return cached
        try:
            reply = self._http.post(request.wire_body(self.model))
        except LLMEndpointError as e:
            raise JudgeEndpointError(
                f"VLM judge endpoint {self.base_url} (model {self.model!r}) is unusable: {e.cause}. "
                "Check config.eval.judge.base_url, .model and .api_key_env") from e
        except LLMError as e:
            if e.reason in FATAL_REASONS:
                raise JudgeEndpointError(
                    f"VLM judge endpoint {self.base_url} (model {self.model!r}) is unusable: {e}. "
                    "Check config.eval.judge.base_url, .model and .api_key_env") from e
            raise
        self.cache.put(key, key_body, reply)
        self.stats.add("succeeded")
        return reply
