"""A local OpenAI-compatible vision endpoint that judges by rule, and a fake eval workdir.

The server decodes the two data-URL PNGs of each request with PIL and answers from their mean
brightness; markers in the prompt text select other behaviour (see `rule_judge`).
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agfsync_jax.schemas import ManifestRow, PromptRecord

MAX_REQUESTS = 400  # a retry loop gone wrong fails the test instead of hammering forever
LIFETIME_S = 120.0  # the server shuts itself down after this long even if a test forgets to


class ServerState:
    def __init__(self, respond: Callable[[dict[str, Any], "ServerState"], dict[str, Any]]):
        self.respond = respond
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.overflow = 0
        self.extra: dict[str, Any] = {}  # per-test knobs read by the responder

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)


def _handler(state: ServerState) -> type[http.server.BaseHTTPRequestHandler]:

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                if len(state.bodies) >= MAX_REQUESTS:
                    state.overflow += 1
                    reply = {"status": 503, "raw": "request budget of the test server exhausted"}
                else:
                    state.bodies.append(body)
                    state.authorization.append(self.headers.get("Authorization"))
                    reply = None
            if self.path != "/v1/chat/completions":
                reply = {"status": 404, "raw": f"unknown path {self.path}"}
            if reply is None:
                reply = state.respond(body, state)
            raw = reply.get("raw")
            if raw is None:
                raw = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply["content"]},
                     "finish_reason": "stop"}]})
            data = raw.encode("utf-8")
            self.send_response(reply.get("status", 200))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def judge_server():
    """start(respond=rule_judge) -> (base_url, state): a threaded HTTP server on 127.0.0.1,
    random port."""
    servers = []

    def start(respond=None) -> tuple[str, ServerState]:
        respond = respond or rule_judge
        state = ServerState(respond)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
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
        timer.cancel()
        server.shutdown()
        server.server_close()
        assert state.overflow == 0, "the client sent more requests than the test allows"


# --- what the rule judge reads from a request ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Asked:
    prompt: str
    question: str
    brightness: tuple[float, float]  # mean pixel value of Image 1 and Image 2


def _decode(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    data = base64.b64decode(url[len(prefix):], validate=True)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), np.float64)


def parse_request(body: dict[str, Any]) -> Asked:
    """Reads the judge's message the way a VLM sees it: texts and images in order."""
    (message,) = body["messages"]
    assert message["role"] == "user"
    parts = message["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url", "text"]
    assert texts[1:3] == ["Image 1:", "Image 2:"]
    prompt = re.fullmatch(r'Two images were generated from the text description: "(.*)"', texts[0])
    assert prompt, texts[0]
    return Asked(prompt=prompt.group(1), question=texts[3].split("\n")[0],
                 brightness=(_decode(urls[0]).mean(), _decode(urls[1]).mean()))


def rule_judge(body: dict[str, Any], state: ServerState) -> dict[str, Any]:
    """Q1 and Q3 prefer the brighter image, Q2 the darker one, whatever the position, except:

    "[biased]" in the prompt: always "1" (pure position bias);
    "[malformed]": "Image 1" (not the asked format) whenever Image 1 is the brighter one;
    "[ratelimit]": the first request for the prompt gets 429, later ones the rule;
    "[down]": 503 while state.extra["down"] is true.
    After state.extra["unauthorized_after"] answers, every request gets 401.
    """
    asked = parse_request(body)
    with state.lock:
        answered = state.extra.get("answered", 0)
        limit = state.extra.get("unauthorized_after")
        if limit is not None and answered >= limit:
            return {"status": 401, "raw": '{"error": "invalid api key"}'}
        if "[ratelimit]" in asked.prompt and not state.extra.get("ratelimited"):
            state.extra["ratelimited"] = True
            return {"status": 429, "raw": '{"error": "slow down"}'}
        if "[down]" in asked.prompt and state.extra.get("down"):
            return {"status": 503, "raw": '{"error": "overloaded"}'}
        state.extra["answered"] = answered + 1
    first_brighter = asked.brightness[0] > asked.brightness[1]
    if "[biased]" in asked.prompt:
        return {"content": "1"}
    if "[malformed]" in asked.prompt and first_brighter:
        return {"content": "Image 1"}
    prefers_darker = asked.question == "Which image better fits the text description?"
    pick_first = first_brighter != prefers_darker
    return {"content": " 1\n" if pick_first else "2"}


# --- a fake eval workdir --------------------------------------------------------------------------

def write_png(path: Path, level: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(path, format="PNG")


def make_eval_workdir(root: Path, prompts: list[tuple[str, str, int, int | None]],
                      seed: int = 200) -> Path:
    """An eval set directory (WORKDIR/eval/<set>): {base,finetuned} as the eval stage leaves them.

    prompts: (id, text, base brightness, finetuned brightness or None for no finetuned image).
    """
    for model in ("base", "finetuned"):
        model_dir = root / model
        records = [PromptRecord(id=pid, category="c", prompt=text, source="test").to_dict()
                   for pid, text, _, _ in prompts]
        (model_dir / "prompts").mkdir(parents=True, exist_ok=True)
        (model_dir / "prompts" / "prompts.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        rows = []
        for pid, _, base_level, fine_level in prompts:
            level = base_level if model == "base" else fine_level
            if level is None:
                continue
            image = f"images/{pid}_0.png"
            write_png(model_dir / "candidates" / image, level)
            rows.append(ManifestRow(prompt_id=pid, candidate=0, seed=seed, noise_sigma=0.0,
                                    image=image, latent=f"latents/{pid}_0.npy", scheduler="ddim",
                                    steps=2, cfg=7.5).to_dict())
        (model_dir / "candidates" / "manifest-00000-of-00001.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def png_writer():
    """write_png(path, level): a solid grey PNG."""
    return write_png


@pytest.fixture
def eval_workdir_maker():
    """make_eval_workdir(root, prompts): a fake eval workdir (see `make_eval_workdir`)."""
    return make_eval_workdir
