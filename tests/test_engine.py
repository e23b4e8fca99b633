"""Mistakes in an engine's definition are caught early, with the step named."""

from __future__ import annotations

import pytest

from blueengine import BlueEngine, ConfigError
from tests import engines


def two_args(context, input):
    return None


def one_arg(context):
    return None


def make_engine() -> BlueEngine:
    engine = BlueEngine("checks")
    engine.add_step("first", two_args, ["Control"], ["Status"])
    return engine


def test_a_duplicate_step_name_is_refused():
    engine = make_engine()
    with pytest.raises(ConfigError, match="step 'first' is added twice"):
        engine.add_step("first", two_args, [], [])


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (["Kontrol"], [], "unknown input channel 'Kontrol'"),
        ([], ["Results"], "unknown output channel 'Results'"),
        ([], ["forward"], "unknown output channel 'forward'"),
    ],
)
def test_an_unknown_channel_is_refused_with_the_step_named(inputs, outputs, message):
    with pytest.raises(ConfigError, match=f"step 'second' lists {message}"):
        make_engine().add_step("second", two_args, inputs, outputs)


def test_the_first_step_must_take_control():
    engine = BlueEngine("no-control")
    engine.add_step("first", two_args, [], [])
    with pytest.raises(ConfigError, match="step 'first' is the first step, so it must list"):
        engine.run_local()


def test_an_engine_without_steps_cannot_start():
    with pytest.raises(ConfigError, match="has no steps"):
        BlueEngine("empty").run_local()


def test_a_function_with_the_wrong_signature_is_refused():
    with pytest.raises(ConfigError, match=r"step 'second': process_func 'one_arg' must take"):
        make_engine().add_step("second", one_arg, [], [])
    with pytest.raises(ConfigError, match=r"step 'second': setup 'two_args' must take \(context\)"):
        make_engine().add_step("second", two_args, [], [], setup=two_args)


@pytest.mark.parametrize(
    ("field", "value"), [("replicas", 0), ("concurrency", -1), ("replicas", 1.5)]
)
def test_counts_must_be_positive_whole_numbers(field, value):
    with pytest.raises(ConfigError, match=f"step 'second': {field} must be a whole number"):
        make_engine().add_step("second", two_args, [], [], **{field: value})


def test_an_import_string_is_checked_without_importing_it():
    engine = make_engine()
    engine.add_step("second", "tests.no_such_module:step", [], [])
    with pytest.raises(ConfigError, match=r"module 'tests\.no_such_module' cannot be found"):
        engine.run_local()
    with pytest.raises(ConfigError, match="is not an import string"):
        make_engine().add_step("third", "not an import string", [], [])


def test_a_lambda_is_refused_at_start_with_advice():
    engine = make_engine()
    engine.add_step("second", lambda context, input: None, [], [])
    with pytest.raises(ConfigError, match="step 'second' cannot be sent to its process"):
        engine.run_local()


def test_with_replicas_changes_only_the_named_steps():
    engine = engines.three_steps().with_replicas({"square": 3})
    assert [s.replicas for s in engine.steps] == [1, 3, 1]
    with pytest.raises(ConfigError, match="has no step 'nope'"):
        engines.three_steps().with_replicas({"nope": 2})
