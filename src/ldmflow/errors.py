"""The errors a user can cause: each message names the file, key or row and what is allowed.

The command line turns each into one line on stderr and an exit code (see :mod:`ldmflow.cli`)."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, the key and what is allowed."""


class CudaSetupError(RuntimeError):
    """The installed torch cannot use this machine's GPUs (no kernels for them, a CPU-only build on a GPU job);
    the message names the torch build to install."""


class Preempted(RuntimeError):
    """A scheduler signal arrived; the latest checkpoint was saved and the run can be resumed."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, a checkpoint that does not fit the config)."""


class SamplingError(ValueError):
    """A sampling request cannot be served (unknown class, moved autoencoder, wrong checkpoint)."""


class SelectionError(ValueError):
    """No run can be selected (missing files, unknown metric)."""


class DataError(ValueError):
    """A manifest row or file is invalid; the message names the manifest row and the file."""


class StorageError(RuntimeError):
    """A write failed on the machine's side (full disk, read-only or vanished folder, lost file system); names the
    path and the errno. The temporary file is removed and the file it was to replace is left as it was."""

    def __init__(self, path, exc: OSError):
        self.path, self.errno = str(path), exc.errno
        super().__init__(f"{path}: cannot write ({errno_name(exc.errno)}: {exc.strerror or exc}); the file it was "
                         "to replace, if any, is intact")


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock; names the holder (host, pid, since when)."""


def errno_name(number: int | None) -> str:
    """'ENOSPC' for 28, 'errno N' for a number the platform does not name."""
    return errno.errorcode.get(number, f"errno {number}") if number is not None else "no errno"


class LatentError(DataError):
    """A latent store is incomplete, inconsistent, or was made by another autoencoder; names the path."""


class ControlError(DataError):
    """A control signal cannot be made or does not fit the model (missing column, wrong size, bad index)."""


# The command line's exit codes: 2 for a user error (usage, config, data, a path that cannot be read or
# written), 143 (128 + SIGTERM) for a run that saved a checkpoint on a scheduler's signal (SIGINT, SIGTERM,
# SIGUSR1 or SIGUSR2: one code for all four) and can be resumed, 1 for a run that cannot go on. README "When
# something is wrong" lists them.
# OSError covers the rest of what a machine can do to a path (ENOSPC, EROFS, EIO, ESTALE on a lost NFS mount).
USER_ERRORS = (ConfigError, CudaSetupError, DataError, SelectionError, SamplingError, StorageError, RunLockedError,
               OSError)
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143
EXIT_TRAINING_ERROR = 1


def describe(exc: BaseException) -> str:
    """The one line a user sees: the message, or for a machine's OSError the path, the errno's name and why."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{errno_name(exc.errno)}: {exc.strerror}"
    return str(exc)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error a user can cause or a scheduler can send; None for a bug (show a traceback)."""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USER_ERROR
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, TrainingError):
        return EXIT_TRAINING_ERROR
    return None
