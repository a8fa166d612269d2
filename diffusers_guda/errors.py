"""Exceptions raised by diffusers-guda.

Every error names the problem and the fix. The command line prints the message of a
:class:`GUDAError` as one line, without a traceback.
"""


class GUDAError(Exception):
    """Base class of all errors that diffusers-guda raises on purpose."""


class DataError(GUDAError, ValueError):
    """A dataset cannot be used (wrong layout, sizes, channels, empty or single group)."""


class ConfigError(GUDAError, ValueError):
    """A configuration value or name is invalid (e.g. an unknown objective)."""


class CheckpointMismatchError(ConfigError):
    """An unlearning checkpoint holds groups of another run (other settings, data or base model)."""


class BundleError(GUDAError, ValueError):
    """An adapter bundle is malformed, unsafe to load, or incomplete."""


class BaseModelMismatchError(BundleError):
    """An adapter bundle was made for another base model than the one it is loaded into."""


class UnlearningDivergedError(GUDAError, RuntimeError):
    """Unlearning produced a non-finite loss (usually a learning rate that is too large)."""


class DistributedError(GUDAError, RuntimeError):
    """A multi-process launch is misconfigured, or its processes were given different inputs."""


class OutputError(GUDAError, OSError):
    """An output could not be written (a full or read-only disk, no permission); the previous one is unchanged."""


class ScoringError(GUDAError, RuntimeError):
    """Scoring produced values that are not finite (a broken adapter or a base model that overflows)."""


class BatchTooLargeError(GUDAError, MemoryError):
    """A batch does not fit in the device's memory; the message names the settings that make it smaller."""


class OutputLockedError(OutputError):
    """Another run is writing the same output (its lock file names it); nothing was done.

    ``remote`` is ``True`` when the lock was left by a run on another machine that no longer holds it:
    waiting does not end it, someone must delete the lock file.
    """

    remote: bool = False
