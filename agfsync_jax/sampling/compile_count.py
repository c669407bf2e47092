"""Counting XLA compilations, to show (and log) that a loop reuses one compiled program."""

from __future__ import annotations

import jax

# Emitted by JAX once per XLA backend compilation (not for executables found in its caches).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts backend compilations in this process while the context is open.

        with CompileCounter() as compiles:
            ...
        logging.info("%d compilations", compiles.count)
    """

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration_secs: float, **kwargs: object) -> None:
        if event == _COMPILE_EVENT:
            self.count += 1
            self.seconds += duration_secs

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
