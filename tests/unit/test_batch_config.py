"""Effective batch configuration: code defaults -> environment -> request overrides."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

from cj_assessment.batch_config import (
    OVERRIDE_RANGES,
    BatchConfig,
    merge_override_sources,
    resolve_batch_config,
    unknown_override_fields,
)
from cj_assessment.errors import RequestRejected
from cj_assessment.settings import Settings


@pytest.fixture(autouse=True)
def _no_cj_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CJ_"):
            monkeypatch.delenv(name)


def _resolve(
    overrides: dict[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    essays: int = 20,
    metadata_max: Any = None,
) -> BatchConfig:
    return resolve_batch_config(
        settings or Settings(),
        essay_count=essays,
        overrides=overrides or {},
        metadata_max_comparisons=metadata_max,
    )


def test_defaults_come_from_settings() -> None:
    s = Settings()
    config = _resolve(settings=s, essays=20)
    assert config == BatchConfig(
        batch_size=s.batch_size,
        max_concurrent_batches=s.max_concurrent_batches,
        partial_completion_threshold=s.partial_completion_threshold,
        enable_stability_checking=s.enable_stability_checking,
        stability_threshold=s.stability_threshold,
        min_iterations_for_stability=s.min_iterations_for_stability,
        max_comparisons=s.comparisons_per_essay * 20,
        matchings_per_iteration=s.matchings_per_iteration,
        failed_comparison_retry_threshold=s.failed_comparison_retry_threshold,
        max_retry_attempts=s.max_retry_attempts,
        min_success_rate=s.min_success_rate,
        pairing_strategy=s.pairing_strategy,
        target_reliability=s.target_reliability,
        target_mean_standard_error=s.target_mean_standard_error,
    )
    assert (config.batch_size, config.max_concurrent_batches) == (50, 3)
    assert config.pairing_strategy == "adaptive"
    assert config.target_reliability is None and config.target_mean_standard_error is None
    assert config.partial_completion_threshold == 0.85
    assert config.max_comparisons == 200


def test_environment_beats_the_code_default() -> None:
    assert _resolve(settings=Settings(batch_size=30)).batch_size == 30


def test_cj_environment_variable_beats_the_code_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CJ_BATCH_SIZE", "30")
    monkeypatch.setenv("CJ_PARTIAL_COMPLETION_THRESHOLD", "0.9")
    config = _resolve(settings=Settings())
    assert config.batch_size == 30
    assert config.partial_completion_threshold == 0.9


def test_request_overrides_beat_the_environment() -> None:
    settings = Settings(batch_size=30, max_concurrent_batches=2, enable_stability_checking=True)
    config = _resolve(
        {
            "batch_size": 100,
            "max_concurrent_batches": 5,
            "partial_completion_threshold": 0.95,
            "enable_stability_checking": False,
            "stability_threshold": 0.2,
        },
        settings=settings,
    )
    assert config.batch_size == 100
    assert config.max_concurrent_batches == 5
    assert config.partial_completion_threshold == 0.95
    assert config.enable_stability_checking is False
    assert config.stability_threshold == 0.2


def test_data_overrides_beat_envelope_metadata_overrides() -> None:
    merged = merge_override_sources(
        {"batch_size": 100, "partial_completion_threshold": None},
        {"batch_size": 20, "max_concurrent_batches": 4, "partial_completion_threshold": 0.6},
    )
    assert merged == {
        "batch_size": 100,
        "max_concurrent_batches": 4,
        "partial_completion_threshold": 0.6,
    }
    config = _resolve(merged)
    assert (config.batch_size, config.max_concurrent_batches) == (100, 4)


def test_merge_drops_unknown_keys_and_ignores_non_dict_metadata() -> None:
    assert merge_override_sources({"batch_size": 40, "colour": "blue"}, "nonsense") == {
        "batch_size": 40
    }
    assert merge_override_sources(None, None) == {}
    assert merge_override_sources(None, {"max_comparisons": 7}) == {"max_comparisons": 7}


def test_unknown_override_fields_are_named_for_the_log_short_and_few() -> None:
    assert unknown_override_fields({"batchsize": 5, "batch_size": 50}, None) == ["batchsize"]
    assert unknown_override_fields({"batchsize": 5}, "nonsense") == [
        "metadata.batch_config_overrides (not an object)",
        "batchsize",
    ]
    many = {f"{i:02d}{'x' * 100}": 1 for i in range(30)}
    named = unknown_override_fields(None, many)
    assert len(named) == 10 and all(len(name) == 40 for name in named)


def test_in_range_boundaries_are_accepted() -> None:
    low = _resolve(
        {
            "batch_size": 10,
            "max_concurrent_batches": 1,
            "partial_completion_threshold": 0.5,
            "max_comparisons": 1,
        },
        essays=2,  # the least budget is one comparison per two essays
    )
    assert (low.batch_size, low.max_concurrent_batches, low.max_comparisons) == (10, 1, 1)
    assert low.partial_completion_threshold == 0.5
    high = _resolve(
        {"batch_size": 200, "max_concurrent_batches": 5, "partial_completion_threshold": 1}
    )
    assert (high.batch_size, high.max_concurrent_batches) == (200, 5)
    assert high.partial_completion_threshold == 1.0
    assert isinstance(high.partial_completion_threshold, float)


def test_an_integral_float_batch_size_is_accepted_as_an_int() -> None:
    config = _resolve({"batch_size": 50.0})
    assert config.batch_size == 50 and isinstance(config.batch_size, int)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("batch_size", 9, "10-200"),
        ("batch_size", 201, "10-200"),
        ("batch_size", "50", "10-200"),
        ("batch_size", True, "10-200"),
        ("batch_size", 50.5, "10-200"),
        ("batch_size", [50], "10-200"),
        ("max_concurrent_batches", 0, "1-5"),
        ("max_concurrent_batches", 6, "1-5"),
        ("partial_completion_threshold", 0.49, "0.5-1"),
        ("partial_completion_threshold", 1.01, "0.5-1"),
        ("partial_completion_threshold", "0.9", "0.5-1"),
        ("stability_threshold", 0, "> 0"),
        ("stability_threshold", -0.1, "> 0"),
        ("stability_threshold", 10**400, "> 0"),  # beyond any float
        ("max_comparisons", 0, ">= 1"),
        ("max_comparisons", -5, ">= 1"),
        ("max_comparisons", "100", ">= 1"),
        ("enable_stability_checking", "yes", "true or false"),
        ("enable_stability_checking", 1, "true or false"),
    ],
)
def test_out_of_range_override_is_rejected_naming_field_and_range(
    field: str, value: Any, allowed: str
) -> None:
    with pytest.raises(RequestRejected) as caught:
        _resolve({field: value})
    error = caught.value
    assert error.error_code == "INVALID_BATCH_CONFIG_OVERRIDE"
    assert field in str(error)
    assert f"allowed: {allowed}" in str(error)
    assert error.context["field"] == field
    assert error.context["allowed"] == allowed


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (10**400, "a number of 401 digits"),
        ("x" * 600_000, "text of length 600000"),
        (["x"] * 50, "a list of length 50"),
        ({"k": 1}, "an object of length 1"),
        ("50", "'50'"),
        (9, "9"),
    ],
)
def test_a_refused_override_is_shown_short_whatever_the_request_sent(
    value: Any, shown: str
) -> None:
    with pytest.raises(RequestRejected) as caught:
        _resolve({"batch_size": value})
    assert caught.value.context["value"] == shown
    assert f"batch_size={shown} is out of range" in caught.value.message
    assert len(caught.value.message) < 120


def test_every_override_field_has_a_described_range() -> None:
    for field in OVERRIDE_RANGES:
        with pytest.raises(RequestRejected) as caught:
            _resolve({field: "not a value"})
        assert field in caught.value.message
        assert "allowed:" in caught.value.message


@pytest.mark.parametrize(
    ("override", "metadata_cap", "expected"),
    [
        (None, None, 100),  # 10 per essay x 10 essays
        (80, None, 80),
        (500, None, 100),
        (None, 50, 50),
        (80, 50, 50),
        (30, 50, 30),
        (None, 1000, 100),
    ],
)
def test_max_comparisons_is_the_smallest_of_budget_override_and_metadata_cap(
    override: int | None, metadata_cap: int | None, expected: int
) -> None:
    overrides = {} if override is None else {"max_comparisons": override}
    config = _resolve(
        overrides, settings=Settings(comparisons_per_essay=10), essays=10, metadata_max=metadata_cap
    )
    assert config.max_comparisons == expected


@pytest.mark.parametrize("cap", [0, "fifty", True, 2.5])
def test_an_invalid_metadata_cap_is_rejected(cap: Any) -> None:
    with pytest.raises(RequestRejected) as caught:
        _resolve(metadata_max=cap)
    assert "max_comparisons" in str(caught.value)


def test_config_round_trips_through_json() -> None:
    config = _resolve({"batch_size": 120})
    assert BatchConfig.from_json(config.to_json()) == config


def test_pairing_and_precision_settings_flow_into_the_config() -> None:
    settings = Settings(
        pairing_strategy="random", target_reliability=0.85, target_mean_standard_error=0.3
    )
    config = _resolve(settings=settings)
    assert config.pairing_strategy == "random"
    assert (config.target_reliability, config.target_mean_standard_error) == (0.85, 0.3)
    assert BatchConfig.from_json(config.to_json()) == config


def test_a_config_stored_without_pairing_fields_keeps_the_random_pairing_it_ran_with() -> None:
    stored = _resolve().to_json()
    for field in ("pairing_strategy", "target_reliability", "target_mean_standard_error"):
        del stored[field]
    config = BatchConfig.from_json(stored)
    assert config.pairing_strategy == "random"
    assert config.target_reliability is None and config.target_mean_standard_error is None
    assert config.batch_size == stored["batch_size"]


@pytest.mark.parametrize(
    "values",
    [
        {"pairing_strategy": "swiss"},
        {"target_reliability": 1.0},
        {"target_reliability": 0.0},
        {"target_mean_standard_error": 0.0},
    ],
)
def test_out_of_range_pairing_and_precision_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Settings(**values)


@pytest.mark.parametrize("field", ["partial_completion_threshold", "stability_threshold"])
def test_a_nan_override_is_rejected(field: str) -> None:
    with pytest.raises(RequestRejected):
        _resolve({field: math.nan})


def test_child_environment_reproduces_the_settings_and_drops_this_process_cj_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cj_assessment.settings import child_environment

    monkeypatch.setenv("CJ_BATCH_SIZE", "7")
    monkeypatch.setenv("CJ_SOMETHING_STALE", "x")
    monkeypatch.setenv("PATH_FOR_CHILD", "kept")
    env = child_environment(Settings(batch_size=30), CJ_LOG_LEVEL="DEBUG")
    assert env["CJ_BATCH_SIZE"] == "30"
    assert env["CJ_LOG_LEVEL"] == "DEBUG"
    assert env["PATH_FOR_CHILD"] == "kept"
    assert "CJ_SOMETHING_STALE" not in env


@pytest.mark.parametrize(("essays", "cap"), [(10, 4), (9, 4), (300, 100)])
def test_a_budget_too_small_to_compare_every_essay_once_is_refused(essays: int, cap: int) -> None:
    # Essays without a single comparison would still get ranks, among the compared ones.
    with pytest.raises(RequestRejected) as caught:
        _resolve({"max_comparisons": cap}, essays=essays)
    assert caught.value.error_code == "INVALID_BATCH_CONFIG_OVERRIDE"
    assert caught.value.context["allowed"] == f">= {-(-essays // 2)}"


@pytest.mark.parametrize(("essays", "cap"), [(10, 5), (9, 5), (2, 1)])
def test_a_budget_that_compares_every_essay_once_is_accepted(essays: int, cap: int) -> None:
    assert _resolve(metadata_max=cap, essays=essays).max_comparisons == cap


def test_a_bad_metadata_max_comparisons_is_named_where_the_request_put_it() -> None:
    with pytest.raises(RequestRejected) as caught:
        _resolve(metadata_max="many")
    assert caught.value.message.startswith("metadata.max_comparisons='many' is out of range")
    assert caught.value.context["source"] == "metadata"
