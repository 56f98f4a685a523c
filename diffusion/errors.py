"""How a command ends when something goes wrong: one line that names the fix, and a documented exit code.

Exit codes of every ``diffusion-*`` command:

- 0: done.
- 1: the config could not be composed (Hydra names the bad override and the choices), or an unexpected error,
  printed with its traceback: a bug to report.
- 2: a mistake in the command or its inputs (a bad value, a missing folder or checkpoint, a foreign or newer
  checkpoint, a refused ``_target_``, a class label the model does not have): the message names the fix.
- 3: a checkpoint could not be written (disk full, read-only folder); the previous checkpoint is kept.
- 4: training stopped because the loss or the gradients were not finite for too many steps in a row; the last
  good state is saved.
- 5: a data-loader worker died; the message names the file it was reading.
- In a sweep (``-m``), a failed job is listed in the sweep's report beside the others, and the sweep exits with 1.
- 128 + N: stopped by signal N (130 for Ctrl-C, 143 for SIGTERM) after saving a checkpoint; ``resume=auto``
  continues.

``HYDRA_FULL_ERROR=1`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_CHECKPOINT_NOT_WRITTEN = 3
EXIT_DIVERGED = 4
EXIT_LOADER_WORKER_DIED = 5

# what the code raises for a user's mistake, each with a message that names the fix
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the one before it is still in place."""

    exit_code = EXIT_CHECKPOINT_NOT_WRITTEN


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite for too many steps in a row."""

    exit_code = EXIT_DIVERGED


class LoaderWorkerDied(RuntimeError):
    """A data-loader worker process died while reading a file."""

    exit_code = EXIT_LOADER_WORKER_DIED


def exit_code_of(error: BaseException) -> int | None:
    """The documented exit code of ``error``, or None for an unexpected error (a bug)."""
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        return exit_code_of(error.__cause__)  # Hydra wraps what a component's constructor raised
    if hasattr(error, "exit_code"):
        return error.exit_code
    return EXIT_USER_ERROR if isinstance(error, USER_ERRORS) else None


def message_of(error: BaseException) -> str:
    """The message of ``error``, unwrapped from Hydra's instantiation error."""
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        return message_of(error.__cause__)
    return str(error) or type(error).__name__


@contextlib.contextmanager
def reported_errors(command: str) -> Iterator[None]:
    """Turn a known error into one logged line and its exit code; anything else (a bug) keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a traceback
        log.warning("%s: interrupted", command)
        raise SystemExit(130) from None
    except Exception as error:
        code = exit_code_of(error)
        if code is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", command, message_of(error))
        if in_sweep():  # Hydra lists the job as failed and runs the others; the sweep then exits with 1
            raise
        raise SystemExit(code) from None


def in_sweep() -> bool:
    """Whether this is one job of a ``-m`` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
