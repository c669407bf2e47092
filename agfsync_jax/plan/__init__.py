"""Pre-flight plans from the real TPU compiler: compile (never run) a run's programs for a TPU
topology with no TPU attached, and read the compiler's memory and FLOP accounting."""
