"""Exceptions raised by lorakit.

All derive from ``LoraError`` (a ``ValueError``), so ``except ValueError`` keeps working for
callers that do not care about the details. Every message names what is wrong and how to fix it.
"""


class LoraError(ValueError):
    """Base class of every error lorakit raises on bad input."""


class ConfigError(LoraError):
    """A LoraConfig field has an invalid value."""


class TargetNotFoundError(LoraError):
    """target_modules matched nothing (or an unsupported module type) in the model."""


class AdapterNotFoundError(LoraError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterMismatchError(LoraError):
    """An adapter's weights do not fit the model (made for another base model)."""


class AdapterFileError(LoraError):
    """An adapter file is missing, corrupt or truncated."""


class MergeStateError(LoraError):
    """An operation that needs unmerged (or merged) adapters was called in the wrong state."""


class TrainingDivergedError(LoraError):
    """The loss or the gradients became NaN / infinite: the run stops before anything more is written."""


class WriteFailedError(LoraError):
    """Writing an output failed (a full disk, a quota, a read-only place); nothing was replaced."""
