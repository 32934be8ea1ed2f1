"""Through the command line, as an operator runs it: `migrate`, `serve` and `provider` as
separate processes, `submit --wait` as the pipeline."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import OutcomeWatcher
from cj_assessment.samples import load_sample_essays
from cj_assessment.settings import child_environment
from cj_assessment.simulated_judge import latent_quality
from tests.support.harness import system_settings
from tests.support.processes import CLI, http_get, wait_http


def _env(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return child_environment(
        settings,
        CJ_PROVIDER_LATENCY_MEDIAN_MS="20",
        CJ_PROVIDER_SEED="5",
        CJ_PROVIDER_GROUP_ID=f"{settings.kafka_consumer_group}-provider",
    )


@pytest.mark.slow
async def test_cli_ranks_twenty_essays_once_through_separate_processes(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, http_port=free_port())
    env = _env(settings)
    essays = dict(list(load_sample_essays().items())[:20])
    folder = tmp_path / "essays"
    folder.mkdir()
    for essay_id, body in essays.items():
        (folder / f"{essay_id}.txt").write_text(body, encoding="utf-8")

    migrated = subprocess.run([*CLI, "migrate"], env=env, capture_output=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr.decode()

    logs = tmp_path / "logs"
    logs.mkdir()
    serve = subprocess.Popen(
        [*CLI, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=(logs / "serve.log").open("w")
    )
    provider = subprocess.Popen(
        [*CLI, "provider", "--backend", "simulated"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(logs / "provider.log").open("w"),
    )
    watcher = OutcomeWatcher(settings)
    await watcher.start()
    try:
        assert wait_http(settings.http_port, "/healthz", 30) == 200
        assert wait_http(settings.http_port, "/readyz", 30) == 200
        submitted = subprocess.run(
            [*CLI, "submit", str(folder), "--batch-id", "cli-e2e", "--wait", "--timeout", "120"],
            env=env,
            capture_output=True,
            timeout=180,
        )
        assert submitted.returncode == 0, submitted.stderr.decode()[-2000:]
        printed = submitted.stdout.decode()
        assert "reliability" in printed and "cli-e2e" in printed

        outcomes = await watcher.wait_for(["cli-e2e"], timeout=30, settle=2.0)
        assert len(watcher.outcomes_for("cli-e2e")) == 1
        metrics = http_get(settings.http_port, "/metrics")
        assert 'cj_assessments_total{outcome="completed"} 1.0' in metrics
        assert "cj_comparisons_succeeded_total" in metrics
        # The overhead between iterations, as production sees it: one close per iteration.
        closes = re.search(r"^cj_iteration_close_seconds_count (\S+)$", metrics, re.MULTILINE)
        assert closes is not None and float(closes.group(1)) >= 1
        assert 'cj_computation_seconds_count{place="event_loop",step="scoring"}' in metrics
    finally:
        await watcher.stop()
        for process in (serve, provider):
            process.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=40) for p in (serve, provider)]
    assert codes == [0, 0], [(logs / f).read_text()[-2000:] for f in ("serve.log", "provider.log")]

    data = outcomes["cli-e2e"]["data"]
    ranked = [r["els_essay_id"] for r in data["rankings"]]
    assert sorted(ranked) == sorted(essays)
    assert len(ranked) == len(set(ranked)) == 20
    rho = spearmanr(
        [r["score"] for r in data["rankings"]], [latent_quality(essays[e]) for e in ranked]
    ).statistic
    assert rho >= 0.8, rho
    serve_log = (logs / "serve.log").read_text()
    for body in essays.values():
        assert body[:60] not in serve_log


def test_cli_is_installed_as_a_console_script() -> None:
    assert shutil.which("cj-assessment") or Path(sys.executable).with_name("cj-assessment").exists()


@pytest.mark.parametrize("unreachable", ["database", "broker"])
def test_serve_without_its_database_or_broker_exits_1_with_one_clear_line(
    unreachable: str, kafka_bootstrap: str, database_url: str
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    settings = system_settings(
        closed if unreachable == "broker" else kafka_bootstrap,
        database_url.replace(database_url.split("@")[1].split("/")[0], closed)
        if unreachable == "database"
        else database_url,
    )
    served = subprocess.run([*CLI, "serve"], env=_env(settings), capture_output=True, timeout=90)
    stderr = served.stderr.decode()
    assert served.returncode == 1, stderr[-2000:]
    assert f"{unreachable} " in stderr and "unreachable" in stderr
    assert "Traceback" not in stderr


def test_migrate_without_its_database_names_it_as_serve_does_without_the_password() -> None:
    url = f"postgresql+asyncpg://cj:s3cret@127.0.0.1:{free_port()}/cj_assessment"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CJ_")},
        "CJ_DATABASE_URL": url,
    }
    run = subprocess.run([*CLI, "migrate"], env=env, capture_output=True, timeout=60)
    stderr = run.stderr.decode()
    assert run.returncode == 1, stderr[-2000:]
    assert stderr.startswith(f"cj-assessment migrate: database {url.replace('s3cret', '***')}")
    assert "s3cret" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("command", ["serve", "migrate", "demo"])
def test_a_setting_out_of_its_range_stops_the_command_with_one_line_per_setting(
    command: str,
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CJ_")},
        "CJ_LLM_DEFAULT_TEMPERATURE": "2.5",
        "CJ_LOG_LEVEL": "verbose",
    }
    served = subprocess.run([*CLI, command], env=env, capture_output=True, timeout=60)
    stderr = served.stderr.decode()
    assert served.returncode == 2, stderr[-2000:]
    # Refused before anything starts: the demo brings up no broker or database first.
    assert served.stdout == b""
    assert stderr.splitlines() == [
        "cj-assessment: invalid setting CJ_LLM_DEFAULT_TEMPERATURE:"
        " Input should be less than or equal to 2",
        "cj-assessment: invalid setting CJ_LOG_LEVEL:"
        " Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
    ]


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("CJ_PROVIDER_ERROR_RATE=2", "CJ_PROVIDER_ERROR_RATE must be within [0, 1], got 2.0"),
        ("CJ_PROVIDER_SLOTS=many", "CJ_PROVIDER_SLOTS must be an integer, got 'many'"),
        ("CJ_PROVIDER_SLOTS=noise", "CJ_PROVIDER_SLOTS must be an integer, got 'noise'"),
    ],
)
def test_a_bad_provider_setting_stops_the_provider_with_one_line_naming_it(
    setting: str, line: str
) -> None:
    name, value = setting.split("=")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CJ_")}, name: value}
    run = subprocess.run([*CLI, "provider"], env=env, capture_output=True, timeout=60)
    stderr = run.stderr.decode()
    assert run.returncode == 2, stderr[-2000:]
    assert stderr.splitlines() == [f"cj-assessment provider: invalid setting: {line}"]


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_migrations_missing_where_configured_stop_the_command_with_exit_2_and_one_line(
    command: str, kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, alembic_dir=str(tmp_path))
    run = subprocess.run([*CLI, command], env=_env(settings), capture_output=True, timeout=90)
    stderr = run.stderr.decode()
    assert run.returncode == 2, stderr[-2000:]
    assert stderr.splitlines() == [
        f"cj-assessment {command}: no alembic/ directory with the migrations:"
        f" CJ_ALEMBIC_DIR={str(tmp_path)!r} holds no env.py"
    ]
