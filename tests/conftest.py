"""Session-wide fixtures: tiny SD pipelines built once and saved as real diffusers folders, a
subprocess runner, and a local OpenAI-compatible vision endpoint that judges by rule (it decodes
the two data-URL PNGs of each request and answers from their mean brightness; markers in the
prompt text select other behaviour, see `rule_judge`)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Tests are CPU-only and must not grab every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path_factory: pytest.TempPathFactory, family: str, safetensors: bool) -> Path:
    from agfsync_jax.tiny import build as tiny

    out = tmp_path_factory.mktemp("models") / f"tiny-{family}-{'st' if safetensors else 'bin'}"
    return tiny.save_tiny_pipeline(family, out, seed=0, safetensors=safetensors)


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> Path:
    """A safetensors-only tiny SD1.x folder."""
    return _tiny(tmp_path_factory, "sd1", safetensors=True)


@pytest.fixture(scope="session")
def tiny_sd1_bin_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd1", safetensors=False)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sdxl", safetensors=True)


@pytest.fixture(scope="session")
def tiny_sdxl_bin_path(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sdxl", safetensors=False)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_sd1_path):
    from agfsync_jax.models.loading import load_stable_diffusion

    return load_stable_diffusion(tiny_sd1_path)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_path):
    from agfsync_jax.models.loading import load_stable_diffusion

    return load_stable_diffusion(tiny_sdxl_path)


@pytest.fixture(scope="session")
def run_python():
    """Runs a Python snippet in a fresh process (for multi-device / multi-host code paths).

    `devices=N` simulates N CPU devices; XLA reads the flag only at start-up, hence the
    subprocess. Returns the completed process; a non-zero exit fails the test with its output.
    """
    import subprocess
    import sys

    def run(code: str, devices: int = 1, timeout: float = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc
    return run


class GcsEmulator:
    """A GCS emulator (gcp-storage-emulator, in memory: tests/gcs_emulator_server.py) on 127.0.0.1,
    with one bucket."""

    def __init__(self, host: str, bucket: str):
        self.host, self.bucket = host, bucket

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def object_names(self, prefix: str = "") -> list[str]:
        """Every object name under `prefix`, listed through the emulator's JSON API."""
        import json
        import urllib.parse
        import urllib.request

        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.host}/storage/v1/b/{self.bucket}/o?{query}", timeout=30) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """Starts the emulator for the session and points this process (and its children) at it
    through STORAGE_EMULATOR_HOST, before anything here touches gs://."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host, bucket = f"http://127.0.0.1:{port}", "agfsync-test-bucket"
    log = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "gcs_emulator_server.py"),
                                 "--host=127.0.0.1", f"--port={port}", f"--bucket={bucket}"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        yield GcsEmulator(host, bucket)
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- a rule-judging OpenAI-compatible vision endpoint -------------------------------------------

MAX_REQUESTS = 400  # a retry loop gone wrong fails the test instead of hammering forever
LIFETIME_S = 120.0  # the server shuts itself down after this long even if a test forgets to


class ServerState:
    def __init__(self, respond: Callable[[dict[str, Any], "ServerState"], dict[str, Any]],
                 max_requests: int = MAX_REQUESTS):
        self.respond = respond
        self.max_requests = max_requests
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
                if len(state.bodies) >= state.max_requests:
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


def _judge_servers(max_requests: int = MAX_REQUESTS, lifetime_s: float = LIFETIME_S):
    """start(respond=rule_judge) -> (base_url, state): threaded HTTP servers on 127.0.0.1,
    random ports; shut down (and checked) when the generator resumes."""
    servers = []

    def start(respond=None) -> tuple[str, ServerState]:
        respond = respond or rule_judge
        state = ServerState(respond, max_requests)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        timer = threading.Timer(lifetime_s, server.shutdown)
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


@pytest.fixture
def judge_server():
    """start(respond=rule_judge) -> (base_url, state), for one test."""
    yield from _judge_servers()


@pytest.fixture(scope="module")
def long_judge_server():
    """The same server for a whole module (a pipeline run asks it hundreds of questions)."""
    yield from _judge_servers(max_requests=2000, lifetime_s=3600.0)


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
