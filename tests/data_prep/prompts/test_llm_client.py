"""OpenAIChatClient against a real HTTP server on 127.0.0.1 (see conftest.openai_server)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from data_prep.prompts.chat_backend import ChatRequest, LLMEndpointError, LLMError
from data_prep.prompts.json_output import JSONOutputError, parse_json_output
from data_prep.prompts.llm_client import OpenAIChatClient
from data_prep.prompts.response_cache import ResponseCache

SECRET = "sk-test-do-not-leak-42"
TIMEOUT_S = 0.25


def reply(**fields) -> dict:
    return fields


def scripted(body, state) -> dict:
    """Behaviour chosen by the user message: 'case:<name>'."""
    case = body["messages"][-1]["content"]
    seen = sum(1 for b in state.bodies if b["messages"][-1]["content"] == case)  # incl. this one
    if case == "case:429-then-ok":
        if seen == 1:
            return reply(status=429, raw='{"error": "slow down"}')
        return reply(content='{"answer": "after 429"}')
    if case == "case:500":
        return reply(status=500, raw='{"error": "boom"}')
    if case == "case:malformed-body":
        return reply(raw='{"choices": [ this is not json')
    if case == "case:malformed-content":
        return reply(content='{"questions": [oops, not json')
    if case == "case:fenced":
        return reply(content='Sure! Here it is:\n```json\n{"questions": ["q1", "q2"]}\n```\n'
                             'Let me know if you need more.')
    if case == "case:slow":
        return reply(content='{"late": true}', delay_s=TIMEOUT_S * 6)
    if case.startswith("case:retry-after"):
        if seen == 1:
            return reply(status=429, raw="{}", headers={"Retry-After": "0.4"})
        return reply(content='{"ok": 1}')
    if case.startswith("case:sleep"):
        return reply(content='{"ok": 1}', delay_s=0.15)
    return reply(status=400, raw=f"unknown case {case}")


def request(case: str) -> ChatRequest:
    return ChatRequest(messages=(("system", "test"), ("user", case)), temperature=0.0,
                       max_tokens=16)


@pytest.fixture
def make_client(tmp_path, monkeypatch, openai_server):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    base_url, state = openai_server(scripted)
    clients = []

    def make(**kw) -> OpenAIChatClient:
        args = dict(base_url=base_url, model="test-model", api_key_env="TEST_LLM_KEY",
                    cache=ResponseCache(tmp_path / "cache"), timeout_s=TIMEOUT_S, max_retries=2,
                    max_concurrency=4, backoff_initial_s=0.01, backoff_max_s=0.05)
        args.update(kw)
        client = OpenAIChatClient(**args)
        clients.append(client)
        return client

    yield make, state
    for c in clients:
        c.close()


def test_429_is_retried_then_succeeds(make_client):
    make, state = make_client
    client = make()
    reply = client.complete(request("case:429-then-ok"))
    assert parse_json_output(reply) == {"answer": "after 429"}
    assert state.count == 2
    s = client.stats.as_dict()
    assert (s["requests"], s["retries"], s["succeeded"], s["failed"]) == (2, 1, 1, 0)


def test_500_exhausts_retries_and_is_counted(make_client):
    make, state = make_client
    client = make(max_retries=2)
    with pytest.raises(LLMError) as e:
        client.complete(request("case:500"))
    assert e.value.reason == "http_500"
    assert state.count == 3  # 1 + 2 retries
    assert client.complete_many([request("case:500")]) == [None]
    s = client.stats.as_dict()
    assert s["failures"] == {"http_500": 2} and s["retries"] == 4 and s["succeeded"] == 0


def test_malformed_body_fails_without_retry(make_client):
    make, state = make_client
    client = make()
    with pytest.raises(LLMError) as e:
        client.complete(request("case:malformed-body"))
    assert e.value.reason == "malformed_response"
    assert state.count == 1
    assert client.stats.failures == {"malformed_response": 1}


def test_malformed_content_reaches_the_parser(make_client):
    make, _ = make_client
    reply = make().complete(request("case:malformed-content"))
    with pytest.raises(JSONOutputError):
        parse_json_output(reply)


def test_fenced_json_with_trailing_text_parses(make_client):
    make, _ = make_client
    reply = make().complete(request("case:fenced"))
    assert parse_json_output(reply) == {"questions": ["q1", "q2"]}


def test_slow_reply_times_out_and_is_retried(make_client):
    make, state = make_client
    client = make(max_retries=1)
    start = time.monotonic()
    assert client.complete_many([request("case:slow")]) == [None]
    elapsed = time.monotonic() - start
    assert state.count == 2
    assert client.stats.failures == {"timeout": 1} and client.stats.retries == 1
    assert elapsed < TIMEOUT_S * 5  # gave up on time, did not wait for the slow reply


def test_retry_after_header_is_honoured(make_client):
    make, state = make_client
    client = make(backoff_max_s=1.0)
    start = time.monotonic()
    client.complete(request("case:retry-after"))
    assert time.monotonic() - start >= 0.4
    assert state.count == 2


def test_cache_makes_a_rerun_issue_zero_requests(make_client, tmp_path):
    make, state = make_client
    cases = ["case:429-then-ok", "case:fenced", "case:malformed-content", "case:500"]
    first = make().complete_many([request(c) for c in cases])
    assert first[3] is None and all(r is not None for r in first[:3])
    sent = state.count
    assert sent == 2 + 1 + 1 + 3

    second_client = make()  # a fresh process would see the same files
    second = second_client.complete_many([request(c) for c in cases[:3]])
    assert second == first[:3]
    assert state.count == sent  # zero requests
    s = second_client.stats.as_dict()
    assert (s["cached"], s["requests"], s["calls"]) == (3, 0, 3)

    # Failures are not cached: the 500 is asked again.
    second_client.complete_many([request("case:500")])
    assert state.count == sent + 3
    # A different request (another model) is not served from the cache.
    make(model="other-model").complete(request("case:fenced"))
    assert state.count == sent + 4


def test_concurrency_limit(make_client):
    make, state = make_client
    client = make(max_concurrency=2)
    results = client.complete_many([request(f"case:sleep-{i}") for i in range(6)])
    assert all(r is not None for r in results)
    assert state.max_in_flight == 2  # used, and never exceeded


def test_api_key_is_sent_but_never_stored_or_logged(make_client, tmp_path, caplog):
    make, state = make_client
    caplog.set_level(logging.DEBUG)
    client = make()
    client.complete(request("case:429-then-ok"))
    assert state.authorization == [f"Bearer {SECRET}"] * 2
    assert SECRET not in repr(client)
    assert SECRET not in caplog.text
    files = list((tmp_path / "cache").rglob("*.json"))
    assert files and all(SECRET not in f.read_text() for f in files)
    assert json.loads(files[0].read_text())["request"]["model"] == "test-model"


def test_missing_api_key_variable_is_an_error(make_client, monkeypatch):
    make, state = make_client
    monkeypatch.delenv("TEST_LLM_KEY")
    with pytest.raises(ValueError, match="TEST_LLM_KEY"):
        make()
    # Servers without keys: api_key_env="" sends no Authorization header.
    make(api_key_env="").complete(request("case:fenced"))
    assert state.authorization == [None]


def test_requests_from_many_threads_share_the_limit(make_client):
    make, state = make_client
    client = make(max_concurrency=1)
    threads = [threading.Thread(target=client.complete, args=(request(f"case:sleep-t{i}"),))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.count == 3 and state.max_in_flight == 1


# --- the endpoint check: causes that no retry can mend fail at once, naming URL and cause ---

def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint_client(tmp_path, base_url, **kw) -> OpenAIChatClient:
    args = dict(base_url=base_url, model="test-model", api_key_env="",
                cache=ResponseCache(tmp_path / "cache"), timeout_s=TIMEOUT_S, max_retries=5,
                max_concurrency=4, backoff_initial_s=0.01, backoff_max_s=0.05)
    args.update(kw)
    return OpenAIChatClient(**args)


def test_connection_refused_is_one_error_naming_url_and_cause(tmp_path):
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    with endpoint_client(tmp_path, base_url) as client:
        with pytest.raises(LLMEndpointError) as e:
            client.complete_many([request(f"case:sleep-{i}") for i in range(5)])
        assert base_url in str(e.value) and "connection refused" in str(e.value)
        assert "config.prompts.llm.base_url" in str(e.value)
        s = client.stats.as_dict()
        assert s["retries"] == 0 and s["requests"] == 0  # checked once, nothing retried


def test_unresolvable_host_is_one_error_naming_the_dns_failure(tmp_path):
    base_url = "http://agfsync-llm.invalid/v1"  # .invalid never resolves (RFC 2606)
    with endpoint_client(tmp_path, base_url) as client:
        with pytest.raises(LLMEndpointError, match="does not resolve") as e:
            client.complete(request("case:fenced"))
        assert base_url in str(e.value) and client.stats.retries == 0


@pytest.mark.parametrize("code", [401, 403])
def test_refused_api_key_is_one_error_naming_the_variable(make_client, tmp_path, openai_server,
                                                          code):
    base_url, state = openai_server(scripted, lambda path, st: {"status": code, "raw": "{}"})
    make, _ = make_client
    client = make(base_url=base_url)
    with pytest.raises(LLMEndpointError) as e:
        client.complete_many([request("case:fenced"), request("case:500")])
    assert f"HTTP {code}" in str(e.value) and base_url in str(e.value)
    assert "TEST_LLM_KEY" in str(e.value) and SECRET not in str(e.value)
    assert state.get_paths == ["/v1/models"] and state.count == 0  # one check, no chat calls
    assert client.stats.retries == 0


def test_a_401_on_a_chat_call_stops_the_stage_without_retries(make_client, openai_server):
    base_url, state = openai_server(lambda body, st: {"status": 401, "raw": "bad key"},
                                    lambda path, st: {"status": 404, "raw": "no model list"})
    make, _ = make_client
    client = make(base_url=base_url)
    with pytest.raises(LLMEndpointError, match="HTTP 401 on chat/completions"):
        client.complete_many([request("case:fenced")])
    assert state.count == 1 and client.stats.retries == 0


def test_the_check_retries_5xx_and_runs_once(make_client, openai_server):
    def flaky_models(path, st):
        if len(st.get_paths) == 1:
            return {"status": 503, "raw": "warming up"}
        return {"raw": json.dumps({"data": [{"id": "test-model"}]})}

    base_url, state = openai_server(scripted, flaky_models)
    make, _ = make_client
    client = make(base_url=base_url)
    assert all(client.complete_many([request(f"case:sleep-{i}") for i in range(4)]))
    assert state.get_paths == ["/v1/models"] * 2  # one retry of the check, then never again
    assert state.count == 4


def test_a_check_that_keeps_failing_names_url_and_attempts(make_client, openai_server):
    base_url, state = openai_server(scripted, lambda path, st: {"status": 502, "raw": "down"})
    make, _ = make_client
    client = make(base_url=base_url, max_retries=2)
    with pytest.raises(LLMEndpointError, match="still failing after 3 attempts") as e:
        client.complete(request("case:fenced"))
    assert base_url in str(e.value) and "502" in str(e.value)
    with pytest.raises(LLMEndpointError):  # remembered: the endpoint is not asked again
        client.complete(request("case:fenced"))
    assert len(state.get_paths) == 3 and state.count == 0


def test_a_fully_cached_run_needs_no_endpoint(make_client, tmp_path):
    make, state = make_client
    first = make().complete(request("case:fenced"))
    # The same cache, an endpoint that is gone: every reply comes from the cache.
    client = endpoint_client(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    assert client.complete(request("case:fenced")) == first
    client.close()
