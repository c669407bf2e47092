"""Stage `eval`: base vs finetuned on a prompt set, same seeds, scored by the scoring stage.

    agfsync-jax eval --config=configs/tiny.py --workdir=DIR [--config.eval.prompts_path=DrawBench.csv
        --config.eval.prompts_format=drawbench]

For each of the base model and the exported finetuned pipeline (WORKDIR/export/pipeline), this
runs the real `sample` stage (one candidate per prompt, no embedding noise, seed `eval.seed`)
and the real `score` stage in WORKDIR/eval/<model>/, so both models see identical initial
latents and the finetuned model is loaded through the same path as any diffusers folder. The
report (metrics.json, report.md, grids, win-rate plot) goes to WORKDIR/eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agfsync_jax import atomic_io
from agfsync_jax import workdir as workdir_lib
from agfsync_jax.evaluation import report
from agfsync_jax.schemas import KIND_PROMPT, PromptRecord, ScoreRow, read_jsonl, read_prompts

MODELS = ("base", "finetuned")


def eval_prompts(config: Any, workdir: Path) -> list[PromptRecord]:
    """The first `eval.num_prompts` plain prompts of a benchmark file or of WORKDIR/prompts.

    With no benchmark file, the evaluation runs on the training prompts themselves: it then
    measures how far training moved the model on its own reward (the closed loop), not
    generalisation; point eval.prompts_path at a benchmark for the latter.
    """
    if config.eval.prompts_path:
        from data_prep.prompts.benchmarks import jsonl_keys, load_benchmark

        records = load_benchmark(config.eval.prompts_format, config.eval.prompts_path,
                                 **jsonl_keys(config.prompts.benchmark))
    else:
        records = read_prompts(workdir / workdir_lib.PROMPTS_FILE)
    records = [r for r in records if r.kind == KIND_PROMPT][: int(config.eval.num_prompts)]
    if not records:
        raise ValueError("eval: no prompts to evaluate (eval.prompts_path / eval.num_prompts)")
    return records


def _model_config(config: Any, model_path: Path, scoring: Any) -> Any:
    cfg = config.copy_and_resolve_references()
    cfg.model.path = str(model_path)
    cfg.model.tiny = ""
    cfg.seed = int(config.eval.seed)
    cfg.sampling.num_candidates = 1
    cfg.sampling.noise_sigma = 0.0
    cfg.sampling.save_png = True
    cfg.scoring = scoring
    cfg.shard.index, cfg.shard.count = 0, 1
    return cfg


def _scores(model_dir: Path) -> dict[str, ScoreRow]:
    rows: dict[str, ScoreRow] = {}
    for path in sorted((model_dir / workdir_lib.SCORES).glob("scores-*.jsonl")):
        rows.update({r.prompt_id: r for r in read_jsonl(path, ScoreRow.from_dict)})
    return rows


def _images(model_dir: Path) -> dict[str, Path]:
    images = {}
    for path in sorted((model_dir / workdir_lib.CANDIDATES).glob("manifest-*.jsonl")):
        for row in atomic_io.read_complete_lines(path):
            images[row["prompt_id"]] = model_dir / workdir_lib.CANDIDATES / row["image"]
    return images


def run(config: Any, workdir: str) -> dict[str, Any]:
    from agfsync_jax.models.tiny import resolve_base_model
    from agfsync_jax.sampling import stage as sample_stage
    from data_prep.scoring import stage as score_stage
    from data_prep.scoring.tiny import resolve_scoring_config

    wd = Path(workdir)
    eval_dir = wd / workdir_lib.EVAL
    done = eval_dir / workdir_lib.DONE_MARKER
    if done.is_file():
        print(f"eval: complete, skipped ({done})")
        return json.loads(done.read_text())
    finetuned = wd / workdir_lib.EXPORT / "pipeline"
    if not (wd / workdir_lib.EXPORT / workdir_lib.DONE_MARKER).is_file():
        raise FileNotFoundError(f"{finetuned}: no exported model; run the `export` stage first")
    records = eval_prompts(config, wd)
    # Score with exactly the scorers that produced the training reward (tiny ones included).
    scoring = resolve_scoring_config(config.scoring, wd, seed=int(config.seed))
    scoring.tiny = False
    paths = {"base": resolve_base_model(config, wd), "finetuned": finetuned}
    for name in MODELS:
        model_dir = eval_dir / name
        atomic_io.atomic_write_jsonl(model_dir / workdir_lib.PROMPTS_FILE, [r.to_dict() for r in records])
        atomic_io.atomic_write_json(model_dir / workdir_lib.PROMPTS / workdir_lib.DONE_MARKER,
                                    {"source": "eval", "records": len(records)})
        cfg = _model_config(config, paths[name], scoring)
        print(f"eval: {name} model {paths[name]}", flush=True)
        sample_stage.run(cfg, str(model_dir))
        score_stage.run(cfg, str(model_dir), require_pairs=False)  # one candidate: no pairs

    scores = {name: _scores(eval_dir / name) for name in MODELS}
    images = {name: _images(eval_dir / name) for name in MODELS}
    items = []
    for r in records:
        if not all(r.id in scores[m] and r.id in images[m] for m in MODELS):
            continue  # counted below: the scoring stage reports why (bad image, no questions)
        items.append(report.EvalItem(
            prompt_id=r.id, category=r.category, prompt=r.prompt,
            element_types=tuple(q.element_type for q in r.questions),
            base=scores["base"][r.id], finetuned=scores["finetuned"][r.id],
            base_image=images["base"][r.id], finetuned_image=images["finetuned"][r.id]))
    metrics = report.write_report(items, eval_dir, grid_prompts=int(config.eval.grid_prompts),
                                  seed=int(config.eval.seed))
    overall = metrics["win_rates"]["all"]
    sign = metrics["sign_tests"]["total"]
    summary = {"prompts": len(records), "evaluated": len(items), "skipped": len(records) - len(items),
               "win_rate_total": overall["total"], "sign_test_total": sign, "report": str(eval_dir / "report.md")}
    atomic_io.atomic_write_json(done, summary)
    print(f"eval: {len(items)}/{len(records)} prompts; win rate of finetuned over base on the total "
          f"reward {overall['total']:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in overall.items() if k != 'total')}); "
          f"{sign['wins']} wins / {sign['losses']} losses / {sign['ties']} ties, one-sided sign test "
          f"p = {sign['p_one_sided']:.3g}; "
          f"report {eval_dir / 'report.md'}", flush=True)
    return summary
