"""Silences two kinds of third-party log noise that would bury the pipeline's own output.

- diffusers 0.39 logs "Flax classes are deprecated" from every Flax attention module's setup,
  i.e. once per layer per trace; transformers 4.57 logs the same once. We pin those versions on
  purpose (docs/design.md section 4), so the message carries no information.
- orbax logs every step of every checkpoint save at INFO through absl.
Nothing else is filtered; warnings and errors from these libraries still show.
"""

from __future__ import annotations

import logging

_PINNED_DEPRECATIONS = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropPinnedDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PINNED_DEPRECATIONS)


class _DropOrbaxInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or "orbax" not in record.pathname


def quiet_third_party_logs() -> None:
    import diffusers  # noqa: F401 - creates the library root logger and its handler
    import transformers  # noqa: F401

    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_DropPinnedDeprecation())
    for handler in logging.getLogger("absl").handlers + logging.getLogger().handlers:
        handler.addFilter(_DropOrbaxInfo())
