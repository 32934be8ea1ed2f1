"""Effective batch configuration: defaults in code -> environment (`Settings`) -> per-request
`batch_config_overrides` (request data wins over envelope metadata)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cj_assessment.errors import RequestRejected
from cj_assessment.settings import Settings

# field -> (type, low, high); None means unbounded on that side.
OVERRIDE_RANGES: dict[str, tuple[type, float | None, float | None]] = {
    "batch_size": (int, 10, 200),
    "max_concurrent_batches": (int, 1, 5),
    "partial_completion_threshold": (float, 0.5, 1.0),
    "enable_stability_checking": (bool, None, None),
    "stability_threshold": (float, 1e-9, None),
    "max_comparisons": (int, 1, None),
}


@dataclass(frozen=True)
class BatchConfig:
    batch_size: int
    max_concurrent_batches: int
    partial_completion_threshold: float
    enable_stability_checking: bool
    stability_threshold: float
    min_iterations_for_stability: int
    max_comparisons: int
    matchings_per_iteration: int
    failed_comparison_retry_threshold: int
    max_retry_attempts: int
    min_success_rate: float
    # Defaults for configurations stored without these fields: the behaviour they ran with.
    pairing_strategy: str = "random"
    target_reliability: float | None = None
    target_mean_standard_error: float | None = None
    min_reliability_to_stop_early: float = 0.5

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


SHOWN_VALUE_CHARS = 40


def _check(field: str, value: Any, source: str = "batch_config_overrides") -> Any:
    """`value` as the field's type, or RequestRejected naming `source.field`."""
    kind, low, high = OVERRIDE_RANGES[field]
    allowed = _describe_range(field)
    if kind is bool:
        if not isinstance(value, bool):
            raise _invalid(source, field, value, allowed)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(source, field, value, allowed)
    # Not for ints: every int is finite, and one too large for a float would overflow here.
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(source, field, value, allowed)
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise _invalid(source, field, value, allowed)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(source, field, value, allowed)
    try:
        return kind(value)
    except OverflowError:  # an int beyond any float, for a field without an upper bound
        raise _invalid(source, field, value, allowed) from None


def _describe_range(field: str) -> str:
    kind, low, high = OVERRIDE_RANGES[field]
    if kind is bool:
        return "true or false"
    if high is None:
        return "> 0" if field == "stability_threshold" else f">= {low:g}"
    return f"{low:g}-{high:g}"


def _invalid(source: str, field: str, value: Any, allowed: str) -> RequestRejected:
    shown = _shown(value)
    context = {"field": field, "value": shown, "allowed": allowed}
    if source != "batch_config_overrides":
        context["source"] = source
    return RequestRejected(
        "INVALID_BATCH_CONFIG_OVERRIDE",
        f"{source}.{field}={shown} is out of range; allowed: {allowed}",
        context,
    )


def _shown(value: Any) -> str:
    """A short value as written; a longer one only by its type and size, so that the failed
    event neither copies request text nor grows with what the request sent."""
    if isinstance(value, int | float | bool | str) or value is None:
        text = repr(value)
        if len(text) <= SHOWN_VALUE_CHARS:
            return text
        if not isinstance(value, str):
            return f"a number of {len(text)} digits"
    size = len(value) if isinstance(value, str | list | dict) else None
    kind = {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{kind} of length {size}" if size is not None else kind


NOT_AN_OBJECT = "metadata.batch_config_overrides (not an object)"


def unknown_override_fields(data_overrides: Any, metadata_overrides: Any) -> list[str]:
    """Override fields this service does not know (ignored, like any unknown field of the
    contract; named here so that a misspelling can be logged), each cut to 40 characters."""
    names = {
        str(name)[:40]
        for source in (data_overrides, metadata_overrides)
        if isinstance(source, dict)
        for name in source
        if name not in OVERRIDE_RANGES
    }
    whole = (
        [NOT_AN_OBJECT]
        if metadata_overrides is not None and not isinstance(metadata_overrides, dict)
        else []
    )
    return [*whole, *sorted(names)][:10]


def merge_override_sources(
    data_overrides: dict[str, Any] | None, metadata_overrides: Any
) -> dict[str, Any]:
    """Envelope metadata overrides first, then request data overrides on top (data wins)."""
    merged: dict[str, Any] = {}
    if isinstance(metadata_overrides, dict):
        merged.update({k: v for k, v in metadata_overrides.items() if v is not None})
    if data_overrides:
        merged.update({k: v for k, v in data_overrides.items() if v is not None})
    return {k: v for k, v in merged.items() if k in OVERRIDE_RANGES}


def resolve_batch_config(
    settings: Settings,
    *,
    essay_count: int,
    overrides: dict[str, Any],
    metadata_max_comparisons: Any = None,
) -> BatchConfig:
    """The configuration one assessment runs with; raises RequestRejected naming a bad field."""
    checked = {field: _check(field, value) for field, value in overrides.items()}
    budget = settings.comparisons_per_essay * essay_count
    caps = [budget]
    if "max_comparisons" in checked:
        caps.append(checked["max_comparisons"])
    if metadata_max_comparisons is not None:
        caps.append(_check("max_comparisons", metadata_max_comparisons, "metadata"))
    needed = math.ceil(essay_count / 2)
    if min(caps) < needed:
        # Essays left without a single comparison would still get ranks: refuse instead.
        raise RequestRejected(
            "INVALID_BATCH_CONFIG_OVERRIDE",
            f"max_comparisons={min(caps)} cannot compare each of {essay_count} essays once;"
            f" at least {needed} are needed",
            {"field": "max_comparisons", "value": repr(min(caps)), "allowed": f">= {needed}"},
        )
    return BatchConfig(
        batch_size=checked.get("batch_size", settings.batch_size),
        max_concurrent_batches=checked.get(
            "max_concurrent_batches", settings.max_concurrent_batches
        ),
        partial_completion_threshold=checked.get(
            "partial_completion_threshold", settings.partial_completion_threshold
        ),
        enable_stability_checking=checked.get(
            "enable_stability_checking", settings.enable_stability_checking
        ),
        stability_threshold=checked.get("stability_threshold", settings.stability_threshold),
        min_iterations_for_stability=settings.min_iterations_for_stability,
        max_comparisons=min(caps),
        matchings_per_iteration=settings.matchings_per_iteration,
        failed_comparison_retry_threshold=settings.failed_comparison_retry_threshold,
        max_retry_attempts=settings.max_retry_attempts,
        min_success_rate=settings.min_success_rate,
        pairing_strategy=settings.pairing_strategy,
        target_reliability=settings.target_reliability,
        target_mean_standard_error=settings.target_mean_standard_error,
        min_reliability_to_stop_early=settings.min_reliability_to_stop_early,
    )
