"""The project's own error types: what a user can fix, as opposed to a bug.

The console script (`agfsync_jax.main`) prints a `UserError` as one line (the message names the
file, field or key and the fix) and exits with status 2; the traceback goes to the log file and,
with `--verbose`, to the console. Anything else is unexpected and keeps its traceback.

Each class also derives from the built-in exception a caller would expect (ValueError,
FileNotFoundError, RuntimeError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, inputs, checkpoints or weights; the message says the fix."""


class ConfigError(UserError, ValueError):
    """A config field has a value that cannot work; the message names the field."""


class InputError(UserError, ValueError):
    """An input file or folder is malformed; the message names it (and the line or key)."""


class MissingInputError(UserError, FileNotFoundError):
    """An input that a stage needs does not exist (often: an earlier stage has not run)."""


class StageChangedError(UserError, RuntimeError):
    """A finished stage's output was made with other settings than the current ones."""


class StageFailedError(UserError, RuntimeError):
    """A stage did its work but some of it failed; nothing was marked done."""
