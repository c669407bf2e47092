"""What to sample: prompts x instructions x candidates, split into shards by prompt.

Every prompt's candidates live in one shard, so a prompt's manifest rows are written by one
process. The shard of a prompt depends only on its position in prompts.jsonl and the number of
shards: stage shards (`config.shard`) times JAX processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agfsync_jax.sampling import candidate_seeds
from agfsync_jax.schemas import PromptRecord

# (prompt_id, instruction, candidate): how manifests and outputs name a candidate.
CandidateKey = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Example:
    """One candidate image to generate."""

    prompt_id: str
    prompt_index: int  # position in prompts.jsonl
    instruction: int  # 0, or 1 for the second instruction of an InstructEngine pair
    candidate: int
    text: str
    seed: int  # candidate_seeds.candidate_seed(...), recorded in the manifest

    @property
    def key(self) -> CandidateKey:
        return (self.prompt_id, self.instruction, self.candidate)


def plan_examples(records: Sequence[PromptRecord], num_candidates: int, global_seed: int) -> list[Example]:
    """All examples of a run, in prompts.jsonl order, then instruction, then candidate."""
    if num_candidates < 1:
        raise ValueError(f"sampling.num_candidates must be >= 1, got {num_candidates}")
    return [Example(r.id, i, instruction, c, text, candidate_seeds.candidate_seed(global_seed, r.id, instruction, c))
            for i, r in enumerate(records)
            for instruction, text in enumerate(r.instructions)
            for c in range(num_candidates)]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """This process's shard among `count`: stage shard s of S and process p of P -> s * P + p of S * P."""

    index: int
    count: int

    @classmethod
    def of(cls, stage_index: int, stage_count: int, process_index: int, process_count: int) -> "ShardSpec":
        if not 0 <= stage_index < stage_count:
            raise ValueError(f"shard.index={stage_index} is not in [0, shard.count={stage_count})")
        return cls(stage_index * process_count + process_index, stage_count * process_count)

    def owns(self, example: Example) -> bool:
        return example.prompt_index % self.count == self.index


def shard_examples(examples: Sequence[Example], shard: ShardSpec) -> list[Example]:
    return [e for e in examples if shard.owns(e)]
