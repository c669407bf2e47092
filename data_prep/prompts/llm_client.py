"""Chat completions from any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp, TGI...).

Before its first request the client checks the endpoint once (GET {base_url}/models): a
refused connection, a host name that does not resolve, a refused API key (401/403) or a
missing route (404) raise `LLMEndpointError` naming the URL and the cause, with no retries,
since no call could succeed. Only 429, 5xx, timeouts and dropped connections are retried, with
exponential backoff (tenacity), honouring a numeric Retry-After header. Requests in flight are
limited; successful replies are cached on disk, and a fully cached run needs no endpoint.
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

from data_prep.prompts.chat_backend import CallStats, ChatRequest, LLMEndpointError, LLMError
from data_prep.prompts.response_cache import ResponseCache, request_key

log = logging.getLogger(__name__)


class _RetryableError(LLMError):
    """A failure worth another attempt (rate limit, server error, timeout, dropped connection)."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(reason, message)
        self.retry_after_s = retry_after_s


# Fragments of the resolver's messages (glibc, macOS, Windows) for a name that does not resolve.
_DNS_FAILURES = ("name or service not known", "nodename nor servname", "name resolution",
                 "getaddrinfo", "no address associated", "no such host")


def _connect_cause(error: httpx.ConnectError) -> str:
    """What a failed connection looks like to a person: refused, DNS, or the raw reason."""
    text = str(error) or type(error).__name__
    lowered = text.lower()
    if "refused" in lowered:
        return f"connection refused, nothing listens there ({text})"
    if any(fragment in lowered for fragment in _DNS_FAILURES):
        return f"the host name does not resolve (DNS: {text})"
    return f"cannot connect ({text})"


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
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0):
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
        self._api_key_env = api_key_env
        self._check_lock = threading.Lock()
        self._checked = False
        self._max_attempts = max_retries + 1
        self._check_error: LLMEndpointError | None = None
        self.cache = cache
        self.stats = CallStats()
        self._max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._http = httpx.Client(base_url=base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s),
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_RetryableError),
            stop=tenacity.stop_after_attempt(self._max_attempts),
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

    def _key_fix(self) -> str:
        if self._api_key_env:
            return (f"Check the key in ${self._api_key_env} (config.prompts.llm.api_key_env) "
                    f"and that it may use this endpoint")
        return ("The endpoint wants an API key: set config.prompts.llm.api_key_env to the "
                "environment variable that holds it")

    def _send(self, method: str, route: str, **kw: Any) -> httpx.Response:
        """One HTTP exchange; connection failures that no retry can mend raise at once."""
        try:
            return self._http.request(method, route, **kw)
        except httpx.TimeoutException as e:
            raise _RetryableError("timeout", f"{self.base_url}/{route}: no reply in time "
                                             f"({type(e).__name__})") from e
        except httpx.ConnectError as e:
            raise LLMEndpointError(
                self.base_url, _connect_cause(e),
                "Start the server or correct config.prompts.llm.base_url") from e
        except httpx.TransportError as e:
            # A connection that was made and then dropped: the server side failed, like a 5xx.
            raise _RetryableError("transport", f"{self.base_url}/{route}: "
                                               f"{type(e).__name__}: {e}") from e

    def _raise_for_endpoint(self, response: httpx.Response, route: str) -> None:
        """Raises for the answers that say no request can succeed, or that are worth a retry."""
        code = response.status_code
        if code in (401, 403):
            raise LLMEndpointError(self.base_url, f"HTTP {code} on {route}: the server refused "
                                                  f"the API key ({response.text[:200]!r})",
                                   self._key_fix())
        if code == 429 or (code >= 500 and code != 501):
            raise _RetryableError(f"http_{code}", f"{self.base_url}/{route} answered {code}",
                                  _retry_after(response))

    def _probe_once(self) -> None:
        response = self._send("GET", "models")
        self._raise_for_endpoint(response, "models")
        if response.status_code != 200:
            # Some servers do not list models (404/405/501): reachable is all we learn.
            return
        try:
            served = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if self.model not in served:
            # A warning, not an error: some servers (llama.cpp) accept any model name.
            log.warning("%s does not list model %r (config.prompts.llm.model); it lists %s",
                        self.base_url, self.model, served[:10])

    def check(self) -> None:
        """Checks once that the endpoint can serve calls; raises LLMEndpointError if not.

        Runs by itself before the first request; threads that arrive meanwhile wait for it,
        and a failed check is raised again to every later caller without asking again.
        """
        with self._check_lock:
            if self._check_error is not None:
                raise self._check_error
            if self._checked:
                return
            try:
                self._retrying(self._probe_once)
            except _RetryableError as e:
                self._check_error = LLMEndpointError(
                    self.base_url, f"still failing after {self._max_attempts} attempts ({e})",
                    "Retry when the server is back, or raise config.prompts.llm.max_retries")
                raise self._check_error from e
            except LLMEndpointError as e:
                self._check_error = e
                raise
            self._checked = True

    def _post_once(self, body: dict[str, Any]) -> str:
        with self._slots:
            self.stats.add("requests")
            response = self._send("POST", "chat/completions", json=body)
        self._raise_for_endpoint(response, "chat/completions")
        code = response.status_code
        if code == 404:
            raise LLMEndpointError(
                self.base_url, f"HTTP 404 on chat/completions ({response.text[:200]!r})",
                "Check config.prompts.llm.base_url (most servers serve under /v1) and "
                "config.prompts.llm.model")
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
        self.check()
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
            # Futures in request order, so results line up with `requests`.
            futures = [pool.submit(self._complete_or_none, r) for r in requests]
            try:
                return [f.result() for f in tqdm(futures, desc=desc or "llm", disable=None)]
            except LLMEndpointError:
                for f in futures:
                    f.cancel()  # no call can succeed: do not start the rest
                raise
