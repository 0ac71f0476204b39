"""The errors a user can cause and fix: one base, ``PipelineError``, that the CLI catches, prints as one line
(``error: <message>``, the message naming the key, file, shard or row at fault) and turns into its ``exit_code``.

Each subclass also keeps the builtin base it had before there was a common one (``ValueError`` for bad values,
``RuntimeError`` for bad state), so ``except ValueError`` in callers and tests keeps working. Anything that is not a
``PipelineError`` is a bug or an outage, and keeps its traceback.

Exit codes: 0 done; 2 bad input or configuration (the default); 3 finished with failures (shards named in the
summary); 4 the storage is full or unusable (``StorageError``).
"""

from __future__ import annotations

FINISHED_WITH_FAILURES = 3  # exit code: the stage ran to the end but some shards failed (named in its summary)


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and where; ``exit_code`` is what the CLI returns."""

    exit_code = 2  # bad input or configuration (argparse uses 2 for bad arguments too)


class ConfigError(PipelineError, ValueError):
    """A configuration problem; the message names the dotted key."""


class NotFoundError(PipelineError, FileNotFoundError):
    """A named input (shards, weights, a record) is not where the run looks for it; the message names the place and
    what produces it."""


class InputError(PipelineError, ValueError):
    """An input (URL list, caption file, image) cannot be used; the message names the file and the reason."""


class RunMismatchError(PipelineError, RuntimeError):
    """An existing output folder was written with different settings (its run record disagrees)."""


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint folder cannot be resumed or loaded as asked; the message names the folder or file."""


class DataError(PipelineError, ValueError):
    """Bad training data; the message names the file (and the row's key where one row is at fault)."""


class StorageError(PipelineError, OSError):
    """The run's storage cannot take what must be written (full, read-only, gone); names the location and the need."""

    exit_code = 4


class RankError(PipelineError):
    """A training rank (deepspeed launcher or Ray Train worker) stopped on a user-facing error: its one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message, exit_code)  # both in args, so it pickles back whole from a Ray worker
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0])


RANK_ERROR_TAG = "[pipeline-error]"  # how a rank hands its one-line error to the launcher through the shared log


def rank_error_line(exc: PipelineError, rank: int) -> str:
    """The line a rank prints when it stops on ``exc``: tag, exit code, then the message on one line."""
    return f"{RANK_ERROR_TAG} {exc.exit_code} rank {rank}: {' '.join(str(exc).split())}"


def find_rank_error(lines: list[str]) -> RankError | None:
    """The first rank error among a launcher's output ``lines`` (ranks print ``rank_error_line``), if any."""
    for line in lines:
        at = line.find(RANK_ERROR_TAG)
        if at >= 0:
            code, _, message = line[at + len(RANK_ERROR_TAG):].strip().partition(" ")
            return RankError(message, int(code) if code.isdigit() else 2)
    return None


class FilterError(InputError):
    """A run's data filter cannot be used (syntax, an unknown column, a type mismatch, or it keeps no row); the
    message names the config key, the column or the shard, and shows where."""
