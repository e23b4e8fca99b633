"""BlueEngine: run each step of a processing engine in its own process, linked by ZeroMQ."""

from blueengine.context import Context
from blueengine.engine import BlueEngine, StepSpec
from blueengine.errors import (
    BlueEngineError,
    ChannelError,
    CodecError,
    ConfigError,
    EngineFull,
    EngineStopped,
    JobNotFound,
    TransportError,
)
from blueengine.jobs import Job
from blueengine.types import JobStatus

__all__ = [
    "BlueEngine",
    "BlueEngineError",
    "ChannelError",
    "CodecError",
    "ConfigError",
    "Context",
    "EngineFull",
    "EngineStopped",
    "Job",
    "JobNotFound",
    "JobStatus",
    "StepSpec",
    "TransportError",
]
__version__ = "0.1.0"
