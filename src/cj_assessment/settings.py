"""Service settings: defaults in code, overridden by `CJ_*` environment variables.

Settings are built once at start-up (`Settings()`) and handed to whoever needs them;
nothing in the package reads the environment at import time.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CJ_", extra="ignore")

    # Kafka
    kafka_bootstrap_servers: str = Field("localhost:9092", description="Kafka bootstrap servers")
    kafka_consumer_group: str = Field("cj_assessment_consumer_group", description="Consumer group")
    kafka_enable_idempotence: bool = Field(
        True, description="Idempotent producer; set false for the embedded Tansu broker"
    )
    kafka_topic_partitions: int = Field(
        6, ge=1, description="Partitions for topics the service creates when missing"
    )
    kafka_topic_replication_factor: int = Field(
        1,
        ge=1,
        description="Replicas of topics the service creates when missing (3 on a production"
        " cluster; 1 for a single broker)",
    )
    kafka_max_poll_records: int = Field(
        2000, ge=1, description="Records fetched per poll (a poll's results are handled together)"
    )
    kafka_max_message_bytes: int = Field(
        1_048_576,
        ge=65_536,
        description="Largest record the broker takes (its message.max.bytes); larger outbox"
        " rows are set aside as undeliverable instead of blocking the relay",
    )
    kafka_fetch_min_bytes: int = Field(
        262_144, ge=1, description="Bytes the broker gathers for a fetch before answering"
    )
    kafka_fetch_max_wait_ms: int = Field(
        20, ge=0, description="Longest the broker waits to gather fetch_min_bytes"
    )
    kafka_operation_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest one offset commit may take (past it, the next one carries it),"
        " or a dead-letter copy may wait to be queued (then it is queued again)",
    )
    consumer_commit_stall_seconds: float = Field(
        300.0,
        gt=0,
        description="Handled records whose offsets could not be committed for this long stop"
        " the service with exit status 1, for its supervisor to restart it",
    )
    shutdown_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="After SIGTERM, serve exits within about this long, even with the broker"
        " or the database away (one deadline for the consumer, the relay and the producer)",
    )
    gc_young_threshold: int = Field(
        10_000,
        ge=0,
        description="Allocations between young-generation garbage collections (Python's"
        " default is 700; 0 keeps it)",
    )
    consumer_result_transactions: int = Field(
        2,
        ge=1,
        le=8,
        description="Concurrent transactions a poll's results are split into, by assessment,"
        " and the most that run at a time (1: one transaction per poll); as many requests of"
        " different batches, and as many large assessments' transactions, run beside them",
    )
    consumer_batch_transactions: bool = Field(
        True, description="Handle a poll's results in one transaction (false: one per record)"
    )

    # Topics (CONTRACT §2)
    topic_assessment_requested: str = "huleedu.els.cj_assessment.requested.v1"
    topic_llm_comparison_request: str = "huleedu.llm_provider.comparison_request.v1"
    topic_llm_comparison_result: str = "huleedu.llm_provider.comparison_result.v1"
    topic_assessment_completed: str = "huleedu.cj_assessment.completed.v1"
    topic_assessment_failed: str = "huleedu.cj_assessment.failed.v1"

    # Database
    database_url: str = Field(
        "postgresql+asyncpg://postgres@localhost:5432/cj_assessment",
        description="SQLAlchemy async URL of the service's PostgreSQL database",
    )
    database_pool_size: int = Field(10, ge=1, description="Connection pool size")
    alembic_dir: str | None = Field(
        None,
        description="The migrations' alembic/ directory; unset: the source tree's, else the"
        " working directory's",
    )
    database_connect_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for a new database connection to open"
    )
    database_lock_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest a statement waits for a row or table lock before its transaction"
        " is retried (PostgreSQL lock_timeout)",
    )
    database_idle_in_transaction_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="A session idle this long inside a transaction is ended by PostgreSQL,"
        " releasing its locks (idle_in_transaction_session_timeout; 0: never)",
    )

    # Content Service
    content_service_url: str = Field(
        "http://content_service:8000/v1/content",
        description="Base URL; essay text is fetched with GET {url}/{text_storage_id}",
    )
    content_fetch_timeout_seconds: float = Field(5.0, gt=0, description="Per-attempt timeout")
    content_fetch_attempts: int = Field(3, ge=1, description="Attempts before the fetch fails")
    content_fetch_concurrency: int = Field(
        8, ge=1, le=64, description="Texts of one request fetched at once (1-64)"
    )

    # HTTP
    http_host: str = Field("0.0.0.0", description="Address of the health/metrics server")
    http_port: int = Field(9095, description="Port of /healthz, /readyz and /metrics")

    # Input limits
    max_essays: int = Field(2000, ge=2, description="Most essays one assessment may hold")
    max_essay_chars: int = Field(50_000, ge=1, description="Longest essay text accepted")
    # Every comparison request carries the instructions with two essays; with both capped, a
    # request stays well under Kafka's default 1 MB message limit even fully JSON-escaped.
    max_instructions_chars: int = Field(
        20_000, ge=1, description="Longest essay_instructions accepted"
    )

    # Batch processing (defaults; per-request batch_config_overrides win)
    batch_size: int = Field(50, ge=10, le=200, description="Comparisons per submission batch")
    max_concurrent_batches: int = Field(
        3, ge=1, le=5, description="Submission batches in flight per assessment"
    )
    partial_completion_threshold: float = Field(
        0.85, ge=0.5, le=1.0, description="Resolved share that completes an iteration"
    )
    failed_comparison_retry_threshold: int = Field(
        20, ge=1, description="Retryable pool entries that trigger a retry batch"
    )
    max_retry_attempts: int = Field(
        3, ge=0, description="Retries before a comparison fails for good"
    )
    min_success_rate: float = Field(
        0.8, ge=0.0, le=1.0, description="Successful share below which an assessment fails"
    )
    enable_stability_checking: bool = Field(True, description="Stop early once scores are stable")
    stability_threshold: float = Field(
        0.05, gt=0, description="Largest score change between iterations that counts as stable"
    )
    min_iterations_for_stability: int = Field(2, ge=1, description="Iterations before stability")
    min_reliability_to_stop_early: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Stability and the standard-error target end an assessment only once the"
        " calibrated reliability is at least this",
    )
    comparisons_per_essay: int = Field(
        10, ge=1, description="Default comparison budget per essay (budget = this x essays)"
    )
    matchings_per_iteration: int = Field(
        5, ge=1, description="Rounds (each pairs every essay at most once) per iteration"
    )
    callback_wait_timeout_seconds: float = Field(
        300.0, gt=0, description="A comparison outstanding longer than this counts as failed"
    )
    batch_timeout_seconds: float = Field(
        600.0, gt=0, description="An assessment idle this long is driven on by the monitor"
    )
    monitor_interval_seconds: float = Field(30.0, gt=0, description="How often the monitor runs")
    pairing_strategy: Literal["random", "adaptive"] = Field(
        "adaptive",
        description="Pairs after the first iteration: random, or adaptive (most informative)",
    )
    target_reliability: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Stop once the calibrated reliability's lower bound reaches this",
    )
    target_mean_standard_error: float | None = Field(
        None, gt=0, description="Stop once the mean standard error of the scores is this or less"
    )

    # Outbox relay
    outbox_poll_interval_seconds: float = Field(0.5, gt=0, description="Relay idle poll interval")
    outbox_batch_size: int = Field(500, ge=1, description="Rows the relay publishes per round")
    outbox_retention_seconds: float = Field(
        3600.0,
        ge=0,
        description="Published outbox rows older than this are deleted by the monitor (0 keeps)",
    )
    inbox_retention_seconds: float = Field(
        7 * 86400.0,
        ge=0,
        description="Inbox rows (handled event ids) older than this are deleted (0 keeps)",
    )
    unmatched_retention_seconds: float = Field(
        7 * 86400.0,
        ge=0,
        description="Stored unmatched results older than this are deleted (0 keeps)",
    )
    text_retention_seconds: float = Field(
        0.0,
        ge=0,
        description="Essay texts, instructions and justifications of assessments finished this"
        " long ago are erased; ids, judgements and scores stay (0 keeps)",
    )

    # LLM defaults forwarded to the provider
    # Bounded as a request's own overrides are (CONTRACT §4): every request inherits these,
    # so a value the contract refuses would fail each comparison request the service builds.
    llm_default_provider: str | None = Field(
        None, max_length=255, description="Provider when not overridden (at most 255 characters)"
    )
    llm_default_model: str | None = Field(
        None, max_length=255, description="Model when not overridden (at most 255 characters)"
    )
    llm_default_temperature: float | None = Field(
        0.1, ge=0.0, le=2.0, description="Temperature when not overridden (0-2)"
    )
    llm_default_max_tokens: int | None = Field(
        512, ge=1, description="Max tokens when not overridden (>= 1)"
    )

    # Operations
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
    ] = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_json: bool = Field(True, description="JSON logs (false: human-readable console logs)")
    fault_kill_after_db_commit: bool = Field(
        False, description="Test hook: exit abruptly after a handler's commit, before the offset"
    )
    fault_kill_after_relay_ack: bool = Field(
        False, description="Test hook: exit abruptly after the broker acked, before marking rows"
    )


def environment_of(settings: Settings, **extra: str) -> dict[str, str]:
    """The `CJ_*` variables that reproduce `settings` in a child process (demo, tests,
    benchmarks start `cj-assessment` commands this way)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[f"CJ_{name.upper()}"] = text
    env.update(extra)
    return env


def child_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The whole environment of a child `cj-assessment` process: this process's variables
    except its own `CJ_*` ones, which `environment_of(settings, **extra)` replaces."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CJ_")}
    return {**inherited, **environment_of(settings, **extra)}
