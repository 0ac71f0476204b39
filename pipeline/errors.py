"""The errors a user can cause and fix: one base, ``PipelineError``, that the CLI catches, prints as one line
(``error: <message>``, the message naming the key, file, shard or row at fault) and turns into its ``exit_code``.

Each subclass also keeps the builtin base it had before there was a common one (``ValueError`` for bad values,
``RuntimeError`` for bad state), so ``except ValueError`` in callers and tests keeps working. Anything that is not a
``PipelineError`` is a bug or an outage, and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and where; ``exit_code`` is what the CLI returns."""

    exit_code = 2  # bad input or configuration (argparse uses 2 for bad arguments too)


class ConfigError(PipelineError, ValueError):
    """A configuration problem; the message names the dotted key."""


class InputError(PipelineError, ValueError):
    """An input (URL list, caption file, image) cannot be used; the message names the file and the reason."""


class RunMismatchError(PipelineError, RuntimeError):
    """An existing output folder was written with different settings (its run record disagrees)."""


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint folder cannot be resumed or loaded as asked; the message names the folder or file."""


class DataError(PipelineError, ValueError):
    """Bad training data; the message names the file (and the row's key where one row is at fault)."""
