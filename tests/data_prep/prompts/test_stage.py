"""The prompts stage end to end: schema, resume, shards, benchmark and LLM sources, the CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from agfsync_jax.schemas import CATEGORIES, KIND_INSTRUCTION_PAIR, read_prompts
from agfsync_jax.workdir import DONE_MARKER, PROMPTS_FILE
from configs.common import base_config
from data_prep.prompts import stage
from data_prep.prompts.chat_backend import LLMEndpointError

REPO = Path(__file__).resolve().parents[3]


def config(**prompts):
    c = base_config()
    c.prompts.per_category = 3
    c.prompts.instruction_pairs = 4
    for k, v in prompts.items():
        c.prompts[k] = v
    return c


def run_shards(c, workdir, count):
    summaries = []
    for i in range(count):
        c.shard.index, c.shard.count = i, count
        summaries.append(stage.run(c, str(workdir)))
    return summaries


def test_offline_stage_writes_schema_valid_records_and_resumes(tmp_path, capsys):
    summary = stage.run(config(), str(tmp_path))
    out = capsys.readouterr().out
    assert re.search(r"prompts: made 40 \(36 prompts, 4 pairs, \d+ questions\) \| dropped 0", out)
    records = read_prompts(tmp_path / PROMPTS_FILE)  # what the sampler reads
    assert len(records) == summary["made"] == 40
    assert {r.category for r in records if r.kind == "prompt"} == set(CATEGORIES)
    pairs = [r for r in records if r.kind == KIND_INSTRUCTION_PAIR]
    assert len(pairs) == 4 and all(p.prompt_2 and p.questions_2 and p.theme for p in pairs)
    assert all(len(r.questions) >= 5 for r in records)
    assert summary["questions"] == sum(len(r.questions) + len(r.questions_2) for r in records)
    assert (tmp_path / "prompts" / DONE_MARKER).exists()

    before = (tmp_path / PROMPTS_FILE).stat().st_mtime_ns
    again = stage.run(config(), str(tmp_path))
    assert "already complete" in capsys.readouterr().out
    assert again == summary and (tmp_path / PROMPTS_FILE).stat().st_mtime_ns == before


def test_same_seed_same_bytes_whatever_the_shard_count(tmp_path):
    stage.run(config(), str(tmp_path / "a"))
    stage.run(config(), str(tmp_path / "b"))
    reference = (tmp_path / "a" / PROMPTS_FILE).read_bytes()
    assert (tmp_path / "b" / PROMPTS_FILE).read_bytes() == reference

    c = config()
    c.shard.index, c.shard.count = 1, 3
    partial = stage.run(c, str(tmp_path / "sharded"))
    assert partial["shard"] == 1 and not (tmp_path / "sharded" / PROMPTS_FILE).exists()
    summaries = run_shards(config(), tmp_path / "sharded", 3)
    assert summaries[0]["shard"] == 0 and summaries[1]["shard"] == 1  # 1 was already done
    assert (tmp_path / "sharded" / PROMPTS_FILE).read_bytes() == reference
    assert summaries[2]["made"] == 40 and summaries[2]["shards"] == 3

    c = config()
    c.seed = 1
    stage.run(c, str(tmp_path / "other-seed"))
    assert (tmp_path / "other-seed" / PROMPTS_FILE).read_bytes() != reference


def test_resuming_with_another_config_is_an_error(tmp_path):
    stage.run(config(), str(tmp_path))
    with pytest.raises(RuntimeError, match=r"other prompts settings \(prompts\.\w+ changed\); `agfsync-jax clean prompts"):
        stage.run(config(per_category=4), str(tmp_path))
    c = config()
    c.prompts.llm.max_concurrency = 2  # operational: not part of the fingerprint
    stage.run(c, str(tmp_path))


def test_min_questions_drops_are_counted(tmp_path, capsys):
    summary = stage.run(config(per_category=10, min_questions=8), str(tmp_path))
    assert summary["dropped"]["too_few_questions"] > 0
    assert summary["made"] + summary["dropped"]["too_few_questions"] == 124
    assert "too_few_questions=" in capsys.readouterr().out
    for r in read_prompts(tmp_path / PROMPTS_FILE):
        assert len(r.questions) >= 8 and (r.kind == "prompt" or len(r.questions_2) >= 8)


def test_benchmark_source(tmp_path):
    csv_path = tmp_path / "db.csv"
    csv_path.write_text("Prompts,Category\nA green bus.,Colors\nTwo cats.,Counting\n"
                        "A red cube.,Colors\n")
    c = config(source="benchmark", instruction_pairs=0)
    c.prompts.benchmark.format, c.prompts.benchmark.path = "drawbench", str(csv_path)
    run_shards(c, tmp_path / "wd", 2)
    records = read_prompts(tmp_path / "wd" / PROMPTS_FILE)
    assert [(r.id, r.prompt, r.source, r.questions) for r in records] == [
        ("drawbench-0000", "A green bus.", "drawbench", ()),
        ("drawbench-0001", "Two cats.", "drawbench", ()),
        ("drawbench-0002", "A red cube.", "drawbench", ())]

    c = config(source="benchmark", instruction_pairs=2)
    c.prompts.benchmark.format, c.prompts.benchmark.path = "drawbench", str(csv_path)
    with pytest.raises(ValueError, match="instruction_source"):
        stage.run(c, str(tmp_path / "wd2"))
    c.prompts.instruction_source = "offline"
    assert stage.run(c, str(tmp_path / "wd2"))["pairs"] == 2


# --- LLM source against the local test server ---------------------------------------------

NOUNS = ("kite boat lamp tree tower bridge violin clock kettle drum anchor cactus bicycle "
         "lantern statue barrel").split()
COLORS = "red blue green yellow purple orange white black".split()


def fake_llm(body, state):
    """A tiny deterministic 'LLM' that follows our request formats."""
    user = body["messages"][-1]["content"]
    h = zlib.crc32(user.encode())
    if "new prompts for a text-to-image model" in user:
        k = int(re.search(r"Write (\d+) new prompts", user).group(1))
        category = re.search(r'category "([^"]+)"', user).group(1)
        batch = int(re.search(r"This is batch (\d+)", user).group(1))
        prompts = []
        for j in range(k):
            n = (h >> (3 * j)) + j
            noun, other = NOUNS[n % len(NOUNS)], NOUNS[(n // 7 + 1 + j) % len(NOUNS)]
            prompts.append(f"{['Two', 'Three', 'Four'][j % 3]} {COLORS[n % 8]} {noun}s beside "
                           f"a {other} for {category} study {batch}-{j}")
        # Batch 0 of "animals" repeats itself: one near-duplicate to drop.
        if category == "animals" and batch == 0:
            prompts.append(prompts[0] + ".")
        return {"content": "```json\n" + json.dumps({"prompts": prompts}) + "\n```"}
    if user.startswith("Description:") and "Questions:\n" in user:
        n = len(re.findall(r"^\d+\. ", user, re.M))
        return {"content": json.dumps({"verdicts": [{"index": i, "valid": True}
                                                    for i in range(1, n + 1)]})}
    if user.startswith("Description:"):
        words = re.findall(r"[a-z]+", user.split("\n", 1)[0].removeprefix("Description:").lower())
        qs = [{"question": f"Is there {w} in the image?", "element": w, "element_type": "object"}
              for w in dict.fromkeys(w for w in words if len(w) > 3)]
        return {"content": json.dumps({"questions": qs}) + "\nThese cover the description."}
    if user.startswith("Theme:"):
        entity = re.search(r"Base instruction: (.+)", user).group(1)
        return {"content": json.dumps({
            "instruction_1": f"A tidy {entity} under morning light beside weathered stones",
            "instruction_2": f"A giant glass {entity} melting under violet light beside stones"})}
    return {"status": 400, "raw": "unexpected request"}


def llm_config(base_url, cache_dir):
    c = config(source="llm", per_category=2, instruction_pairs=3)
    c.prompts.llm.base_url = base_url
    c.prompts.llm.model = "fake"
    c.prompts.llm.api_key_env = ""
    c.prompts.llm.prompts_per_request = 2
    c.prompts.llm.cache_dir = str(cache_dir)
    c.prompts.llm.backoff_initial_s = 0.01
    return c


def test_llm_source_end_to_end_and_a_rerun_costs_nothing(tmp_path, openai_server, capsys):
    base_url, server = openai_server(fake_llm)
    c = llm_config(base_url, tmp_path / "cache")
    summary = stage.run(c, str(tmp_path / "first"))
    records = read_prompts(tmp_path / "first" / PROMPTS_FILE)
    assert summary["prompts"] == 24 and summary["pairs"] == 3 and len(records) == 27
    assert summary["dropped"] == {"near_duplicate": 1}
    # 12 categories x 1 prompt request (animals' extra copy is dropped, two remain: no refill),
    # 3 pair requests, and 30 texts (24 prompts + 2 x 3 instructions) x (generate + validate).
    expected_requests = 12 + 3 + 2 * (24 + 6)
    assert server.count == expected_requests
    assert summary["llm"]["requests"] == expected_requests and summary["llm"]["cached"] == 0
    for r in records:
        assert r.source in ("llm", "instruct_llm") and len(r.questions) >= 5
        assert all(q.element.lower() in r.prompt.lower() for q in r.questions)
    pair = next(r for r in records if r.kind == KIND_INSTRUCTION_PAIR)
    assert pair.divergence == "content_consistency" and "melting" in pair.prompt_2
    assert re.search(r"\| llm calls \d+: \d+ requests, 0 cached, 0 failed", capsys.readouterr().out)

    # A new workdir with the same cache: identical file, zero requests.
    again = stage.run(llm_config(base_url, tmp_path / "cache"), str(tmp_path / "second"))
    assert server.count == expected_requests
    assert again["llm"]["requests"] == 0 and again["llm"]["cached"] == expected_requests
    assert ((tmp_path / "second" / PROMPTS_FILE).read_bytes()
            == (tmp_path / "first" / PROMPTS_FILE).read_bytes())


def test_an_unreachable_llm_fails_at_once_and_leaves_no_marker(tmp_path, openai_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    base_url = f"http://127.0.0.1:{port}/v1"
    c = llm_config(base_url, tmp_path / "cache")
    with pytest.raises(LLMEndpointError, match="connection refused") as e:
        stage.run(c, str(tmp_path / "wd"))
    assert base_url in str(e.value)
    assert not list((tmp_path / "wd").rglob("_DONE*"))

    # The endpoint is back at the same URL: the same command now does the work.
    openai_server(fake_llm, port=port)
    assert stage.run(c, str(tmp_path / "wd"))["prompts"] == 24


def test_a_shard_whose_every_llm_call_failed_is_not_marked_done(tmp_path, openai_server):
    base_url, server = openai_server(lambda body, st: {"status": 400, "raw": "no"})
    c = llm_config(base_url, tmp_path / "cache")
    c.prompts.instruction_pairs = 0
    with pytest.raises(RuntimeError, match=r"kept no record .*http_400=") as e:
        stage.run(c, str(tmp_path / "wd"))
    assert "shard 0/1" in str(e.value)
    assert not list((tmp_path / "wd").rglob("_DONE*"))


def test_cli_runs_the_stage(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "agfsync_jax.main", "prompts", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", "--config.prompts.instruction_pairs=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_category = 8  # configs/tiny.py
    made = 12 * per_category + 3
    assert f"prompts: made {made} ({12 * per_category} prompts, 3 pairs" in proc.stdout
    assert len(read_prompts(tmp_path / PROMPTS_FILE)) == made
