"""The user's API: define an engine step by step, then start it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blueengine.errors import ConfigError
from blueengine.types import CONTROL, INPUT_CHANNELS, OUTPUT_CHANNELS, SetupFunc, StepFunc

if TYPE_CHECKING:
    from blueengine.client import LocalEngine

_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_string(target: str) -> Any:
    """Import `module:attribute` and return the attribute."""
    if not _IMPORT_STRING.match(target):
        raise ConfigError(f"{target!r} is not an import string of the form 'module:attribute'")
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return value


@dataclass(frozen=True)
class StepSpec:
    """One step of an engine, as `add_step` recorded it."""

    name: str
    process_func: StepFunc | str
    input_channels: tuple[str, ...]
    output_channels: tuple[str, ...]
    replicas: int = 1
    setup: SetupFunc | str | None = None
    concurrency: int = 1
    config: Mapping[str, Any] = field(default_factory=dict)

    def load_func(self) -> StepFunc:
        """The step function, imported now if it was given as a string."""
        func = self.process_func
        if isinstance(func, str):
            func = import_string(func)
            _check_signature(self.name, func, "process_func", 2)
        return func

    def load_setup(self) -> SetupFunc | None:
        """The setup hook, imported now if it was given as a string."""
        hook = self.setup
        if isinstance(hook, str):
            hook = import_string(hook)
            _check_signature(self.name, hook, "setup", 1)
        return hook

    @property
    def takes_control(self) -> bool:
        return CONTROL in self.input_channels


class BlueEngine:
    """An engine: steps that run in parallel processes, each feeding the next.

    Example::

        def double(context, input):
            yield {'forward': input['Control']['x'] * 2}

        def report(context, input):
            return {'Result': {'value': input['forward']}}

        engine = BlueEngine('doubler')
        engine.add_step('double', double, input_channels=['Control'], output_channels=[])
        engine.add_step('report', report, input_channels=[], output_channels=['Result'])
        with engine.run_local() as client:
            job = client.submit({'x': 21})
            print(client.wait(job).results)   # [{'value': 42}]

    `allow_pickle` lets `forward` carry any picklable object (only between trusted processes);
    `max_attempts` is how often a job is run when a replica holding its work dies or the job
    misses `job_timeout_s`. `payload_model`, a pydantic model, is what the gateway validates job
    payloads against (and shows in its OpenAPI document).
    """

    def __init__(
        self,
        name: str,
        *,
        allow_pickle: bool = False,
        max_attempts: int = 3,
        job_timeout_s: float | None = None,
        payload_model: type[Any] | None = None,
    ) -> None:
        if not _STEP_NAME.match(name):
            raise ConfigError(f"engine name {name!r} must be 1-63 letters, digits, '_', '.' or '-'")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, not {max_attempts}")
        if job_timeout_s is not None and job_timeout_s <= 0:
            raise ConfigError(f"job_timeout_s must be positive, not {job_timeout_s}")
        self.name = name
        self.allow_pickle = allow_pickle
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        self.payload_model = payload_model
        self.steps: list[StepSpec] = []

    def add_step(
        self,
        name: str,
        process_func: StepFunc | str,
        input_channels: list[str] | tuple[str, ...] = (),
        output_channels: list[str] | tuple[str, ...] = (),
        *,
        replicas: int = 1,
        setup: SetupFunc | str | None = None,
        concurrency: int = 1,
        config: Mapping[str, Any] | None = None,
    ) -> StepSpec:
        """Append a step; its `forward` output feeds the step added after it."""
        spec = StepSpec(
            name=name,
            process_func=process_func,
            input_channels=tuple(input_channels),
            output_channels=tuple(output_channels),
            replicas=replicas,
            setup=setup,
            concurrency=concurrency,
            config=dict(config or {}),
        )
        self._check_step(spec)
        self.steps.append(spec)
        return spec

    def step(self, name: str) -> StepSpec:
        """The step called `name`."""
        for spec in self.steps:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.steps) or "none"
        raise ConfigError(f"engine {self.name!r} has no step {name!r} (steps: {known})")

    def with_replicas(self, replicas: Mapping[str, int]) -> BlueEngine:
        """A copy of this engine with some steps' replica counts changed."""
        clone = BlueEngine(
            self.name,
            allow_pickle=self.allow_pickle,
            max_attempts=self.max_attempts,
            job_timeout_s=self.job_timeout_s,
            payload_model=self.payload_model,
        )
        for name in replicas:
            self.step(name)
        for spec in self.steps:
            count = replicas.get(spec.name, spec.replicas)
            clone.add_step(
                spec.name,
                spec.process_func,
                spec.input_channels,
                spec.output_channels,
                replicas=count,
                setup=spec.setup,
                concurrency=spec.concurrency,
                config=spec.config,
            )
        return clone

    def validate(self) -> None:
        """Check the engine as a whole; `start` and `run_local` call this."""
        if not self.steps:
            raise ConfigError(f"engine {self.name!r} has no steps; call add_step first")
        first = self.steps[0]
        if not first.takes_control:
            raise ConfigError(
                f"step {first.name!r} is the first step, so it must list 'Control' in "
                "input_channels: jobs enter the engine there"
            )
        for spec in self.steps:
            _check_importable(spec)

    def run_local(self, **options: Any) -> LocalEngine:
        """Start every step in the background on this machine; returns a client.

        Use it as a context manager so that the steps stop with the block.
        """
        from blueengine.client import LocalEngine

        return LocalEngine(self, **options)

    def start(self) -> None:
        """Run the engine on this machine until SIGINT or SIGTERM, then drain and stop."""
        from blueengine.client import LocalEngine

        with LocalEngine(self) as client:
            client.serve_forever()

    def _check_step(self, spec: StepSpec) -> None:
        where = f"step {spec.name!r}"
        if not isinstance(spec.name, str) or not _STEP_NAME.match(spec.name):
            raise ConfigError(
                f"step name {spec.name!r} must be 1-63 letters, digits, '_', '.' or '-'"
            )
        if any(s.name == spec.name for s in self.steps):
            raise ConfigError(f"{where} is added twice; step names must be unique")
        for channel in spec.input_channels:
            if channel not in INPUT_CHANNELS:
                raise ConfigError(
                    f"{where} lists unknown input channel {channel!r}; the only input channel "
                    "is 'Control' (a step's forward input needs no declaration)"
                )
        for channel in spec.output_channels:
            if channel not in OUTPUT_CHANNELS:
                allowed = ", ".join(sorted(OUTPUT_CHANNELS))
                raise ConfigError(
                    f"{where} lists unknown output channel {channel!r}; choose from {allowed} "
                    "('forward' needs no declaration)"
                )
        _check_count(where, "replicas", spec.replicas)
        _check_count(where, "concurrency", spec.concurrency)
        _check_callable(spec.name, spec.process_func, "process_func", 2)
        if spec.setup is not None:
            _check_callable(spec.name, spec.setup, "setup", 1)
        if not isinstance(spec.config, Mapping):
            raise ConfigError(f"{where}: config must be a mapping, not {type(spec.config)}")


def _check_count(where: str, what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {what} must be a whole number of at least 1, not {value!r}")


def _check_callable(step: str, target: object, what: str, arity: int) -> None:
    if isinstance(target, str):
        if not _IMPORT_STRING.match(target):
            raise ConfigError(
                f"step {step!r}: {what} {target!r} is not an import string 'module:function'"
            )
        return
    if not callable(target):
        raise ConfigError(f"step {step!r}: {what} must be a function or 'module:function'")
    _check_signature(step, target, what, arity)


def _check_signature(step: str, func: Callable[..., Any], what: str, arity: int) -> None:
    expected = "(context, input)" if arity == 2 else "(context)"
    try:
        inspect.signature(func).bind(*range(arity))
    except TypeError:
        raise ConfigError(
            f"step {step!r}: {what} {getattr(func, '__name__', func)!r} must take "
            f"{expected}, but its signature is {inspect.signature(func)}"
        ) from None
    except ValueError:
        return  # builtins without a signature: trust them.


def _check_importable(spec: StepSpec) -> None:
    # A string target is imported only in the step's own process, so that a container needs only
    # its step's dependencies; here we only check that the module can be found.
    for what, target in (("process_func", spec.process_func), ("setup", spec.setup)):
        if not isinstance(target, str):
            continue
        module = target.partition(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            raise ConfigError(f"step {spec.name!r}: {what} module {module!r} cannot be found")
