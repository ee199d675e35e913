"""The errors a user can cause: bad input, an unusable file or directory, a run that cannot go on.

The command line prints any ``UserError`` as one line, ``ldmkit: error: <message>``, and exits with
status 2 (``TrainingDiverged``: status 3); every other exception is a bug and shows its traceback.
Messages name the config key, flag, file or value at fault and what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable file or directory; the message says which and what was expected."""


class DataError(UserError, ValueError):
    """A data source that cannot be used (a missing or empty path, a malformed class map or captions file)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights directory that is missing, incomplete or damaged."""


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used (exists without --resume, missing with it, or is a file)."""


class TrainingDiverged(UserError, RuntimeError):
    """Training diverged (non-finite or exploding weights, or too many bad steps in a row); the message
    names the newest checkpoint known to hold healthy weights."""
