"""JudgeClient against a real HTTP server on 127.0.0.1: retries, fail-fast errors, the cache."""

import json
import socket

import pytest

from data_prep.judge import protocol
from data_prep.judge.client import JudgeClient, JudgeEndpointError, JudgeImage, JudgeRequest
from data_prep.prompts.llm_client import LLMError
from data_prep.prompts.response_cache import ResponseCache

SECRET = "sk-judge-test-not-a-real-key"


@pytest.fixture
def request_pair(tmp_path, png_writer):
    png_writer(tmp_path / "dark.png", 40)
    png_writer(tmp_path / "bright.png", 200)
    images = (JudgeImage.read(tmp_path / "dark.png"), JudgeImage.read(tmp_path / "bright.png"))

    def make(prompt="a red cat", question="q1"):
        return JudgeRequest(protocol.question(question), prompt, images)

    return make


@pytest.fixture
def make_client(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    clients = []

    def make(base_url, **kw):
        args = dict(base_url=base_url, model="judge-vlm", api_key_env="JUDGE_TEST_KEY",
                    cache=ResponseCache(tmp_path / "cache"), timeout_s=5.0, max_retries=2,
                    max_concurrency=2, backoff_initial_s=0.01, backoff_max_s=0.05)
        args.update(kw)
        client = JudgeClient(**args)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def _free_port() -> int:
    """A port nothing listens on: bound once to get it, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_answer_sends_images_as_png_data_urls_and_the_key(judge_server, make_client, request_pair):
    url, state = judge_server()
    client = make_client(url)
    # Image 2 is the brighter one; Q1 prefers the brighter image.
    assert client.answer(request_pair()) == "2"
    assert state.authorization == [f"Bearer {SECRET}"]
    (body,) = state.bodies
    assert body["model"] == "judge-vlm" and body["temperature"] == 0.0
    assert SECRET not in repr(client)


def test_429_is_retried_then_answered(judge_server, make_client, request_pair):
    url, state = judge_server()
    client = make_client(url)
    assert client.answer(request_pair(prompt="[ratelimit] a cat")) == "2"
    assert state.count == 2
    assert client.stats.retries == 1 and client.stats.succeeded == 1


def test_5xx_after_the_last_retry_fails_this_request_only(judge_server, make_client, request_pair):
    url, state = judge_server()
    state.extra["down"] = True
    client = make_client(url, max_retries=2)
    with pytest.raises(LLMError) as info:
        client.answer(request_pair(prompt="[down] a cat"))
    assert not isinstance(info.value, JudgeEndpointError)
    assert info.value.reason == "http_503"
    assert state.count == 3  # one attempt plus max_retries


def test_401_fails_at_once_naming_the_url(judge_server, make_client, request_pair):
    url, state = judge_server()
    state.extra["unauthorized_after"] = 0
    client = make_client(url, max_retries=5, backoff_initial_s=30.0)
    with pytest.raises(JudgeEndpointError, match="401") as info:
        client.answer(request_pair())
    assert url in str(info.value)
    assert state.count == 1 and client.stats.retries == 0


def test_connection_refused_fails_at_once_naming_the_url(make_client, request_pair):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    # A retry would sleep 30 s: the test would hang instead of passing.
    client = make_client(url, max_retries=5, backoff_initial_s=30.0)
    with pytest.raises(JudgeEndpointError, match="(?i)connection refused") as info:
        client.answer(request_pair())
    assert url in str(info.value)
    assert client.stats.requests == 1 and client.stats.retries == 0


def test_unknown_host_fails_at_once_naming_the_url(make_client, request_pair):
    url = "http://vlm-judge.invalid/v1"  # .invalid never resolves (RFC 2606)
    client = make_client(url, max_retries=5, backoff_initial_s=30.0)
    with pytest.raises(JudgeEndpointError, match="host name does not resolve") as info:
        client.answer(request_pair())
    assert url in str(info.value)
    assert client.stats.retries == 0


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="JUDGE_MISSING_KEY.*config.eval.judge.api_key_env"):
        JudgeClient(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="JUDGE_MISSING_KEY",
                    cache=ResponseCache(tmp_path))


def test_cache_answers_repeats_and_is_keyed_by_image_digest(tmp_path, judge_server, make_client,
                                                            request_pair, png_writer):
    url, state = judge_server()
    client = make_client(url)
    assert client.answer(request_pair()) == "2"
    assert make_client(url).answer(request_pair()) == "2"  # a new client, the same cache
    assert state.count == 1
    (entry,) = (tmp_path / "cache").rglob("*.json")
    text = entry.read_text()
    # The entry names images by digest and does not carry them.
    assert "base64" not in text and text.count("sha256:") == 2
    assert json.loads(text)["response"] == "2"
    # Another question or other pixels: another key, another request.
    client.answer(request_pair(question="q2"))
    png_writer(tmp_path / "bright.png", 201)
    changed = JudgeRequest(protocol.question("q1"), "a red cat",
                           (JudgeImage.read(tmp_path / "dark.png"),
                            JudgeImage.read(tmp_path / "bright.png")))
    assert client.request_key(changed) != client.request_key(request_pair())
    client.answer(changed)
    assert state.count == 3


def test_image_must_be_a_png(tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(ValueError, match="x.png: not a PNG"):
        JudgeImage.read(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        JudgeImage.read(tmp_path / "missing.png")
