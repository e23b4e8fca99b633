"""The SDK's exceptions: one root, a branch per subsystem."""

from __future__ import annotations


class BlueEngineError(Exception):
    """Root of every error the SDK raises on purpose."""


class ConfigError(BlueEngineError):
    """Raised by `add_step` or `start` when the engine definition is wrong."""


class CodecError(BlueEngineError):
    """Raised when a value cannot be encoded for, or decoded from, the wire."""


class ChannelError(BlueEngineError):
    """Raised when a step writes to a channel it did not declare, or writes a bad value."""


class TransportError(BlueEngineError):
    """Raised when a socket cannot be bound, connected or resolved."""


class EngineFull(BlueEngineError):
    """Raised when a job is submitted while the engine has no room for it."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobNotFound(BlueEngineError):
    """Raised when a job id is unknown to the engine."""


class EngineStopped(BlueEngineError):
    """Raised when the engine is asked for work after it has stopped."""
