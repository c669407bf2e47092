"""Fixtures of the prompts-stage tests: a real local OpenAI-compatible server, tiny HF folders."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# A hard cap per server: a retry loop gone wrong fails the test instead of hammering forever.
MAX_REQUESTS = 400
# The server shuts itself down after this long even if a test forgets to.
LIFETIME_S = 120.0


@dataclasses.dataclass
class Reply:
    status: int = 200
    content: str | None = None   # wrapped as a chat completion when `raw` is None
    raw: str | None = None       # the exact response body
    delay_s: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _list_models(path: str, state: "ServerState") -> dict[str, Any]:
    return {"raw": json.dumps({"object": "list", "data": [{"id": "test-model"}, {"id": "fake"}]})}


class ServerState:
    def __init__(self, respond: Callable[[dict[str, Any], "ServerState"], dict[str, Any]],
                 respond_get: Callable[[str, "ServerState"], dict[str, Any]] = _list_models):
        self.respond = respond
        self.respond_get = respond_get
        self.get_paths: list[str] = []  # GET requests (the client's endpoint check)
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.overflow = 0
        self.stop = threading.Event()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def user_texts(self) -> list[str]:
        with self.lock:
            return [b["messages"][-1]["content"] for b in self.bodies]


def _handler(state: ServerState) -> type[http.server.BaseHTTPRequestHandler]:

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, reply: Reply) -> None:
            data = reply.raw.encode("utf-8")
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            with state.lock:
                state.get_paths.append(self.path)
                overflow = len(state.get_paths) > MAX_REQUESTS
                state.overflow += overflow
            reply = Reply(**state.respond_get(self.path, state))
            if overflow:
                reply = Reply(status=503, raw="request budget of the test server exhausted")
            self._send(reply)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                if len(state.bodies) >= MAX_REQUESTS:
                    state.overflow += 1
                    reply = Reply(status=503, raw="request budget of the test server exhausted")
                else:
                    state.bodies.append(body)
                    state.authorization.append(self.headers.get("Authorization"))
                    reply = None
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if self.path != "/v1/chat/completions":
                    reply = Reply(status=404, raw=f"unknown path {self.path}")
                if reply is None:
                    reply = Reply(**state.respond(body, state))
                if reply.delay_s:
                    state.stop.wait(reply.delay_s)
                raw = reply.raw
                if raw is None:
                    raw = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": "stop"}]})
                self._send(dataclasses.replace(reply, raw=raw))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
            finally:
                with state.lock:
                    state.in_flight -= 1

    return Handler


@pytest.fixture
def openai_server():
    """start(respond, respond_get, port) -> (base_url, state): a threaded HTTP server on 127.0.0.1.

    respond(body, state) answers POSTs, respond_get(path, state) GETs (default: a model list);
    both return the fields of `Reply` as a dict: status, content (wrapped as a chat completion,
    POST only), raw (the exact body), delay_s (POST only), headers. port 0 picks a free port.
    """
    servers = []

    def start(respond: Callable[[dict[str, Any], ServerState], dict[str, Any]],
              respond_get: Callable[[str, ServerState], dict[str, Any]] = _list_models,
              port: int = 0) -> tuple[str, ServerState]:
        state = ServerState(respond, respond_get)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        timer = threading.Timer(LIFETIME_S, server.shutdown)
        timer.daemon = True
        timer.start()
        servers.append((server, state, timer))
        return f"http://127.0.0.1:{server.server_address[1]}/v1", state

    yield start
    for server, state, timer in servers:
        state.stop.set()
        timer.cancel()
        server.shutdown()
        server.server_close()
        assert state.overflow == 0, "the client sent more requests than the test allows"


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level fast tokenizer with a chat template, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("a red blue green cat dog bird on under near the table chair river boat sky sun "
             "system user assistant : is there yes no json prompt question").split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]", cls_token="[CLS]", sep_token="[SEP]")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    out = tmp_path_factory.mktemp("hf") / "tokenizer"
    fast.save_pretrained(out)
    return out
