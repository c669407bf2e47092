"""`agfsync-jax score`: candidates -> WORKDIR/scores/scores-*.jsonl and WORKDIR/pairs (TFDS).

    agfsync-jax score --config=configs/sd15.py --workdir=DIR [--config.shard.index=i --config.shard.count=n]

Per shard (prompts i::n by sorted id):
1. score every candidate with the configured scorers, appending ScoreRow lines (with the VQA
   scorer's per-question answers) to scores/scores-SHARD.jsonl; a re-run skips candidates
   already there (a crash costs at most the batch in flight). A missing or corrupt image or
   latent skips that candidate, counted with its path; every re-run tries those again (after
   `sample` regenerated them they are scored and the shard re-paired).
   scores/summary-SHARD.json records the scorer settings the rows were made with.
2. pick the pairs (pairs.py), then write pairs/agfsync_pairs-train.tfrecord-SHARD atomically and
   pairs/summary-SHARD.json with the pairing settings (weights, margin) and the scores it used.
   A re-run rebuilds the shard when those changed or the shard file is damaged, without
   re-scoring: totals are recomputed from the stored per-scorer scores with the current weights.
3. when every shard is done: write the TFDS metadata, then pairs/_DONE.json (and scores/_DONE.json).
   Whichever shard finishes last does this; re-running any shard finishes it after a crash.
   A dataset without a single pair is a failure (no done marker), with the counts by reason.

Changed scorer settings (models, VQA mode, ...) or changed candidates with scores present stop
with the changed fields named: re-scoring is the expensive part, so it is never done silently.
With `scoring.pairs=False` (the eval stage) only step 1 runs.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import logging
from tqdm import tqdm

from agfsync_jax import done_marker, fingerprint, storage, workdir as workdir_lib
from agfsync_jax.atomic_io import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_complete_lines
from agfsync_jax.errors import MissingInputError, StageChangedError, StageFailedError
from agfsync_jax.pairs.records import PairDataError, scan_record_offsets
from agfsync_jax.schemas import PromptRecord, ScoreRow, read_prompts
from agfsync_jax.storage import Path
from data_prep.scoring import candidates as candidates_lib
from data_prep.scoring.candidates import BadCandidate, Candidate
from data_prep.scoring.factory import build_scorers, required_scorers
from agfsync_jax.pairs.records import shard_filename, tfds_features, write_tfrecord
from data_prep.scoring.pair_records import pair_example
from data_prep.scoring.pairs import BELOW_MARGIN, MISSING_INSTRUCTION, TIE, TOO_FEW, Pair, select_pairs
from data_prep.scoring.scorer import Scorer, ScoringItem
from data_prep.scoring.tiny import resolve_scoring_config
from agfsync_jax.score_weights import resolve_weights, weighted_total

NO_QUESTIONS = "no_questions"
# scoring.* fields that decide the pairs but not the scores: changing them re-pairs.
PAIRING_FIELDS = ("scoring.weights_preset", "scoring.weights", "scoring.min_margin", "scoring.store_png",
                  "scoring.pairs")
# scoring.* fields that change speed or placement only.
OPERATIONAL_FIELDS = ("scoring.batch_size", "scoring.device")


def _summary_path(stage_dir: Path, suffix: str) -> Path:
    return stage_dir / f"summary-{suffix}.json"


def scorer_settings(config: Any, candidates_marker: dict[str, Any]) -> dict[str, Any]:
    """What the stored scores depend on: the scoring config minus pairing and speed, the scorer
    set, and the candidates they were computed on."""
    return {**fingerprint.config_settings(config, ("seed", "scoring"), PAIRING_FIELDS + OPERATIONAL_FIELDS),
            "inputs.candidates": candidates_marker.get(done_marker.FINGERPRINT, candidates_marker.get("candidates"))}


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
    n_lines = storage.count_lines(path)
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
                appender.flush()  # a crash costs at most the batch in flight
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
            pngs = [storage.read_bytes(candidates_dir / c.row.image) if store_png else b"" for c in cands]
            yield features.serialize_example(pair_example(pair, latents[0], latents[1], pngs[0], pngs[1]))

    return write_tfrecord(path, serialized())


def _finish_if_complete(wd: Path, shard_count: int, write_pairs: bool, settings: dict[str, Any]) -> bool:
    """Writes TFDS metadata and the done markers once every shard is done; True when complete."""
    scores_dir, pairs_dir = wd / workdir_lib.SCORES, wd / workdir_lib.PAIRS
    suffixes = [workdir_lib.shard_suffix(i, shard_count) for i in range(shard_count)]
    score_summaries = [_summary_path(scores_dir, s) for s in suffixes]
    if not all(p.is_file() for p in score_summaries):
        return False
    if not write_pairs:
        done_marker.write(scores_dir, {"shards": shard_count, "rows": sum(
            storage.read_json(p)["rows"] for p in score_summaries)}, settings)
        return True
    if done_marker.is_done(pairs_dir):
        return True
    summaries = [_summary_path(pairs_dir, s) for s in suffixes]
    if not all(p.is_file() for p in summaries):
        return False
    per_shard = [storage.read_json(p) for p in summaries]
    num_pairs = sum(s["pairs"] for s in per_shard)
    if num_pairs == 0:
        reasons: collections.Counter = collections.Counter()
        for s in per_shard:
            reasons.update({f"prompts {k}": len(v) for k, v in s["prompts_without_pair"].items()})
            reasons.update({f"candidates {k}": len(v) for k, v in s["bad_candidates"].items()})
        raise StageFailedError(f"score: no pair survived in {pairs_dir} ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}); "
                               + "; ".join(_no_pair_hints(reasons)) + "; then re-run `score` (the stored scores are reused)")
    from agfsync_jax.pairs.metadata import write_tfds_metadata

    written = write_tfds_metadata(pairs_dir, shard_count)
    if written != num_pairs:
        raise RuntimeError(f"{pairs_dir}: TFRecords hold {written} pairs but the shard summaries say {num_pairs}")
    done_marker.write(scores_dir, {"shards": shard_count}, settings)
    done_marker.write(pairs_dir, {"pairs": num_pairs, "shards": shard_count},
                      {**settings, "pairing": [s["pairing"] for s in per_shard]})
    return True


def _no_pair_hints(reasons: collections.Counter) -> list[str]:
    hints = []
    if reasons.get(f"prompts {TOO_FEW}") or reasons.get(f"prompts {MISSING_INSTRUCTION}"):
        hints.append("fewer than 2 scored candidates per prompt: check sampling.num_candidates and that `sample` "
                     "finished without failures")
    if reasons.get(f"candidates {NO_QUESTIONS}"):
        hints.append("prompts without questions get no VQA score: generate questions "
                     "(prompts.benchmark.questions=llm) or give VQA no weight (scoring.weights_preset)")
    if reasons.get(f"prompts {BELOW_MARGIN}") or reasons.get(f"prompts {TIE}"):
        hints.append("best and worst candidates score (nearly) the same: lower scoring.min_margin")
    return hints or ["check the scorer settings and the candidates"]


def _summary_line(s: dict[str, Any]) -> str:
    def counts(d: dict[str, Any]) -> str:
        return " ".join(f"{k}={len(v) if isinstance(v, list) else v}" for k, v in sorted(d.items())) or "none"

    line = (f"score {s['shard']}: {s['scored']} candidates scored ({s['already_scored']} from an earlier run), "
            f"{sum(len(v) for v in s['bad_candidates'].values())} skipped ({counts(s['bad_candidates'])})")
    if "pairs" in s:
        line += (f", {s['pairs']} pairs ({counts(s['pairs_by_kind'])}), "
                 f"{sum(len(v) for v in s['prompts_without_pair'].values())} prompt(s) without a pair "
                 f"({counts(s['prompts_without_pair'])})")
    if s.get("redone"):
        line += f"; redone: {s['redone']}"
    return line + f", {'complete' if s['complete'] else 'waiting for shards'}"


def _readable(cand: Candidate, candidates_dir: Path, bad: dict[str, list[str]]) -> bool:
    try:
        candidates_lib.load_image(candidates_dir / cand.row.image)
        candidates_lib.load_latent(candidates_dir / cand.row.latent)
    except BadCandidate as e:
        bad[e.reason].append(str(e.path))
        return False
    return True


def _pair_shard_ok(path: Path) -> str | None:
    """None when the pair shard file is whole, else why not."""
    if not path.is_file():
        return "missing"
    try:
        scan_record_offsets(path)
    except PairDataError as e:
        return str(e)
    return None


def _scores_digest(rows: list[ScoreRow]) -> str:
    return fingerprint.digest({"rows": sorted((r.prompt_id, r.instruction, r.candidate, r.scores) for r in rows)})


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Scores this shard's candidates and writes its pairs (unless scoring.pairs is False); see
    the module docstring."""
    wd = storage.as_path(workdir)
    shard_index, shard_count = int(config.shard.index), int(config.shard.count)
    suffix = workdir_lib.shard_suffix(shard_index, shard_count)
    scores_dir, pairs_dir = wd / workdir_lib.SCORES, wd / workdir_lib.PAIRS
    candidates_dir = wd / workdir_lib.CANDIDATES
    candidates_marker = done_marker.read(candidates_dir)
    if candidates_marker is None:
        raise MissingInputError(f"{done_marker.path(candidates_dir)} is missing: the sampling stage has "
                                "not finished, and pairs from a partial candidate set would be wrong")
    settings = scorer_settings(config, candidates_marker)
    write_pairs = bool(config.scoring.pairs)
    scoring_summary_path = _summary_path(scores_dir, suffix)
    redone: list[str] = []
    if scoring_summary_path.is_file():
        previous_summary = storage.read_json(scoring_summary_path)
        changed = fingerprint.changed_fields(previous_summary.get("settings", {}), settings)
        if changed:
            raise StageChangedError(
                f"score: the scores in {scores_dir} were made with other settings ({', '.join(changed[:8])} "
                f"changed); {done_marker.redo_hint('score', wd)}")

    scoring = resolve_scoring_config(config.scoring, wd, seed=int(config.seed))
    weights = resolve_weights(scoring.weights_preset, scoring.weights)
    names = required_scorers(weights, scoring.extra)
    records: dict[str, PromptRecord] = {r.id: r for r in read_prompts(wd / workdir_lib.PROMPTS_FILE)}
    prompt_ids = set(candidates_lib.shard_prompt_ids(records, shard_index, shard_count))
    cands = candidates_lib.read_candidates(candidates_dir, records, prompt_ids)
    by_key = {c.key: c for c in cands}

    scores_path = scores_dir / f"scores-{suffix}.jsonl"
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
    if todo and scoring_summary_path.is_file():
        # A re-run: only candidates skipped before are left. Load scorers only if some of them
        # became readable (e.g. `sample` regenerated them).
        todo = [c for c in todo if _readable(c, candidates_dir, bad)]
    new_rows: list[ScoreRow] = []
    if todo:
        scorers = build_scorers(names, scoring)
        _check_versions(previous, scorers, scores_path)
        with JsonlAppender(scores_path) as appender:
            new_rows = _score_candidates(todo, scorers, weights, candidates_dir, appender,
                                         int(scoring.batch_size), bad)
        if new_rows and scoring_summary_path.is_file():
            redone.append(f"{len(new_rows)} candidate(s) skipped earlier now scored")
    rows = previous + new_rows
    summary: dict[str, Any] = {
        "shard": suffix, "candidates": len(cands), "scored": len(new_rows), "already_scored": len(previous),
        "bad_candidates": dict(bad), "weights": weights, "scorers": names,
    }
    atomic_write_json(scoring_summary_path, {**summary, "rows": len(rows), "settings": settings})

    if write_pairs:
        pairing = {**fingerprint.config_settings(config, ("scoring",), ()), "scores": _scores_digest(rows)}
        pairing = {k: v for k, v in pairing.items() if k in PAIRING_FIELDS or k == "scores"}
        pair_summary_path = _summary_path(pairs_dir, suffix)
        shard_path = pairs_dir / shard_filename(shard_index, shard_count)
        old = storage.read_json(pair_summary_path) if pair_summary_path.is_file() else None
        damage = _pair_shard_ok(shard_path) if old is not None else None
        if old is not None and old.get("pairing") == pairing and damage is None:
            summary.update({k: old[k] for k in ("pairs", "pairs_by_kind", "prompts_without_pair")})
        else:
            if old is not None:
                why = (f"pair shard {damage}" if damage is not None else
                       "pairing settings changed (" + ", ".join(fingerprint.changed_fields(old.get("pairing", {}), pairing)) + ")")
                redone.append(f"re-paired: {why}")
                done_marker.clear(pairs_dir)
            pairs, without_pair = select_pairs({pid: records[pid] for pid in prompt_ids}, rows,
                                               float(scoring.min_margin))
            num_written = _write_pairs(pairs, by_key, candidates_dir, shard_path, bool(scoring.store_png))
            summary.update({"pairs": num_written, "pairs_by_kind": dict(collections.Counter(p.kind for p in pairs)),
                            "prompts_without_pair": without_pair})
            atomic_write_json(pair_summary_path, {**summary, "pairing": pairing})
    summary["redone"] = "; ".join(redone)
    summary["complete"] = _finish_if_complete(wd, shard_count, write_pairs, settings)
    print(_summary_line(summary) + ("" if redone or new_rows else " [shard was already done]"), flush=True)
    return summary
