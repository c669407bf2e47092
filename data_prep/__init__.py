"""The prep side of the pipeline: prompts, questions and instructions, scoring, preference pairs."""
