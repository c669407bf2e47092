"""Stage `judge`: a VLM compares base and finetuned eval images, the paper's Table 2 study.

    agfsync-jax ... --config.eval.judge.base_url=http://HOST:8000/v1 --config.eval.judge.model=NAME

Its work directory is an eval prompt set's (WORKDIR/eval/<set>; the eval stage runs it there).
Reads the eval's images (<set>/base, <set>/finetuned: same prompts, same seed), asks the three
questions of `protocol.QUESTIONS` for every pair in both image orders, and writes
  <set>/judge/judgments.jsonl  one row per prompt x question x order, with the raw reply
  <set>/judge/summary.json     win / tie / loss per question, sign test, skip counts
Rows are appended as replies arrive, so a killed run keeps them. A re-run reuses every row that
is final (answered, or malformed) and whose request is unchanged (judge model, message, image
digests: its `request_key`), asks only the rest (failed requests included), and rewrites
judgments.jsonl atomically in prompt x question x order order. With both eval.judge.base_url
and eval.judge.model empty the stage is off.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any

from tqdm import tqdm

from agfsync_jax import storage
from agfsync_jax.storage import Path
from agfsync_jax import workdir as workdir_lib
from agfsync_jax.errors import ConfigError
from agfsync_jax.atomic_io import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_complete_lines
from data_prep.judge import protocol
from data_prep.judge.client import JudgeClient, JudgeImage, JudgeRequest
from data_prep.judge.pairs import ImagePair, load_pairs
from data_prep.judge.summary import RowKey, row_key, summarize
from data_prep.prompts.llm_client import LLMError
from data_prep.prompts.response_cache import ResponseCache

log = logging.getLogger(__name__)

_ROW_FIELDS = ("prompt_id", "question", "order", "status", "request_key")


def judge_enabled(judge: Any) -> bool:
    """False when both base_url and model are empty (judge off); one of the two is an error."""
    if not judge.base_url and not judge.model:
        return False
    if not judge.base_url or not judge.model:
        missing = "base_url" if not judge.base_url else "model"
        raise ConfigError(f"config.eval.judge.{missing} is empty while the other of base_url/model "
                         "is set: set both to use the VLM judge, or neither to turn it off")
    return True


@dataclasses.dataclass(frozen=True)
class _Task:
    pair: ImagePair
    question: protocol.Question
    order: str
    request: JudgeRequest
    key: str

    @property
    def row_key(self) -> RowKey:
        return (self.pair.prompt_id, self.question.key, self.order)


def _tasks(pairs: list[ImagePair], client: JudgeClient) -> list[_Task]:
    tasks = []
    for pair in pairs:
        images = {protocol.BASE: JudgeImage.read(pair.base_image),
                  protocol.FINETUNED: JudgeImage.read(pair.finetuned_image)}
        for q in protocol.QUESTIONS:
            for order, shown in protocol.ORDERS.items():
                request = JudgeRequest(q, pair.prompt, (images[shown[0]], images[shown[1]]))
                tasks.append(_Task(pair, q, order, request, client.request_key(request)))
    return tasks


def _row(task: _Task, model: str, workdir: Path, status: str, raw_answer: str | None,
         error: str | None = None) -> dict[str, Any]:
    answer = protocol.parse_answer(raw_answer) if status == protocol.ANSWERED else None
    return {
        "prompt_id": task.pair.prompt_id, "seed": task.pair.seed,
        "question": task.question.key, "order": task.order,
        "model": model, "request_key": task.key,
        "status": status, "raw_answer": raw_answer,
        "choice": protocol.chosen_model(task.order, answer) if answer is not None else None,
        "error": error,
        "base_image": str(task.pair.base_image.relative_to(workdir)),
        "finetuned_image": str(task.pair.finetuned_image.relative_to(workdir)),
    }


def _judge(client: JudgeClient, task: _Task, workdir: Path) -> dict[str, Any]:
    """One ask; a request that failed for good becomes a `request_failed` row, asked again on
    the next run. JudgeEndpointError propagates: no other request can succeed either."""
    try:
        reply = client.answer(task.request)
    except LLMError as e:
        return _row(task, client.model, workdir, protocol.FAILED, None, error=str(e))
    status = protocol.ANSWERED if protocol.parse_answer(reply) is not None else protocol.MALFORMED
    return _row(task, client.model, workdir, status, reply)


def _reusable_rows(path: Path, tasks: list[_Task]) -> dict[RowKey, dict[str, Any]]:
    """Rows of an earlier run that answer one of `tasks` exactly (same request key), final."""
    wanted = {t.row_key: t.key for t in tasks}
    kept = {}
    for i, row in enumerate(read_complete_lines(path)):
        if not isinstance(row, dict) or any(f not in row for f in _ROW_FIELDS):
            raise ValueError(f"{path}:{i + 1}: not a judgment row (needs fields {_ROW_FIELDS}); "
                             f"delete {path} to judge again from the reply cache")
        key = row_key(row)
        if row["status"] in protocol.FINAL_STATUSES and wanted.get(key) == row["request_key"]:
            kept[key] = row
    return kept


def _ordered(tasks: list[_Task], rows: dict[RowKey, dict[str, Any]]) -> list[dict[str, Any]]:
    return [rows[t.row_key] for t in tasks if t.row_key in rows]


def _run_tasks(client: JudgeClient, tasks: list[_Task], workdir: Path, max_concurrency: int,
               out: JsonlAppender, rows: dict[RowKey, dict[str, Any]]) -> None:
    """Asks every task, appending each row as it arrives; the first exception stops the rest."""
    first_error: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(max_concurrency) as pool:
        futures = [pool.submit(_judge, client, t, workdir) for t in tasks]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                           desc="judge", disable=None):
            if future.cancelled():
                continue
            try:
                row = future.result()
            except Exception as e:  # noqa: BLE001 - re-raised below, after in-flight rows are kept
                if first_error is None:
                    first_error = e
                    for f in futures:
                        f.cancel()
                continue
            out.append(row)
            rows[row_key(row)] = row
    if first_error is not None:
        raise first_error


def run(config: Any, workdir: str) -> dict[str, Any]:
    judge = config.eval.judge
    if not judge_enabled(judge):
        print("judge: off (config.eval.judge.base_url and .model are empty)")
        return {"judge": "off"}
    wd = storage.as_path(workdir)
    out_dir = wd / workdir_lib.JUDGE
    judgments_path = wd / workdir_lib.JUDGE_JUDGMENTS
    pairs, skipped_prompts = load_pairs(wd)
    cache = ResponseCache(judge.cache_dir or out_dir / "cache")
    with JudgeClient(base_url=judge.base_url, model=judge.model, api_key_env=judge.api_key_env,
                     cache=cache, timeout_s=float(judge.timeout_s),
                     max_retries=int(judge.max_retries), max_concurrency=int(judge.max_concurrency),
                     backoff_initial_s=float(judge.backoff_initial_s),
                     backoff_max_s=float(judge.backoff_max_s)) as client:
        tasks = _tasks(pairs, client)
        rows = _reusable_rows(judgments_path, tasks)
        # Rewritten before appending: drops a torn last line and rows of other requests.
        atomic_write_jsonl(judgments_path, _ordered(tasks, rows))
        pending = [t for t in tasks if t.row_key not in rows]
        print(f"judge: {len(pairs)} pairs x {len(protocol.QUESTIONS)} questions x "
              f"{len(protocol.ORDERS)} orders; {len(tasks) - len(pending)} judgments from an "
              f"earlier run, {len(pending)} to ask {client.model} at {client.base_url}", flush=True)
        with JsonlAppender(judgments_path) as out:
            _run_tasks(client, pending, wd, int(judge.max_concurrency), out, rows)
        stats = client.stats.as_dict()
    atomic_write_jsonl(judgments_path, _ordered(tasks, rows))
    summary = summarize(pairs, rows, skipped_prompts)
    summary.update({"model": judge.model, "base_url": judge.base_url, "calls": stats,
                    "judgments": workdir_lib.JUDGE_JUDGMENTS})
    atomic_write_json(wd / workdir_lib.JUDGE_SUMMARY, summary)
    failed = summary["rows"][protocol.FAILED]
    if failed:
        log.warning("judge: %d requests failed for good (see 'error' in %s); re-run to ask them again",
                    failed, judgments_path)
    line = "; ".join(f"{k} {s['wins']}/{s['ties']}/{s['losses']} win/tie/loss"
                     + (f", p = {s['p_one_sided']:.3g}" if s["p_one_sided"] is not None else "")
                     for k, s in summary["questions"].items())
    print(f"judge: {line}; {summary['rows'][protocol.MALFORMED]} malformed answers, {failed} failed "
          f"requests, {stats['requests']} requests sent; {wd / workdir_lib.JUDGE_SUMMARY}", flush=True)
    return summary
