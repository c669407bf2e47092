"""The prompts stage: `agfsync-jax prompts --config=... --workdir=DIR`.

Writes DIR/prompts/prompts.jsonl (PromptRecord rows) and DIR/prompts/_DONE.json. As shard i
of n (--config.shard.index=i --config.shard.count=n) it writes
DIR/prompts/shards/prompts-<i>-of-<n>.jsonl plus a per-shard done marker; whichever shard
finds all n markers present merges them (sorted by id, so the result does not depend on n).

Resuming: a finished stage or shard is skipped (its marker records a fingerprint of the
prompts config, and a mismatch is an error, not a silent reuse). Inside an interrupted shard,
LLM work is resumed through the on-disk response cache: redoing it issues no requests.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from agfsync_jax import fingerprint as fingerprint_lib
from agfsync_jax import storage
from agfsync_jax.atomic_io import atomic_write_json, atomic_write_jsonl
from agfsync_jax.done_marker import redo_hint
from agfsync_jax.errors import StageChangedError
from agfsync_jax.schemas import KIND_PROMPT, PromptRecord, read_prompts
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.workdir import DONE_MARKER, PROMPTS, PROMPTS_FILE, shard_suffix
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.make_records import make_shard_records

log = logging.getLogger(__name__)

NEAR_DUPLICATE_ACROSS_CATEGORIES = "near_duplicate_across_categories"
# LLM settings that change how calls are made, not what they return: changing them between a
# run and its resume is fine.
OPERATIONAL_FIELDS = tuple(f"prompts.llm.{k}" for k in (
    "max_concurrency", "timeout_s", "max_retries", "backoff_initial_s", "backoff_max_s", "cache_dir", "api_key_env"))


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything that decides the stage's output: the seed and every prompts field but the operational ones."""
    return fingerprint_lib.config_settings(config, ("seed", "prompts"), OPERATIONAL_FIELDS)


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """Hash of everything that decides the stage's output."""
    return fingerprint_lib.digest(settings(config))


def _shard_paths(out_dir: Path, index: int, count: int) -> tuple[Path, Path]:
    suffix = shard_suffix(index, count)
    return (out_dir / "shards" / f"prompts-{suffix}.jsonl",
            out_dir / "shards" / f"_DONE-{suffix}.json")


def _read_marker(path: Path, expected_fingerprint: str, config: ml_collections.ConfigDict,
                 workdir: PathLike) -> dict[str, Any]:
    summary = storage.read_json(path)
    if summary.get("fingerprint") != expected_fingerprint:
        changed = (fingerprint_lib.changed_fields(summary["settings"], settings(config)) if "settings" in summary
                   else ["<no settings recorded>"])
        raise StageChangedError(
            f"prompts: {path} was written with other prompts settings ({', '.join(changed[:8])} changed); "
            f"{redo_hint('prompts', workdir)}")
    return summary


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def _sum_llm(stats: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"failures": {}}
    for s in stats:
        for k, v in s.items():
            if k == "failures":
                _add_counts(total["failures"], v)
            else:
                total[k] = total.get(k, 0) + v
    return total


def _counts_text(counts: dict[str, int]) -> str:
    counts = {k: v for k, v in counts.items() if v}
    inner = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"{sum(counts.values())}" + (f" ({inner})" if inner else "")


def summary_line(summary: dict[str, Any]) -> str:
    llm = summary["llm"]
    return (f"prompts: made {summary['made']} ({summary['prompts']} prompts, {summary['pairs']} "
            f"pairs, {summary['questions']} questions) | dropped {_counts_text(summary['dropped'])}"
            f" | questions dropped {_counts_text(summary['questions_dropped'])}"
            f" | llm calls {llm.get('calls', 0)}: {llm.get('requests', 0)} requests, "
            f"{llm.get('cached', 0)} cached, {llm.get('failed', 0)} failed"
            f" | {summary['shards']} shard(s) -> {summary['path']}")


def _describe(records: list[PromptRecord]) -> dict[str, int]:
    pairs = sum(r.kind != KIND_PROMPT for r in records)
    return {"made": len(records), "prompts": len(records) - pairs, "pairs": pairs,
            "questions": sum(len(r.questions) + len(r.questions_2) for r in records)}


def _build_shard(config: ml_collections.ConfigDict, workdir: str, fp: str, shard_file: Path,
                 marker: Path) -> dict[str, Any]:
    index, count = config.shard.index, config.shard.count
    result = make_shard_records(config, workdir, index, count)
    if not result.records and (result.dropped or result.llm.get("failed")):
        # Had work and kept nothing: no marker, so a re-run redoes the shard (cached LLM
        # replies cost nothing) instead of failing at the merge forever.
        raise RuntimeError(
            f"prompts: shard {index}/{count} kept no record (dropped "
            f"{_counts_text(dict(result.dropped))}; llm calls failed "
            f"{_counts_text(result.llm.get('failures', {}))}); fix the cause and re-run")
    atomic_write_jsonl(shard_file, [r.to_dict() for r in result.records])
    summary = {"fingerprint": fp, "settings": settings(config), "shard": index, "shards": count, "path": str(shard_file),
               "dropped": dict(result.dropped), "questions_dropped": dict(result.questions_dropped),
               "llm": result.llm, **_describe(result.records)}
    # The marker goes last: its presence means the shard file is complete.
    atomic_write_json(marker, summary)
    return summary


def _merge(config: ml_collections.ConfigDict, out_dir: Path, fp: str, count: int
           ) -> dict[str, Any] | None:
    """Merges all shards into prompts.jsonl; None while some shard is still missing."""
    paths = [_shard_paths(out_dir, i, count) for i in range(count)]
    missing = [i for i, (_, marker) in enumerate(paths) if not marker.exists()]
    if missing:
        return None
    summaries = [_read_marker(marker, fp, config, out_dir.parent) for _, marker in paths]
    records = [r for shard_file, _ in paths for r in read_prompts(shard_file)]
    records.sort(key=lambda r: r.id)
    duplicates = sorted({a.id for a, b in zip(records, records[1:]) if a.id == b.id})
    if duplicates:
        raise RuntimeError(f"prompts: shards of {out_dir} share ids {duplicates[:5]}")
    dropped: dict[str, int] = {}
    questions_dropped: dict[str, int] = {}
    for s in summaries:
        _add_counts(dropped, s["dropped"])
        _add_counts(questions_dropped, s["questions_dropped"])

    # Shards dedup within categories; prompts of different categories meet only here.
    generated = [i for i, r in enumerate(records)
                 if r.kind == KIND_PROMPT and r.source in ("offline", "llm")]
    if len(generated) > 1:
        dedup = NearDuplicateFilter(config.prompts.dedup_threshold,
                                    config.prompts.embedding_model_path)
        keep = {generated[i] for i in dedup.keep([records[i].prompt for i in generated])}
        removed = len(generated) - len(keep)
        if removed:
            dropped[NEAR_DUPLICATE_ACROSS_CATEGORIES] = removed
            dropped_ids = {records[i].id for i in set(generated) - keep}
            records = [r for r in records if r.id not in dropped_ids]
    if not records:
        raise RuntimeError(f"prompts: no record survived (dropped {_counts_text(dropped)}, "
                           f"questions dropped {_counts_text(questions_dropped)})")

    final = out_dir.parent / PROMPTS_FILE
    # Every record came through read_prompts (the sampler's reader) from its shard file.
    atomic_write_jsonl(final, [r.to_dict() for r in records])
    summary = {"fingerprint": fp, "settings": settings(config), "shards": count, "path": str(final), "dropped": dropped,
               "questions_dropped": questions_dropped,
               "llm": _sum_llm([s["llm"] for s in summaries]), **_describe(records)}
    atomic_write_json(out_dir / DONE_MARKER, summary)
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) this process's shard and merges when every shard is done."""
    out_dir = storage.as_path(workdir) / PROMPTS
    fp = fingerprint(config)
    done = out_dir / DONE_MARKER
    if done.exists():
        summary = _read_marker(done, fp, config, workdir)
        print(f"{summary_line(summary)} | already complete, nothing to do")
        return summary

    index, count = config.shard.index, config.shard.count
    shard_file, marker = _shard_paths(out_dir, index, count)
    if marker.exists():
        shard_summary = _read_marker(marker, fp, config, workdir)
        log.info("shard %d/%d already complete: %s", index, count, shard_file)
    else:
        shard_summary = _build_shard(config, workdir, fp, shard_file, marker)

    summary = _merge(config, out_dir, fp, count)
    if summary is None:
        waiting = [i for i in range(count) if not _shard_paths(out_dir, i, count)[1].exists()]
        print(f"{summary_line(shard_summary)} | shard {index}/{count} done, waiting for shards "
              f"{waiting} before merging")
        return shard_summary
    print(summary_line(summary))
    return summary
