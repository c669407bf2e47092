"""`agfsync-jax score`: candidates -> WORKDIR/scores/scores-*.jsonl and WORKDIR/pairs (TFDS).

    agfsync-jax score --config=configs/sd15.py --workdir=DIR [--config.shard.index=i --config.shard.count=n]

Per shard (prompts i::n by sorted id):
1. score every candidate with the configured scorers, appending ScoreRow lines (with the VQA
   scorer's per-question answers) to scores/scores-SHARD.jsonl; a re-run skips candidates
   already there (a crash costs at most the batch in flight). A missing or corrupt image or
   latent skips that candidate, counted with its path; a re-run tries it again.
2. pick the pairs (pairs.py), then write pairs/agfsync_pairs-train.tfrecord-SHARD atomically and
   pairs/summary-SHARD.json (this shard is then done and is skipped on a re-run).
3. when every shard's summary exists: write the TFDS metadata, then pairs/_DONE.json. Whichever
   shard finishes last does this; re-running any shard finishes it after a crash.

A shard with prompts but not a single pair fails with the counts by reason and writes neither
its pairs nor its summary, so a re-run (after fixing the cause) redoes it from the stored scores.

Totals are recomputed from the stored per-scorer scores with the current weights, so changing
scoring.weights_preset re-pairs without re-scoring (as long as the needed scores exist). Stored
scores must come from the same scorer versions as the current config; that is checked whenever
the scorers are loaded, i.e. whenever a candidate is left to score.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

from absl import logging
from tqdm import tqdm

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.atomic_io import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_complete_lines
from agfsync_jax.schemas import PromptRecord, ScoreRow, read_prompts
from data_prep.scoring import candidates as candidates_lib
from data_prep.scoring.candidates import BadCandidate, Candidate
from data_prep.scoring.factory import build_scorers, required_scorers
from data_prep.scoring.pair_records import pair_example, shard_filename, tfds_features, write_tfrecord
from data_prep.scoring.pairs import Pair, select_pairs
from data_prep.scoring.scorer import Scorer, ScoringItem
from data_prep.scoring.tiny import resolve_scoring_config
from data_prep.scoring.weights import resolve_weights, weighted_total

NO_QUESTIONS = "no_questions"


def _summary_path(pairs_dir: Path, suffix: str) -> Path:
    return pairs_dir / f"summary-{suffix}.json"


def load_scores(path: Path, scorer_names: list[str], weights: dict[str, float]) -> list[ScoreRow]:
    """Rows of an earlier run, totals recomputed with `weights`; the file is rewritten when a torn
    last line was dropped or a total changed, so later appends start on a clean line."""
    raw = read_complete_lines(path)
    rows = [ScoreRow.from_dict(d, f"{path} row {i + 1}") for i, d in enumerate(raw)]
    updated = []
    for row in rows:
        missing = [n for n in scorer_names if n not in row.scores]
        if missing:
            raise ValueError(f"{path}: candidate {row.prompt_id}/{row.instruction}/{row.candidate} has no "
                             f"{missing} score; delete the file to rescore with the current scorers")
        updated.append(dataclasses.replace(row, total=weighted_total(row.scores, weights)))
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0
    if n_lines != len(rows) or any(a.total != b.total for a, b in zip(rows, updated)):
        atomic_write_jsonl(path, [r.to_dict() for r in updated])
    return updated


def _check_versions(rows: list[ScoreRow], scorers: dict[str, Scorer], path: Path) -> None:
    for row in rows:
        for name, scorer in scorers.items():
            if row.scorers.get(name) != scorer.version:
                raise ValueError(f"{path}: {name} scores were made by {row.scorers.get(name)!r}, the config now "
                                 f"gives {scorer.version!r}; delete the file to rescore")


def _score_candidates(todo: list[Candidate], scorers: dict[str, Scorer], weights: dict[str, float],
                      candidates_dir: Path, appender: JsonlAppender, batch_size: int,
                      bad: dict[str, list[str]]) -> list[ScoreRow]:
    rows: list[ScoreRow] = []
    versions = {name: s.version for name, s in scorers.items()}
    with tqdm(total=len(todo), desc="score", unit="img") as progress:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ok: list[tuple[Candidate, ScoringItem]] = []
            for cand in chunk:
                try:
                    image = candidates_lib.load_image(candidates_dir / cand.row.image)
                    candidates_lib.load_latent(candidates_dir / cand.row.latent)
                except BadCandidate as e:
                    logging.warning("skipping candidate %s: %s", cand.key, e)
                    bad[e.reason].append(str(e.path))
                    continue
                ok.append((cand, ScoringItem(image=image, text=cand.text, questions=cand.questions)))
            if ok:
                items = [item for _, item in ok]
                values, answers = {}, None
                for name, scorer in scorers.items():
                    values[name], per_item = scorer.score_with_answers(items)
                    answers = per_item if per_item is not None else answers
                for j, (cand, _) in enumerate(ok):
                    scores = {name: float(values[name][j]) for name in scorers}
                    row = ScoreRow(prompt_id=cand.row.prompt_id, candidate=cand.row.candidate, scores=scores,
                                   total=weighted_total(scores, weights), scorers=versions,
                                   instruction=cand.row.instruction,
                                   vqa_answers=answers[j] if answers is not None else ())
                    appender.append(row.to_dict())
                    rows.append(row)
            progress.update(len(chunk))
    return rows


def _write_pairs(pairs: list[Pair], by_key: dict[tuple[str, int, int], Candidate], candidates_dir: Path,
                 path: Path, store_png: bool) -> int:
    features = tfds_features()

    def serialized():
        for pair in tqdm(pairs, desc="pairs", unit="pair"):
            cands = [by_key[(r.prompt_id, r.instruction, r.candidate)] for r in (pair.winner, pair.loser)]
            try:
                latents = [candidates_lib.load_latent(candidates_dir / c.row.latent) for c in cands]
            except BadCandidate as e:
                raise RuntimeError(f"a scored candidate's latent became unreadable after scoring: {e}") from e
            pngs = [(candidates_dir / c.row.image).read_bytes() if store_png else b"" for c in cands]
            yield features.serialize_example(pair_example(pair, latents[0], latents[1], pngs[0], pngs[1]))

    return write_tfrecord(path, serialized())


def _finish_if_complete(pairs_dir: Path, shard_count: int) -> bool:
    """Writes TFDS metadata and the done marker once every shard is done; True when complete."""
    if (pairs_dir / workdir_lib.DONE_MARKER).is_file():
        return True
    summaries = [_summary_path(pairs_dir, workdir_lib.shard_suffix(i, shard_count)) for i in range(shard_count)]
    if not all(p.is_file() for p in summaries):
        return False
    from data_prep.scoring.tfds_metadata import write_tfds_metadata

    num_pairs = write_tfds_metadata(pairs_dir, shard_count)
    per_shard = [json.loads(p.read_text()) for p in summaries]
    if num_pairs != sum(s["pairs"] for s in per_shard):
        raise RuntimeError(f"{pairs_dir}: TFRecords hold {num_pairs} pairs but the shard summaries say "
                           f"{sum(s['pairs'] for s in per_shard)}")
    atomic_write_json(pairs_dir / workdir_lib.DONE_MARKER, {"pairs": num_pairs, "shards": shard_count})
    return True


def _summary_line(s: dict[str, Any]) -> str:
    def counts(d: dict[str, Any]) -> str:
        return " ".join(f"{k}={len(v) if isinstance(v, list) else v}" for k, v in sorted(d.items())) or "none"

    return (f"score {s['shard']}: {s['scored']} candidates scored ({s['already_scored']} from an earlier run), "
            f"{sum(len(v) for v in s['bad_candidates'].values())} skipped ({counts(s['bad_candidates'])}), "
            f"{s['pairs']} pairs ({counts(s['pairs_by_kind'])}), "
            f"{sum(len(v) for v in s['prompts_without_pair'].values())} prompt(s) without a pair "
            f"({counts(s['prompts_without_pair'])}), dataset {'complete' if s['complete'] else 'waiting for shards'}")


def _counts(d: dict[str, list[str]]) -> str:
    return " ".join(f"{k}={len(v)}" for k, v in sorted(d.items()) if v) or "none"


class NoPairsError(RuntimeError):
    """A shard's prompts gave no preference pair: training would have nothing to learn from."""


def _no_pairs_error(suffix: str, num_prompts: int, num_candidates: int, scored: int,
                    without_pair: dict[str, list[str]], bad: dict[str, list[str]]) -> NoPairsError:
    hints = []
    if without_pair.get("too_few_candidates") or without_pair.get("missing_instruction_candidates"):
        hints.append("fewer than 2 scored candidates per prompt: check sampling.num_candidates and "
                     "that `sample` finished without failures")
    if bad.get(NO_QUESTIONS):
        hints.append("prompts without questions cannot get a VQA score: generate questions "
                     "(prompts.benchmark.questions=llm) or give VQA no weight "
                     "(scoring.weights_preset)")
    if without_pair.get("below_margin") or without_pair.get("tie"):
        hints.append("best and worst candidates score (nearly) the same: lower scoring.min_margin")
    return NoPairsError(
        f"score {suffix}: no pair survived of {num_prompts} prompt(s) ({num_candidates} "
        f"candidates, {scored} with scores): prompts without a pair {_counts(without_pair)}; "
        f"candidates skipped {_counts(bad)}. Nothing was written to pairs/; "
        + ("; ".join(hints) or "fix the cause") + ", then re-run `score`")


def run(config: Any, workdir: str, require_pairs: bool = True) -> dict[str, Any]:
    """Scores this shard's candidates and writes its pairs; see the module docstring.

    `require_pairs=False` (the evaluation, which samples one candidate per prompt) scores only:
    a shard without pairs is then not an error.
    """
    wd = Path(workdir)
    shard_index, shard_count = int(config.shard.index), int(config.shard.count)
    suffix = workdir_lib.shard_suffix(shard_index, shard_count)
    pairs_dir = wd / workdir_lib.PAIRS
    summary_path = _summary_path(pairs_dir, suffix)
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["complete"] = _finish_if_complete(pairs_dir, shard_count)
        print(_summary_line(summary) + " [shard was already done]", flush=True)
        return summary

    scoring = resolve_scoring_config(config.scoring, wd, seed=int(config.seed))
    weights = resolve_weights(scoring.weights_preset, scoring.weights)
    names = required_scorers(weights, scoring.extra)
    records: dict[str, PromptRecord] = {r.id: r for r in read_prompts(wd / workdir_lib.PROMPTS_FILE)}
    prompt_ids = set(candidates_lib.shard_prompt_ids(records, shard_index, shard_count))
    candidates_dir = wd / workdir_lib.CANDIDATES
    if not (candidates_dir / workdir_lib.DONE_MARKER).is_file():
        raise FileNotFoundError(f"{candidates_dir / workdir_lib.DONE_MARKER} is missing: the sampling stage has "
                                "not finished, and pairs from a partial candidate set would be wrong")
    cands = candidates_lib.read_candidates(candidates_dir, records, prompt_ids)
    by_key = {c.key: c for c in cands}

    scores_path = wd / workdir_lib.SCORES / f"scores-{suffix}.jsonl"
    previous = [r for r in load_scores(scores_path, names, weights)
                if (r.prompt_id, r.instruction, r.candidate) in by_key]
    done = {(r.prompt_id, r.instruction, r.candidate) for r in previous}
    bad: dict[str, list[str]] = collections.defaultdict(list)
    todo = []
    for cand in cands:
        if cand.key in done:
            continue
        if "vqa" in names and not cand.questions:
            bad[NO_QUESTIONS].append(cand.where)
            continue
        todo.append(cand)
    new_rows: list[ScoreRow] = []
    if todo:
        scorers = build_scorers(names, scoring)
        _check_versions(previous, scorers, scores_path)
        with JsonlAppender(scores_path) as appender:
            new_rows = _score_candidates(todo, scorers, weights, candidates_dir, appender,
                                         int(scoring.batch_size), bad)

    pairs, without_pair = select_pairs({pid: records[pid] for pid in prompt_ids}, previous + new_rows,
                                       float(scoring.min_margin))
    if require_pairs and prompt_ids and not pairs:
        raise _no_pairs_error(suffix, len(prompt_ids), len(cands), len(previous) + len(new_rows),
                              without_pair, bad)
    num_written = _write_pairs(pairs, by_key, candidates_dir,
                               pairs_dir / shard_filename(shard_index, shard_count), bool(scoring.store_png))
    summary: dict[str, Any] = {
        "shard": suffix,
        "candidates": len(cands),
        "scored": len(new_rows),
        "already_scored": len(previous),
        "bad_candidates": dict(bad),
        "pairs": num_written,
        "pairs_by_kind": dict(collections.Counter(p.kind for p in pairs)),
        "prompts_without_pair": without_pair,
        "weights": weights,
        "scorers": names,
    }
    atomic_write_json(summary_path, summary)
    summary["complete"] = _finish_if_complete(pairs_dir, shard_count)
    print(_summary_line(summary), flush=True)
    return summary
