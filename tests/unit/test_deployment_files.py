"""Static checks of the deployment files (no Docker needed).

Dockerfile, docker-compose.yml, deploy/prometheus.yml and .env.example cannot be exercised in the
unit suite, so these tests pin the wiring that matters: which image and roles Kafka runs with,
that the service only starts after the migration, that every app container talks to the compose
services (not localhost), that the image runs as non-root with the `cj-assessment` entry point,
and that `.env.example` documents every field of `Settings` with its real default.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from cj_assessment.settings import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
ENV_EXAMPLE = ROOT / ".env.example"

APP_SERVICES = ("migrate", "cj_assessment", "llm_provider")
CLI_SUBCOMMANDS = {"migrate", "serve", "provider", "demo", "submit"}

# Variables of the reference provider worker: documented in .env.example, but not Settings
# fields. Read from its source, so that a new one cannot go undocumented.
PROVIDER_VARIABLES = set(
    re.findall(
        r"CJ_PROVIDER_[A-Z_]+",
        (ROOT / "src" / "cj_assessment" / "llm_provider.py").read_text(encoding="utf-8"),
    )
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)  # SafeLoader resolves the `<<:` merge keys, as compose does
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of compose's two syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {k: (v[0] if v else "") for k, *v in pairs}
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition} (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def _env_example_entries() -> dict[str, str | None]:
    """Variables named in .env.example: {name: value}; None for commented-out entries."""
    entries: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        active = re.match(r"^\s*(CJ_[A-Z0-9_]+)=(.*)$", line)
        if active:
            entries[active.group(1)] = active.group(2).strip()
            continue
        commented = re.match(r"^\s*#\s*(CJ_[A-Z0-9_]+)=\s*$", line)
        if commented:
            entries.setdefault(commented.group(1), None)
    return entries


def _settings_variables() -> dict[str, str]:
    return {f"CJ_{name.upper()}": name for name in Settings.model_fields}


# --------------------------------------------------------------------------- compose


def test_compose_has_all_services(compose: dict[str, Any]) -> None:
    expected = {"kafka", "postgres", "migrate", "cj_assessment", "llm_provider", "prometheus"}
    assert expected <= set(compose["services"])


def test_kafka_is_single_node_kraft(compose: dict[str, Any]) -> None:
    kafka = _service(compose, "kafka")
    assert str(kafka["image"]).startswith("apache/kafka:")
    env = _environment(kafka)

    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}

    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    assert "kafka:9092" in advertised
    assert "localhost" not in advertised  # other containers must be able to reach it

    listeners = env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://:9092" in listeners and "CONTROLLER://:9093" in listeners
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    protocol_map = dict(
        p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert protocol_map["CONTROLLER"] == "PLAINTEXT" and protocol_map["PLAINTEXT"] == "PLAINTEXT"
    # One broker: internal topics cannot have more replicas than that.
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"

    healthcheck = " ".join(map(str, kafka["healthcheck"]["test"]))
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in healthcheck
    assert "localhost:9092" in healthcheck


def test_postgres_service(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    assert str(postgres["image"]).split(":")[0] == "postgres"
    env = _environment(postgres)
    assert env["POSTGRES_DB"] == "cj_assessment"
    assert env["POSTGRES_USER"] == "postgres"
    assert "POSTGRES_PASSWORD" in env
    healthcheck = " ".join(map(str, postgres["healthcheck"]["test"]))
    assert "pg_isready" in healthcheck
    named_volumes = set(compose.get("volumes") or {})
    mounts = [str(v).split(":")[0] for v in postgres.get("volumes") or []]
    assert any(m in named_volumes for m in mounts), "postgres data should live in a named volume"


def test_app_services_build_this_repository(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        service = _service(compose, name)
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context in (".", "./"), f"{name} should be built from the repository root"
        command = _command(service)
        assert command and command[0] in CLI_SUBCOMMANDS, f"{name}: unknown command {command}"


def test_migrate_runs_once_against_postgres(compose: dict[str, Any]) -> None:
    migrate = _service(compose, "migrate")
    assert _command(migrate) == ["migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    # Tried again only after a failure: a restart after success would run it forever.
    assert str(migrate.get("restart", "no")).split(":")[0] in ("no", "on-failure")
    assert "@postgres:5432/" in _environment(migrate)["CJ_DATABASE_URL"]


def test_postgres_counts_as_healthy_only_once_it_accepts_tcp(compose: dict[str, Any]) -> None:
    check = " ".join(_service(compose, "postgres")["healthcheck"]["test"])
    assert "pg_isready" in check
    assert "-h 127.0.0.1" in check


def test_service_serves_after_migration(compose: dict[str, Any]) -> None:
    service = _service(compose, "cj_assessment")
    assert _command(service) == ["serve"]
    deps = _depends_on(service)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("kafka") == "service_healthy"
    assert deps.get("postgres") == "service_healthy"

    env = _environment(service)
    assert env["CJ_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["CJ_DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/cj_assessment" in env["CJ_DATABASE_URL"]
    assert env["CJ_HTTP_PORT"] == "9095"
    assert any(str(p).endswith("9095:9095") for p in service.get("ports") or [])
    healthcheck = " ".join(map(str, service["healthcheck"]["test"]))
    assert "localhost:9095/healthz" in healthcheck


def test_provider_uses_the_compose_broker(compose: dict[str, Any]) -> None:
    provider = _service(compose, "llm_provider")
    command = _command(provider)
    assert command[0] == "provider"
    assert "--backend" in command and command[command.index("--backend") + 1] == "simulated"
    assert _depends_on(provider).get("kafka") == "service_healthy"
    assert "cj_assessment" in _depends_on(provider)
    assert _environment(provider)["CJ_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_app_services_never_point_at_localhost(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = _environment(_service(compose, name))
        for var in ("CJ_KAFKA_BOOTSTRAP_SERVERS", "CJ_DATABASE_URL"):
            if var in env:
                assert "localhost" not in env[var] and "127.0.0.1" not in env[var], (name, var)


def test_app_service_environment_names_real_settings(compose: dict[str, Any]) -> None:
    known = set(_settings_variables()) | PROVIDER_VARIABLES
    for name in APP_SERVICES:
        unknown = {v for v in _environment(_service(compose, name)) if v.startswith("CJ_")} - known
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"


def test_prometheus_mounts_the_repository_config(compose: dict[str, Any]) -> None:
    prometheus = _service(compose, "prometheus")
    assert str(prometheus["image"]).startswith("prom/prometheus")
    mounts = [str(v) for v in prometheus.get("volumes") or []]
    assert any(
        m.startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml") for m in mounts
    )


# --------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_the_service() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["cj_assessment"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "cj_assessment:9095" in targets


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_slim_python() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "python:3.11-slim" in text


def test_dockerfile_runs_as_non_root() -> None:
    final = _final_stage(_dockerfile_instructions())
    users = [args for ins, args in final if ins == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_entrypoint_and_port() -> None:
    final = _final_stage(_dockerfile_instructions())
    entrypoints = [args for ins, args in final if ins == "ENTRYPOINT"]
    assert entrypoints and "cj-assessment" in entrypoints[-1]
    cmds = [args for ins, args in final if ins == "CMD"]
    assert cmds and "serve" in cmds[-1]
    assert any("9095" in args for ins, args in final if ins == "EXPOSE")
    workdirs = [args for ins, args in final if ins == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"


def test_dockerfile_ships_the_migrations() -> None:
    final = _final_stage(_dockerfile_instructions())
    copies = " ".join(args for ins, args in final if ins == "COPY")
    assert "alembic.ini" in copies
    assert re.search(r"\balembic/?\s", copies + " ")


def test_dockerfile_copy_sources_exist() -> None:
    """Every local path the Dockerfile COPYs must exist, or `docker build` fails."""
    missing = []
    for ins, args in _dockerfile_instructions():
        if ins != "COPY" or "--from=" in args:
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            if not (ROOT / source).exists():
                missing.append(source)
    assert not missing, f"Dockerfile copies paths that do not exist: {missing}"


# --------------------------------------------------------------------------- .env.example


def test_env_example_documents_every_setting() -> None:
    documented = set(_env_example_entries())
    missing = sorted(set(_settings_variables()) - documented)
    assert not missing, f".env.example does not document: {missing}"


def test_env_example_has_no_stale_variables() -> None:
    documented = set(_env_example_entries())
    stale = sorted(documented - set(_settings_variables()) - PROVIDER_VARIABLES)
    assert not stale, f".env.example names variables no setting reads: {stale}"


def test_env_example_documents_the_provider_variables() -> None:
    missing = sorted(PROVIDER_VARIABLES - set(_env_example_entries()))
    assert not missing, f".env.example does not document: {missing}"


def test_env_example_shows_the_real_defaults() -> None:
    entries = _env_example_entries()
    wrong = []
    for var, field_name in _settings_variables().items():
        if var not in entries:
            continue  # reported by test_env_example_documents_every_setting
        field = Settings.model_fields[field_name]
        default = field.get_default(call_default_factory=True)
        value = entries[var]
        if value is None:  # commented out: only right for a default of none
            if default is not None:
                wrong.append(f"{var} is commented out but defaults to {default!r}")
            continue
        assert field.annotation is not None
        parsed = TypeAdapter(field.annotation).validate_python(value)
        if parsed != default:
            wrong.append(f"{var}={value} but the default is {default!r}")
    assert not wrong, "\n".join(wrong)
