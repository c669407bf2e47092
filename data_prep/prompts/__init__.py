"""The prompts stage: AGFSync prompts with yes-questions, InstructEngine pairs, benchmark prompts.

Writes WORKDIR/prompts/prompts.jsonl as `agfsync_jax.schemas.PromptRecord` rows. Entry point:
`stage.run(config, workdir)` (`agfsync-jax prompts ...`).
"""
