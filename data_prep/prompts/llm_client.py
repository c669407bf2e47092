"""Chat completions from any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp, TGI...).

Retries with exponential backoff (tenacity) on 429, 5xx, timeouts and transport errors; honours
a numeric Retry-After header; limits requests in flight; caches successful replies on disk.
The API key is read from an environment variable, sent only in the Authorization header, and
never logged, cached or shown in repr().
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import httpx
import tenacity
from tqdm import tqdm

from data_prep.prompts.chat_backend import CallStats, ChatRequest, LLMError
from data_prep.prompts.response_cache import ResponseCache, request_key

log = logging.getLogger(__name__)


class _RetryableError(LLMError):
    """A failure worth another attempt (rate limit, server error, timeout, dropped connection)."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(reason, message)
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date: use our own backoff


class _Backoff(tenacity.wait.wait_base):
    """Exponential backoff with jitter, or the server's Retry-After when it asks for longer."""

    def __init__(self, initial_s: float, max_s: float):
        # Jitter keeps many workers that were rate-limited together from retrying in step.
        self._exponential = (tenacity.wait_exponential(multiplier=initial_s, max=max_s)
                             + tenacity.wait_random(0, initial_s))
        self._max_s = max_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = min(self._exponential(retry_state), self._max_s)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, _RetryableError) and error.retry_after_s is not None:
            wait = max(wait, min(error.retry_after_s, self._max_s))
        return wait


class OpenAIChatClient:
    """`ChatBackend` over HTTP: POST {base_url}/chat/completions."""

    backend_name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str, cache: ResponseCache,
                 timeout_s: float = 60.0, max_retries: int = 5, max_concurrency: int = 8,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
                 retry_connect_errors: bool = True):
        # retry_connect_errors=False: a refused connection or an unknown host fails at once
        # (reason "connect_error"): callers for whom it can only be a wrong base_url.
        if not model:
            raise ValueError("config.prompts.llm.model is empty: name the served model")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_retries >= 0, got "
                             f"{max_concurrency} and {max_retries}")
        headers = {}
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                # Name the variable, never a value. Local servers that need no key: set
                # config.prompts.llm.api_key_env="".
                raise ValueError(f"environment variable {api_key_env} (config.prompts.llm."
                                 f"api_key_env) is not set")
            headers["Authorization"] = f"Bearer {api_key}"
        self.model = model
        self.base_url = base_url
        self.cache = cache
        self.stats = CallStats()
        self._retry_connect_errors = retry_connect_errors
        self._max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._http = httpx.Client(base_url=base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s),
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_RetryableError),
            stop=tenacity.stop_after_attempt(max_retries + 1),
            wait=_Backoff(backoff_initial_s, backoff_max_s),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def __repr__(self) -> str:
        return f"OpenAIChatClient(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OpenAIChatClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        self.stats.add("retries")
        error = retry_state.outcome.exception() if retry_state.outcome else None
        log.info("chat request failed (%s), retry %d", getattr(error, "reason", error),
                 retry_state.attempt_number)

    def _post_once(self, body: dict[str, Any]) -> str:
        with self._slots:
            self.stats.add("requests")
            try:
                response = self._http.post("chat/completions", json=body)
            except httpx.TimeoutException as e:
                raise _RetryableError("timeout", f"no reply in time ({type(e).__name__})") from e
            except httpx.ConnectError as e:
                if not self._retry_connect_errors:
                    raise LLMError("connect_error", f"cannot connect to {self.base_url}: {e}") from e
                raise _RetryableError("transport", type(e).__name__) from e
            except httpx.TransportError as e:
                raise _RetryableError("transport", type(e).__name__) from e
        code = response.status_code
        if code == 429 or code >= 500:
            raise _RetryableError(f"http_{code}", f"{self.base_url} answered {code}",
                                  _retry_after(response))
        if code >= 400:
            raise LLMError(f"http_{code}",
                           f"{self.base_url} answered {code}: {response.text[:200]}")
        try:
            payload = response.json()
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LLMError("malformed_response",
                           f"reply is not a chat completion: {response.text[:200]!r}") from e
        if not isinstance(content, str):
            raise LLMError("malformed_response", f"message content is {type(content).__name__}")
        return content

    def post(self, body: dict[str, Any]) -> str:
        """The reply to a ready request body, retried but not cached: for callers that key
        their own cache entries (a judge's requests carry images, its keys their digests)."""
        try:
            return self._retrying(self._post_once, body)
        except LLMError as e:
            self.stats.fail(e.reason)
            raise

    def complete(self, request: ChatRequest) -> str:
        self.stats.add("calls")
        body = request.body(self.model)
        key = request_key(self.backend_name, body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add("cached")
            return cached
        content = self.post(body)
        self.cache.put(key, body, content)
        self.stats.add("succeeded")
        return content

    def _complete_or_none(self, request: ChatRequest) -> str | None:
        try:
            return self.complete(request)
        except LLMError as e:
            log.warning("chat call failed for good: %s", e)
            return None

    def complete_many(self, requests: Sequence[ChatRequest], desc: str = "") -> list[str | None]:
        if not requests:
            return []
        with concurrent.futures.ThreadPoolExecutor(self._max_concurrency) as pool:
            # map keeps request order, so results line up with `requests`.
            results = pool.map(self._complete_or_none, requests)
            return list(tqdm(results, total=len(requests), desc=desc or "llm", disable=None))
