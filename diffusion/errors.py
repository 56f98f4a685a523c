"""How a command ends when something goes wrong: one line that names the fix, and a documented exit code.

Exit codes of every ``diffusion-*`` command:

- 0: done.
- 1: the config could not be composed (Hydra names the bad override and the choices), or an unexpected error,
  printed with its traceback: a bug to report (any exception that is not a ``KnownError``, a plain ``ValueError``
  included).
- 2: a ``UserError``, a mistake in the command or its inputs (a bad value, a missing folder or checkpoint, a foreign
  or newer checkpoint, a refused ``_target_``, a class label the model does not have): the message names the fix.
  So is a mistake OmegaConf finds in the composed config (a ``???`` left unset, an interpolation to a missing key),
  and what a resolver raised is judged as if raised directly.
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
from omegaconf.errors import (
    InterpolationKeyError,
    InterpolationResolutionError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    UnsupportedInterpolationType,
    ValidationError,
)

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_CHECKPOINT_NOT_WRITTEN = 3
EXIT_DIVERGED = 4
EXIT_LOADER_WORKER_DIED = 5

# what OmegaConf raises for a mistake in the config a user composed: a ``???`` left unset, an interpolation to a key
# that does not exist, a value its node's type refuses
CONFIG_MISTAKES = (MissingMandatoryValue, InterpolationKeyError, InterpolationToMissingValueError,
                   UnsupportedInterpolationType, ValidationError)


class KnownError(Exception):
    """An error with a documented exit code whose message is the whole story: printed as one line, no traceback."""

    exit_code = 1


class UserError(KnownError):
    """A mistake in the command or its inputs; the message names the fix (exit 2)."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A config value, override or component that cannot work (an unknown option, a bad number, a refused target)."""


class DataError(UserError, ValueError):
    """A data set or input image that cannot be used (an empty folder, too few images, a wrong size)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used here (damaged, foreign, newer, of another architecture, weights only)."""


class PathNotFound(UserError, FileNotFoundError):
    """A file or folder the command was given does not exist."""


class CheckpointWriteError(KnownError, RuntimeError):
    """A checkpoint could not be written; the one before it is still in place."""

    exit_code = EXIT_CHECKPOINT_NOT_WRITTEN


class TrainingDiverged(KnownError, RuntimeError):
    """The loss or the gradients stayed non-finite for too many steps in a row."""

    exit_code = EXIT_DIVERGED


class LoaderWorkerDied(KnownError, RuntimeError):
    """A data-loader worker process died while reading a file."""

    exit_code = EXIT_LOADER_WORKER_DIED


def exit_code_of(error: BaseException) -> int | None:
    """The documented exit code of ``error``, or None for an unexpected error (a bug, shown with its traceback)."""
    if (inner := wrapped(error)) is not None:
        return exit_code_of(inner)
    if isinstance(error, KnownError):
        return error.exit_code
    return EXIT_USER_ERROR if isinstance(error, CONFIG_MISTAKES) else None


def wrapped(error: BaseException) -> BaseException | None:
    """The error that a component's constructor (in Hydra's instantiation error) or a config resolver (in
    OmegaConf's resolution error) raised, or None when ``error`` wraps nothing."""
    if isinstance(error, InstantiationException):
        return error.__cause__
    if type(error) is InterpolationResolutionError:  # OmegaConf keeps what the resolver raised as the context
        return error.__cause__ or error.__context__
    return None


def message_of(error: BaseException) -> str:
    """The message of ``error``, unwrapped from Hydra's instantiation error or OmegaConf's resolution error."""
    if (inner := wrapped(error)) is not None:
        return message_of(inner)
    if isinstance(error, MissingMandatoryValue):
        return f"{error.full_key} is not set (it is ???): pass {error.full_key}=... on the command line"
    if isinstance(error, OmegaConfBaseException) and str(error):  # the other lines repeat the key and node type
        return str(error).splitlines()[0] + (f" (at {error.full_key})" if error.full_key else "")
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
