"""Stage `eval`: base vs finetuned on a prompt set, same seeds, scored by the scoring stage.

    agfsync-jax eval --config=configs/tiny.py --workdir=DIR [--config.eval.prompts_path=DrawBench.csv
        --config.eval.prompts_format=drawbench]

The prompt set is a benchmark file (`eval.prompts_path`, `eval.prompts_format`), or by default
prompts that training never saw: the `prompts` stage run again with seed `eval.seed`, minus every
prompt of WORKDIR/prompts. `eval.num_prompts` of them are drawn stratified by category.

Each set gets its own directory, WORKDIR/eval/<set>/ (a name plus a digest of what defines the
set), so evaluating another benchmark never reuses or overwrites an earlier report. In it, for
each of the base model and the exported finetuned pipeline, the real `sample` stage (one
candidate per prompt, no embedding noise, seed `eval.seed`) and the real `score` stage run in
<set>/<model>/, each in its own process (`agfsync_jax.stage_runner`), so both models see
identical initial latents and the finetuned model is loaded like any diffusers folder. The
report (metrics.json, report.md, grids, win-rate plot) goes to <set>/.

Everything here is derived from the models and the prompt set, so a changed input (a retrained
model, other sampling or scoring settings) redoes the affected model's part instead of
stopping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

from agfsync_jax import base_model, done_marker, fingerprint, stage_runner, storage, workdir as workdir_lib
from agfsync_jax.errors import ConfigError, InputError, MissingInputError
from agfsync_jax.evaluation import prompt_selection
from agfsync_jax.schemas import CATEGORIES, PromptRecord, ScoreRow, read_jsonl, read_prompts
from agfsync_jax.score_weights import resolve_weights
from agfsync_jax.storage import Path, PathLike

MODELS = ("base", "finetuned")
SOURCE = "source"  # <set>/source: the prompts stage's output for the set
MODEL_SETTINGS = "eval_settings.json"  # <set>/<model>/: what that model's samples and scores depend on
HELDOUT = "heldout"
# prompts.llm fields that change how requests are made, not the prompts (as the prompts stage).
_PROMPTS_OPERATIONAL = ("prompts.llm.max_concurrency", "prompts.llm.timeout_s", "prompts.llm.max_retries",
                        "prompts.llm.backoff_initial_s", "prompts.llm.backoff_max_s", "prompts.llm.cache_dir",
                        "prompts.llm.api_key_env")
# Sampling fields that change speed or memory only.
_SAMPLING_OPERATIONAL = ("sampling.batch_size", "sampling.microbatch", "sampling.shard_params")
_SCORING_OPERATIONAL = ("scoring.batch_size", "scoring.device")
_JUDGE_OPERATIONAL = tuple(f"eval.judge.{k}" for k in (
    "max_concurrency", "timeout_s", "max_retries", "backoff_initial_s", "backoff_max_s", "cache_dir", "api_key_env"))


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str  # directory under WORKDIR/eval
    settings: dict[str, Any]  # what defines the set
    source_config: Any  # the prompts stage's config for it


def _file_digest(path: PathLike) -> str:
    p = storage.as_path(path)
    if p.is_dir():
        return base_model.folder_identity(p)
    if not p.is_file():
        raise MissingInputError(f"eval.prompts_path={str(path)!r} does not exist")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def prompt_set(config: Any, workdir: PathLike) -> PromptSet:
    """The eval's prompt set: its directory name, defining settings and the prompts-stage config."""
    e = config.eval
    cfg = config.copy_and_resolve_references()
    cfg.shard.index, cfg.shard.count = 0, 1
    cfg.seed = int(e.seed)
    cfg.prompts.instruction_pairs = 0
    if e.prompts_path:
        if not e.prompts_format:
            raise ConfigError("eval.prompts_path is set but eval.prompts_format is empty; name the file's "
                              "format (e.g. --config.eval.prompts_format=drawbench)")
        cfg.prompts.source = "benchmark"
        cfg.prompts.benchmark.format = e.prompts_format
        cfg.prompts.benchmark.path = str(e.prompts_path)
        name = e.prompts_format
        settings = {"file": _file_digest(e.prompts_path),
                    **fingerprint.config_settings(cfg, ("prompts",), _PROMPTS_OPERATIONAL + ("prompts.benchmark.path",
                                                                                            "prompts.per_category"))}
    else:
        if config.prompts.source == "benchmark":
            raise ConfigError("eval: the training prompts come from a benchmark file, so there is no generator to "
                              "draw held-out prompts from; set eval.prompts_path and eval.prompts_format")
        # Enough per category that, after dropping prompts training saw, num_prompts remain.
        cfg.prompts.per_category = max(int(config.prompts.per_category),
                                       math.ceil(1.25 * int(e.num_prompts) / len(CATEGORIES)) + 1)
        name = HELDOUT
        settings = fingerprint.config_settings(cfg, ("prompts",), _PROMPTS_OPERATIONAL)
        # The prompts to leave out: a changed training set changes the held-out one.
        training = done_marker.read(storage.as_path(workdir) / workdir_lib.PROMPTS) or {}
        settings["inputs.training_prompts"] = training.get(done_marker.FINGERPRINT, "")
    settings.update({"eval.seed": int(e.seed), "eval.num_prompts": int(e.num_prompts)})
    return PromptSet(f"{name}-{fingerprint.digest(settings)[:8]}", settings, cfg)


def _select(config: Any, wd: Path, pset: PromptSet, set_dir: Path) -> tuple[list[PromptRecord], dict]:
    """Runs the prompts stage for the set (once) and draws the evaluated prompts from it."""
    stage_runner.run_in_child("prompts", pset.source_config, set_dir / SOURCE)
    records = read_prompts(set_dir / SOURCE / workdir_lib.PROMPTS_FILE)
    info: dict[str, Any] = {"name": pset.name, "source": config.eval.prompts_path or "held-out prompts"}
    if not config.eval.prompts_path:
        training = read_prompts(wd / workdir_lib.PROMPTS_FILE) if (wd / workdir_lib.PROMPTS_FILE).is_file() else []
        records, info["dropped_seen_in_training"] = prompt_selection.drop_seen(
            records, [p for r in training for p in (r.prompt, r.prompt_2) if p])
    chosen, counts = prompt_selection.stratified_sample(records, int(config.eval.num_prompts), int(config.eval.seed))
    if not chosen:
        raise InputError(f"eval: the prompt set {pset.name} ({info['source']}) holds no plain prompts")
    info.update(counts)
    return chosen, info


def _check_scorable(config: Any, records: list[PromptRecord], pset: PromptSet) -> None:
    """Fails before any sampling when the prompts cannot be scored under the chosen weights."""
    weights = resolve_weights(config.scoring.weights_preset, config.scoring.weights)
    without = [r.id for r in records if not r.questions]
    if weights.get("vqa", 0) > 0 and without:
        raise ConfigError(
            f"eval: {len(without)} of {len(records)} prompts of {pset.name} have no questions (e.g. {without[0]!r}), "
            f"but the VQA weight is {weights['vqa']} (scoring.weights_preset={config.scoring.weights_preset}). "
            "Generate questions with the LLM (--config.prompts.benchmark.questions=llm and prompts.llm.*), "
            "score without VQA (--config.scoring.weights_preset=released_code), or use a file with questions "
            "(prompts_format=tifa_questions, or jsonl with prompts.benchmark.questions_key)")


def model_config(config: Any, model_path: Path, workdir: Path) -> Any:
    """The config of the sample and score stages for one evaluated model."""
    cfg = config.copy_and_resolve_references()
    cfg.model.path = str(model_path)
    cfg.model.tiny = ""
    cfg.seed = int(config.eval.seed)
    cfg.sampling.num_candidates = 1
    cfg.sampling.noise_sigma = 0.0
    cfg.sampling.save_png = True
    cfg.shard.index, cfg.shard.count = 0, 1
    # The scorers of the training reward (tiny ones included), plus the eval's extra metrics.
    cfg.scoring.tiny_models_dir = config.scoring.tiny_models_dir or str(workdir / workdir_lib.SCORES / "tiny_models")
    extra = [s for s in (config.scoring.extra + "," + config.eval.extra_scorers).split(",") if s.strip()]
    cfg.scoring.extra = ",".join(dict.fromkeys(s.strip() for s in extra))
    cfg.scoring.pairs = False
    return cfg


def _model_settings(cfg: Any, records: list[PromptRecord]) -> dict[str, Any]:
    return {**fingerprint.config_settings(cfg, ("seed", "model", "sampling", "scoring"),
                                          _SAMPLING_OPERATIONAL + _SCORING_OPERATIONAL + base_model.COVERED_BY_IDENTITY),
            "model.identity": base_model.folder_identity(cfg.model.path),
            "prompts": fingerprint.digest({"ids": [r.to_dict() for r in records]})}


def _prepare_model_dir(model_dir: Path, settings: dict[str, Any], records: list[PromptRecord]) -> str:
    """Clears a model's directory when what its samples depend on changed; returns what was done."""
    path = model_dir / MODEL_SETTINGS
    action = "new"
    if path.is_file():
        changed = fingerprint.changed_fields(storage.read_json(path), settings)
        if not changed:
            return "unchanged"
        action = f"redone ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed)"
        storage.rmtree(model_dir)
    storage.write_jsonl(model_dir / workdir_lib.PROMPTS_FILE, [r.to_dict() for r in records])
    done_marker.write(model_dir / workdir_lib.PROMPTS, {"source": "eval", "records": len(records)},
                      {"records": fingerprint.digest({"ids": [r.to_dict() for r in records]})})
    storage.write_json(path, settings)
    return action


def _scores(model_dir: Path) -> dict[str, ScoreRow]:
    rows: dict[str, ScoreRow] = {}
    for path in sorted((model_dir / workdir_lib.SCORES).glob("scores-*.jsonl")):
        rows.update({r.prompt_id: r for r in read_jsonl(path, ScoreRow.from_dict)})
    return rows


def _images(model_dir: Path) -> dict[str, Path]:
    images = {}
    for path in sorted((model_dir / workdir_lib.CANDIDATES).glob("manifest-*.jsonl")):
        for row in storage.read_complete_lines(path):
            images[row["prompt_id"]] = model_dir / workdir_lib.CANDIDATES / row["image"]
    return images


def run(config: Any, workdir: str) -> dict[str, Any]:
    from agfsync_jax.evaluation import report

    wd = storage.as_path(workdir)
    finetuned = wd / workdir_lib.EXPORT / "pipeline"
    export_marker = done_marker.read(wd / workdir_lib.EXPORT)
    if export_marker is None:
        raise MissingInputError(f"{finetuned}: no exported model; run the `export` stage first")
    pset = prompt_set(config, wd)
    set_dir = wd / workdir_lib.EVAL / pset.name
    paths = {"base": base_model.resolve_base_model(config, wd), "finetuned": finetuned}
    cfgs = {name: model_config(config, paths[name], wd) for name in MODELS}
    records_path = set_dir / "prompts.jsonl"
    selection_path = set_dir / "selection.json"
    if records_path.is_file() and selection_path.is_file():
        records = read_prompts(records_path)
        selection = storage.read_json(selection_path)
    else:
        records, selection = _select(config, wd, pset, set_dir)
        storage.write_jsonl(records_path, [r.to_dict() for r in records])
        storage.write_json(selection_path, selection)
    per_model = {name: _model_settings(cfgs[name], records) for name in MODELS}
    settings = {**pset.settings, **{f"{m}.{k}": v for m, s in per_model.items() for k, v in s.items()},
                **fingerprint.config_settings(config, ("eval",), _JUDGE_OPERATIONAL + tuple(pset.settings))}
    marker = done_marker.read(set_dir)
    if marker is not None and not done_marker.changed_fields(marker, settings):
        print(f"eval: {pset.name} complete, skipped ({done_marker.path(set_dir)}); report {marker['report']}")
        return marker
    done_marker.clear(set_dir)
    _check_scorable(config, records, pset)

    actions = {}
    for name in MODELS:
        model_dir = set_dir / name
        actions[name] = _prepare_model_dir(model_dir, per_model[name], records)
        print(f"eval: {name} model {paths[name]} ({actions[name]})", flush=True)
        stage_runner.run_in_child("sample", cfgs[name], model_dir)
        stage_runner.run_in_child("score", cfgs[name], model_dir)

    judged = bool(config.eval.judge.base_url or config.eval.judge.model)
    if judged:
        stage_runner.run_in_child("judge", config, set_dir)

    scores = {name: _scores(set_dir / name) for name in MODELS}
    images = {name: _images(set_dir / name) for name in MODELS}
    items = []
    for r in records:
        if not all(r.id in scores[m] and r.id in images[m] for m in MODELS):
            continue  # counted below: the scoring stage reports why (bad image, no questions)
        items.append(report.EvalItem(
            prompt_id=r.id, category=r.category, prompt=r.prompt,
            element_types=tuple(q.element_type for q in r.questions),
            base=scores["base"][r.id], finetuned=scores["finetuned"][r.id],
            base_image=images["base"][r.id], finetuned_image=images["finetuned"][r.id]))
    if not items:
        raise InputError(f"eval: none of the {len(records)} prompts of {pset.name} was scored for both models; "
                         f"see the score stage's summary lines above ({set_dir})")
    metrics = report.write_report(items, set_dir, grid_prompts=int(config.eval.grid_prompts),
                                  seed=int(config.eval.seed), prompt_set=selection)
    overall = metrics["win_rates"]["all"]
    sign = metrics["sign_tests"]["total"]
    summary = {"prompt_set": pset.name, "prompts": len(records), "available": selection["available"],
               "evaluated": len(items), "skipped": len(records) - len(items), "models": actions, "judge": judged,
               "win_rate_total": overall["total"], "sign_test_total": sign, "report": str(set_dir / "report.md")}
    done_marker.write(set_dir, summary, settings)
    print(f"eval: {pset.name}: {len(items)}/{len(records)} prompts (of {selection['available']}); win rate of "
          f"finetuned over base on the total reward {overall['total']:.3f} "
          f"({', '.join(f'{k} {v:.3f}' for k, v in overall.items() if k != 'total')}); "
          f"{sign['wins']} wins / {sign['losses']} losses / {sign['ties']} ties, one-sided sign test "
          f"p = {sign['p_one_sided']:.3g}; report {set_dir / 'report.md'}", flush=True)
    return summary
