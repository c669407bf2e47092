"""The judge stage end to end against the rule-judging local server (see conftest.rule_judge)."""

import json

import pytest
from scipy import stats as scipy_stats

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.evaluation import judge_table
from configs.common import base_config
from data_prep.judge import stage
from data_prep.judge.client import JudgeEndpointError

# (id, prompt, base brightness, finetuned brightness). Q1 and Q3 prefer the brighter image, Q2
# the darker one, so a brighter finetuned image wins Q1 and Q3 and loses Q2.
PROMPTS = [
    ("p0", "a red cat", 60, 180),
    ("p1", "a blue dog", 100, 140),
    ("p2", "a green bird", 200, 50),           # finetuned darker: loses Q1/Q3, wins Q2
    ("p3", "[biased] a boat", 60, 180),        # always "1": the orders disagree, a tie each
    ("p4", "[malformed] a river", 60, 180),    # one malformed answer per question
    ("p5", "[ratelimit] a sun", 60, 180),      # a 429 first, then like p0
    ("p6", "a lonely chair", 90, None),        # no finetuned image: a skipped prompt
]
PAIRS = 6
ROWS = PAIRS * 3 * 2


def _config(base_url, **judge):
    c = base_config()
    c.eval.judge.base_url = base_url
    c.eval.judge.model = "judge-vlm"
    c.eval.judge.api_key_env = ""
    c.eval.judge.max_concurrency = 2
    c.eval.judge.max_retries = 2
    c.eval.judge.backoff_initial_s = 0.01
    c.eval.judge.backoff_max_s = 0.05
    for k, v in judge.items():
        setattr(c.eval.judge, k, v)
    return c


def _judgments(wd):
    return [json.loads(line) for line in (wd / workdir_lib.JUDGE_JUDGMENTS).read_text().splitlines()]


def _counts(summary):
    return {k: (q["wins"], q["ties"], q["losses"], q["skipped"]["malformed_answer"],
                q["skipped"]["request_failed"]) for k, q in summary["questions"].items()}


EXPECTED_COUNTS = {"q1": (3, 1, 1, 1, 0), "q2": (1, 1, 3, 1, 0), "q3": (3, 1, 1, 1, 0)}


def _greater(wins, losses):
    return scipy_stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue


@pytest.fixture
def workdir(tmp_path, eval_workdir_maker):
    return eval_workdir_maker(tmp_path / "wd", PROMPTS)


def test_counts_ties_malformed_and_the_sign_test(workdir, judge_server):
    url, state = judge_server()
    summary = stage.run(_config(url), str(workdir))

    assert _counts(summary) == EXPECTED_COUNTS
    assert summary["pairs"] == PAIRS and summary["skipped_prompts"] == {"missing_image": 1}
    assert summary["rows"] == {"answered": ROWS - 3, "malformed_answer": 3, "request_failed": 0}
    q1, q2 = summary["questions"]["q1"], summary["questions"]["q2"]
    assert q1["judged"] == 5 and q1["win_rate"] == 3 / 5 and q1["tie_rate"] == 1 / 5
    assert q1["p_one_sided"] == pytest.approx(_greater(3, 1))
    assert q2["p_one_sided"] == pytest.approx(_greater(1, 3))
    # Answers naming Image 1: p3's six, one per question pair of p0/p1/p2/p5, and p4's Q2.
    assert summary["first_position_rate"] == pytest.approx(19 / 33)
    assert state.count == ROWS + 1  # one retry after the 429
    assert summary["calls"]["retries"] == 1 and summary["calls"]["cached"] == 0
    assert json.loads((workdir / workdir_lib.JUDGE_SUMMARY).read_text()) == summary

    rows = _judgments(workdir)
    assert len(rows) == ROWS
    assert [(r["prompt_id"], r["question"], r["order"]) for r in rows[:4]] == [
        ("p0", "q1", "base_first"), ("p0", "q1", "finetuned_first"),
        ("p0", "q2", "base_first"), ("p0", "q2", "finetuned_first")]
    by_key = {(r["prompt_id"], r["question"], r["order"]): r for r in rows}
    biased = [by_key[("p3", "q1", o)] for o in ("base_first", "finetuned_first")]
    assert [(r["raw_answer"], r["choice"]) for r in biased] == [("1", "base"), ("1", "finetuned")]
    malformed = by_key[("p4", "q1", "finetuned_first")]
    assert (malformed["status"], malformed["raw_answer"], malformed["choice"]) == (
        "malformed_answer", "Image 1", None)
    # The raw reply is stored as sent (" 1\n" parses as 1).
    assert by_key[("p0", "q1", "finetuned_first")]["raw_answer"] == " 1\n"
    assert by_key[("p0", "q1", "finetuned_first")]["choice"] == "finetuned"
    assert all(r["seed"] == 200 and r["model"] == "judge-vlm" for r in rows)
    assert by_key[("p0", "q1", "base_first")]["base_image"] == "base/candidates/images/p0_0.png"

    table = judge_table.judge_markdown(judge_table.load_summary(workdir / workdir_lib.JUDGE_SUMMARY))
    assert ('| Q1 general preference (General): "Which image do you prefer?" | 60.0% | 20.0% | '
            f'20.0% | 5 | 1 / 0 | {_greater(3, 1):.3g} |') in table
    assert '| Q2 prompt alignment (Faithful): "Which image better fits the text description?" | 20.0% |' in table


def test_rerun_asks_nothing_and_the_cache_alone_answers_everything(workdir, judge_server):
    url, state = judge_server()
    first = stage.run(_config(url), str(workdir))
    text = (workdir / workdir_lib.JUDGE_JUDGMENTS).read_text()
    asked = state.count

    again = stage.run(_config(url), str(workdir))  # from judgments.jsonl
    assert state.count == asked and again["calls"]["calls"] == 0
    assert (workdir / workdir_lib.JUDGE_JUDGMENTS).read_text() == text

    (workdir / workdir_lib.JUDGE_JUDGMENTS).unlink()
    cached = stage.run(_config(url), str(workdir))  # from the reply cache
    assert state.count == asked
    assert cached["calls"]["cached"] == ROWS and cached["calls"]["requests"] == 0
    assert (workdir / workdir_lib.JUDGE_JUDGMENTS).read_text() == text
    assert _counts(cached) == _counts(first) == EXPECTED_COUNTS


def test_resume_after_a_run_stopped_by_an_endpoint_error(workdir, judge_server, tmp_path):
    url, state = judge_server()
    state.extra["unauthorized_after"] = 8
    with pytest.raises(JudgeEndpointError, match="401") as info:
        stage.run(_config(url, max_concurrency=1), str(workdir))
    assert url in str(info.value)
    assert not (workdir / workdir_lib.JUDGE_SUMMARY).exists()
    partial = _judgments(workdir)
    assert len(partial) == 8 and all(r["status"] == "answered" for r in partial)

    del state.extra["unauthorized_after"]
    before = state.count
    # An empty cache: whatever is not asked again comes from judgments.jsonl.
    summary = stage.run(_config(url, max_concurrency=1, cache_dir=str(tmp_path / "cache2")),
                        str(workdir))
    assert state.count - before == ROWS - 8 + 1  # + the 429 of p5
    assert _counts(summary) == EXPECTED_COUNTS
    rows = _judgments(workdir)
    assert len(rows) == ROWS and rows[:8] == partial


def test_a_torn_last_line_is_asked_again(workdir, judge_server):
    url, state = judge_server()
    stage.run(_config(url), str(workdir))
    path = workdir / workdir_lib.JUDGE_JUDGMENTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # a crash mid-append
    (workdir / workdir_lib.JUDGE / "cache").rename(workdir / "old_cache")
    before = state.count
    summary = stage.run(_config(url), str(workdir))
    assert state.count - before == 1
    assert _counts(summary) == EXPECTED_COUNTS


def test_failed_requests_are_counted_then_asked_again(tmp_path, eval_workdir_maker, judge_server):
    wd = eval_workdir_maker(tmp_path / "wd", [("p0", "a red cat", 60, 180),
                                              ("p1", "[down] a tree", 60, 180)])
    url, state = judge_server()
    state.extra["down"] = True
    summary = stage.run(_config(url, max_retries=1), str(wd))
    assert summary["rows"]["request_failed"] == 6
    assert _counts(summary) == {"q1": (1, 0, 0, 0, 1), "q2": (0, 0, 1, 0, 1), "q3": (1, 0, 0, 0, 1)}
    failed = [r for r in _judgments(wd) if r["status"] == "request_failed"]
    assert len(failed) == 6 and all("http_503" in r["error"] and r["raw_answer"] is None for r in failed)

    state.extra["down"] = False
    before = state.count
    summary = stage.run(_config(url, max_retries=1), str(wd))
    assert state.count - before == 6
    assert summary["rows"]["request_failed"] == 0
    assert _counts(summary)["q1"] == (2, 0, 0, 0, 0)


def test_a_changed_image_is_judged_again(workdir, judge_server, png_writer):
    url, state = judge_server()
    stage.run(_config(url), str(workdir))
    # p0's finetuned image becomes darker than its base image: Q1/Q3 now a loss, Q2 a win.
    png_writer(workdir / "finetuned/candidates/images/p0_0.png", 10)
    before = state.count
    summary = stage.run(_config(url), str(workdir))
    assert state.count - before == 6
    assert _counts(summary)["q1"] == (2, 1, 2, 1, 0) and _counts(summary)["q2"] == (2, 1, 2, 1, 0)


def test_connection_refused_stops_the_stage_naming_the_url(workdir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeEndpointError, match="(?i)connection refused") as info:
        stage.run(_config(url, max_retries=5, backoff_initial_s=30.0), str(workdir))
    assert url in str(info.value)
    assert not (workdir / workdir_lib.JUDGE_SUMMARY).exists()


def test_judge_off_and_half_configured(workdir):
    assert stage.run(_config("", model=""), str(workdir)) == {"judge": "off"}
    assert not (workdir / workdir_lib.JUDGE).exists()
    with pytest.raises(ValueError, match="config.eval.judge.model is empty"):
        stage.run(_config("http://127.0.0.1:1/v1", model=""), str(workdir))


def test_bad_eval_artifacts_are_named(tmp_path, eval_workdir_maker):
    wd = eval_workdir_maker(tmp_path / "wd", PROMPTS[:2])
    manifest = wd / "finetuned/candidates/manifest-00000-of-00001.jsonl"
    manifest.write_text(manifest.read_text().replace('"seed": 200', '"seed": 201', 1))
    with pytest.raises(ValueError, match="prompt 'p0'.*seed 200.*201"):
        stage.run(_config("http://127.0.0.1:1/v1"), str(wd))

    (wd / "base/prompts/prompts.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="base/prompts/prompts.jsonl"):
        stage.run(_config("http://127.0.0.1:1/v1"), str(wd))
