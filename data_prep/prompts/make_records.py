"""What one shard of the prompts stage produces, for every source; no file handling here.

Work is split across shards by unit: categories (offline and llm prompts), benchmark records,
and InstructEngine pair indices, each unit going to shard `unit % count`. Every unit's content
depends only on the seed and the unit, so the merged result does not depend on the shard count.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import ml_collections
from tqdm import tqdm

from agfsync_jax import storage
from agfsync_jax.schemas import CATEGORIES, KIND_INSTRUCTION_PAIR, PromptRecord, Question
from data_prep.prompts import (benchmarks, instruct_engine, offline_generator, prompt_generation,
                               question_generation)
from data_prep.prompts.backend_factory import build_backend
from data_prep.prompts.categories import category_slug, load_category_examples
from data_prep.prompts.chat_backend import ChatBackend
from data_prep.prompts.dedup import NearDuplicateFilter
from data_prep.prompts.json_output import JSONOutputError
from data_prep.prompts.question_filter import finalize_questions
from data_prep.prompts.scene_grammar import Vocabulary, load_vocabulary

SOURCES = ("offline", "llm", "benchmark")
PAIR_CALL_FAILED = "pair_call_failed"
PAIR_OUTPUT_UNPARSEABLE = "pair_output_unparseable"


@dataclasses.dataclass
class ShardResult:
    records: list[PromptRecord]
    dropped: collections.Counter[str]              # records (or candidates) dropped, by reason
    questions_dropped: collections.Counter[str]    # single questions dropped, by reason
    llm: dict[str, Any]                            # CallStats.as_dict() of the backend, if any


def resolve_sources(p: ml_collections.ConfigDict) -> tuple[str, str]:
    """(prompt source, instruction-pair source), checked."""
    if p.source not in SOURCES:
        raise ValueError(f"config.prompts.source is {p.source!r}, expected one of {SOURCES}")
    pair_source = p.instruction_source or p.source
    if p.instruction_pairs > 0 and pair_source not in ("offline", "llm"):
        raise ValueError("config.prompts.instruction_pairs > 0 with source 'benchmark': set "
                         "config.prompts.instruction_source to 'offline' or 'llm'")
    if p.source == "benchmark" and p.benchmark.questions not in ("file", "llm"):
        raise ValueError(f"config.prompts.benchmark.questions is {p.benchmark.questions!r}, "
                         f"expected 'file' or 'llm'")
    if p.source != "benchmark" and p.per_category <= 0 and p.instruction_pairs <= 0:
        raise ValueError("nothing to make: config.prompts.per_category and "
                         "config.prompts.instruction_pairs are both 0")
    return p.source, pair_source


def _needs_llm(p: ml_collections.ConfigDict) -> bool:
    source, pair_source = resolve_sources(p)
    return ((source == "llm" and p.per_category > 0)
            or (source == "benchmark" and p.benchmark.questions == "llm")
            or (p.instruction_pairs > 0 and pair_source == "llm"))


def llm_cache_dir(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> storage.Path:
    return storage.as_path(config.prompts.llm.cache_dir or storage.as_path(workdir) / "prompts" / "llm_cache")


def question_settings(p: ml_collections.ConfigDict) -> question_generation.QuestionSettings:
    return question_generation.QuestionSettings(
        min_questions=p.min_questions, max_questions=p.max_questions,
        dedup_threshold=p.question_dedup_threshold,
        require_grounded=p.require_grounded_elements,
        temperature=p.llm.question_temperature, max_tokens=p.llm.max_tokens)


class _Shard:
    """Accumulates one shard's records and counters."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: storage.PathLike, index: int,
                 count: int):
        self.config, self.p = config, config.prompts
        self.index, self.count = index, count
        self.workdir = workdir
        self.records: list[PromptRecord] = []
        self.dropped: collections.Counter[str] = collections.Counter()
        self.questions_dropped: collections.Counter[str] = collections.Counter()
        self.settings = question_settings(self.p)
        self._vocab: Vocabulary | None = None
        # Built up front, so a bad LLM config fails before any work is done.
        self._backend: ChatBackend | None = None
        if _needs_llm(self.p):
            self._backend = build_backend(self.p.llm, str(llm_cache_dir(config, workdir)),
                                          seed=config.seed)

    @property
    def backend(self) -> ChatBackend:
        if self._backend is None:
            raise RuntimeError("an LLM step ran, but the prompts config asks for no LLM")
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = load_vocabulary()
        return self._vocab

    def mine(self, units: int) -> list[int]:
        return [u for u in range(units) if u % self.count == self.index]

    def finalize(self, prompt: str, questions: list[Question] | tuple[Question, ...]
                 ) -> tuple[tuple[Question, ...], str | None]:
        s = self.settings
        return finalize_questions(prompt, questions, s.min_questions, s.dedup_threshold,
                                  s.require_grounded, self.questions_dropped)

    def keep(self, record: PromptRecord, reason: str | None) -> None:
        if reason is not None:
            self.dropped[reason] += 1
        else:
            # Schema validation happens when the stage reads the shard back (read_prompts).
            self.records.append(record)

    # --- AGFSync prompts ---------------------------------------------------------------------

    def offline_prompts(self) -> None:
        dedup = NearDuplicateFilter(self.p.dedup_threshold, self.p.embedding_model_path)
        for c in tqdm(self.mine(len(CATEGORIES)), desc="offline prompts", disable=None):
            records, duplicates = offline_generator.category_prompts(
                self.vocab, CATEGORIES[c], self.p.per_category, self.config.seed, dedup)
            if duplicates:
                self.dropped[prompt_generation.NEAR_DUPLICATE] += duplicates
            for r in records:
                questions, reason = self.finalize(r.prompt, r.questions)
                self.keep(dataclasses.replace(r, questions=questions), reason)

    def llm_prompts(self) -> None:
        dedup = NearDuplicateFilter(self.p.dedup_threshold, self.p.embedding_model_path)
        examples = load_category_examples()
        llm = self.p.llm
        for c in self.mine(len(CATEGORIES)):
            category = CATEGORIES[c]
            prompts = prompt_generation.generate_category_prompts(
                self.backend, category, examples[category], self.p.per_category,
                llm.prompts_per_request, llm.temperature, llm.max_tokens, dedup, self.dropped)
            results = question_generation.generate_questions(
                self.backend, prompts, self.settings, self.questions_dropped, desc=category)
            for i, (prompt, (questions, reason)) in enumerate(zip(prompts, results)):
                self.keep(PromptRecord(id=f"{category_slug(category)}-{i:05d}", category=category,
                                       prompt=prompt, source="llm", questions=questions), reason)

    def benchmark_prompts(self) -> None:
        b = self.p.benchmark
        every = benchmarks.load_benchmark(b.format, b.path, **benchmarks.jsonl_keys(b))
        records = [every[i] for i in self.mine(len(every))]
        if b.questions == "file":
            for r in records:
                self.keep(r, None)
            return
        results = question_generation.generate_questions(
            self.backend, [r.prompt for r in records], self.settings, self.questions_dropped,
            desc=b.format)
        for r, (questions, reason) in zip(records, results):
            self.keep(dataclasses.replace(r, questions=questions), reason)

    # --- InstructEngine pairs ----------------------------------------------------------------

    def offline_pairs(self) -> None:
        subtopics = instruct_engine.load_taxonomy(self.vocab)
        for k in tqdm(self.mine(self.p.instruction_pairs), desc="instruction pairs", disable=None):
            record, q1, q2 = instruct_engine.offline_pair(subtopics, self.vocab, k,
                                                          self.config.seed)
            questions, reason = self.finalize(record.prompt, q1)
            questions_2, reason_2 = self.finalize(record.prompt_2, q2)
            self.keep(dataclasses.replace(record, questions=questions, questions_2=questions_2),
                      reason or reason_2)

    def llm_pairs(self) -> None:
        subtopics = instruct_engine.load_taxonomy(self.vocab)
        llm = self.p.llm
        plans = [(k, *instruct_engine.pair_plan(subtopics, k, self.config.seed)[:3])
                 for k in self.mine(self.p.instruction_pairs)]
        replies = self.backend.complete_many(
            [instruct_engine.pair_request(sub.theme, sub.name, entity.name, divergence,
                                          llm.temperature, llm.max_tokens)
             for _, divergence, sub, entity in plans], desc="instruction pairs")
        pairs = []
        for plan, reply in zip(plans, replies):
            if reply is None:
                self.dropped[PAIR_CALL_FAILED] += 1
                continue
            try:
                pairs.append((plan, instruct_engine.parse_pair(reply)))
            except JSONOutputError:
                self.dropped[PAIR_OUTPUT_UNPARSEABLE] += 1
        texts = [t for _, (first, second) in pairs for t in (first, second)]
        results = question_generation.generate_questions(
            self.backend, texts, self.settings, self.questions_dropped, desc="pair questions")
        for n, ((k, divergence, sub, _), (first, second)) in enumerate(pairs):
            (q1, r1), (q2, r2) = results[2 * n], results[2 * n + 1]
            self.keep(PromptRecord(
                id=instruct_engine.pair_id(k), category=sub.theme, prompt=first,
                source=instruct_engine.SOURCE_LLM, questions=q1,
                kind=KIND_INSTRUCTION_PAIR, prompt_2=second, questions_2=q2,
                divergence=divergence, theme=sub.theme, subtopic=sub.name), r1 or r2)

    def llm_stats(self) -> dict[str, Any]:
        if self._backend is None:
            return {"calls": 0, "cached": 0, "requests": 0, "retries": 0, "succeeded": 0,
                    "failed": 0, "failures": {}}
        return self._backend.stats.as_dict()


def make_shard_records(config: ml_collections.ConfigDict, workdir: storage.PathLike, index: int,
                       count: int) -> ShardResult:
    """Records of shard `index` of `count`, in a deterministic order."""
    p = config.prompts
    source, pair_source = resolve_sources(p)
    shard = _Shard(config, workdir, index, count)
    try:
        if source == "offline" and p.per_category > 0:
            shard.offline_prompts()
        elif source == "llm" and p.per_category > 0:
            shard.llm_prompts()
        elif source == "benchmark":
            shard.benchmark_prompts()
        if p.instruction_pairs > 0 and pair_source == "offline":
            shard.offline_pairs()
        elif p.instruction_pairs > 0:
            shard.llm_pairs()
    finally:
        shard.close()
    return ShardResult(records=shard.records, dropped=shard.dropped,
                       questions_dropped=shard.questions_dropped, llm=shard.llm_stats())
